"""The bucket-op tests' cases and builders: which backends run where (the targets), the sizes,
dtypes and offsets, the buckets, and the sums' error depths (tests/test_ops*.py)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fused_lesam import maths

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Sizes that matter to compiled kernels: empty, one element, around the 16-element vector width,
# and over a million (many reduction chunks, several CPU threads).
COMPILED_SIZES = [0, 1, 15, 16, 17, 4095, (1 << 20) + 3]
# Triton's interpreter runs each program in Python, so small buckets: around the blocks (1024
# fp32 elements, 2048 fp16/bf16) and several blocks.
INTERPRETED_SIZES = [0, 1, 17, 1023, 1024, 1025, 2047, 2048, 2049, 5000]

# name: (backend, device, sizes, marks). Each is tested against the spec on the same device.
TARGETS = {
    "cpp": ("cpp", "cpu", COMPILED_SIZES, ()),
    # tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU; GPU machines run "triton".
    "triton-interpreter": (
        "triton",
        "cpu",
        INTERPRETED_SIZES,
        (
            pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1",
                reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1",
            ),
        ),
    ),
    "cuda": ("cuda", "cuda", COMPILED_SIZES, (pytest.mark.cuda,)),
    "triton": ("triton", "cuda", COMPILED_SIZES, (pytest.mark.cuda,)),
}


# The reductions are checked on the spec backend too (its torch.dot goes through the BLAS
# torch was built with, whose rounding differs by CPU), against the exact sum like the kernels.
REDUCTION_TARGETS = {
    "torch": ("torch", "cpu", COMPILED_SIZES, ()),
    "torch-cuda": ("torch", "cuda", COMPILED_SIZES, (pytest.mark.cuda,)),
    **TARGETS,
}


def targets(table=TARGETS):
    return [pytest.param(backend, device, id=name, marks=marks) for name, (backend, device, _, marks) in table.items()]


def targets_and_sizes(table=TARGETS):
    return [
        pytest.param(backend, device, size, id=f"{name}-{size}", marks=marks)
        for name, (backend, device, sizes, marks) in table.items()
        for size in sizes
    ]


def largest_size(backend, device):
    return next(max(sizes) for b, d, sizes, _ in REDUCTION_TARGETS.values() if (b, d) == (backend, device))


def summation_depth(backend, sizes):
    """The longest chain of roundings from a term to the result (helpers/asserts.py, sum_error_bound) of a
    reduction over buckets of ``sizes`` elements: up to 3 making a term (w g, then its square; or
    D = w - b, then D g) and a final conversion, plus the summation's own depth. The kernels sum a
    chunk in running sums of at most 1024 terms (C++: 16 lanes of 1024; CUDA: a thread's 64, then
    a tree; Triton: 1024 lanes of 16, then a tree), then the lanes (at most 16 deep), then the
    partials of every chunk one after another (or fewer levels). The "torch" backend hands each
    bucket to torch.dot, i.e. to the BLAS torch was built with: its order is unknown, and a plain
    loop, n deep, is the deepest there is; then it adds the buckets' results."""
    largest = max(sizes, default=0)
    if backend == "torch":
        return largest + len(sizes) + 4
    return min(largest, 1024) + 16 + sum(math.ceil(n / maths.REDUCE_CHUNK) for n in sizes) + 4


def sq_terms(grad, weight):
    """The exact terms of sq_norm's sum (fp64): g^2, or (|w| g)^2."""
    x = grad.double() if weight is None else grad.double() * weight.double()
    return x * x


def sq_parts(grads, weights):
    """sq_norm's terms per bucket with the dtype each bucket is summed in, for assert_sum_close."""
    return [(sq_terms(g, w), maths.acc_dtype(g.dtype)) for g, w in zip(grads, weights)]


def integer_bucket(size, dtype, device, seed, offset=0):
    """Values in {-2, -1, 1, 2}: exact in every dtype, and so are their products and, below 2^24,
    every partial sum of them, in any order: a sum of them has one right answer."""
    gen = torch.Generator().manual_seed(seed)
    magnitudes = torch.randint(1, 3, (size,), generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1
    return at_offset((magnitudes * signs).to(dtype).to(device), offset)


def exact_sum(parts):
    """The exact sum of integer terms, checked to be one that fp32 holds at every step."""
    total = math.fsum(float(terms.abs().sum()) for terms, _ in parts)
    assert total < 2**24, "every partial sum must be exact in fp32"
    return math.fsum(float(terms.sum()) for terms, _ in parts)


OFFSETS = [0, 3]  # 3 elements in: the bucket's pointer is not 16-byte aligned
RADII = {  # (sigma_t, rho_max, varrho)
    "lesam": (0.35, 0.4, 1e-12),
    "clipped": (5.0, 0.05, 1e-12),
    "sam": (math.inf, 0.05, 1.0),
    "zero-sigma": (0.0, 0.4, 1e-12),
}
LESAM = RADII["lesam"]
REGIMES = ["normal", "zero", "tiny", "huge", "nan", "inf"]


def at_offset(values, offset):
    """A contiguous view holding ``values`` that starts ``offset`` elements into its storage."""
    storage = torch.zeros(offset + values.numel(), dtype=values.dtype, device=values.device)
    storage[offset:] = values
    return storage[offset:]


def random_bucket(size, dtype, device, seed, offset=0, regime="normal"):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(size, generator=gen, dtype=torch.float64)
    if regime == "zero":
        values.zero_()
    elif regime == "tiny":
        values *= 1e-30  # its square underflows in fp32: a zero norm from non-zero gradients
    elif regime == "huge":
        values *= 1e4 if dtype == torch.float16 else 1e15  # large but a finite norm in fp32
    elif regime in ("nan", "inf") and size:
        values[size // 2] = float(regime)
    return at_offset(values.to(dtype).to(device), offset)


def clone_at(t, offset):
    return at_offset(t.clone(), offset)


def assert_same_bits_with_any_thread_count(compute):
    """``compute()`` gives the same tensor with 1, 2 and the default number of CPU threads."""
    first = compute()
    threads = torch.get_num_threads()
    try:
        for n in {1, threads, max(2, threads)}:
            torch.set_num_threads(n)
            assert torch.equal(compute(), first), f"differs with {n} threads"
    finally:
        torch.set_num_threads(threads)


# Fake tensors cannot go through Triton's interpreter (it reads their data), so the Triton ops'
# fake kernels and their torch.compile tracing are checked on the GPU only.
TRACEABLE = [t for t in targets() if t.id != "triton-interpreter"]
