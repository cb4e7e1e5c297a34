"""The skip of a non-finite step, and GradScaler's protocol, between the engine and the base optimizer.

A step is skipped, and counted in ``skipped_steps``, when the first or the final gradient is not
finite, or a hyperparameter held as an accelerator tensor is not (`skip_flag`). The flag stays a
device tensor: the fused base update reads it in its kernels; torch's fused optimizers read it as
``base.found_inf`` (GradScaler's protocol); any other base is stepped or not on the host
(`base_step`, the one host sync). The engine unscales each pass through GradScaler itself
(`unscale`): the first under the engine, the second under the base, so that ``scaler.update()``
sees both inf checks; Momentum-SAM's one pass under the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unscale", "skip_flag", "can_skip_on_device", "prepare_device_skip", "base_state_ready", "base_step"]


def unscale(grad_scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> None:
    """``grad_scaler.unscale_(optimizer)``, unless the user called it in this iteration already
    (to clip the gradient, say): a second unscale_ would be an error."""
    if grad_scaler is None:
        return
    states = getattr(grad_scaler, "_per_optimizer_states", None)
    stage = states[id(optimizer)].get("stage") if states is not None and id(optimizer) in states else None
    if getattr(stage, "name", None) != "UNSCALED":
        grad_scaler.unscale_(optimizer)


def skip_flag(values: list[Tensor], device_hypers: list[Tensor]) -> Tensor:
    """0-d bool on the device: whether some value (a squared norm, XSAM's dots) is not finite, or
    some hyperparameter held as a tensor on an accelerator (first_step collected them) is not: the
    step is then skipped and counted rather than read on the host."""
    finite = torch.isfinite(values[0]).all()
    for value in values[1:]:
        finite = finite & torch.isfinite(value).all()
    found_inf = ~finite
    if not device_hypers:
        return found_inf
    bad = torch.stack([~torch.isfinite(t.to(found_inf.device)).all() for t in device_hypers]).any()
    return found_inf | bad


def can_skip_on_device(base: torch.optim.Optimizer) -> bool:
    """torch's fused optimizers (``fused=True``) read GradScaler's found_inf in their kernels."""
    return getattr(base, "_step_supports_amp_scaling", False)


def prepare_device_skip(base: torch.optim.Optimizer, device: torch.device) -> None:
    """Give a base that skips on the device its found_inf. Set once, then written in place: torch
    2.11's dynamo cannot set the attributes."""
    if can_skip_on_device(base):
        base.grad_scale, base.found_inf = None, torch.zeros((), device=device)


def base_state_ready(base: torch.optim.Optimizer, buckets: list) -> bool:
    """Every parameter with a gradient has its base-optimizer state already."""
    state = base.state
    return all(state.get(p) for bucket in buckets for p in bucket.params if p.grad is not None)


def base_step(base: torch.optim.Optimizer, buckets: list, found_inf: Tensor) -> None:
    """``base.step()`` unless ``found_inf``, after the restore.

    A parameter's first base step is decided on the host too: torch's fused SGD creates its
    momentum buffers uninitialised and fills them in the kernel, so a first step skipped on the
    device would leave garbage (possibly NaN) in the state."""
    device_skip = can_skip_on_device(base)
    if device_skip:  # torch's fused optimizers read it, also where the host decides below
        base.found_inf.copy_(found_inf)
    if device_skip and base_state_ready(base, buckets):
        _step_without_global_hooks(base, buckets)
    elif not bool(found_inf):  # the one host sync: this base optimizer cannot skip on the device
        _step_without_global_hooks(base, buckets)


def _step_without_global_hooks(base: torch.optim.Optimizer, buckets: list) -> None:
    """``base.step()`` without torch's global optimizer hooks, which fire once per full step, for
    the engine (its ``_fire_step_hooks``); hooks registered on ``opt.base`` itself still fire."""
    step = type(base).step
    step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
    for hook in base._optimizer_step_pre_hooks.values():
        hook(base, (), {})
    step(base)
    for hook in base._optimizer_step_post_hooks.values():
        hook(base, (), {})
    if not torch.compiler.is_compiling():
        for bucket in buckets:  # one call per bucket: a base must update the parameters in place
            bucket.check_storage(after_base_step=type(base).__name__)
