"""The optimizer front-end: FusedLESAM and FusedSAM.

Both are one engine (`SharpnessAware`) that differs only in how the radius is found each step:
LE-SAM back-solves it from a loss budget, SAM keeps it fixed. The engine owns the flat buckets
(`fused_lesam.buckets`), calls the three bucket ops of a backend (`fused_lesam.backends`), and
delegates the actual update to an ordinary torch optimizer (``base``) built on the same param
groups, so LR schedulers, per-group settings and the base optimizer's state work as usual.

One step (docs/design.md §1)::

    first_step:  n = ||g|| over every bucket; per bucket: backup <- w; w <- w + eps(n, group)
    (caller)     second forward/backward at w + eps
    second_step: per bucket: w <- backup (bit-exact), LE-SAM+ combine; base.step() unless non-finite
"""

from __future__ import annotations

import contextlib
import math
import numbers
from itertools import chain
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import backends
from .base_update import FusedBaseUpdate, fused_kind
from .buckets import ParamBucket, ShardBucket, build_buckets
from .checks import check_base_hypers, make_base, refuse_foreign_kwargs, replaced_params_error, watch_params
from .schedule import check_schedule, sigma_at

__all__ = ["SharpnessAware", "FusedLESAM", "FusedSAM"]

_STATE_KEY = "fused_lesam"
_NO_LOSS = object()  # step(): the closure was not called for the first pass


def _check(name: str, value: Any, ok: bool, need: str) -> None:
    if not ok:
        if isinstance(value, Tensor):  # the usual cause, worth naming: the value itself may be fine
            raise ValueError(f"{name} must be {need} as a Python number, got a Tensor {value!r}: pass float({name}) "
                             f"(our hyperparameters are read on the host at every step)")
        raise ValueError(f"{name} must be {need}, got {value!r}")


def _check_max_grad_norm(value: Optional[float]) -> None:
    if value is not None and not torch.compiler.is_compiling():
        _check("max_grad_norm", value, _is_real(value) and math.isfinite(value) and value > 0, "a finite number > 0")


def _plain_numbers(group: dict[str, Any], names: tuple[str, ...]) -> None:
    """numpy scalars (np.float32(0.3)) among our hyperparameters become Python floats: they mean
    the same number, and the ops take Python floats."""
    for name in names:
        value = group.get(name)
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)) and not isinstance(value, Tensor):
            group[name] = float(value)


def _unscaled_already(grad_scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer) -> bool:
    """Whether the user called ``grad_scaler.unscale_(optimizer)`` in this iteration already (to clip
    the first gradient, say): a second unscale_ would be an error."""
    states = getattr(grad_scaler, "_per_optimizer_states", None)
    stage = states[id(optimizer)].get("stage") if states is not None and id(optimizer) in states else None
    return getattr(stage, "name", None) == "UNSCALED"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Progress:
    """Where the optimizer is within a step. A plain object rather than attributes of the
    optimizer: torch.compile keeps writes to it, but drops attribute writes on an Optimizer."""

    def __init__(self):
        self.count = 0  # completed steps: t of the schedule (capturable: the device copy is authoritative)
        self.perturbed = False
        self.ascents = 0  # perturbation (ascent) steps taken in the current step: 1 for SAM and LE-SAM
        self.first_sq: Optional[Tensor] = None  # the first pass's squared norm, for the skip decision
        self.device_hypers: list[Tensor] = []  # base hyperparameters held as accelerator tensors, for the skip
        self.combine: list[Optional[tuple[float, float]]] = []  # LE-SAM+ coefficients per bucket
        self.local_pending = False  # set by local_first_pass, taken by the next first_step
        self.local = False
        self.in_step = False  # inside step(closure), whose hooks torch's wrapper fires


