"""The "torch" backend: the bucket ops in plain PyTorch.

This file is the specification. The C++, CUDA and Triton kernels compute the same thing and are
tested against it; it also runs anywhere torch runs (CPU, CUDA, any dtype). Everything stays on
the device: no ``.item()``, no Python branch on a tensor value, so no host synchronisation.

Each op works on flat 1-D buckets (see ``fused_lesam.buckets``). Arithmetic is done in the
accumulation dtype (fp32, or fp64 for fp64 buckets) and rounded to the bucket's dtype once.

SAM and LE-SAM use ``sq_norm``, ``perturb_`` and ``restore_``. XSAM (docs/design.md §1) ascends with
``sq_norm`` and ``perturb_`` too, then uses ``xsam_dots`` (three reductions in one pass) and
``xsam_restore_`` / ``xsam_probe_`` (one element-wise pass each). LookSAM (fused_lesam.throughput)
adds ``look_dots`` (two reductions in one pass), ``look_store_`` and ``look_add_`` (one element-wise
pass each). The scalars between the ops (the
radius, XSAM's slerp coefficients) are computed by ``fused_lesam.maths``, for every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..maths import acc_dtype, radius_and_scale, sum_dtype

NAME = "torch"


def sq_norm(grads: Sequence[Tensor], weights: Sequence[Tensor | None]) -> Tensor:
    """Sum over buckets of sum((|w| * g)^2), or of sum(g^2) where the weight is None.

    ``weights[i]`` is the parameter bucket of an adaptive (ASAM) group, else None. Returns a 0-d
    tensor on the buckets' device, fp32 (fp64 if any bucket is fp64).
    """
    out_dtype = sum_dtype(grads)
    partials = []
    for grad, weight in zip(grads, weights):
        x = grad.to(acc_dtype(grad.dtype))
        if weight is not None:
            x = x * weight.to(x.dtype).abs()
        partials.append(torch.dot(x, x).to(out_dtype))  # one pass, no squared temporary
    return torch.stack(partials).sum()


def perturb_(
    param: Tensor,
    grad: Tensor,
    backup: Tensor | None,
    sq: Tensor,
    sigma: float,
    rho_max: float,
    varrho: float,
    adaptive: bool,
    center: Tensor | None = None,
    sigma_t: Tensor | None = None,
) -> Tensor:
    """backup <- w (if given); w <- w + eps with eps = s*g (s*w*w*g if adaptive); center <- g if given.

    ``sq`` is the global squared norm from `sq_norm`. XSAM's later ascent steps pass no backup:
    the one written by the first step is the w_0 to restore. ``sigma_t``, a 0-d float64 tensor on the
    device, replaces ``sigma`` when given (a schedule computed on the device). Returns rho_t (0-d,
    on the device).
    """
    dtype = acc_dtype(param.dtype)
    rho, scale = radius_and_scale(sq.to(dtype), sigma if sigma_t is None else sigma_t, rho_max, varrho)
    if backup is not None:
        backup.copy_(param)
    before = backup if backup is not None else param.clone()  # for the non-finite guard below
    if center is not None:
        center.copy_(grad)
    w = param.to(dtype)  # param itself for fp32/fp64 buckets: then everything below is in place
    g = grad.to(dtype)
    direction = w * w * g if adaptive else g
    w.addcmul_(direction, scale)
    # A non-finite norm leaves w untouched: scale is 0 then, but 0 * NaN would still be NaN.
    torch.where(torch.isfinite(sq), w, before, out=w)
    if w is not param:
        param.copy_(w)
    return rho


def restore_(
    param: Tensor,
    backup: Tensor,
    grad: Tensor,
    center: Tensor | None,
    ghat_coef: float,
    center_coef: float,
) -> None:
    """w <- backup (bit-exact); with a center gradient, g <- ghat_coef * g_hat - center_coef * g.

    LE-SAM+ uses ghat_coef = 1 + alpha, center_coef = alpha (the gradient of
    L(w+eps) + alpha * (L(w+eps) - L(w))).
    """
    param.copy_(backup)
    if center is not None:
        dtype = acc_dtype(grad.dtype)
        g = grad.to(dtype)  # grad itself for fp32/fp64 buckets
        g.mul_(ghat_coef).sub_(center.to(dtype), alpha=center_coef)
        if g is not grad:
            grad.copy_(g)


# ---------------------------------------------------------------------------------------- XSAM
def xsam_dots(params: Sequence[Tensor], backups: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """[||D||^2, ||g||^2, D . g] summed over buckets, D = param - backup (w_k - w_0), g the last
    gradient: a (3,) tensor on the buckets' device, fp32 (fp64 if any bucket is fp64)."""
    out_dtype = sum_dtype(params)
    sums = []
    for param, backup, grad in zip(params, backups, grads):
        dtype = acc_dtype(param.dtype)
        delta = param.to(dtype) - backup.to(dtype)
        g = grad.to(dtype)
        sums.append(torch.stack([torch.dot(delta, delta), torch.dot(g, g), torch.dot(delta, g)]).to(out_dtype))
    return torch.stack(sums).sum(0)


