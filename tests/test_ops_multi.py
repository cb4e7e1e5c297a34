"""The multi-tensor forms of the element-wise bucket ops (``multi_perturb_``, ``multi_restore_``,
``multi_xsam_restore_``, ``multi_xsam_probe_``, ``multi_look_store_``, ``multi_look_add_``).

A multi form computes, on every bucket of its lists, exactly what the backend's own per-bucket op
computes on that bucket: bit for bit, since both are one element-wise formula per element (the
per-bucket ops are held to the spec and to fp64 truths in tests/test_ops*.py). The lists mix what
the kernels treat apart: empty buckets (an FSDP2 rank whose shard of a parameter is empty), one
element, sizes around the vector width and over several blocks, aligned and unaligned pointers.
"""

import inspect

import pytest
import torch
from helpers.asserts import assert_bits_equal, assert_sum_close
from helpers.op_cases import (
    DTYPES,
    RADII,
    TARGETS,
    TRACEABLE,
    clone_at,
    random_bucket,
    sq_parts,
    summation_depth,
    targets,
)

from fused_lesam.backends import resolve

# Sizes per target: the compiled kernels' vector edges, Triton's interpreter's block edges (small:
# it runs each program in Python).
SIZES = {"cpu": [0, 1, 15, 16, 17, 4095, 0, 70001], "interpreted": [0, 1, 17, 1023, 1025, 0, 2049]}
MULTI_TARGETS = [*targets({"torch": ("torch", "cpu", (), ())}), *targets(TARGETS)]


def bucket_sizes(backend, device):
    return SIZES["interpreted"] if backend == "triton" and device == "cpu" else SIZES["cpu"]


def buckets(backend, device, dtype, seed, regime="normal"):
    """One list of buckets, every other one 3 elements into its storage (unaligned)."""
    return [
        random_bucket(n, dtype, device, seed=seed + i, offset=3 * (i % 2), regime=regime if n > 1000 else "normal")
        for i, n in enumerate(bucket_sizes(backend, device))
    ]


def copies(tensors):
    return [clone_at(t, 3 * (i % 2)) for i, t in enumerate(tensors)]


