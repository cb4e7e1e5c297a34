"""XSAM's bucket ops (xsam_dots, xsam_restore_, xsam_probe_) and perturb_ without a backup, on every
kernel backend, against the "torch" spec (the dots, on the spec too, against their exact
sums): the same targets, sizes, dtypes and unaligned offsets as tests/test_ops.py, opcheck,
whole-graph tracing (bad input: tests/test_op_errors.py)."""

import math

import pytest
import torch
from helpers.asserts import assert_bits_equal, assert_close, assert_sum_close
from helpers.op_cases import (
    DTYPES,
    LESAM,
    OFFSETS,
    REDUCTION_TARGETS,
    TRACEABLE,
    assert_same_bits_with_any_thread_count,
    clone_at,
    exact_sum,
    integer_bucket,
    largest_size,
    random_bucket,
    summation_depth,
    targets,
    targets_and_sizes,
)

from fused_lesam import maths
from fused_lesam.backends import resolve, spec


def coefs_for(device, dtype=torch.float32):
    return torch.tensor([0.37, -1.25], dtype=dtype, device=device)


def dots_parts(params, backups, grads):
    """The exact terms of the three sums of xsam_dots (fp64), D D, g g and D g with D = w - b, per
    bucket with the dtype it is summed in: three lists for assert_sum_close."""
    parts = ([], [], [])
    for w, b, g in zip(params, backups, grads):
        delta, grad, dtype = w.double() - b.double(), g.double(), maths.acc_dtype(w.dtype)
        for sums, terms in zip(parts, (delta * delta, grad * grad, delta * grad)):
            sums.append((terms, dtype))
    return parts


def assert_dots_close(got, params, backups, grads, backend):
    depth = summation_depth(backend, [w.numel() for w in params])
    for j, (value, parts) in enumerate(zip(got, dots_parts(params, backups, grads))):
        assert_sum_close(value, parts, depth, msg=["D.D", "g.g", "D.g"][j])


