"""The scalar maths of every optimizer, in one place: csrc/lesam_math.h is its C++/CUDA twin.

The named constants are shared by the Python backends (spec.py, triton.py) and the front-end,
and must equal their ``k...`` counterparts in lesam_math.h. The functions compute a step's
scalars (the radius, the slerp coefficients, the clipping coefficient) on the device, from 0-d
tensors: no ``.item()``, no Python branch on a tensor value, so no host synchronisation. The
schedule (`sigma_at`) is host arithmetic on Python numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

# The dtypes a bucket may have (every backend takes these).
BUCKET_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Added to the norm before dividing by it; the paper's eps = rho_t * g / ||g|| (docs/design.md §1).
# lesam_math.h: kNormEps.
NORM_EPS = 1e-12

# Elements per partial sum of a reduction (sq_norm, xsam_dots): the partials are then added in a
# fixed order, so that the same gradients give the same bits. lesam_math.h: kReduceChunk.
REDUCE_CHUNK = 16384

# torch.nn.utils.clip_grad_norm_'s guard: the clipping coefficient is max_norm / (||g|| + 1e-6).
CLIP_EPS = 1e-6

# Below this sine of the angle between the ascent and the last gradient, the slerp's division is
# replaced by the linear interpolation, its limit as the angle goes to 0 (the XSAM reference code
# uses (v0 + v1) / 2 there, docs/design.md §4, which is that only at alpha = 0.5; the interpolation
# keeps alpha = 1 exactly SAM). Near an angle of pi there is no limit: the same form is a choice.
SLERP_MIN_SIN = 1e-8


# ---------------------------------------------------------------------- precision
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic of a bucket of ``dtype`` is done in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_dtype(buckets: Iterable[Tensor]) -> torch.dtype:
    """The dtype of a reduction over several buckets: fp64 if any bucket is fp64, else fp32."""
    return torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32


# ---------------------------------------------------------------------- SAM and LE-SAM
def radius_and_scale(sq: Tensor, sigma: float | Tensor, rho_max: float, varrho: float) -> tuple[Tensor, Tensor]:
    """rho_t = min(sigma / (n + varrho), rho_max) and the scale rho_t / (n + NORM_EPS) applied to g.

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


def clip_coefficient(sq: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (||g|| + CLIP_EPS)) from the squared norm: torch's clip_grad_norm_ rule."""
    return (max_norm / (sq.sqrt() + CLIP_EPS)).clamp(max=1.0)


# ---------------------------------------------------------------------- the schedule
def sigma_at(
    t: int,
    sigma0: float,
    total: int,
    anneal: int,
    sigma_min: float = 0.0,
    warmup: int = 0,
) -> float:
    """Loss budget after ``t`` completed units (steps or epochs; the first unit has ``t = 0``).

    Held at ``sigma0`` until ``decay_start = total - anneal``, then a cosine down to ``sigma_min``
    that reaches it exactly at the last unit ``t = total - 1`` (the authors' released code), and
    ``sigma_min`` after that. ``anneal = 0`` means no annealing. With ``warmup > 0`` sigma first
    rises linearly from 0: ``sigma0 * t / warmup`` for ``t < warmup`` (the newest released script
    does this; the paper does not describe it).
    """
    if t < warmup:
        return sigma0 * t / warmup
    if anneal <= 0:
        return sigma0
    decay_start = total - anneal
    if t < decay_start:
        return sigma0
    if total - decay_start <= 1:
        return sigma_min
    # Clamp the phase, not sigma: past the last unit the cosine would rise again.
    frac = min(1.0, (t - decay_start) / (total - 1 - decay_start))
    return sigma_min + 0.5 * (sigma0 - sigma_min) * (1.0 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------- XSAM
def slerp_coefficients(
    dots: Tensor, alpha: float | Tensor, length: float | Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(c0, c1) with c0 * D + c1 * g = length * d(alpha), from ``xsam_dots``'s dots.

    v0 = D / (||D|| + eps), v1 = g / (||g|| + eps), theta = arccos(clamp(v0 . v1, -1, 1)) and
    d(alpha) = sin((1 - alpha) theta) / sin theta * v0 + sin(alpha theta) / sin theta * v1 (slerp).
    Guards: sin theta < SLERP_MIN_SIN takes the slerp's limit (1 - alpha) v0 + alpha v1; a zero
    ascent (D = 0) has no direction to turn from, so d = v1; non-finite dots give c0 = c1 = 0. Also
    returns theta. Everything stays on the device; every backend's XSAM step uses these.
    """
    dots = dots.to(acc_dtype(dots.dtype))
    norm_d, norm_g = dots[0].sqrt(), dots[1].sqrt()
    cos = (dots[2] / ((norm_d + eps) * (norm_g + eps))).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    if isinstance(alpha, Tensor):  # a Python alpha stays a Python number: no host-to-device copy
        alpha = alpha.to(dots.dtype)
    straight = sin < SLERP_MIN_SIN
    safe_sin = torch.where(straight, 1.0, sin)
    a = torch.where(straight, 1.0 - alpha, torch.sin((1.0 - alpha) * theta) / safe_sin)
    b = torch.where(straight, alpha, torch.sin(alpha * theta) / safe_sin)
    no_ascent = norm_d == 0
    a = torch.where(no_ascent, 0.0, a)
    b = torch.where(no_ascent, 1.0, b)
    c0 = length * a / (norm_d + eps)
    c1 = length * b / (norm_g + eps)
    finite = torch.isfinite(dots).all()
    coefs = torch.where(finite, torch.stack([c0, c1]), 0.0)
    return coefs, theta


# ---------------------------------------------------------------------- LookSAM
def look_projection(dots: Tensor) -> Tensor:
    """c = (g_hat . g) / ||g||^2 from ``look_dots``'s [g_hat . g, ||g||^2]: g_v = g_hat - c g is the
    part of g_hat orthogonal to g. A zero g has nothing to project out: c = 0 (g_v = g_hat)."""
    dots = dots.to(acc_dtype(dots.dtype))
    gg = dots[1]
    return torch.where(gg > 0, dots[0] / torch.where(gg > 0, gg, 1.0), 0.0)


def look_reuse_coefficient(grad_sq: Tensor, dir_norm: Tensor, look_alpha: float) -> Tensor:
    """look_alpha * ||g|| / ||g_v||, the weight of g_v in a LookSAM reuse step's gradient; 0 when
    ||g_v|| = 0 (no full step taken yet: a plain step)."""
    dtype = sum_dtype([grad_sq, dir_norm])
    grad_norm = grad_sq.to(dtype).sqrt()
    dir_norm = dir_norm.to(dtype)
    usable = dir_norm > 0
    return torch.where(usable, look_alpha * grad_norm / torch.where(usable, dir_norm, 1.0), 0.0)
