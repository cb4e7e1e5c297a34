"""The compiled extension (``fused_lesam._C``, csrc/) seen from Python: the ops and their fakes.

Importing ``fused_lesam._C`` registers the ``torch.ops.fused_lesam`` ops with their CPU and,
when built with CUDA, CUDA kernels. This module adds the fake (meta) kernels ``torch.compile``
traces with, and makes the "cpp" and "cuda" backends (`backend`): the ops, with the signatures of
the spec backend, once their device's kernels are known to be built.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import build_info
from ..maths import acc_dtype, sum_dtype

_problem = build_info.extension_problem()
if _problem:  # checked before loading: an extension built for another torch must not be loaded
    raise ImportError(f"the compiled extension fused_lesam._C is not usable: {_problem}", name="fused_lesam._C")

import fused_lesam._C  # noqa: E402,F401  (registers torch.ops.fused_lesam)

_OPS = (
    "sq_norm",
    "perturb_",
    "restore_",
    "xsam_dots",
    "xsam_restore_",
    "xsam_probe_",
    "look_dots",
    "look_store_",
    "look_add_",
    "multi_perturb_",
    "multi_restore_",
    "multi_xsam_restore_",
    "multi_xsam_probe_",
    "multi_look_store_",
    "multi_look_add_",
    "sgd_step_",
    "adam_step_",
)


def has_kernels(dispatch_key: str) -> bool:
    """True when every op has a kernel for ``dispatch_key`` ("CPU" or "CUDA") in this build."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lesam::{op}", dispatch_key) for op in _OPS)


def require_kernels(dispatch_key: str) -> None:
    """Raise ImportError (the backend is then reported unavailable) when the kernels are not built."""
    if not has_kernels(dispatch_key):
        raise ImportError(f"the compiled extension was built without its {dispatch_key} kernels", name="fused_lesam._C")


@torch.library.register_fake("fused_lesam::sq_norm")
def _sq_norm_fake(grads: Sequence[Tensor], weights: Sequence[Tensor | None]) -> Tensor:
    return grads[0].new_empty((), dtype=sum_dtype(grads))


@torch.library.register_fake("fused_lesam::perturb_")
def _perturb_fake(param, grad, backup, sq, sigma, rho_max, varrho, adaptive, center=None, sigma_t=None) -> Tensor:
    return param.new_empty((), dtype=acc_dtype(param.dtype))


@torch.library.register_fake("fused_lesam::restore_")
def _restore_fake(param, backup, grad, center, ghat_coef, center_coef) -> None:
    return None


@torch.library.register_fake("fused_lesam::xsam_dots")
def _xsam_dots_fake(params: Sequence[Tensor], backups: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    return params[0].new_empty((3,), dtype=sum_dtype(params))


@torch.library.register_fake("fused_lesam::xsam_restore_")
def _xsam_restore_fake(param, backup, grad, delta, coefs) -> None:
    return None


@torch.library.register_fake("fused_lesam::xsam_probe_")
def _xsam_probe_fake(param, backup, grad, delta, coefs, save_delta) -> None:
    return None


@torch.library.register_fake("fused_lesam::look_dots")
def _look_dots_fake(grads: Sequence[Tensor], centers: Sequence[Tensor]) -> Tensor:
    return grads[0].new_empty((2,), dtype=sum_dtype(grads))


@torch.library.register_fake("fused_lesam::look_store_")
def _look_store_fake(look_dir, grad, center, coef, found_inf) -> None:
    return None


@torch.library.register_fake("fused_lesam::look_add_")
def _look_add_fake(grad, look_dir, coef) -> None:
    return None


@torch.library.register_fake("fused_lesam::multi_perturb_")
def _multi_perturb_fake(
    params, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers=None, sigma_t=None
) -> Tensor:
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


@torch.library.register_fake("fused_lesam::multi_restore_")
def _multi_restore_fake(params, backups, grads, centers, ghat_coef, center_coef) -> None:
    return None


@torch.library.register_fake("fused_lesam::multi_xsam_restore_")
def _multi_xsam_restore_fake(params, backups, grads, deltas, coefs) -> None:
    return None


@torch.library.register_fake("fused_lesam::multi_xsam_probe_")
def _multi_xsam_probe_fake(params, backups, grads, deltas, coefs, save_delta) -> None:
    return None


@torch.library.register_fake("fused_lesam::multi_look_store_")
def _multi_look_store_fake(look_dirs, grads, centers, coef, found_inf) -> None:
    return None


@torch.library.register_fake("fused_lesam::multi_look_add_")
def _multi_look_add_fake(grads, look_dirs, coef) -> None:
    return None


@torch.library.register_fake("fused_lesam::sgd_step_")
def _sgd_step_fake(
    param,
    backup,
    grad,
    momentum_buffer,
    center,
    found_inf,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    init_buffer,
    ghat_coef,
    center_coef,
) -> None:
    return None


@torch.library.register_fake("fused_lesam::adam_step_")
def _adam_step_fake(
    param,
    backup,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    center,
    step,
    found_inf,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    ghat_coef,
    center_coef,
) -> None:
    return None


# The device each backend runs on, by the dispatch key its kernels are registered under.
_DISPATCH_KEYS = {"cpp": "CPU", "cuda": "CUDA"}


@functools.cache
def backend(name: str) -> types.SimpleNamespace:
    """The "cpp" or "cuda" backend: ``NAME`` and the ops, which take the arguments of the spec
    backend's functions. ImportError (the backend is then reported unavailable, saying why) when
    its kernels are not built or, for "cuda", no CUDA device is visible."""
    require_kernels(_DISPATCH_KEYS[name])
    if name == "cuda" and not torch.cuda.is_available():
        raise ImportError("the CUDA kernels are built, but no CUDA device is visible", name="fused_lesam._C")
    return types.SimpleNamespace(NAME=name, **{op: getattr(torch.ops.fused_lesam, op) for op in _OPS})
