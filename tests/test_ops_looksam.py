"""LookSAM's bucket ops (look_dots, look_store_, look_add_) and the base-update ops without a backup
(a one-pass step), on every kernel backend, against the "torch" spec (the dots, on the spec too,
against their exact sums): the patterns of tests/test_ops_xsam.py (bad input: tests/test_op_errors.py)."""

import pytest
import torch
from helpers.asserts import assert_bits_equal, assert_close, assert_sum_close
from helpers.op_cases import (
    DTYPES,
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


def cases(table=None):
    """(backend, device, size, dtype): every size of a target with every dtype, except that the
    largest buckets (over a million elements, many reduction chunks and CPU threads) are taken in
    fp32 only, to keep the file fast."""
    params = []
    for target in targets_and_sizes(*([table] if table else [])):
        backend, device, size = target.values
        for dtype in DTYPES:
            if size > 5000 and dtype != torch.float32:
                continue
            name = str(dtype).removeprefix("torch.")
            params.append(pytest.param(backend, device, size, dtype, id=f"{target.id}-{name}", marks=target.marks))
    return params


def coef_for(device, dtype=torch.float32):
    return torch.tensor(-0.37, dtype=dtype, device=device)


def dots_parts(grads, centers):
    """The exact terms of look_dots' two sums (fp64), g_hat g and g g, per bucket with the dtype
    it is summed in."""
    parts = ([], [])
    for h, g in zip(grads, centers):
        ghat, grad, dtype = h.double(), g.double(), maths.acc_dtype(h.dtype)
        for sums, terms in zip(parts, (ghat * grad, grad * grad)):
            sums.append((terms, dtype))
    return parts


def assert_dots_close(got, grads, centers, backend):
    depth = summation_depth(backend, [g.numel() for g in grads])
    for j, (value, parts) in enumerate(zip(got, dots_parts(grads, centers))):
        assert_sum_close(value, parts, depth, msg=["g_hat.g", "g.g"][j])


@pytest.mark.parametrize("backend,device,size,dtype", cases(REDUCTION_TARGETS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_look_dots(backend, device, dtype, size, offset):
    ops = resolve(backend, torch.device(device))
    h, g = (random_bucket(size, dtype, device, seed=s, offset=offset) for s in (80, 81))
    got = ops.look_dots([h], [g])
    assert got.shape == (2,) and got.dtype == maths.acc_dtype(dtype) and got.device == h.device
    assert_dots_close(got, [h], [g], backend)


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_look_dots_counts_every_element(backend, device, dtype):
    """Exact on small integers: a missed or doubled element changes a dot, which rounding cannot hide."""
    ops = resolve(backend, torch.device(device))
    size = largest_size(backend, device)
    grads = [integer_bucket(size, dtype, device, seed=82, offset=3), integer_bucket(37, dtype, device, seed=83)]
    centers = [integer_bucket(size, dtype, device, seed=84, offset=3), integer_bucket(37, dtype, device, seed=85)]
    got = ops.look_dots(grads, centers)
    assert got.tolist() == [exact_sum(parts) for parts in dots_parts(grads, centers)]


@pytest.mark.parametrize("backend,device", targets(REDUCTION_TARGETS))
def test_look_dots_sums_several_buckets(backend, device):
    ops = resolve(backend, torch.device(device))
    specs = [(torch.float32, 17, 3), (torch.bfloat16, 4095, 0), (torch.float32, 0, 0), (torch.float16, 70001, 5)]
    pairs = [
        [random_bucket(n, dt, device, seed=10 * i + k, offset=off) for k in range(2)]
        for i, (dt, n, off) in enumerate(specs)
    ]
    grads, centers = (list(t) for t in zip(*pairs))
    got = ops.look_dots(grads, centers)
    assert got.dtype == torch.float32
    assert_dots_close(got, grads, centers, backend)
    grads.append(random_bucket(33, torch.float64, device, seed=86))
    centers.append(random_bucket(33, torch.float64, device, seed=87))
    got = ops.look_dots(grads, centers)
    assert got.dtype == torch.float64
    assert_dots_close(got, grads, centers, backend)


@pytest.mark.parametrize("backend,device", targets())
def test_look_dots_is_deterministic(backend, device):
    ops = resolve(backend, torch.device(device))
    n = largest_size(backend, device)
    h, g = (random_bucket(n, torch.float32, device, seed=s) for s in (88, 89))
    assert_same_bits_with_any_thread_count(lambda: ops.look_dots([h], [g]))


@pytest.mark.parametrize("backend,device,size,dtype", cases())
@pytest.mark.parametrize("offset", OFFSETS)
def test_look_store(backend, device, dtype, size, offset):
    """g_v <- g_hat - c g against the spec; with found_inf set, g_v keeps its bits."""
    ops = resolve(backend, torch.device(device))
    old, h, g = (random_bucket(size, dtype, device, seed=s) for s in (90, 91, 92))
    results = []
    for impl in (ops, spec):
        look_dir, ghat, center = clone_at(old, offset), clone_at(h, offset), clone_at(g, offset)
        impl.look_store_(look_dir, ghat, center, coef_for(device), torch.zeros((), device=device))
        assert_bits_equal(ghat, h, "look_store_ must not write the gradient")
        results.append(look_dir)
        kept = clone_at(old, offset)
        impl.look_store_(kept, ghat, center, coef_for(device), torch.ones((), device=device))
        assert_bits_equal(kept, old, "a skipped step must leave g_v bit-exact")
    assert_close(*results)


@pytest.mark.parametrize("backend,device,size,dtype", cases())
@pytest.mark.parametrize("offset", OFFSETS)
def test_look_add(backend, device, dtype, size, offset):
    ops = resolve(backend, torch.device(device))
    g, d = (random_bucket(size, dtype, device, seed=s) for s in (93, 94))
    results = []
    for impl in (ops, spec):
        grad, look_dir = clone_at(g, offset), clone_at(d, offset)
        impl.look_add_(grad, look_dir, coef_for(device, torch.float64))
        assert_bits_equal(look_dir, d, "look_add_ must not write g_v")
        results.append(grad)
    assert_close(*results)


def _sgd(ops, param, backup, grad, buf, found_inf):
    ops.sgd_step_(param, backup, grad, buf, None, found_inf, 0.1, 0.9, 0.0, 1e-2, False, False, False, 1.0, 0.0)


def _adam(ops, param, backup, grad, state, found_inf):
    m, v, step = state
    ops.adam_step_(
        param,
        backup,
        grad,
        m,
        v,
        None,
        None,
        step,
        found_inf,
        1e-2,
        0.9,
        0.999,
        1e-8,
        0.05,
        True,
        False,
        False,
        1.0,
        0.0,
    )


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_step_ops_without_a_backup(backend, device, dtype, kind):
    """backup=None steps from param itself: the bits of the same op given a separate copy of w as
    backup, and a skipped step leaves param and the state untouched."""
    ops = resolve(backend, torch.device(device))
    n = 3001
    w, g = random_bucket(n, dtype, device, seed=95, offset=3), random_bucket(n, dtype, device, seed=96, offset=3)

    def state():
        if kind == "sgd":
            return random_bucket(n, dtype, device, seed=97)
        return (
            random_bucket(n, dtype, device, seed=97),
            random_bucket(n, dtype, device, seed=98).abs(),
            torch.tensor(3.0, device=device),
        )

    step = _sgd if kind == "sgd" else _adam
    for skip in (0.0, 1.0):
        found_inf = torch.tensor(skip, device=device)
        with_backup, without = clone_at(w, 3), clone_at(w, 3)
        state_with, state_without = state(), state()
        step(ops, with_backup, w.clone(), g, state_with, found_inf)
        step(ops, without, None, g, state_without, found_inf)
        assert_bits_equal(without, with_backup, "no backup: the step from param itself")
        for a, b in zip(
            state_without if kind == "adam" else [state_without], state_with if kind == "adam" else [state_with]
        ):
            assert_bits_equal(a, b)
        if skip:
            assert_bits_equal(without, w, "a skipped step without a backup leaves param")


@pytest.mark.parametrize("backend,device", targets())
def test_opcheck(backend, device):
    ops = resolve(backend, torch.device(device))
    checks = ("test_schema", "test_autograd_registration")
    if any(t.values[:2] == (backend, device) for t in TRACEABLE):
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    h, g, d = (random_bucket(300, torch.float32, device, seed=s) for s in (100, 101, 102))
    b = random_bucket(40, torch.bfloat16, device, seed=103)
    zero = torch.zeros((), device=device)
    samples = [
        (ops.look_dots, ([h, b], [g, b + 1])),
        (ops.look_store_, (d.clone(), h, g, coef_for(device), zero)),
        (ops.look_add_, (b.clone(), b * 2, coef_for(device, torch.float64))),
        (ops.sgd_step_, (h.clone(), None, g, d.clone(), None, zero, 0.1, 0.9, 0.0, 0.0, False, False, False, 1.0, 0.0)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("backend,device", TRACEABLE)
def test_looksam_ops_trace_whole_graph(backend, device):
    """A LookSAM full step's store and a reuse step's combine as one fullgraph graph."""
    ops = resolve(backend, torch.device(device))

    def look_ops(look_dir, ghat, g, grad):
        dots = ops.look_dots([ghat], [g])
        found_inf = torch.zeros((), device=look_dir.device)
        ops.look_store_(look_dir, ghat, g, maths.look_projection(dots), found_inf)
        norm = ops.sq_norm([look_dir], [None]).sqrt()
        coef = maths.look_reuse_coefficient(ops.sq_norm([grad], [None]), norm, 0.7)
        ops.look_add_(grad, look_dir, coef)
        return dots, coef

    def inputs():
        return tuple(random_bucket(100, torch.float32, device, seed=s) for s in (104, 105, 106, 107))

    eager_in, compiled_in = inputs(), inputs()
    eager_out = look_ops(*eager_in)
    compiled_out = torch.compile(look_ops, fullgraph=True, backend="aot_eager")(*compiled_in)
    for a, b in zip(eager_out + eager_in, compiled_out + compiled_in):
        assert torch.equal(a, b)


def test_look_scalars_guard_zero_norms():
    """The projection of a zero g and the reuse coefficient of a zero g_v are 0 (no NaN)."""
    zero_g = torch.tensor([3.0, 0.0])
    assert maths.look_projection(zero_g).item() == 0.0
    assert maths.look_projection(torch.tensor([3.0, 2.0])).item() == 1.5
    assert maths.look_reuse_coefficient(torch.tensor(4.0), torch.tensor(0.0), 0.7).item() == 0.0
    assert maths.look_reuse_coefficient(torch.tensor(4.0), torch.tensor(0.5), 0.7).item() == pytest.approx(2.8)
