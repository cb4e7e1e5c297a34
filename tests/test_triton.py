"""The Triton backend's own helper: fp32 -> bf16 rounding to nearest even, written out in the
kernels because Triton's interpreter truncates (so the CPU tests check what the GPU computes)."""

import pytest
import torch
import triton
import triton.language as tl

from fused_lesam.backends.triton import _narrow  # runs where the backend does: see test_extension.py

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
    x = torch.cat([torch.randn(1000, generator=gen), ties,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-40])]).to(DEVICE)
    out = torch.empty_like(x, dtype=dtype)
    _narrow_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])
