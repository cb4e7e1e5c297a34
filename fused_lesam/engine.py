"""The step engine: `SharpnessAware`, which FusedLESAM, FusedSAM (optimizer.py) and FusedXSAM (xsam.py) are.

The kinds differ only in their hyperparameters and in how the radius is found each step
(`_radius_args`): LE-SAM back-solves it from a loss budget, SAM keeps it fixed. The engine owns the flat buckets
(`fused_lesam.buckets`), calls the three bucket ops of a backend (`fused_lesam.backends`), and
delegates the actual update to an ordinary torch optimizer (``base``) built on the same param
groups, so LR schedulers, per-group settings and the base optimizer's state work as usual.

One step (docs/design.md §1)::

    first_step:  n = ||g|| over every bucket; per bucket: backup <- w; w <- w + eps(n, group)
    (caller)     second forward/backward at w + eps
    second_step: per bucket: w <- backup (bit-exact), LE-SAM+ combine; base.step() unless non-finite

The throughput modes (throughput.py: ``sam_interval``, ``sam_start``, LookSAM) make some steps
one-pass steps: first_step perturbs nothing and second_step steps from w with the gradient at w
(LookSAM: plus its stored direction); ``needs_perturbed_pass`` tells the loop which kind comes.

Around it, each concern in its own module: the checks of what users pass (checks.py), the skip of a
non-finite step and GradScaler's protocol with the base (skip.py), the base update fused into the
restore (base_update.py), the reductions over devices and ranks (distributed.py), checkpoints
(checkpoint.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import backends, checkpoint, distributed, momentum_sam, skip
from .base_update import FusedBaseUpdate, fused_kind
from .buckets import Launch, ParamBucket, ShardBucket, build_buckets, group_launches
from .checks import (
    check_base_hypers,
    check_max_grad_norm,
    check_value,
    make_base,
    plain_numbers,
    replaced_params_error,
    watch_params,
)
from .maths import clip_coefficient, look_projection, look_reuse_coefficient, sum_dtype
from .throughput import FULL, REUSE, Modes, needs_pass

__all__ = ["SharpnessAware"]

NO_LOSS = object()  # step(): the closure was not called for the first pass


class _Progress:
    """Where the optimizer is within a step. A plain object rather than attributes of the
    optimizer: torch.compile keeps writes to it, but drops attribute writes on an Optimizer."""

    def __init__(self):
        self.count = 0  # completed steps: t of the schedule (capturable: the device copy is authoritative)
        self.perturbed = False
        self.ascents = 0  # perturbation (ascent) steps taken in the current step: 1 for SAM and LE-SAM
        self.first_sq: Tensor | None = None  # the first pass's squared norm, for the skip decision
        self.device_hypers: list[Tensor] = []  # base hyperparameters held as accelerator tensors, for the skip
        self.combine: list[tuple[float, float] | None] = []  # LE-SAM+ coefficients per param group
        self.local_pending = False  # set by local_first_pass, taken by the next first_step
        self.local = False
        self.in_step = False  # inside step(closure), whose hooks torch's wrapper fires
        self.kind = FULL  # the kind of the step begun by first_step (throughput.py)
        self.refresh = False  # perturbed() on a one-pass step: its body recomputes the gradient at w


class SharpnessAware(torch.optim.Optimizer):
    """The engine shared by FusedLESAM and FusedSAM; subclasses define `_radius_args` and `_check_group`.

    Telemetry, all device tensors updated without a host sync (read them with ``.item()`` when
    you log, which syncs then and there):

    - ``last_grad_norm``: ||g|| (or ||T g|| in adaptive groups, ||v|| for Momentum-SAM) of the
      last first step, 0-d;
    - ``last_rho``, ``last_sigma``: rho_t and sigma_t of the last first step, one entry per param
      group (sigma_t is inf for FusedSAM, whose radius is fixed; rho_t is -rho for Momentum-SAM);
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
    # Momentum-SAM (FusedSAM(momentum_sam=True), momentum_sam.py): one pass per step, perturbed along -v.
    momentum_sam = False
    # torch.amp.GradScaler's protocol: `scaler.step(opt, closure)` then calls
    # `opt.step(closure, grad_scaler=scaler)`, so both passes are unscaled here. Without it the
    # scaler unscales the first pass only and the closure's still-scaled gradient would reach the
    # base step (an update `scale` times too large).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        base: Callable[..., torch.optim.Optimizer] | None,
        hyper: dict[str, Any],
        backend: str,
        capturable: bool = False,
        base_update: str = "auto",
        modes: Modes | None = None,
        **base_kwargs,
    ):
        base_optimizer = base_kwargs.pop("base_optimizer", None)  # davda54/sam's name for base
        self._modes = Modes() if modes is None else modes
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a string, got {backend!r}")
        check_value("capturable", capturable, isinstance(capturable, bool), "a bool")
        check_value(
            "base_update", base_update, base_update in ("auto", "fused", "generic"), "'auto', 'fused' or 'generic'"
        )
        if capturable and not self._modes.default:
            raise ValueError(
                "capturable=True cannot take sam_interval, sam_start or look_k: the kind of each step (one "
                "pass or two) is chosen on the host from the step count, which a captured graph would freeze; "
                "use capturable=False with these options, or capturable=True without them"
            )
        plain_numbers(hyper, self._hyper_names)
        self._check_group(hyper)
        self._check_look(hyper)
        super().__init__(params, hyper)
        for group in self.param_groups:
            plain_numbers(group, self._hyper_names)
            self._check_group(group)
            self._check_look(group)
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
        if capturable and self.base_update != "fused" and not skip.can_skip_on_device(self.base):
            raise ValueError(
                f"capturable=True needs a base update that can skip a non-finite step on the device: the fused one "
                f"(base torch.optim.SGD/Adam/AdamW) or a base with fused=True; "
                f"{type(self.base).__name__}({base_kwargs}) would "
                f"need a host sync to skip"
            )

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        self._buckets: list[ParamBucket | ShardBucket] = build_buckets(self.param_groups)
        self._launches: list[Launch] = group_launches(self._buckets)  # what each multi-tensor op call takes
        if not hasattr(self, "_replaced_params"):
            self._replaced_params: list = []  # (module, name, old parameter), appended by checks.watch_params' hook
            self._superseded_by: str | None = None  # set by checks.watch_params: a newer optimizer took the params
        watch_params(self, [p for group in self.param_groups for p in group["params"]])
        self._mark_grads()
        self._shard_group = distributed.shard_group(self._buckets)
        devices = list(dict.fromkeys(b.device for b in self._buckets))
        self._ops = {d: backends.resolve(self.backend, d) for d in devices}
        self._choose_base_update()
        main = devices[0] if devices else torch.device("cpu")
        self._main_device = main
        n_groups = len(self.param_groups)
        old = getattr(self, "skipped_steps", None)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=main) if old is None else old.to(main)
        self.last_grad_norm = torch.zeros((), device=main)
        skip.prepare_device_skip(self.base, main)
        self.last_rho = torch.zeros(n_groups, device=main)
        self.last_sigma = torch.zeros(n_groups, device=main)
        if self.capturable:  # the step count the schedule reads, advanced on the device
            old = getattr(self, "_device_count", None)
            self._device_count = torch.zeros((), dtype=torch.int64, device=main) if old is None else old.to(main)
        # LookSAM's ||g_v|| (g_v is each bucket's look_dir): new buckets (add_param_group) start afresh.
        look_dtype = sum_dtype([b.grad for b in self._buckets])  # fp64 when a bucket is: the norm's own dtype
        self._look_norm = torch.zeros((), dtype=look_dtype, device=main) if self._modes.looksam else None

    def _choose_base_update(self) -> None:
        """Fuse the base optimizer's step into the restore where it can be (see the class docstring)."""
        kind, why = fused_kind(self.base, self._buckets)
        if self._base_update_request == "fused" and kind is None:
            raise ValueError(f"base_update='fused' is not possible: {why}; use base_update='auto' or 'generic'")
        if self._base_update_request == "generic" or kind is None:
            self.base_update = "generic"
            self._fused_update: FusedBaseUpdate | None = None
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
        plain_numbers(param_group, self._hyper_names)
        self._check_group(param_group)
        self._check_look(param_group)
        check_base_hypers(param_group, self._hyper_names)
        self.base.add_param_group(param_group)  # appends to the shared list, fills the base's defaults
        self._build()

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """``opt.base``, under davda54/sam's name."""
        return self.base

    @property
    def needs_perturbed_pass(self) -> bool:
        """Whether the step about to be taken (or the one begun by first_step()) needs a forward and
        backward at the perturbed point between first_step() and second_step(). False on the
        one-pass steps of ``sam_interval``, ``sam_start`` and LookSAM (``look_k``); True on every
        Momentum-SAM step (its one pass is at the perturbed point). Read from the host step count, no
        device sync."""
        kind = self._progress.kind if self._progress.perturbed else self._modes.step_kind(self._progress.count)
        return needs_pass(kind)

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

    def _center_coefs(self, group: dict[str, Any]) -> tuple[float, float] | None:
        """(ghat_coef, center_coef) when the group combines with the first gradient, else None."""
        return None

    def _check_look(self, group: dict[str, Any]) -> None:
        if self._modes.looksam and group.get("adaptive", False):
            raise ValueError(
                "look_k > 1 (LookSAM) with adaptive=True: LookSAM's reuse rule is defined for SAM's "
                "perturbation, not ASAM's scaled one; use adaptive=False with look_k, or sam_interval "
                "(plain steps in between) with adaptive=True"
            )

    # ------------------------------------------------------------------ the step
    def _adaptive(self, group_index: int) -> bool:
        """ASAM-style perturbation in this param group (kinds without the option never are)."""
        return bool(self.param_groups[group_index].get("adaptive", False))

    def _reduce_buckets(self, partial: Callable[[Any, list], Tensor]) -> Tensor:
        """``partial(ops, buckets)`` over every bucket: the value of the whole model, 0-d or (k,), on
        the main device (see distributed.reduce_buckets)."""
        return distributed.reduce_buckets(self._ops, self._buckets, self._main_device, self._shard_group, partial)

    def _global_sq_norm(self, adaptive_aware: bool) -> Tensor:
        """Squared norm of the gradients (of |w| g in adaptive groups) over every bucket: 0-d, main device."""
        return self._reduce_buckets(
            lambda ops, mine: ops.sq_norm(
                [b.grad for b in mine],
                [b.param if adaptive_aware and self._adaptive(b.group_index) else None for b in mine],
            )
        )

    def _on_devices(self, t: Tensor) -> dict[torch.device, Tensor]:
        """A main-device scalar made available on every device that holds buckets."""
        return {d: t if d == self._main_device else t.to(d) for d in self._ops}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Perturb the parameters to w + eps using the gradient at w (the caller's first backward).

        With ``grad_scaler`` (fp16 training with ``torch.amp.GradScaler``), the first backward's
        scaled gradients are unscaled first (``grad_scaler.unscale_(opt)``, which also records
        their inf check for ``grad_scaler.update()``).

        Momentum-SAM (``momentum_sam``): w - rho v / ||v|| from the base's momentum v; no gradient
        is read, and any present is zeroed (the one backward, at the perturbed point, follows).
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
                self._check_look(group)
                check_base_hypers(group, self._hyper_names, self._progress.device_hypers)
            for bucket in self._buckets:
                bucket.check_storage()
            self._check_not_replaced()
        if self.momentum_sam:  # no first pass: nothing to unscale, the ascent is along the momentum
            momentum_sam.check_step(self)
        else:
            skip.unscale(grad_scaler, self)  # the first pass's inf check, recorded under this optimizer
        self._progress.local, self._progress.local_pending = self._progress.local_pending, False
        for bucket in self._buckets:
            bucket.bind_grads()
        self._progress.kind = self._modes.step_kind(self._progress.count)
        if not needs_pass(self._progress.kind):
            self._begin_one_pass()
            return
        if self.momentum_sam:
            directions = momentum_sam.directions(self)
            sq = momentum_sam.sq_norm(self, directions)
        else:
            directions = [bucket.grad for bucket in self._buckets]
            sq = self._global_sq_norm(adaptive_aware=True)
        direction_of = {id(bucket): direction for bucket, direction in zip(self._buckets, directions)}
        sq_on = self._on_devices(sq)
        radius_args = [self._radius_args(group) for group in self.param_groups]
        # Decided here, once: second_step must combine with the center gradient saved now.
        self._progress.combine = [self._center_coefs(group) for group in self.param_groups]
        rho_of_group: dict[int, Tensor] = {}
        for launch in self._launches:
            index = launch.group_index
            sigma, rho_max, varrho = radius_args[index]
            sigma_t = sigma.to(launch.device) if isinstance(sigma, Tensor) else None
            # LookSAM keeps g too: second_step projects it out of g_hat.
            keep_center = self._progress.combine[index] is not None or self._modes.looksam
            rho_of_group[index] = self._ops[launch.device].multi_perturb_(
                params=launch.tensors("param"),
                grads=[direction_of[id(bucket)] for bucket in launch.buckets],
                backups=[bucket.ensure_backup() for bucket in launch.buckets],
                sq=sq_on[launch.device],
                sigma=0.0 if sigma_t is not None else sigma,
                rho_max=rho_max,
                varrho=varrho,
                adaptive=self._adaptive(index),
                centers=[bucket.ensure_center() for bucket in launch.buckets] if keep_center else None,
                sigma_t=sigma_t,
            )
        self._progress.perturbed = True
        self._progress.ascents = 1
        self._progress.first_sq = None if self.momentum_sam else sq  # Momentum-SAM: no first gradient to check
        self.last_grad_norm.copy_(sq.sqrt())
        for index, rho in rho_of_group.items():
            self.last_rho[index].copy_(rho)
        for index, (sigma, _, _) in enumerate(radius_args):
            if isinstance(sigma, Tensor):
                self.last_sigma[index].copy_(sigma)
            else:
                self.last_sigma[index].fill_(sigma)
        if zero_grad or self.momentum_sam:  # (Momentum-SAM: a gradient here would add to the pass's)
            for bucket in self._buckets:  # grads were bound above
                bucket.zero_grad()
        if not torch.compiler.is_compiling():  # for step(closure): does the closure call backward? (not traced)
            self._mark_grads()

    def _begin_one_pass(self) -> None:
        """first_step of a one-pass step: nothing is perturbed and the gradient at w is kept for
        second_step (a zero_grad asked for is not done: no second backward follows). Its norm, for
        the skip decision, the clipping and LookSAM's coefficient, is of g itself."""
        sq = self._global_sq_norm(adaptive_aware=False)
        self._progress.first_sq = sq
        self._progress.combine = [None] * len(self.param_groups)
        self._progress.perturbed = True
        self._progress.ascents = 0
        self._progress.refresh = False
        self.last_grad_norm.copy_(sq.sqrt())
        self.last_rho.zero_()  # no perturbation this step
        if not torch.compiler.is_compiling():  # second_step refuses a backward that comes after this
            self._mark_grads()

    def _restore(self, combine: bool = False) -> None:
        """w <- backup in every bucket, with the LE-SAM+ combine decided at first_step if ``combine``.
        A one-pass step changed no parameter: it is only ended."""
        if not needs_pass(self._progress.kind):
            self._progress.perturbed = False
            return
        for launch in self._launches:
            coefs = self._progress.combine[launch.group_index] if combine else None
            ghat_coef, center_coef = (1.0, 0.0) if coefs is None else coefs
            self._ops[launch.device].multi_restore_(
                params=launch.tensors("param"),
                backups=launch.tensors("backup"),
                grads=launch.tensors("grad"),
                centers=None if coefs is None else launch.tensors("center"),
                ghat_coef=ghat_coef,
                center_coef=center_coef,
            )
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
        with distributed.unsynced_backward(model):
            yield
        self._progress.local_pending = True

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
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
        Momentum-SAM's one pass is unscaled through ``grad_scaler.unscale_(opt)``, as a one-pass
        torch optimizer's is, and only its gradient is checked for the skip.
        """
        if not self._progress.perturbed:
            raise RuntimeError(
                "second_step() called before first_step(): nothing to restore; the parameters were not changed"
            )
        check_max_grad_norm(max_grad_norm)  # before anything changes: a second_step(...) may follow
        if not needs_pass(self._progress.kind):
            self._one_pass_step(zero_grad, grad_scaler, max_grad_norm)
            return
        self._take_final_grads(grad_scaler)
        if self.momentum_sam:
            momentum_sam.restore_idle(self)
        if self._progress.local:
            combine = self._progress.combine
            distributed.average_over_ranks(
                [b.center for b in self._buckets if combine[b.group_index] is not None or self._modes.looksam]
            )
        # The final gradient's check reads it once more (4 B per parameter): a skip must be known
        # before the update writes anything, and the update is one pass over every bucket.
        final_sq = self._global_sq_norm(adaptive_aware=False)
        checked = [final_sq] if self._progress.first_sq is None else [self._progress.first_sq, final_sq]
        found_inf = skip.skip_flag(checked, self._progress.device_hypers)
        if self._modes.looksam:
            self._store_look_dir(found_inf)
        if max_grad_norm is not None:
            self._clip_final_grads(final_sq, max_grad_norm)
        self._update(found_inf, zero_grad)

    def _update(self, found_inf: Tensor, zero_grad: bool, restored: bool = False) -> None:
        """The end of every step: the restore (a full step's; a one-pass step perturbed nothing) and
        the base step unless ``found_inf``, in one pass of the fused base update where it can run,
        else restore, then torch's own step. ``restored``: w_0 is back already (XSAM's
        xsam_restore_ restores it as it writes the update gradient), the base step starts there."""
        fused = self._fused_update
        if fused is not None and not fused.why_not():
            self.skipped_steps.add_(found_inf)
            from_backup = needs_pass(self._progress.kind) and not restored
            fused.step(self._ops, self._progress.combine, self._on_devices(found_inf.to(torch.float32)), from_backup)
            self._progress.perturbed = False
            self._progress.ascents = 0
            self._count_step(zero_grad)
            return
        if not restored:
            self._restore(combine=True)
        self._finish_step(found_inf, zero_grad)
        if fused is not None:  # torch's own step may have created state that is not in the flat buffers
            fused.stale = True

    def _store_look_dir(self, found_inf: Tensor) -> None:
        """LookSAM, after a full step's second pass: g_v <- g_hat - (g_hat . g / ||g||^2) g in every
        bucket (g_hat before the LE-SAM+ combine and the clipping), then ||g_v|| from the stored
        buffers. A skipped step leaves g_v, and so its norm, as they were."""
        dots = self._reduce_buckets(lambda ops, mine: ops.look_dots([b.grad for b in mine], [b.center for b in mine]))
        coef_on = self._on_devices(look_projection(dots))
        skip_on = self._on_devices(found_inf.to(torch.float32))
        for launch in self._launches:
            self._ops[launch.device].multi_look_store_(
                look_dirs=[bucket.ensure_look_dir() for bucket in launch.buckets],
                grads=launch.tensors("grad"),
                centers=launch.tensors("center"),
                coef=coef_on[launch.device],
                found_inf=skip_on[launch.device],
            )
        self._look_norm.copy_(self._look_dir_sq().sqrt())

    def _look_dir_sq(self) -> Tensor:
        """||g_v||^2 over every bucket, from the stored buffers."""
        return self._reduce_buckets(lambda ops, mine: ops.sq_norm([b.look_dir for b in mine], [None] * len(mine)))

    def _one_pass_step(
        self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None, max_grad_norm: float | None
    ) -> None:
        """second_step of a one-pass step: the base step from w with the gradient at w (LookSAM's
        reuse: plus look_alpha * ||g|| / ||g_v|| * g_v), with the skip, clipping and fused update of
        a full step."""
        if self._progress.refresh:  # perturbed()'s body recomputed the gradient at w (all-reduced by DDP)
            self._progress.local = False
            self._take_final_grads(grad_scaler)
            self._progress.first_sq = self._global_sq_norm(adaptive_aware=False)
            self.last_grad_norm.copy_(self._progress.first_sq.sqrt())
        elif not torch.compiler.is_compiling() and self._grads_written():
            self._progress.perturbed = False
            raise RuntimeError(
                f"{type(self).__name__}.second_step(): a backward ran after first_step() on a one-pass step "
                f"(sam_interval, sam_start or look_k make this step a plain or reuse step, which uses the "
                f"gradient at w); its gradient would be mixed into the update. Run the second forward/backward "
                f"only when opt.needs_perturbed_pass is True (check it after first_step()). This step was "
                f"dropped; the parameters are unchanged"
            )
        if self._progress.local:  # the local first pass was not all-reduced, and no second pass follows
            distributed.average_over_ranks([b.grad for b in self._buckets])
            self._progress.first_sq = self._global_sq_norm(adaptive_aware=False)
        final_sq = self._progress.first_sq
        if self._progress.kind == REUSE:
            coef = look_reuse_coefficient(final_sq, self._look_norm, self._modes.look_alpha)
            coef_on = self._on_devices(coef)
            for launch in self._launches:
                self._ops[launch.device].multi_look_add_(
                    grads=launch.tensors("grad"),
                    look_dirs=[bucket.ensure_look_dir() for bucket in launch.buckets],
                    coef=coef_on[launch.device],
                )
            final_sq = self._global_sq_norm(adaptive_aware=False)
        found_inf = skip.skip_flag([self._progress.first_sq, final_sq], self._progress.device_hypers)
        if max_grad_norm is not None:
            self._clip_final_grads(final_sq, max_grad_norm)
        self._progress.refresh = False
        self._update(found_inf, zero_grad)

    def _clip_final_grads(self, final_sq: Tensor, max_norm: float) -> None:
        """g_hat *= min(1, max_norm / (||g_hat|| + CLIP_EPS)) in every bucket (torch's clip_grad_norm_ rule)."""
        coef = clip_coefficient(final_sq, max_norm)
        coef_on = self._on_devices(coef)
        for launch in self._launches:
            grads = launch.tensors("grad")
            torch._foreach_mul_(grads, coef_on[launch.device].to(grads[0].dtype))

    def _take_final_grads(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        """The last backward's gradients, unscaled (through the base optimizer, see second_step) and
        bound into the flat grad buffers."""
        # The second pass's inf check, recorded under the base; Momentum-SAM's one pass under the
        # optimizer, as for any torch optimizer (a user's scaler.unscale_(opt) before is not repeated).
        skip.unscale(grad_scaler, self if self.momentum_sam else self.base)
        for bucket in self._buckets:
            bucket.bind_grads()

    def _finish_step(self, found_inf: Tensor, zero_grad: bool) -> None:
        """After the restore: the base step unless ``found_inf``, the counters, the optional zeroing."""
        self.skipped_steps.add_(found_inf)  # in place: `+=` also sets the attribute, which torch 2.11's dynamo rejects
        skip.base_step(self.base, self._buckets, found_inf)
        self._count_step(zero_grad)

    def _count_step(self, zero_grad: bool) -> None:
        """The end of every step: the step counts, what LR schedulers check, the optional zeroing."""
        self._progress.count += 1
        if self.capturable:
            self._device_count.add_(1)  # in place: `+=` also sets the attribute, which torch 2.11's dynamo rejects
        if zero_grad:
            for bucket in self._buckets:  # grads were bound in second_step
                bucket.zero_grad()
        if not torch.compiler.is_compiling():  # host bookkeeping, not traced (torch 2.11's dynamo cannot set these)
            self._opt_called = True  # what torch's LR schedulers check to know the optimizer has stepped
            self.base._opt_called = True  # also when a scheduler was built on opt.base (its step is not called)
            self._mark_grads()  # for step(closure): did a backward come since?
        self._fire_step_hooks(post=True)

    def _check_capture(self) -> None:
        """torch's rule for its own optimizers: only a capturable optimizer may be captured (a graph
        would replay the step count and sigma_t of the capture forever otherwise)."""
        if torch.compiler.is_compiling() or not torch.cuda.is_initialized():
            return  # (a capture needs CUDA initialised; asking is_available() would initialise it)
        if torch.cuda.is_current_stream_capturing():
            if not self.capturable:
                raise RuntimeError(
                    f"{type(self).__name__} is being captured in a CUDA graph but was built with "
                    f"capturable=False: its step count and sigma_t would be frozen; pass capturable=True"
                )
            if not skip.base_state_ready(self.base, self._buckets):
                raise RuntimeError(
                    "capture a step only after at least one eager step: the base optimizer's state "
                    "(momentum buffers, ...) must exist before capture"
                )

    def _fire_step_hooks(self, post: bool) -> None:
        """torch's step hooks (``register_step_pre_hook``/``register_step_post_hook``, this optimizer's
        and the global ones) for the manual API: first_step fires the pre-hooks, the end of the step
        the post-hooks, once per full step. Within step(closure) torch's wrapper of step fires them.
        A pre-hook's replacement arguments have nothing to replace here and are ignored."""
        if self._progress.in_step:
            return
        hooks = (
            chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values())
            if post
            else chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values())
        )
        for hook in hooks:
            hook(self, (), {})

    @contextlib.contextmanager
    def perturbed(
        self, grad_scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None
    ) -> Iterator[SharpnessAware]:
        """``with opt.perturbed(): <second forward + backward>``: the whole sharpness-aware step.

        Entering perturbs (first_step, grads zeroed); leaving normally finishes the step
        (second_step: restore, combine, base update), both with ``grad_scaler`` if given.
        Leaving by an exception (an OOM in the second forward, a KeyboardInterrupt) restores the
        parameters bit-exactly, skips the update and re-raises; the gradients are left as they were.

        On a one-pass step (``sam_interval``, ``sam_start``, ``look_k``; ``needs_perturbed_pass`` is
        False) the body cannot be skipped: entering zeroes the gradients without perturbing, the
        body's backward recomputes the gradient at w, and leaving steps with it. Correct, but it
        saves nothing: a loop that wants the saving checks ``needs_perturbed_pass`` (README).
        """
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        if not needs_pass(self._progress.kind):
            for bucket in self._buckets:  # grads were bound in first_step
                bucket.zero_grad()
            self._progress.refresh = True
        try:
            yield self
        except BaseException:
            with torch.no_grad():
                self._restore()
            raise
        self.second_step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> Any:
        """One step. ``closure`` does a forward and backward and may return the loss.

        The first backward (at w) is normally done by the caller, and ``closure`` redoes it at
        w + eps; its loss is returned. When no backward happened since the last step or
        ``zero_grad()`` (torch's closure convention, and PyTorch Lightning's automatic
        optimization: ``opt.zero_grad(); opt.step(closure)``), the closure is called for the first
        pass too, and the loss at w, its first result, is returned.

        fp16 with a ``torch.amp.GradScaler``: both backwards on ``grad_scaler.scale(loss)``, then
        ``grad_scaler.step(opt, closure)`` (or ``opt.step(closure, grad_scaler=grad_scaler)``) and
        ``grad_scaler.update()`` (see first_step and second_step for what the scaler is used for).
        ``max_grad_norm``: clip the final gradient (see second_step).

        After ``first_step()``, ``step()`` finishes the step begun there, as ``second_step()`` does
        (see `_finish_begun_step`): what frameworks that make the ``optimizer.step()`` call themselves
        need (the Hugging Face Trainer, Lightning's manual optimization).

        On a one-pass step (``needs_perturbed_pass`` False) the closure is called only for the first
        pass, in the form above (then its loss is returned), never at the perturbed point; when the
        caller did the backward it is not called and None is returned, as torch's optimizers return
        without a closure."""
        if self._progress.perturbed:
            check_max_grad_norm(max_grad_norm)
            return self._finish_begun_step(
                closure,
                grad_scaler,
                lambda: self.second_step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm),
            )
        closure = self._check_step_call(closure, grad_scaler)
        check_max_grad_norm(max_grad_norm)
        self._progress.in_step = True  # torch's wrapper of step fires the step hooks, not first/second_step
        try:
            first_loss = NO_LOSS if self.momentum_sam else self._first_pass_by_closure(closure)
            if not self.needs_perturbed_pass:  # one pass: the closure is not called again
                self.first_step(grad_scaler=grad_scaler)
                self.second_step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
                return None if first_loss is NO_LOSS else first_loss
            with self.perturbed(grad_scaler, max_grad_norm):
                loss = self._call_closure(closure)
        finally:
            self._progress.in_step = False
        return loss if first_loss is NO_LOSS else first_loss

    def _finish_begun_step(
        self,
        closure: Callable[[], Any] | None,
        grad_scaler: torch.amp.GradScaler | None,
        finish: Callable[[], None],
    ) -> Any:
        """``step()`` after ``first_step()``: the second pass's gradient comes from the caller's
        backward before ``step()`` (the Trainer's ``optimizer.step()``, whose closure, where there is
        one, does nothing: Lightning's) or from ``closure``; then ``finish`` (second_step). The
        closure's loss is returned. A second pass with no gradient, or with two (the caller's
        backward and the closure's), restores w and is refused before any update. A one-pass step
        begun there takes no second pass: the closure is not called, second_step refuses a backward
        that ran, and None is returned."""
        if not needs_pass(self._progress.kind):
            self._progress.in_step = True
            try:
                finish()
            finally:
                self._progress.in_step = False
            return None
        caller_did = self._grads_written()
        loss = None
        try:
            self._check_step_call(closure, grad_scaler)
            closure_did = False
            if closure is not None:
                self._mark_grads()
                with torch.enable_grad():
                    loss = closure()
                closure_did = self._grads_written()
            if caller_did and closure_did:
                raise RuntimeError(
                    f"{type(self).__name__}.step(closure) after first_step(): the second pass's gradient "
                    f"was computed twice, by a backward before step() and by the closure. Do one of the "
                    f"two (step() without a closure finishes the step); the parameters are unchanged"
                )
            if not (caller_did or closure_did):
                raise RuntimeError(
                    f"{type(self).__name__}.step() after first_step(): no backward ran at the perturbed "
                    f"point, so the step would use no gradient. Do the second forward and backward "
                    f"before step() (or in its closure); the parameters are unchanged"
                )
        except BaseException:
            with torch.no_grad():
                self._restore()
            raise
        self._progress.in_step = True  # torch's wrapper of step fires the post-hooks (and the pre-hooks once more)
        try:
            finish()
        finally:
            self._progress.in_step = False
        return loss

    def _check_step_call(
        self, closure: Callable[[], Any] | None, grad_scaler: torch.amp.GradScaler | None
    ) -> Callable[[], Any] | None:
        if closure is None and not self._progress.perturbed:
            with_scaler = (
                " With a GradScaler: scaler.step(opt, closure), or opt.step(closure, grad_scaler=scaler); "
                "then scaler.update()."
                if grad_scaler is not None
                else ""
            )
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that re-evaluates the loss and calls backward(); "
                f"or call first_step(), do the second forward/backward, then second_step().{with_scaler}"
            )
        if grad_scaler is None and self.__dict__.get("grad_scale") is not None:
            # GradScaler's newer protocol sets opt.grad_scale instead of passing itself: the closure's
            # pass could not be unscaled.
            raise RuntimeError(
                f"{type(self).__name__} was stepped by a GradScaler that did not pass itself as "
                f"grad_scaler=: call opt.step(closure, grad_scaler=scaler), then scaler.update()"
            )
        if not torch.compiler.is_compiling():
            self._check_not_replaced()
        return closure

    def _first_pass_by_closure(self, closure: Callable[[], Any]) -> Any:
        """Call ``closure`` for the first pass when no gradient was written since the last step or
        zero_grad() (see step); its loss, or NO_LOSS when the caller did the first backward. Not
        decided while tracing (the version counters are not traced): the caller's backward is assumed."""
        if torch.compiler.is_compiling() or self._grads_written():
            return NO_LOSS
        with torch.enable_grad():
            loss = closure()
        if not self._grads_written():
            raise RuntimeError(
                self._no_backward_message(
                    "no gradient exists at w: no backward() ran since the last "
                    "step or zero_grad(), and the closure did not call one either"
                )
            )
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
        return (
            f"{type(self).__name__}.step(closure): {what}, so the step would use no gradient. The closure must "
            f"compute the loss and call loss.backward() (and may return the loss); the parameters are unchanged"
        )

    def _mark_grads(self) -> None:
        for bucket in self._buckets:
            bucket.mark_grads()

    def _grads_written(self) -> bool:
        """A gradient was written into some bucket since the last `_mark_grads` (a step, zero_grad())."""
        return any(bucket.grads_written() for bucket in self._buckets)

    def _check_not_replaced(self) -> None:
        if self._superseded_by:
            raise RuntimeError(
                f"this {type(self).__name__} was superseded: a {self._superseded_by} built later on the same "
                f"parameters took them into its own flat buckets. Step the newer optimizer only (build "
                f"one optimizer per set of parameters)"
            )
        if self._replaced_params:
            message = replaced_params_error(self._replaced_params)
            if message:
                raise RuntimeError(message)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place (default): they stay views into the flat grad buffer, so the
        next backward writes straight into it. ``set_to_none=True`` drops them as torch does; the
        next step then copies the new gradients back into the buffer (slower, same result)."""
        if self._progress.perturbed and not needs_pass(self._progress.kind) and not self._progress.refresh:
            raise RuntimeError(
                f"{type(self).__name__}.zero_grad() after first_step() on a one-pass step (sam_interval, sam_start "
                f"or look_k): the step uses the gradient at w kept by first_step(), which this would drop. Zero the "
                f"gradients only when opt.needs_perturbed_pass is True (or after second_step()); nothing was changed"
            )
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
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or of a plain torch optimizer of the base's class
        (then the hyperparameters of this optimizer's groups and its step counts are kept). One of
        another kind of fused optimizer, or one with values this optimizer refuses, is refused
        before anything changes."""
        checkpoint.load_state_dict(self, state_dict)