def xsam_restore_(param: Tensor, backup: Tensor, grad: Tensor, delta: Tensor | None, coefs: Tensor) -> None:
    """g <- c0 * D + c1 * g with D = delta if given, else param - backup; then w <- backup (bit-exact).

    ``coefs`` is the (2,) tensor of `slerp_coefficients` (length ||g||: XSAM's update gradient)."""
    dtype = acc_dtype(param.dtype)
    d = delta.to(dtype) if delta is not None else param.to(dtype) - backup.to(dtype)
    c = coefs.to(dtype)
    grad.copy_(d * c[0] + grad.to(dtype) * c[1])
    param.copy_(backup)


def xsam_probe_(param: Tensor, backup: Tensor, grad: Tensor, delta: Tensor, coefs: Tensor, save_delta: bool) -> None:
    """w <- backup + c0 * D + c1 * g, a point of XSAM's alpha search; with ``save_delta`` first
    delta <- param - backup (D = w_k - w_0, which the probe overwrites in param)."""
    dtype = acc_dtype(param.dtype)
    if save_delta:
        delta.copy_(param.to(dtype) - backup.to(dtype))
    c = coefs.to(dtype)
    param.copy_(backup.to(dtype) + (delta.to(dtype) * c[0] + grad.to(dtype) * c[1]))


# ------------------------------------------------------------------ the base update, fused into the restore
# One pass that ends a step: it reads the saved weights w0 (``backup``; None: w0 is param itself, the
# one-pass steps of fused_lesam.throughput, which perturb nothing), the final gradient and the
# base optimizer's state, and writes the weights and the state, with the LE-SAM+ combine fused in.
# It computes what torch.optim.SGD / Adam / AdamW (``foreach=False``) compute for the step at w0,
# in the accumulation dtype (fp32 for fp32/bf16/fp16 buckets, fp64 for fp64), rounding each stored
# value once to the bucket's dtype (state tensors have the parameter's dtype, as torch keeps them).
# ``found_inf`` (0-d float32 on the device, nonzero: the step is skipped) is read on the device:
# a skipped step restores w0 bit-exactly and writes no state.


def _final_grad(
    grad: Tensor, center: Tensor | None, ghat_coef: float, center_coef: float, maximize: bool, dtype: torch.dtype
) -> Tensor:
    """The gradient the base optimizer steps with: the LE-SAM+ combine, then maximize's sign."""
    g = grad.to(dtype)
    if center is not None:
        g = g * ghat_coef - center.to(dtype) * center_coef
    return -g if maximize else g


def _skip_or(found_inf: Tensor, param: Tensor, w0: Tensor, new: Tensor) -> None:
    """param <- w0 where the step is skipped, else ``new`` rounded to the bucket's dtype."""
    param.copy_(torch.where(found_inf != 0, w0, new.to(param.dtype)))


def _write_state(found_inf: Tensor, state: Tensor, new: Tensor) -> Tensor:
    """state <- new (rounded to its dtype) unless the step is skipped; returns the stored value in
    the accumulation dtype, which the rest of the step uses (as torch's reads of its state do)."""
    state.copy_(torch.where(found_inf != 0, state, new.to(state.dtype)))
    return state.to(new.dtype)