@pytest.mark.parametrize("backend,device,size", targets_and_sizes(REDUCTION_TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_xsam_dots(backend, device, dtype, size, offset):
    ops = resolve(backend, torch.device(device))
    w, b, g = (random_bucket(size, dtype, device, seed=s, offset=offset) for s in (40, 41, 42))
    got = ops.xsam_dots([w], [b], [g])
    assert got.shape == (3,) and got.dtype == maths.acc_dtype(dtype) and got.device == w.device
    assert_dots_close(got, [w], [b], [g], backend)


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_xsam_dots_counts_every_element(backend, device, dtype):
    """Exact on small integers (w = b + D, all of them in [-4, 4]): a missed or doubled element
    changes a dot, which rounding cannot hide (see test_ops.test_sq_norm_counts_every_element)."""
    ops = resolve(backend, torch.device(device))
    size = largest_size(backend, device)
    backups = [integer_bucket(size, dtype, device, seed=70, offset=3), integer_bucket(37, dtype, device, seed=71)]
    params = [b + integer_bucket(b.numel(), dtype, device, seed=72 + i) for i, b in enumerate(backups)]
    grads = [integer_bucket(size, dtype, device, seed=74, offset=3), integer_bucket(37, dtype, device, seed=75)]
    got = ops.xsam_dots(params, backups, grads)
    assert got.tolist() == [exact_sum(parts) for parts in dots_parts(params, backups, grads)]


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
def test_xsam_dots_sums_several_buckets(backend, device):
    ops = resolve(backend, torch.device(device))
    specs = [
        (torch.float32, 17, 3),
        (torch.bfloat16, 4095, 0),
        (torch.float16, 16, 1),
        (torch.float32, 0, 0),
        (torch.float32, 70001, 5),
    ]
    buckets = [
        [random_bucket(n, dt, device, seed=10 * i + k, offset=off) for k in range(3)]
        for i, (dt, n, off) in enumerate(specs)
    ]
    params, backups, grads = (list(t) for t in zip(*buckets))
    got = ops.xsam_dots(params, backups, grads)
    assert got.dtype == torch.float32
    assert_dots_close(got, params, backups, grads, backend)
    for bucket_list, seed in zip((params, backups, grads), (97, 98, 99)):
        bucket_list.append(random_bucket(33, torch.float64, device, seed=seed))
    got = ops.xsam_dots(params, backups, grads)
    assert got.dtype == torch.float64
    assert_dots_close(got, params, backups, grads, backend)


@pytest.mark.parametrize("backend,device", targets())
def test_xsam_dots_is_deterministic(backend, device):
    ops = resolve(backend, torch.device(device))
    n = largest_size(backend, device)
    w, b, g = (random_bucket(n, torch.float32, device, seed=s) for s in (43, 44, 45))
    assert_same_bits_with_any_thread_count(lambda: ops.xsam_dots([w], [b], [g]))


@pytest.mark.parametrize("backend,device,size", targets_and_sizes())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("with_delta", [False, True])
def test_xsam_restore(backend, device, dtype, size, offset, with_delta):
    ops = resolve(backend, torch.device(device))
    w_k, w_0, ghat, delta = (random_bucket(size, dtype, device, seed=s) for s in (46, 47, 48, 49))
    results = []
    for impl in (ops, spec):
        param, grad = clone_at(w_k, offset), clone_at(ghat, offset)
        impl.xsam_restore_(
            param, clone_at(w_0, offset), grad, clone_at(delta, offset) if with_delta else None, coefs_for(device)
        )
        results.append((param, grad))
    (param, grad), (_, ref_grad) = results
    assert_bits_equal(param, w_0, "the restore of w_0 must be bit-exact")
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend,device,size", targets_and_sizes())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_xsam_probe(backend, device, dtype, size, offset):
    """The first probe saves D = w_k - w_0, the next ones reuse it: both against the spec."""
    ops = resolve(backend, torch.device(device))
    w_k, w_0, ghat = (random_bucket(size, dtype, device, seed=s) for s in (50, 51, 52))
    results = []
    for impl in (ops, spec):
        param, backup, grad = clone_at(w_k, offset), clone_at(w_0, offset), clone_at(ghat, offset)
        delta = clone_at(torch.full_like(w_k, 7.0), offset)  # garbage the first probe must overwrite
        impl.xsam_probe_(param, backup, grad, delta, coefs_for(device), True)
        first = param.clone()
        impl.xsam_probe_(param, backup, grad, delta, coefs_for(device) * 2, False)
        assert_bits_equal(backup, w_0, "a probe must not write the backup")
        assert_bits_equal(grad, ghat, "a probe must not write the gradient")
        results.append((first, param, delta))
    for got, want in zip(*results):
        assert_close(got, want)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["normal", "nan"])
def test_perturb_without_a_backup(backend, device, dtype, regime):
    """XSAM's later ascent steps: the same w as with a backup, and untouched for a non-finite norm."""
    ops = resolve(backend, torch.device(device))
    w = random_bucket(3001, dtype, device, seed=53, offset=3)
    g = random_bucket(3001, dtype, device, seed=54, offset=3, regime=regime)
    sq = spec.sq_norm([g], [None])
    with_backup, without = clone_at(w, 3), clone_at(w, 3)
    ops.perturb_(with_backup, g, torch.empty_like(w), sq, *LESAM, False, None)
    ops.perturb_(without, g, None, sq, *LESAM, False, None)
    assert_bits_equal(without, with_backup, "the backup must not change the perturbation")
    if regime == "nan":
        assert_bits_equal(without, w, "a non-finite norm leaves w untouched")


@pytest.mark.parametrize("backend,device", targets())
def test_opcheck(backend, device):
    ops = resolve(backend, torch.device(device))
    checks = ("test_schema", "test_autograd_registration")
    if any(t.values[:2] == (backend, device) for t in TRACEABLE):
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    w, b, g = (random_bucket(300, torch.float32, device, seed=s) for s in (55, 56, 57))
    h = random_bucket(40, torch.bfloat16, device, seed=58)
    sq = spec.sq_norm([g], [None])
    samples = [
        (ops.xsam_dots, ([w, h], [b, h + 1], [g, h])),
        (ops.xsam_restore_, (w.clone(), b, g.clone(), None, coefs_for(device))),
        (ops.xsam_restore_, (h.clone(), h + 1, h.clone(), h * 2, coefs_for(device, torch.float64))),
        (ops.xsam_probe_, (w.clone(), b, g, torch.empty_like(w), coefs_for(device), True)),
        (ops.xsam_probe_, (w.clone(), b, g, w - b, coefs_for(device), False)),
        (ops.perturb_, (w.clone(), g, None, sq, math.inf, 0.05, 1.0, False, None)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("backend,device", TRACEABLE)
def test_xsam_ops_trace_whole_graph(backend, device):
    """An XSAM step's ops (two ascent steps, dots, coefficients, restore) as one fullgraph graph."""
    ops = resolve(backend, torch.device(device))

    def xsam_ops(param, grad, backup, ghat):
        sq = ops.sq_norm([grad], [None])
        ops.perturb_(param, grad, backup, sq, math.inf, 0.05, 1.0, False)
        ops.perturb_(param, grad, None, sq, math.inf, 0.05, 1.0, False)
        dots = ops.xsam_dots([param], [backup], [ghat])
        coefs, theta = maths.slerp_coefficients(dots, 0.5, dots[1].sqrt(), 1e-12)
        ops.xsam_restore_(param, backup, ghat, None, coefs)
        return dots, theta

    def inputs():
        w, g = random_bucket(100, torch.float32, device, seed=59), random_bucket(100, torch.float32, device, seed=60)
        return w, g, torch.empty_like(w), random_bucket(100, torch.float32, device, seed=61)

    eager_in, compiled_in = inputs(), inputs()
    eager_out = xsam_ops(*eager_in)
    compiled_out = torch.compile(xsam_ops, fullgraph=True, backend="aot_eager")(*compiled_in)
    for a, b in zip(eager_out + eager_in, compiled_out + compiled_in):
        assert torch.equal(a, b)
