"""The "torch" backend: the three bucket ops in plain PyTorch.

This file is the specification. The C++, CUDA and Triton kernels compute the same thing and are
tested against it; it also runs anywhere torch runs (CPU, CUDA, any dtype). Everything stays on
the device: no ``.item()``, no Python branch on a tensor value, so no host synchronisation.

Each op works on flat 1-D buckets (see ``fused_lesam.buckets``). Arithmetic is done in the
accumulation dtype (fp32, or fp64 for fp64 buckets) and rounded to the bucket's dtype once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

NAME = "torch"

# The dtypes a bucket may have (every backend takes these).
BUCKET_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Added to the norm before dividing by it; the paper's eps = rho_t * g / ||g|| (DESIGN.md §1).
NORM_EPS = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic of a bucket of ``dtype`` is done in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sq_norm(grads: Sequence[Tensor], weights: Sequence[Optional[Tensor]]) -> Tensor:
    """Sum over buckets of sum((|w| * g)^2), or of sum(g^2) where the weight is None.

    ``weights[i]`` is the parameter bucket of an adaptive (ASAM) group, else None. Returns a 0-d
    tensor on the buckets' device, fp32 (fp64 if any bucket is fp64).
    """
    out_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    partials = []
    for grad, weight in zip(grads, weights):
        x = grad.to(acc_dtype(grad.dtype))
        if weight is not None:
            x = x * weight.to(x.dtype).abs()
        partials.append(torch.dot(x, x).to(out_dtype))  # one pass, no squared temporary
    return torch.stack(partials).sum()


def radius_and_scale(sq: Tensor, sigma: float | Tensor, rho_max: float, varrho: float) -> tuple[Tensor, Tensor]:
    """rho_t = min(sigma / (n + varrho), rho_max) and the scale rho_t / (n + 1e-12) applied to g.

    ``sigma`` is a number or a 0-d tensor on the device (rounded to ``sq``'s dtype first);
    ``sigma = inf`` means a fixed radius ``rho_max`` (classic SAM). A zero norm gives scale 0 (so
    eps = 0 exactly, whatever varrho); a non-finite norm gives rho_t = 0 and scale 0: no perturbation.
    """
    norm = sq.sqrt()
    usable = torch.isfinite(norm)
    # A tensor either way (a fill, not a host-to-device copy), so that both forms divide alike.
    sigma = sigma.to(norm.dtype) if isinstance(sigma, Tensor) else torch.full_like(norm, sigma)
    rho = torch.clamp(sigma / (norm + varrho), max=rho_max)
    rho = torch.where(usable, rho, 0.0)
    scale = torch.where(usable & (norm > 0), rho / (norm + NORM_EPS), 0.0)
    return rho, scale


def perturb_(
    param: Tensor,
    grad: Tensor,
    backup: Tensor,
    sq: Tensor,
    sigma: float,
    rho_max: float,
    varrho: float,
    adaptive: bool,
    center: Optional[Tensor] = None,
    sigma_t: Optional[Tensor] = None,
) -> Tensor:
    """backup <- w; w <- w + eps with eps = s*g (s*w*w*g if adaptive); center <- g if given.

    ``sq`` is the global squared norm from `sq_norm`. ``sigma_t``, a 0-d float64 tensor on the
    device, replaces ``sigma`` when given (a schedule computed on the device). Returns rho_t (0-d,
    on the device).
    """
    dtype = acc_dtype(param.dtype)
    rho, scale = radius_and_scale(sq.to(dtype), sigma if sigma_t is None else sigma_t, rho_max, varrho)
    backup.copy_(param)
    if center is not None:
        center.copy_(grad)
    w = param.to(dtype)  # param itself for fp32/fp64 buckets: then everything below is in place
    g = grad.to(dtype)
    direction = w * w * g if adaptive else g
    w.addcmul_(direction, scale)
    # A non-finite norm leaves w untouched: scale is 0 then, but 0 * NaN would still be NaN.
    torch.where(torch.isfinite(sq), w, backup, out=w)
    if w is not param:
        param.copy_(w)
    return rho


def restore_(
    param: Tensor,
    backup: Tensor,
    grad: Tensor,
    center: Optional[Tensor],
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