class SharpnessAware(torch.optim.Optimizer):
    """The engine shared by FusedLESAM and FusedSAM; subclasses define `_radius_args` and `_check_group`.

    Telemetry, all device tensors updated without a host sync (read them with ``.item()`` when
    you log, which syncs then and there):

    - ``last_grad_norm``: ||g|| (or ||T g|| in adaptive groups) of the last first step, 0-d;
    - ``last_rho``, ``last_sigma``: rho_t and sigma_t of the last first step, one entry per param
      group (sigma_t is inf for FusedSAM, whose radius is fixed);
    - ``skipped_steps``: how many steps were skipped because a gradient was not finite, 0-d int64.

    ``capturable=True`` keeps every scalar of the step on the device (the step count, sigma_t of
    the annealing, the skip flag), so that a whole training step can be captured in a CUDA graph
    and replayed; it needs a base update that skips on the device (the fused one, or ``fused=True``).

    ``base_update``: "auto" fuses the base optimizer's step into the restore when the base is
    torch.optim.SGD, Adam or AdamW (`fused_lesam.base_update`), whatever ``foreach``/``fused`` it
    was given, and otherwise restores and calls ``base.step()``; "fused" requires the first,
    "generic" forces the second. ``opt.base_update`` says which was chosen, and ``repr(opt)`` too.
    """

    # Hyperparameter names of this kind of optimizer; they live in each param group.
    _hyper_names: tuple[str, ...] = ()
    # torch.amp.GradScaler's protocol: `scaler.step(opt, closure)` then calls
    # `opt.step(closure, grad_scaler=scaler)`, so both passes are unscaled here. Without it the
    # scaler unscales the first pass only and the closure's still-scaled gradient would reach the
    # base step (an update `scale` times too large).
    _step_supports_amp_scaling = True

    def __init__(self, params, base: Optional[Callable[..., torch.optim.Optimizer]], hyper: dict[str, Any], backend: str,
                 capturable: bool = False, base_update: str = "auto", **base_kwargs):
        base_optimizer = base_kwargs.pop("base_optimizer", None)  # davda54/sam's name for base
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a string, got {backend!r}")
        _check("capturable", capturable, isinstance(capturable, bool), "a bool")
        _check("base_update", base_update, base_update in ("auto", "fused", "generic"), "'auto', 'fused' or 'generic'")
        _plain_numbers(hyper, self._hyper_names)
        self._check_group(hyper)
        super().__init__(params, hyper)
        for group in self.param_groups:
            _plain_numbers(group, self._hyper_names)
            self._check_group(group)
        # The base optimizer shares our param-group dicts, so edits to opt.param_groups (an LR
        # scheduler on either optimizer, a SigmaAnnealing) reach both.
        self.base = make_base(base, base_optimizer, self.param_groups, base_kwargs)
        for group in self.param_groups:
            check_base_hypers(group, self._hyper_names)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults.update(self.base.defaults)
        self.capturable = capturable
        self.backend = backend
        self._base_update_request = base_update
        self._progress = _Progress()
        self._build()
        if capturable and self.base_update != "fused" and not getattr(self.base, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"capturable=True needs a base update that can skip a non-finite step on the device: the fused one "
                f"(base torch.optim.SGD/Adam/AdamW) or a base with fused=True; {type(self.base).__name__}({base_kwargs}) would "
                f"need a host sync to skip"
            )

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        self._buckets: list[ParamBucket | ShardBucket] = build_buckets(self.param_groups)
        if not hasattr(self, "_replaced_params"):
            self._replaced_params: list = []  # (module, name, old parameter), appended by checks.watch_params' hook
            self._superseded_by: Optional[str] = None  # set by checks.watch_params: a newer optimizer took the params
        watch_params(self, [p for group in self.param_groups for p in group["params"]])
        self._mark_grads()
        # Sharded (FSDP2) buckets hold a part of the model each: the norm is summed over this group.
        sharded = self._buckets and isinstance(self._buckets[0], ShardBucket)
        self._shard_group = self._buckets[0].mesh.get_group() if sharded else None
        devices = list(dict.fromkeys(b.device for b in self._buckets))
        self._ops = {d: backends.resolve(self.backend, d) for d in devices}
        self._choose_base_update()
        main = devices[0] if devices else torch.device("cpu")
        self._main_device = main
        n_groups = len(self.param_groups)
        old = getattr(self, "skipped_steps", None)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=main) if old is None else old.to(main)
        self.last_grad_norm = torch.zeros((), device=main)
        if getattr(self.base, "_step_supports_amp_scaling", False):  # GradScaler's protocol, read by torch's fused
            # optimizers to skip on the device; set here, then written in place: torch 2.11's dynamo cannot set them
            self.base.grad_scale, self.base.found_inf = None, torch.zeros((), device=main)
        self.last_rho = torch.zeros(n_groups, device=main)
        self.last_sigma = torch.zeros(n_groups, device=main)
        if self.capturable:  # the step count the schedule reads, advanced on the device
            old = getattr(self, "_device_count", None)
            self._device_count = torch.zeros((), dtype=torch.int64, device=main) if old is None else old.to(main)

    def _choose_base_update(self) -> None:
        """Fuse the base optimizer's step into the restore where it can be (see the class docstring)."""
        kind, why = fused_kind(self.base, self._buckets)
        if self._base_update_request == "fused" and kind is None:
            raise ValueError(f"base_update='fused' is not possible: {why}; use base_update='auto' or 'generic'")
        if self._base_update_request == "generic" or kind is None:
            self.base_update = "generic"
            self._fused_update: Optional[FusedBaseUpdate] = None
            self.base_update_reason = why or "base_update='generic' was asked for"
            return
        self.base_update = "fused"
        self.base_update_reason = f"{type(self.base).__name__}'s step runs in the backends' {kind}_step_ op"
        self._fused_update = FusedBaseUpdate(self.base, kind)
        self._fused_update.adopt(self._buckets)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}Base update: {self.base_update} ({self.base_update_reason})\n)"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base"):  # during our own __init__
            super().add_param_group(param_group)
            return
        if self._progress.perturbed:
            raise RuntimeError("add_param_group() between first_step() and second_step(): finish the step first")
        for name in self._hyper_names:
            param_group.setdefault(name, self.defaults[name])
        _plain_numbers(param_group, self._hyper_names)
        self._check_group(param_group)
        check_base_hypers(param_group, self._hyper_names)
        self.base.add_param_group(param_group)  # appends to the shared list, fills the base's defaults
        self._build()

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """``opt.base``, under davda54/sam's name."""
        return self.base

    @property
    def backend_names(self) -> dict[str, str]:
        """Which backend runs on each device, e.g. {"cpu": "torch"}."""
        return {str(d): ops.NAME for d, ops in self._ops.items()}

    # ------------------------------------------------------------------ per-kind hooks
    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _radius_args(self, group: dict[str, Any]) -> tuple[float | Tensor, float, float]:
        """(sigma_t, rho_max, varrho) for the perturb op; sigma_t = inf means the fixed radius rho_max.
        sigma_t may be a 0-d float64 tensor on the main device (capturable schedules)."""
        raise NotImplementedError

    def _center_coefs(self, group: dict[str, Any]) -> Optional[tuple[float, float]]:
        """(ghat_coef, center_coef) when the group combines with the first gradient, else None."""
        return None

    # ------------------------------------------------------------------ the step
    def _adaptive(self, bucket: ParamBucket | ShardBucket) -> bool:
        """ASAM-style perturbation in this bucket's group (kinds without the option never are)."""
        return bool(self.param_groups[bucket.group_index].get("adaptive", False))

    def _reduce_buckets(self, partial: Callable[[Any, list], Tensor]) -> Tensor:
        """``partial(ops, buckets)`` for each device's buckets, summed on the main device; for
        sharded (FSDP2) parameters summed over the ranks too, on the device, so that every rank
        gets the value of the whole model."""
        partials = [partial(ops, [b for b in self._buckets if b.device == device]).to(self._main_device)
                    for device, ops in self._ops.items()]
        total = partials[0] if len(partials) == 1 else torch.stack([p.to(partials[0].dtype) for p in partials]).sum(0)
        if self._shard_group is not None:
            dist.all_reduce(total, group=self._shard_group)
        return total

    def _global_sq_norm(self, adaptive_aware: bool) -> Tensor:
        """Squared norm of the gradients (of |w| g in adaptive groups) over every bucket: 0-d, main device."""
        return self._reduce_buckets(lambda ops, mine: ops.sq_norm(
            [b.grad for b in mine], [b.param if adaptive_aware and self._adaptive(b) else None for b in mine]))

    def _on_devices(self, t: Tensor) -> dict[torch.device, Tensor]:
        """A main-device scalar made available on every device that holds buckets."""
        return {d: t if d == self._main_device else t.to(d) for d in self._ops}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """Perturb the parameters to w + eps using the gradient at w (the caller's first backward).

        With ``grad_scaler`` (fp16 training with ``torch.amp.GradScaler``), the first backward's
        scaled gradients are unscaled first (``grad_scaler.unscale_(opt)``, which also records
        their inf check for ``grad_scaler.update()``).
        """
        if self._progress.perturbed:
            raise RuntimeError(
                "first_step() called twice without second_step(): the parameters are already perturbed "
                "(a second perturbation would overwrite the exact backup of w)"
            )
        self._fire_step_hooks(post=False)
        self._check_capture()
        # Host checks, skipped while tracing: the compiler may treat hyperparameters as symbols and
        # cannot trace data pointers (the graph is specialised to these parameters anyway).
        self._progress.device_hypers = []
        if not torch.compiler.is_compiling():
            for group in self.param_groups:
                self._check_group(group)
                check_base_hypers(group, self._hyper_names, self._progress.device_hypers)
            for bucket in self._buckets:
                bucket.check_storage()
            self._check_not_replaced()
        if grad_scaler is not None and not _unscaled_already(grad_scaler, self):
            grad_scaler.unscale_(self)
        self._progress.local, self._progress.local_pending = self._progress.local_pending, False
        for bucket in self._buckets:
            bucket.bind_grads()
        sq = self._global_sq_norm(adaptive_aware=True)
        sq_on = self._on_devices(sq)
        radius_args = [self._radius_args(group) for group in self.param_groups]
        # Decided here, once: second_step must combine with the center gradient saved now.
        self._progress.combine = [self._center_coefs(self.param_groups[b.group_index]) for b in self._buckets]
        rho_of_group: dict[int, Tensor] = {}
        for bucket, coefs in zip(self._buckets, self._progress.combine):
            sigma, rho_max, varrho = radius_args[bucket.group_index]
            sigma_t = sigma.to(bucket.device) if isinstance(sigma, Tensor) else None
            center = bucket.ensure_center() if coefs is not None else None
            rho_of_group[bucket.group_index] = self._ops[bucket.device].perturb_(
                bucket.param, bucket.grad, bucket.ensure_backup(), sq_on[bucket.device],
                0.0 if sigma_t is not None else sigma, rho_max, varrho,
                self._adaptive(bucket), center, sigma_t,
            )
        self._progress.perturbed = True
        self._progress.ascents = 1
        self._progress.first_sq = sq
        self.last_grad_norm.copy_(sq.sqrt())
        for index, rho in rho_of_group.items():
            self.last_rho[index].copy_(rho)
        for index, (sigma, _, _) in enumerate(radius_args):
            if isinstance(sigma, Tensor):
                self.last_sigma[index].copy_(sigma)
            else:
                self.last_sigma[index].fill_(sigma)
        if zero_grad:
            for bucket in self._buckets:  # grads were bound above
                bucket.zero_grad()
        if not torch.compiler.is_compiling():  # for step(closure): does the closure call backward? (not traced)
            self._mark_grads()

    def _restore(self, combine: bool = False) -> None:
        """w <- backup in every bucket, with the LE-SAM+ combine decided at first_step if ``combine``."""
        for bucket, coefs in zip(self._buckets, self._progress.combine):
            center = bucket.center if combine and coefs is not None else None
            ghat_coef, center_coef = coefs if center is not None else (1.0, 0.0)
            self._ops[bucket.device].restore_(bucket.param, bucket.backup, bucket.grad, center, ghat_coef, center_coef)
        self._progress.perturbed = False
        self._progress.ascents = 0

    @contextlib.contextmanager
    def local_first_pass(self, model: torch.nn.Module) -> Iterator[None]:
        """``with opt.local_first_pass(ddp_model): loss.backward()``: the first backward of this step
        is not all-reduced, so each rank perturbs with its own gradient and its own ||g|| (the
        "m-sharpness" variant of the SAM paper, m = the per-rank batch). The second backward is
        all-reduced as usual. With LE-SAM+ (alpha > 0) the first gradients are averaged over the
        ranks at second_step, one extra all-reduce, so that every rank combines with the same g.
        Costs one gradient all-reduce less per step than the default (synchronized) mode."""
        no_sync = getattr(model, "no_sync", None)
        if no_sync is None:
            raise TypeError(f"local_first_pass() needs the DistributedDataParallel model, got {type(model).__name__}")
        with no_sync():
            yield
        self._progress.local_pending = True

    def _average_centers(self) -> None:
        world = dist.get_world_size()
        for bucket, coefs in zip(self._buckets, self._progress.combine):
            if coefs is not None:
                dist.all_reduce(bucket.center)  # SUM: gloo has no AVG
                bucket.center.div_(world)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: Optional["torch.amp.GradScaler"] = None,
                    max_grad_norm: Optional[float] = None) -> None:
        """Restore w exactly, combine gradients for LE-SAM+, and let the base optimizer step with g_hat.

        ``max_grad_norm``: clip the final gradient g_hat to this global norm first, as
        ``torch.nn.utils.clip_grad_norm_`` would (coefficient max_norm / (||g_hat|| + 1e-6), at most
        1), after the GradScaler's unscale. Its norm is the one the non-finite check computes anyway;
        the scaling is one more pass over the gradient, on the device (no host sync).

        If the first or the final gradient is not finite, the base step is skipped and counted in
        ``skipped_steps``: on the device when the base optimizer can skip there (torch's fused
        SGD/Adam/AdamW, ``fused=True``) once every parameter has its state, otherwise with one
        host sync.

        With ``grad_scaler``, the second backward's gradients are unscaled through
        ``grad_scaler.unscale_(opt.base)``, so that ``grad_scaler.update()`` sees the inf checks of
        both passes (first pass: recorded under ``opt``, second: under ``opt.base``) and backs off
        when either overflowed. Call ``grad_scaler.update()`` after this, not ``grad_scaler.step``.
        """
        if not self._progress.perturbed:
            raise RuntimeError("second_step() called before first_step(): nothing to restore; the parameters were not changed")
        _check_max_grad_norm(max_grad_norm)  # before anything changes: a second_step(...) may follow
        self._take_final_grads(grad_scaler)
        if self._progress.local:
            self._average_centers()
        # The final gradient's check reads it once more (4 B per parameter): a skip must be known
        # before the update writes anything, and the update is one pass over every bucket.
        final_sq = self._global_sq_norm(adaptive_aware=False)
        found_inf = ~(torch.isfinite(self._progress.first_sq) & torch.isfinite(final_sq))
        found_inf = self._or_bad_device_hypers(found_inf)
        if max_grad_norm is not None:
            self._clip_final_grads(final_sq, max_grad_norm)
        fused = self._fused_update
        if fused is not None and not fused.why_not():
            self.skipped_steps.add_(found_inf)
            fused.step(self._ops, self._progress.combine, self._on_devices(found_inf.to(torch.float32)))
            self._progress.perturbed = False
            self._progress.ascents = 0
            self._count_step(zero_grad)
            return
        self._restore(combine=True)
        self._finish_step(found_inf, zero_grad)
        if fused is not None:  # torch's own step may have created state that is not in the flat buffers
            fused.stale = True

    def _clip_final_grads(self, final_sq: Tensor, max_norm: float) -> None:
        """g_hat *= min(1, max_norm / (||g_hat|| + 1e-6)) in every bucket (torch's clip_grad_norm_ rule)."""
        coef = (max_norm / (final_sq.sqrt() + 1e-6)).clamp(max=1.0)
        coef_on = self._on_devices(coef)
        for bucket in self._buckets:
            bucket.grad.mul_(coef_on[bucket.device].to(bucket.grad.dtype))

    def _or_bad_device_hypers(self, found_inf: Tensor) -> Tensor:
        """Fold a non-finite hyperparameter held as a tensor on an accelerator (first_step collected
        them) into the skip flag: the step is skipped and counted rather than read on the host."""
        hypers = self._progress.device_hypers
        if not hypers:
            return found_inf
        bad = torch.stack([~torch.isfinite(t.to(found_inf.device)).all() for t in hypers]).any()
        return found_inf | bad

    def _take_final_grads(self, grad_scaler: Optional["torch.amp.GradScaler"]) -> None:
        """The last backward's gradients, unscaled (through the base optimizer, see second_step) and
        bound into the flat grad buffers."""
        if grad_scaler is not None and not _unscaled_already(grad_scaler, self.base):  # (to clip it, say)
            grad_scaler.unscale_(self.base)
        for bucket in self._buckets:
            bucket.bind_grads()

    def _finish_step(self, found_inf: Tensor, zero_grad: bool) -> None:
        """After the restore: the base step unless ``found_inf``, the counters, the optional zeroing."""
        self.skipped_steps.add_(found_inf)  # in place: `+=` also sets the attribute, which torch 2.11's dynamo rejects
        self._base_step(found_inf)
        self._count_step(zero_grad)

    def _count_step(self, zero_grad: bool) -> None:
        """The end of every step: the step counts, what LR schedulers check, the optional zeroing."""
        self._progress.count += 1
        if self.capturable:
            self._device_count += 1
        self._opt_called = True  # what torch's LR schedulers check to know the optimizer has stepped
        self.base._opt_called = True  # also when a scheduler was built on opt.base (its step is not called, see _base_step)
        if zero_grad:
            for bucket in self._buckets:  # grads were bound in second_step
                bucket.zero_grad()
        if not torch.compiler.is_compiling():  # for step(closure): did a backward come since? (not traced)
            self._mark_grads()
        self._fire_step_hooks(post=True)

    def _check_capture(self) -> None:
        """torch's rule for its own optimizers: only a capturable optimizer may be captured (a graph
        would replay the step count and sigma_t of the capture forever otherwise)."""
        if torch.compiler.is_compiling() or not torch.cuda.is_initialized():
            return  # (a capture needs CUDA initialised; asking is_available() would initialise it)
        if torch.cuda.is_current_stream_capturing():
            if not self.capturable:
                raise RuntimeError(f"{type(self).__name__} is being captured in a CUDA graph but was built with "
                                   f"capturable=False: its step count and sigma_t would be frozen; pass capturable=True")
            if not self._base_state_ready():
                raise RuntimeError("capture a step only after at least one eager step: the base optimizer's state "
                                   "(momentum buffers, ...) must exist before capture")

    def _base_state_ready(self) -> bool:
        """Every parameter with a gradient has its base-optimizer state already."""
        state = self.base.state
        return all(state.get(p) for bucket in self._buckets for p in bucket.params if p.grad is not None)

    def _base_step(self, found_inf: Tensor) -> None:
        # A parameter's first base step is decided on the host too: torch's fused SGD creates its
        # momentum buffers uninitialised and fills them in the kernel, so a first step skipped on
        # the device would leave garbage (possibly NaN) in the state.
        device_skip = getattr(self.base, "_step_supports_amp_scaling", False)
        if device_skip:  # torch's fused optimizers read it (see _build), also where the host decides below
            self.base.found_inf.copy_(found_inf)
        if device_skip and self._base_state_ready():
            self._base_step_without_global_hooks()
        elif not bool(found_inf):  # the one host sync: this base optimizer cannot skip on the device
            self._base_step_without_global_hooks()

    def _base_step_without_global_hooks(self) -> None:
        """``base.step()`` without torch's global optimizer hooks, which fire once per full step, for
        this optimizer (`_fire_step_hooks`); hooks registered on ``opt.base`` itself still fire."""
        step = type(self.base).step
        step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
        base = self.base
        for hook in base._optimizer_step_pre_hooks.values():
            hook(base, (), {})
        step(base)
        for hook in base._optimizer_step_post_hooks.values():
            hook(base, (), {})
        if not torch.compiler.is_compiling():
            for bucket in self._buckets:  # one call per bucket: a base must update the parameters in place
                bucket.check_storage(after_base_step=type(base).__name__)

    def _fire_step_hooks(self, post: bool) -> None:
        """torch's step hooks (``register_step_pre_hook``/``register_step_post_hook``, this optimizer's
        and the global ones) for the manual API: first_step fires the pre-hooks, the end of the step
        the post-hooks, once per full step. Within step(closure) torch's wrapper of step fires them.
        A pre-hook's replacement arguments have nothing to replace here and are ignored."""
        if self._progress.in_step:
            return
        hooks = (chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()) if post
                 else chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()))
        for hook in hooks:
            hook(self, (), {})

    @contextlib.contextmanager
    def perturbed(self, grad_scaler: Optional["torch.amp.GradScaler"] = None,
                  max_grad_norm: Optional[float] = None) -> Iterator["SharpnessAware"]:
        """``with opt.perturbed(): <second forward + backward>``: the whole sharpness-aware step.

        Entering perturbs (first_step, grads zeroed); leaving normally finishes the step
        (second_step: restore, combine, base update), both with ``grad_scaler`` if given.
        Leaving by an exception (an OOM in the second forward, a KeyboardInterrupt) restores the
        parameters bit-exactly, skips the update and re-raises; the gradients are left as they were.
        """
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        try:
            yield self
        except BaseException:
            with torch.no_grad():
                self._restore()
            raise
        self.second_step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)

    def step(self, closure: Optional[Callable[[], Any]] = None,
             grad_scaler: Optional["torch.amp.GradScaler"] = None, max_grad_norm: Optional[float] = None) -> Any:
        """One step. ``closure`` does a forward and backward and may return the loss.

        The first backward (at w) is normally done by the caller, and ``closure`` redoes it at
        w + eps; its loss is returned. When no backward happened since the last step or
        ``zero_grad()`` (torch's closure convention, and PyTorch Lightning's automatic
        optimization: ``opt.zero_grad(); opt.step(closure)``), the closure is called for the first
        pass too, and the loss at w, its first result, is returned.

        fp16 with a ``torch.amp.GradScaler``: both backwards on ``grad_scaler.scale(loss)``, then
        ``grad_scaler.step(opt, closure)`` (or ``opt.step(closure, grad_scaler=grad_scaler)``) and
        ``grad_scaler.update()`` (see first_step and second_step for what the scaler is used for).
        ``max_grad_norm``: clip the final gradient (see second_step)."""
        closure = self._check_step_call(closure, grad_scaler)
        _check_max_grad_norm(max_grad_norm)
        self._progress.in_step = True  # torch's wrapper of step fires the step hooks, not first/second_step
        try:
            first_loss = self._first_pass_by_closure(closure)
            with self.perturbed(grad_scaler, max_grad_norm):
                loss = self._call_closure(closure)
        finally:
            self._progress.in_step = False
        return loss if first_loss is _NO_LOSS else first_loss

    def _check_step_call(self, closure: Optional[Callable[[], Any]],
                         grad_scaler: Optional["torch.amp.GradScaler"]) -> Callable[[], Any]:
        if closure is None:
            with_scaler = (" With a GradScaler: scaler.step(opt, closure), or opt.step(closure, grad_scaler=scaler); "
                           "then scaler.update()." if grad_scaler is not None else "")
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that re-evaluates the loss and calls backward(); "
                f"or call first_step(), do the second forward/backward, then second_step().{with_scaler}"
            )
        if grad_scaler is None and self.__dict__.get("grad_scale") is not None:
            # GradScaler's newer protocol sets opt.grad_scale instead of passing itself: the closure's
            # pass could not be unscaled.
            raise RuntimeError(f"{type(self).__name__} was stepped by a GradScaler that did not pass itself as "
                               f"grad_scaler=: call opt.step(closure, grad_scaler=scaler), then scaler.update()")
        if not torch.compiler.is_compiling():
            self._check_not_replaced()
        return closure

    def _first_pass_by_closure(self, closure: Callable[[], Any]) -> Any:
        """Call ``closure`` for the first pass when no gradient was written since the last step or
        zero_grad() (see step); its loss, or _NO_LOSS when the caller did the first backward. Not
        decided while tracing (the version counters are not traced): the caller's backward is assumed."""
        if torch.compiler.is_compiling() or self._grads_written():
            return _NO_LOSS
        with torch.enable_grad():
            loss = closure()
        if not self._grads_written():
            raise RuntimeError(self._no_backward_message("no gradient exists at w: no backward() ran since the last "
                                                         "step or zero_grad(), and the closure did not call one either"))
        return loss

    def _call_closure(self, closure: Callable[[], Any]) -> Any:
        """The closure at the perturbed point; it must write a gradient (else the base would step
        on a zero or stale one). The caller restores w on the exception."""
        with torch.enable_grad():
            loss = closure()
        if not torch.compiler.is_compiling() and not self._grads_written():
            raise RuntimeError(self._no_backward_message("the closure returned without calling backward()"))
        return loss

    def _no_backward_message(self, what: str) -> str:
        return (f"{type(self).__name__}.step(closure): {what}, so the step would use no gradient. The closure must "
                f"compute the loss and call loss.backward() (and may return the loss); the parameters are unchanged")

    def _mark_grads(self) -> None:
        for bucket in self._buckets:
            bucket.mark_grads()

    def _grads_written(self) -> bool:
        """A gradient was written into some bucket since the last `_mark_grads` (a step, zero_grad())."""
        return any(bucket.grads_written() for bucket in self._buckets)

    def _check_not_replaced(self) -> None:
        if self._superseded_by:
            raise RuntimeError(f"this {type(self).__name__} was superseded: a {self._superseded_by} built later on the same "
                               f"parameters took them into its own flat buckets. Step the newer optimizer only (build "
                               f"one optimizer per set of parameters)")
        if self._replaced_params:
            message = replaced_params_error(self._replaced_params)
            if message:
                raise RuntimeError(message)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place (default): they stay views into the flat grad buffer, so the
        next backward writes straight into it. ``set_to_none=True`` drops them as torch does; the
        next step then copies the new gradients back into the buffer (slower, same result)."""
        for bucket in self._buckets:
            if set_to_none:
                bucket.drop_grads()
            else:
                bucket.bind_grads()
                bucket.zero_grad()
            bucket.mark_grads()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (param groups hold our hyperparameters too), plus our counters."""
        if self._progress.perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step(): the parameters are perturbed")
        state = self.base.state_dict()
        count = int(self._device_count) if self.capturable else self._progress.count
        state[_STATE_KEY] = {"kind": type(self).__name__, "step": count, "skipped_steps": self.skipped_steps.clone()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or of a plain torch optimizer of the base's class
        (then the hyperparameters of this optimizer's groups and its step counts are kept). One of
        another kind of fused optimizer, or one with values this optimizer refuses, is refused
        before anything changes."""
        if self._progress.perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step(): finish the step first")
        state_dict, ours = self._loadable(state_dict)
        self.base.load_state_dict(state_dict)
        # torch's load_state_dict builds new group dicts and a new state: share them again.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        if self._fused_update is not None:  # the loaded tensors go into the flat buffers
            self._fused_update.adopt(self._buckets)
        if ours is None:  # a plain torch optimizer's state: our counters go on as they were
            return
        self._progress.count = int(ours["step"])
        if self.capturable:
            self._device_count.fill_(self._progress.count)
        self.skipped_steps.copy_(ours["skipped_steps"])


    def _loadable(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(the state dict for the base, our counters or None for a plain torch optimizer's), after
        every check that can fail: loading must not stop half way and leave the optimizer broken."""
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY, None)
        kind = type(self).__name__
        saved_by = ours.get("kind") if ours is not None else None
        if saved_by is not None and saved_by != kind:
            raise ValueError(f"this state dict was saved by {saved_by}, and this is a {kind}: their hyperparameters and "
                             f"state differ; load it into a {saved_by}. Nothing was changed")
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"this state dict has {len(saved_groups)} param groups and the optimizer "
                             f"{len(self.param_groups)}: load it into an optimizer built on the same groups")
        groups = []
        for saved, current in zip(saved_groups, self.param_groups):
            missing = [name for name in self._hyper_names if name not in saved]
            if missing and ours is not None:
                raise ValueError(f"this state dict was saved by another kind of optimizer: its param groups lack "
                                 f"{missing}, which {kind} needs; load it into the class that saved it. Nothing was changed")
            group = {**{name: current[name] for name in missing}, **saved}
            self._check_group(group)
            check_base_hypers(group, self._hyper_names)
            groups.append(group)
        state_dict["param_groups"] = groups
        return state_dict, ours