def sgd_step_(
    param: Tensor,
    backup: Tensor | None,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    center: Tensor | None,
    found_inf: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_buffer: bool,
    ghat_coef: float,
    center_coef: float,
) -> None:
    """w <- SGD step of torch.optim.SGD from w0 = backup with the final gradient g (combined with
    ``center`` for LE-SAM+: ghat_coef * g - center_coef * center):

        g <- -g if maximize;  g <- g + weight_decay * w0
        b <- g if init_buffer else momentum * b + (1 - dampening) * g     (when momentum != 0)
        d <- g + momentum * b if nesterov else b                          (d = g without momentum)
        w <- w0 - lr * d

    ``backup`` None: w0 is param (a step that perturbed nothing). ``momentum_buffer`` is None
    exactly when momentum == 0. ``init_buffer`` is torch's first step
    of a parameter (its buffer is a copy of g). The gradient is not written.
    """
    dtype = acc_dtype(param.dtype)
    start = param if backup is None else backup
    w0 = start.to(dtype)
    g = _final_grad(grad, center, ghat_coef, center_coef, maximize, dtype)
    if weight_decay != 0:
        g = g + w0 * weight_decay
    d = g
    if momentum != 0:
        b = g if init_buffer else momentum_buffer.to(dtype) * momentum + g * (1 - dampening)
        b = _write_state(found_inf, momentum_buffer, b)
        d = g + b * momentum if nesterov else b
    _skip_or(found_inf, param, start, w0 - d * lr)


def adam_step_(
    param: Tensor,
    backup: Tensor | None,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    center: Tensor | None,
    step: Tensor,
    found_inf: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    ghat_coef: float,
    center_coef: float,
) -> None:
    """w <- Adam (AdamW with ``decoupled_weight_decay``) step of torch.optim.Adam from w0 = backup
    with the final gradient g (combined as in `sgd_step_`):

        g <- -g if maximize
        w0 <- w0 * (1 - lr * weight_decay) if decoupled, else g <- g + weight_decay * w0
        m <- lerp(m, g, 1 - beta1);  v <- beta2 * v + (1 - beta2) * g * g
        vmax <- max(vmax, v) (amsgrad; then v below reads vmax)
        w <- w0 - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    ``step`` (0-d float32 on the device) holds t, the step count this update is (the caller has
    already advanced it); ``backup`` as in `sgd_step_`; the bias corrections are computed from it in fp64 on the device.
    ``max_exp_avg_sq`` is None exactly when not amsgrad. The gradient is not written.
    """
    dtype = acc_dtype(param.dtype)
    t = step.to(torch.float64)
    step_size = (lr / (1 - beta1**t)).to(dtype)
    bias2_sqrt = (1 - beta2**t).sqrt().to(dtype)
    start = param if backup is None else backup
    w0 = start.to(dtype)
    g = _final_grad(grad, center, ghat_coef, center_coef, maximize, dtype)
    if weight_decay != 0:
        if decoupled_weight_decay:
            w0 = w0 * (1 - lr * weight_decay)
        else:
            g = g + w0 * weight_decay
    m = _write_state(found_inf, exp_avg, torch.lerp(exp_avg.to(dtype), g, 1 - beta1))
    v = _write_state(found_inf, exp_avg_sq, exp_avg_sq.to(dtype) * beta2 + g * g * (1 - beta2))
    if amsgrad:
        v = _write_state(found_inf, max_exp_avg_sq, torch.maximum(max_exp_avg_sq.to(dtype), v))
    denom = v.sqrt() / bias2_sqrt + eps
    _skip_or(found_inf, param, start, w0 - step_size * (m / denom))


# ---------------------------------------------------------------------------------------- LookSAM
def look_dots(grads: Sequence[Tensor], centers: Sequence[Tensor]) -> Tensor:
    """[g_hat . g, ||g||^2] summed over buckets, g_hat the gradient at the perturbed point (grads),
    g the first one (centers): a (2,) tensor on the buckets' device, fp32 (fp64 if any bucket is fp64)."""
    out_dtype = sum_dtype(grads)
    sums = []
    for grad, center in zip(grads, centers):
        dtype = acc_dtype(grad.dtype)
        g_hat = grad.to(dtype)
        g = center.to(dtype)
        sums.append(torch.stack([torch.dot(g_hat, g), torch.dot(g, g)]).to(out_dtype))
    return torch.stack(sums).sum(0)


def look_store_(look_dir: Tensor, grad: Tensor, center: Tensor, coef: Tensor, found_inf: Tensor) -> None:
    """look_dir <- g_hat - coef * g (g_hat = grad, g = center), unless ``found_inf`` (0-d float32 on
    the device, nonzero: the step is skipped and look_dir keeps its value bit-exactly).

    ``coef`` is the 0-d float32/float64 tensor of `look_projection`."""
    dtype = acc_dtype(grad.dtype)
    new = grad.to(dtype) - center.to(dtype) * coef.to(dtype)
    look_dir.copy_(torch.where(found_inf != 0, look_dir, new.to(look_dir.dtype)))


