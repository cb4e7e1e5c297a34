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
    """Each op of the backend once, on small fp32 buckets on ``device``."""
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
    # sq_norm 2, perturb_, restore_, xsam_dots 4, xsam_restore_, xsam_probe_, look_dots 3, look_store_,
    # look_add_, the steps
    assert len(launches) >= 16
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
DIVIDING = {"_perturb_kernel", "_adam_step_kernel"}

_COMPILE_FOR_SM90 = textwrap.dedent("""
    import json, re, sys
    import torch
    torch.cuda.is_available = lambda: True  # import the backend compiled, not interpreted, without a GPU
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_lesam.backends import triton as backend

    SCALAR_POINTERS = {"found_inf_ptr", "step_ptr", "sq_ptr", "sigma_ptr", "rho_ptr"}
    found = []
    for name, constexprs in json.loads(sys.argv[1]):
        kernel = getattr(backend, name)
        signature = {arg: "constexpr" if arg in constexprs else "*fp32" if arg in SCALAR_POINTERS else
                     "*bf16" if arg.endswith("_ptr") else "i64" if arg == "n" else "fp32" for arg in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        found.append(sorted(set(re.findall(r"\\b(?:div|sqrt)\\.[a-z0-9.]+", compiled.asm["ptx"]))))
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
    for (name, _), instructions in zip(COMPILED_KERNELS, found):
        assert bool(instructions) == (name in DIVIDING), f"{name}: divisions and square roots: {instructions}"
        approximate = [i for i in instructions if ".rn." not in i]
        assert not approximate, f"{name} uses approximate {approximate}"
