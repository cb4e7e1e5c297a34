"""The Triton backend's own helpers: fp32 -> bf16 rounding to nearest even, written out in the
kernels because Triton's interpreter truncates (so the CPU tests check what the GPU computes); the
launches, each under a guard of its buckets' device; and the code compiled for the GPU, whose
divisions and square roots must be correctly rounded to agree with torch."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from fused_lesam.backends import triton as triton_backend  # runs where the backend does: see test_extension.py
from fused_lesam.backends.triton import _narrow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _narrow_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, _narrow(tl.load(x_ptr + offsets, mask=mask), out_ptr.dtype.element_ty), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_rounds_like_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(500, generator=gen).bfloat16().float()
    ulp = base.abs() * 2.0**-8  # bf16 spacing near each value (within a factor 2)
    ties = torch.cat([base + ulp / 2, base - ulp / 2])  # exactly or nearly half-way between neighbours
    x = torch.cat(
        [
            torch.randn(1000, generator=gen),
            ties,
            torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-40]),
        ]
    ).to(DEVICE)
    out = torch.empty_like(x, dtype=dtype)
    _narrow_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])


# ---------------------------------------------------------------------- launches
def launch_every_op(device):
    """Each op of the backend once, on small fp32 buckets on ``device``, then each multi-tensor op
    and reduction over many buckets (on DEVICE)."""
    gen = torch.Generator().manual_seed(0)
    w0, g, center, buf, m, v = (torch.randn(100, generator=gen).to(device) for _ in range(6))
    w, coefs = w0.clone(), torch.tensor([0.5, 0.25], device=device)
    sq = triton_backend.sq_norm([g], [None])
    triton_backend.perturb_(w, g, torch.empty_like(w), sq, 0.35, 0.4, 1e-12, False, None)
    triton_backend.restore_(w, w0, g.clone(), center, 1.5, 0.5)
    triton_backend.xsam_dots([w], [w0], [g])
    triton_backend.xsam_restore_(w, w0, g.clone(), None, coefs)
    triton_backend.xsam_probe_(w, w0, g, torch.empty_like(w), coefs, True)
    zero, t = torch.zeros((), device=device), torch.ones((), device=device)
    triton_backend.look_dots([g], [center])
    triton_backend.look_store_(torch.empty_like(w), g, center, coefs[0], zero)
    triton_backend.look_add_(g.clone(), center, coefs[1])
    triton_backend.sgd_step_(w, w0, g, buf, None, zero, 0.1, 0.9, 0.0, 0.0, False, False, False, 1.0, 0.0)
    triton_backend.adam_step_(
        w, w0, g, m, v.square(), None, None, t, zero, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 1.0, 0.0
    )
    for _, _, call in multi_calls(torch.float32):
        call()


def test_every_launch_runs_under_its_buckets_device_guard(monkeypatch):
    """Triton launches on the current CUDA device: each op must first make its buckets' device
    current (buckets on cuda:1 while cuda:0 is current). The guard is replaced by a recorder here,
    so that the check runs on the CPU too."""
    entered, open_guards, launches = [], [], []

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(device)
        open_guards.append(device)
        try:
            yield
        finally:
            open_guards.pop()

    real_wrap = triton_backend.wrap_triton

    def checking_wrap(kernel):
        launches.append(list(open_guards))
        return real_wrap(kernel)

    monkeypatch.setattr(triton_backend, "_device_guard", recording_guard)
    monkeypatch.setattr(triton_backend, "wrap_triton", checking_wrap)
    launch_every_op(DEVICE)
    # sq_norm 2, perturb_, restore_, xsam_dots 2, xsam_restore_, xsam_probe_, look_dots 2, look_store_,
    # look_add_, the steps 2; then the multi-tensor calls 12
    assert len(launches) == 26
    bucket_device = torch.empty(0, device=DEVICE).device
    assert all(guards == [bucket_device] for guards in launches), f"not each under one guard of {bucket_device}"


def test_device_guard_selects_the_cuda_device():
    guard = triton_backend._device_guard(torch.device("cuda", 1))  # built, not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(triton_backend._device_guard(torch.device("cpu")), torch.cuda.device)


# Kernels compiled for the GPU, with options that reach each branch of their arithmetic; those
# whose maths divides or takes a square root are in DIVIDING. Pointer arguments are named *_ptr.
COMPILED_KERNELS = [
    ("_perturb_kernel", dict(ADAPTIVE=True, SAVE_BACKUP=True, SAVE_CENTER=True, SIGMA_ON_DEVICE=False, BLOCK=1024)),
    ("_restore_kernel", dict(COMBINE=True, BLOCK=1024)),
    (
        "_sgd_step_kernel",
        dict(
            MOMENTUM=True, WEIGHT_DECAY=True, NESTEROV=True, MAXIMIZE=False, INIT_BUFFER=False, COMBINE=True, BLOCK=1024
        ),
    ),
    (
        "_sgd_step_kernel",
        dict(
            MOMENTUM=True,
            WEIGHT_DECAY=False,
            NESTEROV=False,
            MAXIMIZE=True,
            INIT_BUFFER=True,
            COMBINE=False,
            BLOCK=2048,
        ),
    ),
    (
        "_adam_step_kernel",
        dict(
            WEIGHT_DECAY=True,
            DECOUPLED=True,
            AMSGRAD=True,
            MAXIMIZE=False,
            LERP_SMALL_WEIGHT=True,
            COMBINE=True,
            BLOCK=1024,
        ),
    ),
    (
        "_adam_step_kernel",
        dict(
            WEIGHT_DECAY=True,
            DECOUPLED=False,
            AMSGRAD=False,
            MAXIMIZE=True,
            LERP_SMALL_WEIGHT=False,
            COMBINE=False,
            BLOCK=2048,
        ),
    ),
]
# The multi-tensor kernels: their pointers are addresses read from the table and cast (int_to_ptr),
# which compiled Triton must accept as the interpreter does.
# ALIGNED (a table of 16-byte addresses and sizes that are multiples of 16) must make them load and
# store 16 bytes at a time, as the per-bucket kernels do with aligned arguments.
COMPILED_KERNELS += [
    (
        "_multi_perturb_kernel",
        dict(ADAPTIVE=True, SAVE_BACKUP=True, SAVE_CENTER=True, SIGMA_ON_DEVICE=True, ALIGNED=True, BLOCK=2048),
    ),
    ("_multi_restore_kernel", dict(COMBINE=True, ALIGNED=False, BLOCK=1024)),
    ("_multi_xsam_restore_kernel", dict(HAS_DELTA=False, ALIGNED=True, BLOCK=1024)),
    ("_multi_xsam_probe_kernel", dict(SAVE_DELTA=True, ALIGNED=False, BLOCK=2048)),
    ("_multi_look_store_kernel", dict(ALIGNED=True, BLOCK=1024)),
    ("_multi_look_add_kernel", dict(ALIGNED=False, BLOCK=2048)),
    (
        "_sq_partials_kernel",
        dict(WEIGHTED=True, CHUNK=triton_backend.CHUNK, ALIGNED=True, BLOCK=triton_backend.REDUCE_BLOCK),
    ),
    ("_dots_partials_kernel", dict(CHUNK=triton_backend.CHUNK, ALIGNED=False, BLOCK=triton_backend.REDUCE_BLOCK)),
]
DIVIDING = {"_perturb_kernel", "_adam_step_kernel", "_multi_perturb_kernel"}

_COMPILE_FOR_SM90 = textwrap.dedent("""
    import json, re, sys
    import torch
    torch.cuda.is_available = lambda: True  # import the backend compiled, not interpreted, without a GPU
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_lesam.backends import triton as backend

    SCALAR_POINTERS = {"found_inf_ptr", "step_ptr", "sq_ptr", "sigma_ptr", "rho_ptr", "partials_ptr"}
    TABLES = {"table_ptr", "programs_ptr"}
    found = []
    for name, constexprs in json.loads(sys.argv[1]):
        kernel = getattr(backend, name)
        signature = {arg: "constexpr" if arg in constexprs else "*fp32" if arg in SCALAR_POINTERS else
                     "*i64" if arg in TABLES else "*bf16" if arg.endswith("_ptr") else "i64" if arg == "n" else
                     "i32" if arg == "total" else "fp32" for arg in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        vector = bool(re.search(r"\\bld\\.global(?:\\.[a-z]+)*\\.v[24]\\.b32", ptx))
        found.append([sorted(set(re.findall(r"\\b(?:div|sqrt)\\.[a-z0-9.]+", ptx))), vector])
    print(json.dumps(found))
""")


def test_kernels_compile_for_sm90_with_correctly_rounded_division_and_sqrt():
    """Compiled for an H100/H200 (sm_90; Triton compiles without a GPU): plain / and tl.sqrt on fp32
    become the approximate div.full.f32 and sqrt.approx.f32 there, so the kernels must use div_rn and
    sqrt_rn (div.rn, sqrt.rn) to agree with torch. This also catches code that the interpreter runs
    but Triton's compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90, json.dumps(COMPILED_KERNELS)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(found) == len(COMPILED_KERNELS)
    for (name, constexprs), (instructions, vector) in zip(COMPILED_KERNELS, found):
        assert bool(instructions) == (name in DIVIDING), f"{name}: divisions and square roots: {instructions}"
        approximate = [i for i in instructions if ".rn." not in i]
        assert not approximate, f"{name} uses approximate {approximate}"
        if "ALIGNED" in constexprs:
            assert vector == constexprs["ALIGNED"], f"{name} (ALIGNED={constexprs['ALIGNED']}): 16-byte loads {vector}"


# ---------------------------------------------------------------------- multi-tensor launches
def many_buckets(dtype, seed, sizes=(0, 1, 17, 1025, 0, 2049, 3)):
    """Buckets as a sharded model gives them: empty ones, tiny ones, several blocks; every other one
    3 elements into its storage (unaligned)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        storage = torch.randn(n + 3 * (i % 2), generator=gen).to(dtype).to(DEVICE)
        out.append(storage[3 * (i % 2) :])
    return out


@contextlib.contextmanager
def recorded_launches(monkeypatch):
    """The names of the kernels launched inside the block, in order (every launch goes through
    wrap_triton: `_launch`)."""
    launched = []
    real_wrap = triton_backend.wrap_triton

    def recording_wrap(kernel):
        launched.append(kernel.fn.__name__)
        return real_wrap(kernel)

    monkeypatch.setattr(triton_backend, "wrap_triton", recording_wrap)
    yield launched
    monkeypatch.setattr(triton_backend, "wrap_triton", real_wrap)


def multi_calls(dtype):
    """(op, kernels it must launch, call) for each multi-tensor op and reduction over 7 buckets."""
    p, b, g, c, d = (many_buckets(dtype, seed) for seed in range(5))
    sq = torch.tensor(2.0, device=DEVICE)
    coefs, coef = torch.tensor([0.5, 0.25], device=DEVICE), torch.tensor(0.5, device=DEVICE)
    flag = torch.zeros((), device=DEVICE)
    return [
        ("sq_norm", ["_sq_partials_kernel", "_sum_kernel"], lambda: triton_backend.sq_norm(g, p)),
        ("xsam_dots", ["_dots_partials_kernel", "_sum_kernel"], lambda: triton_backend.xsam_dots(p, b, g)),
        ("look_dots", ["_look_dots_partials_kernel", "_sum_kernel"], lambda: triton_backend.look_dots(g, c)),
        (
            "multi_perturb_",
            ["_multi_perturb_kernel"],
            lambda: triton_backend.multi_perturb_(p, g, b, sq, 0.35, 0.4, 1e-12, True, c),
        ),
        ("multi_restore_", ["_multi_restore_kernel"], lambda: triton_backend.multi_restore_(p, b, g, c, 1.5, 0.5)),
        (
            "multi_xsam_restore_",
            ["_multi_xsam_restore_kernel"],
            lambda: triton_backend.multi_xsam_restore_(p, b, g, d, coefs),
        ),
        (
            "multi_xsam_probe_",
            ["_multi_xsam_probe_kernel"],
            lambda: triton_backend.multi_xsam_probe_(p, b, g, d, coefs, True),
        ),
        (
            "multi_look_store_",
            ["_multi_look_store_kernel"],
            lambda: triton_backend.multi_look_store_(d, g, c, coef, flag),
        ),
        ("multi_look_add_", ["_multi_look_add_kernel"], lambda: triton_backend.multi_look_add_(g, d, coef)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_ops_launch_once_whatever_the_number_of_buckets(monkeypatch, dtype):
    """Issue 14: one launch per element-wise op and two per reduction (partials, then the sums),
    over 7 buckets, two of them empty."""
    for op, kernels, call in multi_calls(dtype):
        with recorded_launches(monkeypatch) as launched:
            call()
        assert launched == kernels, f"{op} launched {launched}"


def test_a_reduction_launches_its_partials_once_per_kind_of_bucket(monkeypatch):
    """Buckets of two dtypes (or sq_norm's weighted and plain buckets) cannot share typed pointers:
    one partials launch per kind, still one launch of the sums."""
    f32, bf16 = many_buckets(torch.float32, 0), many_buckets(torch.bfloat16, 1)
    with recorded_launches(monkeypatch) as launched:
        triton_backend.xsam_dots(f32 + bf16, f32 + bf16, f32 + bf16)
        triton_backend.sq_norm(f32, [None, *f32[1:4], None, None, f32[6]])
    assert launched == ["_dots_partials_kernel"] * 2 + ["_sum_kernel"] + ["_sq_partials_kernel"] * 2 + ["_sum_kernel"]


def test_a_multi_op_keeps_its_table_for_the_same_buckets(monkeypatch):
    """A table is built for a list of buckets once and read again by the next steps' launches; a
    list at the same addresses but of other sizes (a bucket resized in place) gets its own."""
    storage = [torch.randn(3000).to(DEVICE) for _ in range(4)]
    monkeypatch.setattr(triton_backend, "_TABLES", triton_backend.OrderedDict())
    coef = torch.tensor(0.75, device=DEVICE)
    for sizes in ([1500, 17], [1500, 17], [2049, 5]):
        grads = [storage[0][: sizes[0]], storage[1][: sizes[1]]]
        dirs = [storage[2][: sizes[0]], storage[3][: sizes[1]]]
        expected = [g + d * 0.75 for g, d in zip(grads, dirs)]
        triton_backend.multi_look_add_(grads, dirs, coef)
        for got, want in zip(grads, expected):
            assert torch.equal(got, want)
    assert len(triton_backend._TABLES) == 2


def test_the_kept_tables_are_bounded(monkeypatch):
    monkeypatch.setattr(triton_backend, "_TABLES", triton_backend.OrderedDict())
    monkeypatch.setattr(triton_backend, "TABLES_KEPT", 3)
    coef = torch.tensor(0.5, device=DEVICE)
    for n in range(1, 7):
        triton_backend.multi_look_add_([torch.ones(n, device=DEVICE)] * 2, [torch.ones(n, device=DEVICE)] * 2, coef)
    assert len(triton_backend._TABLES) == 3


def test_table_ops_are_one_call_in_a_compiled_graph():
    """torch.compile keeps each op that launches multi-tensor kernels whole (its tables need real
    addresses, which fake tensors lack): one fullgraph graph gives the eager bits."""

    def step(params, grads, backups, ghats):
        sq = triton_backend.sq_norm(grads, [None] * len(grads))
        rho = triton_backend.multi_perturb_(params, grads, backups, sq, 0.35, 0.4, 1e-12, False)
        dots = triton_backend.xsam_dots(params, backups, ghats)
        look = triton_backend.look_dots(ghats, grads)
        triton_backend.multi_restore_(params, backups, ghats, grads, 1.5, 0.5)
        return sq, rho, dots, look

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        params, grads, ghats = (many_buckets(torch.float32, seed) for seed in range(3))
        backups = [torch.empty_like(p) for p in params]
        results.append((run(params, grads, backups, ghats), params + backups + ghats))
    (outputs, buckets), (outputs_ref, buckets_ref) = results
    assert outputs[1] > 0 and outputs[2][0] > 0
    assert all(torch.equal(a, b) for a, b in zip(outputs + tuple(buckets), outputs_ref + tuple(buckets_ref)))


def test_opcheck_of_the_table_ops():
    """torch.library.opcheck with the fake kernels and AOT dispatch, what torch.compile goes through:
    those ops never give fake tensors to Triton, so this runs on the CPU too (the per-bucket ops'
    are checked on the GPU, tests/test_ops*.py)."""
    p, b, g, c = (many_buckets(torch.float32, seed, sizes=(0, 17, 1025)) for seed in range(4))
    sq, coefs = torch.tensor(2.0, device=DEVICE), torch.tensor([0.5, 0.25], device=DEVICE)
    samples = [
        (triton_backend.sq_norm, (g, [None, *p[1:]])),
        (triton_backend.xsam_dots, (p, b, g)),
        (triton_backend.look_dots, (g, c)),
        (triton_backend._multi_perturb, (p, g, b, sq, 0.35, 0.4, 1e-12, True, c, None)),
        (triton_backend.multi_restore_, (p, b, g, c, 1.5, 0.5)),
        (triton_backend.multi_xsam_restore_, (p, b, g, None, coefs)),
        (triton_backend.multi_xsam_probe_, (p, b, g, c, coefs, True)),
        (triton_backend.multi_look_store_, (c, g, b, coefs[0], torch.zeros((), device=DEVICE))),
        (triton_backend.multi_look_add_, (g, c, coefs[1])),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_multi_perturb_of_empty_buckets_still_gives_the_radius():
    """An FSDP2 rank whose shards of a parameter group are all empty still returns rho_t (one
    program runs and stores it, taking no element), the same as perturb_ on an empty bucket."""
    params = [torch.empty(0, device=DEVICE) for _ in range(3)]
    sq = torch.tensor(4.0, device=DEVICE)
    rho = triton_backend.multi_perturb_(params, params, None, sq, 0.35, 0.4, 1e-12, False)
    assert torch.equal(rho, triton_backend.perturb_(params[0], params[0], None, sq, 0.35, 0.4, 1e-12, False))
    assert torch.equal(rho, torch.tensor(0.35 / 2, device=DEVICE))


def test_multi_ops_on_aligned_buckets_take_the_aligned_table():
    """Buckets at 16-byte addresses with sizes that are multiples of 16 (the common case) give an
    ALIGNED table, and its kernels (told so: `_table_pointer`) the per-bucket ops' bits."""
    gen = torch.Generator().manual_seed(0)
    params, grads, backups = (
        [torch.randn(n, generator=gen).to(torch.bfloat16).to(DEVICE) for n in (1024, 0, 16, 4096)] for _ in range(3)
    )
    assert triton_backend._table([params, grads, backups, params], 2048)[3]
    assert not triton_backend._table([params[:2], many_buckets(torch.bfloat16, 0, sizes=(0, 1024))], 2048)[3]
    assert not triton_backend._table([params[:2] + [params[3][:17]]], 2048)[3]
    sq = torch.tensor(3.0, device=DEVICE)
    w, w_ref = [p.clone() for p in params], [p.clone() for p in params]
    b_ref = [torch.empty_like(p) for p in params]
    rho = triton_backend.multi_perturb_(w, grads, backups, sq, 0.35, 0.4, 1e-12, True)
    for i in range(len(w_ref)):
        rho_ref = triton_backend.perturb_(w_ref[i], grads[i], b_ref[i], sq, 0.35, 0.4, 1e-12, True)
    assert torch.equal(rho, rho_ref)
    assert all(torch.equal(a, b) for a, b in zip(w + backups, w_ref + b_ref))
