"""The "triton" backend: the bucket ops as Triton kernels, registered as PyTorch custom ops.

The same maths as the reference backend (reference.py, the specification) and the C++/CUDA
kernels, over flat buckets:

- ``sq_norm``: one program per ``CHUNK`` elements writes a partial sum, then one program adds
  the partials in a fixed order. Two stages and no atomics: the same gradients give the same bits.
- ``perturb_``: every program reads the squared norm from device memory and back-solves rho_t,
  the guards and the scale itself; program 0 stores rho_t. The backup is written exactly.
- ``restore_``: the bit-exact restore, with the LE-SAM+ combine fused in.
- XSAM: ``xsam_dots`` (three partial sums per chunk, then three fixed-order sums),
  ``xsam_restore_`` and ``xsam_probe_`` (one pass each; the coefficients read from device memory).

Arithmetic is fp32 for fp32/bf16/fp16 buckets (loaded, converted, computed, converted back once).
Float arguments are not specialised by Triton, so one compiled kernel serves every sigma_t of an
annealing. Triton passes float scalars as fp32, which would cost fp64 buckets precision: those
take the reference ops. The ops are ``torch.library.triton_op``s (namespace ``fused_lesam_triton``),
so ``torch.compile`` traces into them.

On CUDA tensors this runs compiled kernels. With ``TRITON_INTERPRET=1`` set before Triton is
imported, it runs them through Triton's interpreter on CPU tensors too: that is how the tests
check them on machines without a GPU (slow; small buckets only).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import reference

NAME = "triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRETED):
    raise ImportError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on the CPU)")
if INTERPRETED:
    # The interpreter makes triton.jit return an InterpretedFunction: torch 2.14's wrap_triton hands
    # it back as is, torch 2.11's rejects it. Launch it directly then, on every torch.
    def wrap_triton(kernel):
        return kernel

CHUNK = 16384  # elements per partial sum of the norm, as in the C++/CUDA kernels
REDUCE_BLOCK = 1024  # elements loaded at a time by the norm programs
ELEMENTWISE_BLOCK = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}  # 4 KB per program
NUM_WARPS = 4


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    """fp32 x rounded to ``dtype`` to nearest even, as a GPU rounds. For bf16 the rounding is
    written out because Triton's interpreter truncates there, and the CPU tests should check what
    the GPU computes."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN stays NaN
    else:
        return x.to(dtype)