def look_add_(grad: Tensor, look_dir: Tensor, coef: Tensor) -> None:
    """g <- g + coef * look_dir, LookSAM's gradient on a reuse step; ``coef`` (0-d float32/float64 on
    the device) is `look_reuse_coefficient`."""
    dtype = acc_dtype(grad.dtype)
    grad.copy_(grad.to(dtype) + look_dir.to(dtype) * coef.to(dtype))


# ------------------------------------------------------------------------------ multi-tensor forms
# One call per (device, dtype) over a list of buckets that share the scalars: the form the engine
# uses, so that sharded (FSDP2) parameters, one bucket each, cost one call (one kernel launch on
# CUDA and Triton, one op call on CPU) per op instead of one per shard. Each element of the lists is
# exactly the per-bucket op's argument; every tensor of one call has the same device and dtype, and a
# list has at least one bucket. Optional lists (``backups``, ``centers``, ``deltas``) are given for
# every bucket or for none.


def _same_length(op: str, **lists: Sequence[Tensor] | None) -> int:
    """The number of buckets in a multi-tensor call, after checking the lists agree with each other:
    one length (at least 1), one device and one dtype over all their tensors."""
    given = {name: value for name, value in lists.items() if value is not None}
    lengths = {name: len(value) for name, value in given.items()}
    count = next(iter(lengths.values()))
    if count == 0 or any(n != count for n in lengths.values()):
        raise RuntimeError(f"fused_lesam::{op}: the lists must have one length, at least 1; got {lengths}")
    first_name, first = next(iter(given.items()))
    for name, tensors in given.items():
        for i, t in enumerate(tensors):
            if t.dtype != first[0].dtype or t.device != first[0].device:
                raise RuntimeError(
                    f"fused_lesam::{op}: {name}[{i}] is {t.dtype} on {t.device} but {first_name}[0] is "
                    f"{first[0].dtype} on {first[0].device}; one call takes one dtype on one device"
                )
    return count


def multi_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor] | None,
    sq: Tensor,
    sigma: float,
    rho_max: float,
    varrho: float,
    adaptive: bool,
    centers: Sequence[Tensor] | None = None,
    sigma_t: Tensor | None = None,
) -> Tensor:
    """`perturb_` on every bucket of the lists, with one radius; returns it (0-d, on the device)."""
    count = _same_length("multi_perturb_", params=params, grads=grads, backups=backups, centers=centers)
    for i in range(count):
        backup = None if backups is None else backups[i]
        center = None if centers is None else centers[i]
        rho = perturb_(params[i], grads[i], backup, sq, sigma, rho_max, varrho, adaptive, center, sigma_t)
    return rho


def multi_restore_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    centers: Sequence[Tensor] | None,
    ghat_coef: float,
    center_coef: float,
) -> None:
    """`restore_` on every bucket of the lists."""
    count = _same_length("multi_restore_", params=params, backups=backups, grads=grads, centers=centers)
    for i in range(count):
        restore_(params[i], backups[i], grads[i], None if centers is None else centers[i], ghat_coef, center_coef)


def multi_xsam_restore_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    deltas: Sequence[Tensor] | None,
    coefs: Tensor,
) -> None:
    """`xsam_restore_` on every bucket of the lists."""
    count = _same_length("multi_xsam_restore_", params=params, backups=backups, grads=grads, deltas=deltas)
    for i in range(count):
        xsam_restore_(params[i], backups[i], grads[i], None if deltas is None else deltas[i], coefs)


def multi_xsam_probe_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    deltas: Sequence[Tensor],
    coefs: Tensor,
    save_delta: bool,
) -> None:
    """`xsam_probe_` on every bucket of the lists."""
    count = _same_length("multi_xsam_probe_", params=params, backups=backups, grads=grads, deltas=deltas)
    for i in range(count):
        xsam_probe_(params[i], backups[i], grads[i], deltas[i], coefs, save_delta)


def multi_look_store_(
    look_dirs: Sequence[Tensor], grads: Sequence[Tensor], centers: Sequence[Tensor], coef: Tensor, found_inf: Tensor
) -> None:
    """`look_store_` on every bucket of the lists."""
    count = _same_length("multi_look_store_", look_dirs=look_dirs, grads=grads, centers=centers)
    for i in range(count):
        look_store_(look_dirs[i], grads[i], centers[i], coef, found_inf)


def multi_look_add_(grads: Sequence[Tensor], look_dirs: Sequence[Tensor], coef: Tensor) -> None:
    """`look_add_` on every bucket of the lists."""
    count = _same_length("multi_look_add_", grads=grads, look_dirs=look_dirs)
    for i in range(count):
        look_add_(grads[i], look_dirs[i], coef)