def assert_lists_equal(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert_bits_equal(g, w, f"{what}[{i}]")


def coefs_for(device, dtype=torch.float32):
    return torch.tensor([0.37, -1.25], dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("radius", ["lesam", "sam"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("with_backup,with_center", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("regime", ["normal", "nan"])
def test_multi_perturb(backend, device, dtype, radius, adaptive, with_backup, with_center, regime):
    ops = resolve(backend, torch.device(device))
    params = buckets(backend, device, dtype, seed=10)
    grads = buckets(backend, device, dtype, seed=30, regime=regime)
    sq = ops.sq_norm(grads, [p if adaptive else None for p in params])
    sigma, rho_max, varrho = RADII[radius]
    results = []
    for form in ("multi", "per-bucket"):
        w = copies(params)
        backups = [torch.full_like(p, 7.0) for p in params] if with_backup else None
        centers = [torch.full_like(p, 7.0) for p in params] if with_center else None
        if form == "multi":
            rho = ops.multi_perturb_(w, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers)
        else:
            for i in range(len(w)):
                rho = ops.perturb_(
                    w[i],
                    grads[i],
                    None if backups is None else backups[i],
                    sq,
                    sigma,
                    rho_max,
                    varrho,
                    adaptive,
                    None if centers is None else centers[i],
                )
        results.append((w, backups, centers, rho))
    (w, backups, centers, rho), (w_ref, backups_ref, centers_ref, rho_ref) = results
    assert_lists_equal(w, w_ref, "param")
    if with_backup:
        assert_lists_equal(backups, backups_ref, "backup")
        assert_lists_equal(backups, params, "backup (the weights before the step)")
    if with_center:
        assert_lists_equal(centers, centers_ref, "center")
    assert_bits_equal(rho, rho_ref, "rho")


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_perturb_sigma_on_device(backend, device, dtype):
    """sigma_t, a schedule computed on the device, replaces sigma as in perturb_."""
    ops = resolve(backend, torch.device(device))
    params = buckets(backend, device, dtype, seed=10)
    grads = buckets(backend, device, dtype, seed=30)
    sq = ops.sq_norm(grads, [None] * len(grads))
    sigma_t = torch.tensor(0.125, dtype=torch.float64, device=device)
    w, w_ref = copies(params), copies(params)
    rho = ops.multi_perturb_(w, grads, None, sq, 0.0, 0.4, 1e-12, False, None, sigma_t)
    for i in range(len(w_ref)):
        rho_ref = ops.perturb_(w_ref[i], grads[i], None, sq, 0.0, 0.4, 1e-12, False, None, sigma_t)
    assert_lists_equal(w, w_ref, "param")
    assert_bits_equal(rho, rho_ref, "rho")


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_center", [False, True])
def test_multi_restore(backend, device, dtype, with_center):
    ops = resolve(backend, torch.device(device))
    params = buckets(backend, device, dtype, seed=10)
    backup_values = buckets(backend, device, dtype, seed=20)
    grads = buckets(backend, device, dtype, seed=30)
    centers = buckets(backend, device, dtype, seed=40) if with_center else None
    coefs = (1.3, 0.3) if with_center else (1.0, 0.0)
    w, g = copies(params), copies(grads)
    ops.multi_restore_(w, backup_values, g, centers, *coefs)
    w_ref, g_ref = copies(params), copies(grads)
    for i in range(len(w_ref)):
        ops.restore_(w_ref[i], backup_values[i], g_ref[i], None if centers is None else centers[i], *coefs)
    assert_lists_equal(w, backup_values, "param (restored bit-exactly)")
    assert_lists_equal(g, g_ref, "grad")


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_multi_xsam_restore(backend, device, dtype, with_delta):
    ops = resolve(backend, torch.device(device))
    params = buckets(backend, device, dtype, seed=10)
    backup_values = buckets(backend, device, dtype, seed=20)
    grads = buckets(backend, device, dtype, seed=30)
    deltas = buckets(backend, device, dtype, seed=50) if with_delta else None
    coefs = coefs_for(device)
    w, g = copies(params), copies(grads)
    ops.multi_xsam_restore_(w, backup_values, g, deltas, coefs)
    w_ref, g_ref = copies(params), copies(grads)
    for i in range(len(w_ref)):
        ops.xsam_restore_(w_ref[i], backup_values[i], g_ref[i], None if deltas is None else deltas[i], coefs)
    assert_lists_equal(w, backup_values, "param (restored bit-exactly)")
    assert_lists_equal(g, g_ref, "grad")


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save_delta", [True, False])
def test_multi_xsam_probe(backend, device, dtype, save_delta):
    ops = resolve(backend, torch.device(device))
    params = buckets(backend, device, dtype, seed=10)
    backup_values = buckets(backend, device, dtype, seed=20)
    grads = buckets(backend, device, dtype, seed=30)
    delta_values = buckets(backend, device, dtype, seed=50)
    coefs = coefs_for(device, torch.float64)
    w, d = copies(params), copies(delta_values)
    ops.multi_xsam_probe_(w, backup_values, grads, d, coefs, save_delta)
    w_ref, d_ref = copies(params), copies(delta_values)
    for i in range(len(w_ref)):
        ops.xsam_probe_(w_ref[i], backup_values[i], grads[i], d_ref[i], coefs, save_delta)
    assert_lists_equal(w, w_ref, "param")
    assert_lists_equal(d, d_ref, "delta")


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skipped", [False, True])
def test_multi_look_store(backend, device, dtype, skipped):
    ops = resolve(backend, torch.device(device))
    dir_values = buckets(backend, device, dtype, seed=60)
    grads = buckets(backend, device, dtype, seed=30)
    centers = buckets(backend, device, dtype, seed=40)
    coef = torch.tensor(-0.37, device=device)
    found_inf = torch.tensor(1.0 if skipped else 0.0, device=device)
    d = copies(dir_values)
    ops.multi_look_store_(d, grads, centers, coef, found_inf)
    d_ref = copies(dir_values)
    for i in range(len(d_ref)):
        ops.look_store_(d_ref[i], grads[i], centers[i], coef, found_inf)
    assert_lists_equal(d, d_ref, "look_dir")
    if skipped:
        assert_lists_equal(d, dir_values, "look_dir (a skipped step writes nothing)")


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_look_add(backend, device, dtype):
    ops = resolve(backend, torch.device(device))
    grads = buckets(backend, device, dtype, seed=30)
    dirs = buckets(backend, device, dtype, seed=60)
    coef = torch.tensor(0.81, dtype=torch.float64, device=device)
    g = copies(grads)
    ops.multi_look_add_(g, dirs, coef)
    g_ref = copies(grads)
    for i in range(len(g_ref)):
        ops.look_add_(g_ref[i], dirs[i], coef)
    assert_lists_equal(g, g_ref, "grad")


# Many buckets, as FSDP2 gives: past what a table passed in the kernel's arguments holds (the CUDA
# kernels then read it from device memory), with empty and unaligned ones among them.
LONG_LIST = [(i * 37) % 300 for i in range(48)]


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_lists(backend, device, dtype):
    ops = resolve(backend, torch.device(device))

    def many(seed):
        return [random_bucket(n, dtype, device, seed=seed + i, offset=3 * (i % 2)) for i, n in enumerate(LONG_LIST)]

    params, grads, centers = many(10), many(30), many(40)
    sq = ops.sq_norm(grads, [None] * len(grads))
    assert_sum_close(sq, sq_parts(grads, [None] * len(grads)), summation_depth(backend, LONG_LIST))
    dots = ops.look_dots(grads, centers)
    assert_sum_close(dots[1], sq_parts(centers, [None] * len(centers)), summation_depth(backend, LONG_LIST))
    w, backups, kept = copies(params), [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    rho = ops.multi_perturb_(w, grads, backups, sq, *RADII["lesam"], False, kept)
    w_ref = copies(params)
    for i in range(len(w_ref)):
        rho_ref = ops.perturb_(w_ref[i], grads[i], None, sq, *RADII["lesam"], False)
    assert_lists_equal(w, w_ref, "param")
    assert_lists_equal(backups, params, "backup")
    assert_lists_equal(kept, grads, "center")
    assert_bits_equal(rho, rho_ref, "rho")
    g, g_ref = copies(grads), copies(grads)
    ops.multi_restore_(w, backups, g, centers, 1.3, 0.3)
    for i in range(len(g_ref)):
        ops.restore_(w_ref[i], params[i], g_ref[i], centers[i], 1.3, 0.3)
    assert_lists_equal(w, params, "param (restored bit-exactly)")
    assert_lists_equal(g, g_ref, "grad")


def misuses(device):
    """(op name, call) pairs, each a mistake the multi form must refuse with a RuntimeError naming it."""
    a, b = torch.ones(5, device=device), torch.ones(7, device=device)
    half = torch.ones(7, dtype=torch.float16, device=device)
    sq, coefs = torch.tensor(1.0, device=device), coefs_for(device)
    coef, flag = torch.tensor(0.5, device=device), torch.tensor(0.0, device=device)
    return [
        ("multi_perturb_", "one length", lambda ops: ops.multi_perturb_([a, b], [a], None, sq, 0.1, 1.0, 0.0, False)),
        ("multi_perturb_", "dtype", lambda ops: ops.multi_perturb_([b, half], [b, half], None, sq, 0.1, 1, 0, False)),
        ("multi_perturb_", "at least 1", lambda ops: ops.multi_perturb_([], [], None, sq, 0.1, 1.0, 0.0, False)),
        ("multi_restore_", "one length", lambda ops: ops.multi_restore_([a, b], [a, b], [a], None, 1.0, 0.0)),
        ("multi_restore_", "dtype", lambda ops: ops.multi_restore_([a, b], [a, half], [a, b], None, 1.0, 0.0)),
        ("multi_xsam_restore_", "one length", lambda ops: ops.multi_xsam_restore_([a], [a], [a], [a, b], coefs)),
        ("multi_xsam_probe_", "dtype", lambda ops: ops.multi_xsam_probe_([b], [half], [b], [b], coefs, True)),
        ("multi_look_store_", "one length", lambda ops: ops.multi_look_store_([a, b], [a, b], [a], coef, flag)),
        ("multi_look_add_", "dtype", lambda ops: ops.multi_look_add_([b], [half], coef)),
    ]


@pytest.mark.parametrize("backend,device", MULTI_TARGETS)
def test_multi_misuse_is_refused(backend, device):
    ops = resolve(backend, torch.device(device))
    for op, problem, call in misuses(device):
        with pytest.raises(RuntimeError, match=op) as caught:
            call(ops)
        assert problem in str(caught.value), f"{op}: the message should name the problem ({problem!r})"


# ------------------------------------------------------------------ schemas, fakes, torch.compile
def multi_calls(ops, device, seed=0):
    """Every multi form once, on fresh lists (an empty, an unaligned and a two-vector bucket) that
    it writes: (op, args) pairs for torch.library.opcheck and for a traced function."""
    sizes = [0, 17, 32]

    def fresh(offset_seed):
        return [
            random_bucket(n, torch.float32, device, seed=seed + offset_seed + i, offset=3 * (i % 2))
            for i, n in enumerate(sizes)
        ]

    w, g, bak, ctr, delta, dirs = (fresh(k) for k in (0, 10, 20, 30, 40, 50))
    sq = torch.tensor(2.5, device=device)
    coefs, coef, flag = coefs_for(device), torch.tensor(-0.37, device=device), torch.tensor(0.0, device=device)
    return [
        (ops.multi_perturb_, (w, g, bak, sq, 0.35, 0.4, 1e-12, True, ctr, None)),
        (
            ops.multi_perturb_,
            (w, g, None, sq, 0.35, 0.4, 1e-12, False, None, torch.tensor(0.2, dtype=torch.float64, device=device)),
        ),
        (ops.multi_restore_, (w, bak, g, ctr, 1.5, 0.5)),
        (ops.multi_restore_, (w, bak, g, None, 1.0, 0.0)),
        (ops.multi_xsam_restore_, (w, bak, g, delta, coefs)),
        (ops.multi_xsam_restore_, (w, bak, g, None, coefs)),
        (ops.multi_xsam_probe_, (w, bak, g, delta, coefs, True)),
        (ops.multi_look_store_, (dirs, g, ctr, coef, flag)),
        (ops.multi_look_add_, (g, dirs, coef)),
    ]


@pytest.mark.parametrize("backend,device", targets())
def test_multi_opcheck(backend, device):
    """torch.library.opcheck of the multi forms: the schemas declare what they write, and (where
    fake tensors can run) the fake kernels and AOT dispatch agree with the real ones."""
    ops = resolve(backend, torch.device(device))
    checks = ("test_schema", "test_autograd_registration")
    if any(t.values[:2] == (backend, device) for t in TRACEABLE):
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in multi_calls(ops, device):
        if inspect.isfunction(op):  # Triton's multi_perturb_: a function giving its op the defaults it lacks
            op = getattr(torch.ops.fused_lesam_triton, op.__name__).default
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("backend,device", TRACEABLE)
def test_multi_ops_trace_whole_graph(backend, device):
    """Every multi form in one torch.compile(fullgraph=True) graph (through their fake kernels)
    gives the eager results bit for bit: the returned radius and every list they write."""
    ops = resolve(backend, torch.device(device))

    def all_multi_ops(calls):
        rho = None
        for op, args in calls:
            out = op(*args)
            rho = out if out is not None else rho
        return rho

    eager_calls, compiled_calls = multi_calls(ops, device, seed=5), multi_calls(ops, device, seed=5)
    eager_rho = all_multi_ops(eager_calls)
    compiled_rho = torch.compile(all_multi_ops, fullgraph=True, backend="aot_eager")(compiled_calls)
    assert_bits_equal(compiled_rho, eager_rho, "rho")
    for (op, eager_args), (_, compiled_args) in zip(eager_calls, compiled_calls):
        for i, (e, c) in enumerate(zip(eager_args, compiled_args)):
            if isinstance(e, list):
                assert_lists_equal(c, e, f"{op} argument {i}")


# ------------------------------------------------------------------ one launch per op on the GPU
LAUNCH_TARGETS = [t for t in targets() if t.values == ("cuda", "cuda") or t.values == ("triton", "cuda")]
REDUCTIONS = ("sq_norm", "xsam_dots", "look_dots")


def kernels_launched(call):
    """The names of the GPU kernels ``call()`` launches (copies and memsets are not kernels)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [
        event.name
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))
    ]


@pytest.mark.parametrize("backend,device", LAUNCH_TARGETS)
def test_one_launch_per_multi_op_over_64_buckets(backend, device):
    """Over 64 buckets of one dtype (FSDP2's shards: sizes from empty to several blocks, every other
    one unaligned) each multi form is one kernel launch, and each reduction two (its partial sums,
    then their sum), not one per bucket."""
    ops = resolve(backend, torch.device(device))
    sizes = [(i * 997) % 5000 for i in range(64)]  # 0 first, then sizes up to several blocks

    def fresh(seed):
        return [random_bucket(n, torch.float32, device, seed=seed + i, offset=3 * (i % 2)) for i, n in enumerate(sizes)]

    w, g, bak, ctr, delta, dirs = (fresh(k) for k in (100, 200, 300, 400, 500, 600))
    sq = ops.sq_norm(g, [None] * len(g))
    coefs, coef, flag = coefs_for(device), torch.tensor(0.5, device=device), torch.tensor(0.0, device=device)
    calls = {
        "multi_perturb_": lambda: ops.multi_perturb_(w, g, bak, sq, 0.35, 0.4, 1e-12, False, ctr),
        "multi_restore_": lambda: ops.multi_restore_(w, bak, g, ctr, 1.5, 0.5),
        "multi_xsam_restore_": lambda: ops.multi_xsam_restore_(w, bak, g, delta, coefs),
        "multi_xsam_probe_": lambda: ops.multi_xsam_probe_(w, bak, g, delta, coefs, True),
        "multi_look_store_": lambda: ops.multi_look_store_(dirs, g, ctr, coef, flag),
        "multi_look_add_": lambda: ops.multi_look_add_(g, dirs, coef),
        "sq_norm": lambda: ops.sq_norm(g, [None] * len(g)),
        "xsam_dots": lambda: ops.xsam_dots(w, bak, g),
        "look_dots": lambda: ops.look_dots(g, ctr),
    }
    for name, call in calls.items():
        call()  # Triton compiles its kernels on a first call
        launched = kernels_launched(call)
        expected = 2 if name in REDUCTIONS else 1
        assert len(launched) == expected, f"{backend} {name} over 64 buckets launched {len(launched)}: {launched}"
