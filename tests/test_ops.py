"""Every bucket op of the kernel backends equals the "torch" backend (spec.py, the specification).

The reductions (sq_norm here, xsam_dots in tests/test_ops_xsam.py) are held, on every backend the
the spec included, to an error bound around their exact (fp64) sum, and must be exact where every
partial sum is (small integers): torch's own fp32 dot differs by CPU and BLAS. The inputs cover
what the kernels treat apart: empty and one-element buckets, sizes around the
16-element vector width, a bucket over a million elements (many reduction chunks, several
threads), views at an odd offset (pointers not 16-byte aligned), several buckets in one call,
gradients that are zero, tiny, huge or not finite, the adaptive form and the LE-SAM+ combine.
GPU backends run the same tests on CUDA tensors (marked ``cuda``, skipped without a GPU).
"""

import math

import pytest
import torch
from helpers.asserts import assert_bits_equal, assert_close, assert_sum_close
from helpers.op_cases import (
    DTYPES,
    LESAM,
    OFFSETS,
    RADII,
    REDUCTION_TARGETS,
    REGIMES,
    TRACEABLE,
    assert_same_bits_with_any_thread_count,
    clone_at,
    exact_sum,
    integer_bucket,
    largest_size,
    random_bucket,
    sq_parts,
    sq_terms,
    summation_depth,
    targets,
    targets_and_sizes,
)

from fused_lesam import maths
from fused_lesam.backends import resolve, spec


def run_perturb(ops, w, g, sq, radius, adaptive, with_center, offset, sigma_t=None):
    """Run ops.perturb_ on fresh copies (at ``offset``); returns (param, backup, center, rho)."""
    param, grad = clone_at(w, offset), clone_at(g, offset)
    backup = clone_at(torch.full_like(w, 7.0), offset)  # garbage the op must overwrite
    center = clone_at(torch.full_like(w, 7.0), offset) if with_center else None
    rho = ops.perturb_(param, grad, backup, sq.clone(), *radius, adaptive, center, sigma_t)
    assert_bits_equal(grad, g, "perturb_ must not write the gradient")
    return param, backup, center, rho