@triton.jit
def _sq_partials_kernel(g_ptr, w_ptr, n, partials_ptr, WEIGHTED: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """partials[pid] = sum of g^2 (or (w g)^2) over chunk pid, accumulated in the partials' dtype."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    acc_type = partials_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_type)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        if WEIGHTED:
            x = x * tl.load(w_ptr + offsets, mask=mask, other=0.0).to(acc_type)  # (|w| g)^2 = (w g)^2
        acc += x * x
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _sum_kernel(partials_ptr, count, out_ptr, BLOCK: tl.constexpr):
    """*out = the sum of count partials, in a fixed order (one program)."""
    acc = tl.zeros([BLOCK], dtype=partials_ptr.dtype.element_ty)
    for start in range(0, count, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offsets, mask=offsets < count, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _perturb_kernel(w_ptr, g_ptr, backup_ptr, center_ptr, sq_ptr, sigma_ptr, rho_ptr, n, sigma, rho_max, varrho,
                    ADAPTIVE: tl.constexpr, SAVE_BACKUP: tl.constexpr, SAVE_CENTER: tl.constexpr,
                    SIGMA_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr):
    # The radius back-solve (reference.radius_and_scale): rho_t = min(sigma / (n + varrho), rho_max),
    # scale = rho_t / (n + 1e-12); both 0 for a non-finite norm, the scale 0 for a zero norm.
    if SIGMA_ON_DEVICE:
        sigma = tl.load(sigma_ptr).to(tl.float32)
    norm = tl.sqrt(tl.load(sq_ptr).to(tl.float32))
    finite = norm - norm == 0.0  # false for inf and NaN
    rho = tl.where(finite, tl.minimum(sigma / (norm + varrho), rho_max), 0.0)
    scale = tl.where(finite & (norm > 0.0), rho / (norm + 1e-12), 0.0)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(rho_ptr, rho)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    w = tl.load(w_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask)
    if SAVE_BACKUP:
        tl.store(backup_ptr + offsets, w, mask=mask)
    if SAVE_CENTER:
        tl.store(center_ptr + offsets, g, mask=mask)
    wf = w.to(tl.float32)
    direction = g.to(tl.float32)
    if ADAPTIVE:
        direction = wf * wf * direction
    perturbed = _narrow(wf + direction * scale, w.dtype)
    tl.store(w_ptr + offsets, tl.where(finite, perturbed, w), mask=mask)  # a non-finite norm: w untouched


@triton.jit
def _restore_kernel(w_ptr, backup_ptr, g_ptr, center_ptr, n, ghat_coef, center_coef, COMBINE: tl.constexpr,
                    BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(w_ptr + offsets, tl.load(backup_ptr + offsets, mask=mask), mask=mask)
    if COMBINE:
        ghat = tl.load(g_ptr + offsets, mask=mask)
        center = tl.load(center_ptr + offsets, mask=mask).to(tl.float32)
        combined = ghat.to(tl.float32) * ghat_coef - center * center_coef
        tl.store(g_ptr + offsets, _narrow(combined, ghat.dtype), mask=mask)


def _check(op: str, name: str, t: Tensor, like: Optional[Tensor] = None, like_name: str = "") -> None:
    """The checks of the C++ ops (csrc/bucket_args.h), with the same messages."""
    where = f"fused_lesam_triton::{op}: {name}"
    if t.dtype not in reference.BUCKET_DTYPES:
        raise RuntimeError(f"{where} has dtype {t.dtype}; buckets must be float32, float64, float16 or bfloat16")
    if not t.is_contiguous():
        raise RuntimeError(f"{where} must be contiguous (a flat bucket), got strides {t.stride()}")
    if like is None:
        return
    if t.dtype != like.dtype:
        raise RuntimeError(f"{where} has dtype {t.dtype} but {like_name} has {like.dtype}")
    if t.numel() != like.numel():
        raise RuntimeError(f"{where} has {t.numel()} elements but {like_name} has {like.numel()}")
    if t.device != like.device:
        raise RuntimeError(f"{where} is on {t.device} but {like_name} is on {like.device}")


@triton_op("fused_lesam_triton::sq_norm", mutates_args=())
def sq_norm(grads: list[Tensor], weights: list[Optional[Tensor]]) -> Tensor:
    if len(grads) != len(weights):
        raise RuntimeError(f"fused_lesam_triton::sq_norm: got {len(grads)} grad buckets but {len(weights)} weights")
    for i, (grad, weight) in enumerate(zip(grads, weights)):
        _check("sq_norm", f"grads[{i}]", grad)
        if weight is not None:
            _check("sq_norm", f"weights[{i}]", weight, grad, f"grads[{i}]")
    out_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    chunks = [triton.cdiv(g.numel(), CHUNK) for g in grads]
    partials = torch.empty(sum(chunks), dtype=out_dtype, device=grads[0].device)
    first = 0
    for grad, weight, count in zip(grads, weights, chunks):
        if count:
            wrap_triton(_sq_partials_kernel)[(count,)](
                grad, grad if weight is None else weight, grad.numel(), partials[first:],
                WEIGHTED=weight is not None, CHUNK=CHUNK, BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
        first += count
    out = torch.empty((), dtype=out_dtype, device=grads[0].device)
    wrap_triton(_sum_kernel)[(1,)](partials, partials.numel(), out, BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return out


@triton_op("fused_lesam_triton::perturb_", mutates_args=("param", "backup", "center"))
def perturb_(param: Tensor, grad: Tensor, backup: Optional[Tensor], sq: Tensor, sigma: float, rho_max: float,
             varrho: float, adaptive: bool, center: Optional[Tensor] = None, sigma_t: Optional[Tensor] = None) -> Tensor:
    _check("perturb_", "param", param)
    _check("perturb_", "grad", grad, param, "param")
    if backup is not None:
        _check("perturb_", "backup", backup, param, "param")
    if center is not None:
        _check("perturb_", "center", center, param, "param")
    if sq.dim() != 0 or sq.dtype not in (torch.float32, torch.float64) or sq.device != param.device:
        raise RuntimeError(f"fused_lesam_triton::perturb_: sq must be the 0-d float32/float64 tensor sq_norm returns "
                           f"on param's device, got a {sq.dtype} tensor of shape {tuple(sq.shape)} on {sq.device}")
    if sigma_t is not None and (sigma_t.dim() != 0 or sigma_t.dtype != torch.float64):
        raise RuntimeError(f"fused_lesam_triton::perturb_: sigma_t must be a 0-d float64 tensor, got a {sigma_t.dtype} "
                           f"tensor of shape {tuple(sigma_t.shape)}")
    if sigma_t is not None and sigma_t.device != param.device:
        raise RuntimeError(f"fused_lesam_triton::perturb_: sigma_t is on {sigma_t.device} but param is on {param.device}")
    if param.dtype == torch.float64:
        return reference.perturb_(param, grad, backup, sq, sigma, rho_max, varrho, adaptive, center, sigma_t)
    rho = torch.empty((), dtype=torch.float32, device=param.device)
    block = ELEMENTWISE_BLOCK[param.dtype]
    grid = (max(1, triton.cdiv(param.numel(), block)),)  # one program at least: it stores rho_t
    wrap_triton(_perturb_kernel)[grid](
        param, grad, param if backup is None else backup, param if center is None else center, sq,
        sq if sigma_t is None else sigma_t, rho, param.numel(), sigma, rho_max, varrho, ADAPTIVE=adaptive,
        SAVE_BACKUP=backup is not None, SAVE_CENTER=center is not None, SIGMA_ON_DEVICE=sigma_t is not None,
        BLOCK=block, num_warps=NUM_WARPS)
    return rho


if torch.__version__ < (2, 14):
    # torch 2.11's autograd layer of a custom op bumps the version of every mutated argument by its
    # position, but the dispatcher leaves out trailing arguments at their defaults: perturb_ without
    # center and sigma_t fails there (IndexError). Its replacement skips the ones left out, as later
    # torch does; the op itself is unchanged.
    def _perturb_inplace_or_view(keyset, *args, **kwargs):
        for i in (0, 2, 8):  # param, backup, center
            if i < len(args):
                torch._library.custom_ops.increment_version(args[i])
        return perturb_._opoverload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)

    perturb_._lib.impl("perturb_", _perturb_inplace_or_view, "ADInplaceOrView", with_keyset=True, allow_override=True)


@triton_op("fused_lesam_triton::restore_", mutates_args=("param", "grad"))
def restore_(param: Tensor, backup: Tensor, grad: Tensor, center: Optional[Tensor], ghat_coef: float,
             center_coef: float) -> None:
    _check("restore_", "param", param)
    _check("restore_", "backup", backup, param, "param")
    _check("restore_", "grad", grad, param, "param")
    if center is not None:
        _check("restore_", "center", center, param, "param")
    if param.dtype == torch.float64:
        reference.restore_(param, backup, grad, center, ghat_coef, center_coef)
        return
    if param.numel() == 0:
        return
    block = ELEMENTWISE_BLOCK[param.dtype]
    wrap_triton(_restore_kernel)[(triton.cdiv(param.numel(), block),)](
        param, backup, grad, grad if center is None else center, param.numel(), ghat_coef, center_coef,
        COMBINE=center is not None, BLOCK=block, num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------- XSAM
@triton.jit
def _dots_partials_kernel(w_ptr, b_ptr, g_ptr, n, partials_ptr, total, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """partials[j * total + pid] for j = sum D^2, sum g^2, sum D g over chunk pid (D = w - b)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    acc_type = partials_ptr.dtype.element_ty
    dd = tl.zeros([BLOCK], dtype=acc_type)
    gg = tl.zeros([BLOCK], dtype=acc_type)
    dg = tl.zeros([BLOCK], dtype=acc_type)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        mask = offsets < n
        d = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(acc_type) - tl.load(b_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        dd += d * d
        gg += g * g
        dg += d * g
    tl.store(partials_ptr + pid, tl.sum(dd, axis=0))
    tl.store(partials_ptr + total + pid, tl.sum(gg, axis=0))
    tl.store(partials_ptr + 2 * total + pid, tl.sum(dg, axis=0))


@triton.jit
def _block_and_coefs(coefs_ptr, n, BLOCK: tl.constexpr):
    """This program's offsets and mask, and the slerp coefficients (c0, c1) read from the device."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n, tl.load(coefs_ptr).to(tl.float32), tl.load(coefs_ptr + 1).to(tl.float32)


@triton.jit
def _xsam_restore_kernel(w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, n, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr):
    offsets, mask, c0, c1 = _block_and_coefs(coefs_ptr, n, BLOCK)
    b = tl.load(backup_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask)
    if HAS_DELTA:
        d = tl.load(delta_ptr + offsets, mask=mask).to(tl.float32)
    else:
        d = tl.load(w_ptr + offsets, mask=mask).to(tl.float32) - b.to(tl.float32)
    tl.store(g_ptr + offsets, _narrow(d * c0 + g.to(tl.float32) * c1, g.dtype), mask=mask)
    tl.store(w_ptr + offsets, b, mask=mask)


@triton.jit
def _xsam_probe_kernel(w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, n, SAVE_DELTA: tl.constexpr,
                       BLOCK: tl.constexpr):
    offsets, mask, c0, c1 = _block_and_coefs(coefs_ptr, n, BLOCK)
    w = tl.load(w_ptr + offsets, mask=mask)
    b = tl.load(backup_ptr + offsets, mask=mask).to(tl.float32)
    if SAVE_DELTA:
        d = _narrow(w.to(tl.float32) - b, w.dtype)
        tl.store(delta_ptr + offsets, d, mask=mask)
    else:
        d = tl.load(delta_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(w_ptr + offsets, _narrow(b + (d.to(tl.float32) * c0 + g * c1), w.dtype), mask=mask)


def _check_coefs(op: str, coefs: Tensor, param: Tensor) -> None:
    if coefs.dim() != 1 or coefs.numel() != 2 or coefs.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"fused_lesam_triton::{op}: coefs must be a (2,) float32/float64 tensor, got a {coefs.dtype} "
                           f"tensor of shape {tuple(coefs.shape)}")
    if coefs.device != param.device:
        raise RuntimeError(f"fused_lesam_triton::{op}: coefs is on {coefs.device} but param is on {param.device}")


@triton_op("fused_lesam_triton::xsam_dots", mutates_args=())
def xsam_dots(params: list[Tensor], backups: list[Tensor], grads: list[Tensor]) -> Tensor:
    if not (len(params) == len(backups) == len(grads)):
        raise RuntimeError(f"fused_lesam_triton::xsam_dots: got {len(params)} param, {len(backups)} backup and "
                           f"{len(grads)} grad buckets; they must match one to one")
    if not params:
        raise RuntimeError("fused_lesam_triton::xsam_dots: needs at least one bucket")
    for i, (param, backup, grad) in enumerate(zip(params, backups, grads)):
        _check("xsam_dots", f"params[{i}]", param)
        _check("xsam_dots", f"backups[{i}]", backup, param, f"params[{i}]")
        _check("xsam_dots", f"grads[{i}]", grad, param, f"params[{i}]")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    chunks = [triton.cdiv(p.numel(), CHUNK) for p in params]
    total = sum(chunks)
    partials = torch.zeros(3 * max(total, 1), dtype=out_dtype, device=params[0].device)
    first = 0
    for param, backup, grad, count in zip(params, backups, grads, chunks):
        if count:
            wrap_triton(_dots_partials_kernel)[(count,)](
                param, backup, grad, param.numel(), partials[first:], total, CHUNK=CHUNK, BLOCK=REDUCE_BLOCK,
                num_warps=NUM_WARPS)
        first += count
    out = torch.empty(3, dtype=out_dtype, device=params[0].device)
    for j in range(3):
        wrap_triton(_sum_kernel)[(1,)](partials[j * total:], total, out[j:], BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return out


@triton_op("fused_lesam_triton::xsam_restore_", mutates_args=("param", "grad"))
def xsam_restore_(param: Tensor, backup: Tensor, grad: Tensor, delta: Optional[Tensor], coefs: Tensor) -> None:
    _check("xsam_restore_", "param", param)
    _check("xsam_restore_", "backup", backup, param, "param")
    _check("xsam_restore_", "grad", grad, param, "param")
    if delta is not None:
        _check("xsam_restore_", "delta", delta, param, "param")
    _check_coefs("xsam_restore_", coefs, param)
    if param.dtype == torch.float64:
        reference.xsam_restore_(param, backup, grad, delta, coefs)
        return
    if param.numel() == 0:
        return
    block = ELEMENTWISE_BLOCK[param.dtype]
    wrap_triton(_xsam_restore_kernel)[(triton.cdiv(param.numel(), block),)](
        param, backup, grad, param if delta is None else delta, coefs, param.numel(), HAS_DELTA=delta is not None,
        BLOCK=block, num_warps=NUM_WARPS)


@triton_op("fused_lesam_triton::xsam_probe_", mutates_args=("param", "delta"))
def xsam_probe_(param: Tensor, backup: Tensor, grad: Tensor, delta: Tensor, coefs: Tensor, save_delta: bool) -> None:
    _check("xsam_probe_", "param", param)
    _check("xsam_probe_", "backup", backup, param, "param")
    _check("xsam_probe_", "grad", grad, param, "param")
    _check("xsam_probe_", "delta", delta, param, "param")
    _check_coefs("xsam_probe_", coefs, param)
    if param.dtype == torch.float64:
        reference.xsam_probe_(param, backup, grad, delta, coefs, save_delta)
        return
    if param.numel() == 0:
        return
    block = ELEMENTWISE_BLOCK[param.dtype]
    wrap_triton(_xsam_probe_kernel)[(triton.cdiv(param.numel(), block),)](
        param, backup, grad, delta, coefs, param.numel(), SAVE_DELTA=save_delta, BLOCK=block, num_warps=NUM_WARPS)