class FusedLESAM(SharpnessAware):
    r"""Loss-Equated SAM (LE-SAM / LE-SAM+): fix the loss budget sigma, back-solve the radius.

    Each step: rho_t = min(sigma_t / (||g|| + varrho), rho_max), eps = rho_t * g / ||g||; with
    ``alpha > 0`` (LE-SAM+) the update uses (1 + alpha) * g_hat - alpha * g, the gradient of
    L(w + eps) + alpha * (L(w + eps) - L(w)). ``alpha_form="released"`` uses g_hat - alpha * g
    instead, as the authors' released training script does.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        base: the optimizer class that makes the update (torch.optim.SGD, AdamW, ...); its keyword
            arguments (lr, momentum, weight_decay, fused, ...) pass through.
        sigma: loss budget sigma_0 (>= 0). rho_max: radius cap (> 0; None or inf: no cap).
        varrho: stability constant in the denominator (> 0). alpha: LE-SAM+ weight (>= 0).
        adaptive: ASAM-style scale-invariant perturbation, eps ~ w^2 * g, norm ||w * g||.
        total_steps, anneal_steps: cosine-anneal sigma to 0 over the last ``anneal_steps`` of
            ``total_steps`` optimizer steps (0: no annealing). For per-epoch annealing as in the
            paper use `fused_lesam.SigmaAnnealing` instead.
        backend: "auto", "torch", "cpp", "cuda" or "triton".
        capturable: the step count and sigma_t live on the device (CUDA graphs; one torch.compile
            graph for the whole annealing); needs the fused base update or a base with ``fused=True``.
        base_update: "auto" (fuse torch.optim.SGD/Adam/AdamW's step into the restore when the base
            is one of them), "fused" (require it) or "generic" (restore, then ``base.step()``).
    """

    _hyper_names = ("sigma", "rho_max", "varrho", "alpha", "alpha_form", "adaptive")

    def __init__(
        self,
        params,
        base: Optional[Callable[..., torch.optim.Optimizer]] = None,
        *,
        sigma: float = 0.35,
        rho_max: Optional[float] = 0.4,
        varrho: float = 1e-12,
        alpha: float = 0.0,
        alpha_form: str = "paper",
        adaptive: bool = False,
        total_steps: Optional[int] = None,
        anneal_steps: int = 0,
        backend: str = "auto",
        capturable: bool = False,
        base_update: str = "auto",
        **base_kwargs,
    ):
        refuse_foreign_kwargs("FusedLESAM", base, base_kwargs, {
            "rho": "LE-SAM has no fixed radius: it back-solves rho_t = min(sigma_t / ||g||, rho_max) from the loss "
                   "budget sigma each step; give sigma= (the budget, default 0.35) and rho_max= (the cap), or use "
                   "FusedSAM(rho=...) for SAM's fixed radius (davda54/sam's rho)"})
        check_schedule(total_steps, anneal_steps, suffix="_steps")
        self.total_steps = total_steps
        self.anneal_steps = anneal_steps
        self._sigma_tables: dict[float, Tensor] = {}
        hyper = dict(sigma=sigma, rho_max=math.inf if rho_max is None else rho_max, varrho=varrho,
                     alpha=alpha, alpha_form=alpha_form, adaptive=adaptive)
        super().__init__(params, base, hyper, backend, capturable, base_update, **base_kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        sigma, rho_max, varrho, alpha = group["sigma"], group["rho_max"], group["varrho"], group["alpha"]
        _check("sigma", sigma, _is_real(sigma) and math.isfinite(sigma) and sigma >= 0, "a finite number >= 0")
        _check("rho_max", rho_max, _is_real(rho_max) and rho_max > 0, "a number > 0 (or None / inf for no cap)")
        _check("varrho", varrho, _is_real(varrho) and math.isfinite(varrho) and varrho > 0, "a finite number > 0")
        _check("alpha", alpha, _is_real(alpha) and math.isfinite(alpha) and alpha >= 0, "a finite number >= 0")
        _check("alpha_form", group["alpha_form"], group["alpha_form"] in ("paper", "released"), "'paper' or 'released'")
        _check("adaptive", group["adaptive"], isinstance(group["adaptive"], bool), "a bool")

    def _radius_args(self, group: dict[str, Any]) -> tuple[float | Tensor, float, float]:
        sigma = group["sigma"]
        if self.anneal_steps and self.capturable:
            sigma = self._sigma_on_device(sigma)
        elif self.anneal_steps:
            sigma = sigma_at(self._progress.count, sigma, self.total_steps, self.anneal_steps)
        return sigma, group["rho_max"], group["varrho"]

    def _sigma_on_device(self, sigma0: float) -> Tensor:
        """sigma_t of the annealing looked up on the device from the device step count: a table of
        sigma_at's values (held at sigma0 before the cosine, then one entry per annealed step, the
        last one repeated after the end), built once per sigma0 on the host."""
        table = self._sigma_tables.get(sigma0)
        start = self.total_steps - self.anneal_steps
        if table is None:
            values = [sigma0] + [sigma_at(t, sigma0, self.total_steps, self.anneal_steps) for t in range(start, self.total_steps)]
            table = torch.tensor(values, dtype=torch.float64, device=self._main_device)
            self._sigma_tables[sigma0] = table
        index = (self._device_count - start + 1).clamp(0, self.anneal_steps)
        return table.gather(0, index.view(1)).view(())  # a gather, not table[index]: no data-dependent shape to trace

    def _center_coefs(self, group: dict[str, Any]) -> Optional[tuple[float, float]]:
        alpha = group["alpha"]
        if alpha == 0:
            return None
        return (1.0 + alpha if group["alpha_form"] == "paper" else 1.0), alpha


class FusedSAM(SharpnessAware):
    """Classic SAM (Foret et al.) with a fixed radius ``rho``, on the same fused engine.

    eps = rho * g / ||g|| (``adaptive=True``: ASAM, eps = rho * w^2 g / ||w g||), the numbers the
    most used PyTorch SAM implementation computes. The baseline of every comparison.
    """

    _hyper_names = ("rho", "adaptive")

    def __init__(self, params, base: Optional[Callable[..., torch.optim.Optimizer]] = None, *, rho: float = 0.05,
                 adaptive: bool = False, backend: str = "auto", capturable: bool = False, base_update: str = "auto",
                 **base_kwargs):
        refuse_foreign_kwargs("FusedSAM", base, base_kwargs, {
            name: f"{name} is LE-SAM's (FusedLESAM); SAM's radius is the fixed rho="
            for name in ("sigma", "rho_max", "varrho")})
        super().__init__(params, base, dict(rho=rho, adaptive=adaptive), backend, capturable, base_update, **base_kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        rho = group["rho"]
        _check("rho", rho, _is_real(rho) and math.isfinite(rho) and rho >= 0, "a finite number >= 0")
        _check("adaptive", group["adaptive"], isinstance(group["adaptive"], bool), "a bool")

    def _radius_args(self, group: dict[str, Any]) -> tuple[float, float, float]:
        return math.inf, group["rho"], 1.0