@pytest.mark.parametrize("backend,device,size", targets_and_sizes(REDUCTION_TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sq_norm(backend, device, dtype, size, offset, adaptive):
    ops = resolve(backend, torch.device(device))
    grad = random_bucket(size, dtype, device, seed=1, offset=offset)
    weight = random_bucket(size, dtype, device, seed=2, offset=offset) if adaptive else None
    got = ops.sq_norm([grad], [weight])
    assert got.shape == () and got.dtype == maths.acc_dtype(dtype) and got.device == grad.device
    assert_sum_close(got, sq_parts([grad], [weight]), summation_depth(backend, [size]))


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sq_norm_counts_every_element(backend, device, dtype, adaptive):
    """Exact where every partial sum is: an element missed or counted twice (a chunk's or a lane's
    tail, an unaligned head) changes the result, which rounding cannot hide."""
    ops = resolve(backend, torch.device(device))
    size = largest_size(backend, device)
    grads = [integer_bucket(size, dtype, device, seed=60, offset=3), integer_bucket(37, dtype, device, seed=61)]
    weights = [integer_bucket(size, dtype, device, seed=62, offset=3) if adaptive else None, None]
    assert ops.sq_norm(grads, weights).item() == exact_sum(sq_parts(grads, weights))


@pytest.mark.parametrize("backend,device,size", [t for t in targets_and_sizes() if t.values[2] > 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sum_bound_notices_a_missing_term(backend, device, size, dtype):
    """The kernels' bound is tight enough that a sum without the bucket's largest term fails it."""
    ops = resolve(backend, torch.device(device))
    grad = random_bucket(size, dtype, device, seed=1)
    terms = sq_terms(grad, None)
    without_largest = torch.cat([terms[: terms.argmax()], terms[terms.argmax() + 1 :]])
    got = ops.sq_norm([grad], [None])
    assert_sum_close(got, [(terms, torch.float32)], summation_depth(backend, [size]))
    with pytest.raises(AssertionError, match="over the bound"):
        assert_sum_close(got, [(without_largest, torch.float32)], summation_depth(backend, [size]))


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
def test_sq_norm_sums_several_buckets(backend, device):
    ops = resolve(backend, torch.device(device))
    specs = [
        (torch.float32, 17, 3, False),
        (torch.bfloat16, 4095, 0, True),
        (torch.float16, 16, 1, False),
        (torch.float32, 0, 0, True),
        (torch.float32, 70001, 5, True),
    ]
    grads = [random_bucket(n, dt, device, seed=i, offset=off) for i, (dt, n, off, _) in enumerate(specs)]
    weights = [
        random_bucket(n, dt, device, seed=10 + i) if adaptive else None for i, (dt, n, _, adaptive) in enumerate(specs)
    ]
    got = ops.sq_norm(grads, weights)
    assert got.dtype == torch.float32
    assert_sum_close(got, sq_parts(grads, weights), summation_depth(backend, [n for _, n, _, _ in specs]))
    # A float64 bucket makes the whole sum float64 (the float32 buckets' parts stay float32-accurate).
    grads.append(random_bucket(33, torch.float64, device, seed=99))
    weights.append(None)
    got = ops.sq_norm(grads, weights)
    assert got.dtype == torch.float64
    assert_sum_close(got, sq_parts(grads, weights), summation_depth(backend, [g.numel() for g in grads]))


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
@pytest.mark.parametrize("regime", ["nan", "inf", "huge", "tiny", "zero"])
def test_sq_norm_of_extreme_gradients(backend, device, regime):
    ops = resolve(backend, torch.device(device))
    grads = [
        random_bucket(5000, torch.float32, device, seed=3, regime=regime),
        random_bucket(40, torch.bfloat16, device, seed=4),
    ]
    got = ops.sq_norm(grads, [None, None])
    if regime in ("nan", "inf"):
        assert torch.isnan(got) if regime == "nan" else torch.isinf(got)
    else:
        assert_sum_close(got, sq_parts(grads, [None, None]), summation_depth(backend, [5000, 40]))


@pytest.mark.parametrize("backend,device", targets())
def test_sq_norm_is_deterministic(backend, device):
    """Fixed reduction chunks: the same bits on every run, whatever the number of CPU threads."""
    ops = resolve(backend, torch.device(device))
    grads = [
        random_bucket(largest_size(backend, device), torch.float32, device, seed=5),
        random_bucket(999, torch.float16, device, seed=6),
    ]
    assert_same_bits_with_any_thread_count(lambda: ops.sq_norm(grads, [None, grads[1]]))


@pytest.mark.parametrize("backend,device,size", targets_and_sizes())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb(backend, device, dtype, size, offset, adaptive):
    ops = resolve(backend, torch.device(device))
    w = random_bucket(size, dtype, device, seed=7)
    g = random_bucket(size, dtype, device, seed=8)
    sq = spec.sq_norm([g], [w if adaptive else None])
    got = run_perturb(ops, w, g, sq, LESAM, adaptive, True, offset)
    want = run_perturb(spec, w, g, sq, LESAM, adaptive, True, offset)
    check_perturb(got, want, w, g)


def check_perturb(got, want, w, g):
    (param, backup, center, rho), (ref_param, _, _, ref_rho) = got, want
    assert_bits_equal(backup, w, "the backup must be an exact copy of w")
    if center is not None:
        assert_bits_equal(center, g, "the center must be an exact copy of g")
    assert rho.shape == () and rho.dtype == ref_rho.dtype
    assert_close(rho, ref_rho)
    assert_close(param, ref_param)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
def test_perturb_gradient_regimes(backend, device, dtype, regime, adaptive, with_center):
    ops = resolve(backend, torch.device(device))
    w = random_bucket(4099, dtype, device, seed=9)
    g = random_bucket(4099, dtype, device, seed=10, regime=regime)
    sq = spec.sq_norm([g], [w if adaptive else None])
    got = run_perturb(ops, w, g, sq, LESAM, adaptive, with_center, offset=3)
    check_perturb(got, run_perturb(spec, w, g, sq, LESAM, adaptive, with_center, offset=3), w, g)
    param, _, _, rho = got
    assert torch.isfinite(param).all(), "a non-finite value reached the parameters"
    if regime in ("zero", "nan", "inf") or not torch.isfinite(sq):
        assert_bits_equal(param, w, "no perturbation for a zero or non-finite norm")
    if not torch.isfinite(sq):
        assert rho.item() == 0.0


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("radius", list(RADII))
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_radius(backend, device, radius, adaptive):
    """The back-solve on the device: unclipped, clipped at rho_max, SAM's fixed radius, sigma = 0."""
    ops = resolve(backend, torch.device(device))
    w = random_bucket(1000, torch.float32, device, seed=11)
    g = random_bucket(1000, torch.float32, device, seed=12)
    sq = spec.sq_norm([g], [w if adaptive else None])
    got = run_perturb(ops, w, g, sq, RADII[radius], adaptive, False, offset=0)
    check_perturb(got, run_perturb(spec, w, g, sq, RADII[radius], adaptive, False, offset=0), w, g)
    sigma, rho_max, varrho = RADII[radius]
    expected_rho = min(sigma / (sq.sqrt().item() + varrho), rho_max)
    assert got[3].item() == pytest.approx(expected_rho, rel=1e-6)
    # The perturbation has length rho_t (in the ||T^-1 eps|| sense when adaptive, as in ASAM).
    eps = (got[0] - w).double()
    length = (eps / w.double().abs()).norm() if adaptive else eps.norm()
    assert length.item() == pytest.approx(expected_rho, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("case", ["nan-sigma", "zero-over-zero"])
def test_a_nan_radius_is_the_specs_on_every_backend(backend, device, case):
    """A NaN radius (reachable through the ops only: the optimizers refuse a NaN sigma and a
    varrho of 0) propagates as torch.clamp propagates it in the spec, on every backend: a NaN sigma
    gives rho_t = NaN and a NaN perturbation; 0 / (0 + 0) at a zero gradient gives rho_t = NaN and
    leaves w as it was (the scale of a zero norm is 0). The kernels once clipped NaN to rho_max."""
    ops = resolve(backend, torch.device(device))
    w = random_bucket(1000, torch.float32, device, seed=18)
    if case == "nan-sigma":
        g, radius = random_bucket(1000, torch.float32, device, seed=19), (math.nan, 0.5, 1e-12)
    else:
        g, radius = torch.zeros_like(w), (0.0, 0.5, 0.0)
    sq = spec.sq_norm([g], [None])
    got, want = (
        run_perturb(ops, w, g, sq, radius, False, False, offset=0),
        run_perturb(spec, w, g, sq, radius, False, False, offset=0),
    )
    assert math.isnan(want[3].item())
    assert math.isnan(got[3].item()), f"rho_t = {got[3].item()}, the spec's is NaN"
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    if case == "zero-over-zero":
        assert_bits_equal(got[0], w, "a zero gradient must leave w as it was")


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("radius", list(RADII))
def test_perturb_reads_sigma_from_the_device(backend, device, dtype, radius):
    """sigma_t (a 0-d float64 device tensor, what the capturable schedule passes) replaces the
    float sigma, which is set to a wrong value here: the same bits as the float path."""
    ops = resolve(backend, torch.device(device))
    w = random_bucket(3000, dtype, device, seed=16)
    g = random_bucket(3000, dtype, device, seed=17)
    sq = spec.sq_norm([g], [None])
    sigma, rho_max, varrho = RADII[radius]
    want = run_perturb(ops, w, g, sq, (sigma, rho_max, varrho), False, True, offset=0)
    sigma_t = torch.tensor(sigma, dtype=torch.float64, device=device)
    got = run_perturb(ops, w, g, sq, (123.0, rho_max, varrho), False, True, offset=0, sigma_t=sigma_t)
    for a, b in zip(got, want):
        assert_bits_equal(a, b, "sigma_t must give the bits of the same float sigma")


@pytest.mark.parametrize("backend,device,size", targets_and_sizes())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("coefs", [None, (1.5, 0.5), (1.0, 0.5)], ids=["plain", "lesam-plus", "released"])
def test_restore(backend, device, dtype, size, offset, coefs):
    ops = resolve(backend, torch.device(device))
    backup = random_bucket(size, dtype, device, seed=13)
    ghat = random_bucket(size, dtype, device, seed=14)
    center = random_bucket(size, dtype, device, seed=15) if coefs else None
    ghat_coef, center_coef = coefs or (1.0, 0.0)
    results = []
    for impl in (ops, spec):
        param = clone_at(backup + 1, offset)  # the perturbed weights the op must overwrite
        grad = clone_at(ghat, offset)
        impl.restore_(
            param,
            clone_at(backup, offset),
            grad,
            None if center is None else clone_at(center, offset),
            ghat_coef,
            center_coef,
        )
        results.append((param, grad))
    (param, grad), (_, ref_grad) = results
    assert_bits_equal(param, backup, "the restore must be bit-exact")
    if center is None:
        assert_bits_equal(grad, ghat, "without a center the gradient is left alone")
    else:
        assert_close(grad, ref_grad)


# ---------------------------------------------------------------------- registration
def opcheck_samples(ops, device):
    """(op, args) covering each op's paths: dtypes, adaptive, center or none, several buckets."""
    g32 = random_bucket(300, torch.float32, device, seed=20)
    w32 = random_bucket(300, torch.float32, device, seed=21)
    g16 = random_bucket(40, torch.bfloat16, device, seed=22)
    sq = spec.sq_norm([g32], [None])
    return [
        (ops.sq_norm, ([g32, g16], [None, g16])),
        (ops.sq_norm, ([g32], [w32])),
        (ops.perturb_, (w32.clone(), g32, torch.empty_like(w32), sq, 0.35, 0.4, 1e-12, False, None)),
        (ops.perturb_, (w32.clone(), g32, torch.empty_like(w32), sq, math.inf, 0.05, 1.0, True, torch.empty_like(w32))),
        (ops.perturb_, (g16.clone(), g16, torch.empty_like(g16), sq, 0.35, 0.4, 1e-12, False, None)),
        (
            ops.perturb_,
            (
                w32.clone(),
                g32,
                torch.empty_like(w32),
                sq,
                0.0,
                0.4,
                1e-12,
                False,
                None,
                torch.tensor(0.2, dtype=torch.float64, device=device),
            ),
        ),
        (ops.restore_, (w32.clone(), w32 + 1, g32.clone(), None, 1.0, 0.0)),
        (ops.restore_, (w32.clone(), w32 + 1, g32.clone(), w32, 1.5, 0.5)),
    ]


@pytest.mark.parametrize("backend,device", targets())
def test_opcheck(backend, device):
    """torch.library.opcheck: schema (mutations declared), autograd registration, and (where fake
    tensors can run) the fake kernels and AOT dispatch, what torch.compile goes through."""
    ops = resolve(backend, torch.device(device))
    checks = ("test_schema", "test_autograd_registration")
    if any(t.values[:2] == (backend, device) for t in TRACEABLE):
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in opcheck_samples(ops, device):
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("backend,device", TRACEABLE)
def test_ops_trace_whole_graph(backend, device):
    """The three ops in one torch.compile(fullgraph=True) graph give the eager results."""
    ops = resolve(backend, torch.device(device))

    def sam_ops(param, grad, backup, center, ghat):
        sq = ops.sq_norm([grad], [None])
        rho = ops.perturb_(param, grad, backup, sq, 0.35, 0.4, 1e-12, False, center)
        perturbed = param.clone()
        ops.restore_(param, backup, ghat, center, 1.5, 0.5)
        return rho, perturbed

    def inputs():
        w, g = random_bucket(100, torch.float32, device, seed=30), random_bucket(100, torch.float32, device, seed=31)
        return w, g, torch.empty_like(w), torch.empty_like(w), random_bucket(100, torch.float32, device, seed=32)

    eager_in, compiled_in = inputs(), inputs()
    eager_out = sam_ops(*eager_in)
    compiled_out = torch.compile(sam_ops, fullgraph=True, backend="aot_eager")(*compiled_in)
    for a, b in zip(eager_out + eager_in, compiled_out + compiled_in):
        assert torch.equal(a, b)
