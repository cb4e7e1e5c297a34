"""FusedXSAM: explicit sharpness-aware minimization (Chen & Zhou, ICLR 2026; docs/design.md §1 "XSAM").

XSAM ascends like SAM, in ``steps`` steps of length rho / steps, then updates w_0 along an explicit
estimate of the direction to the neighbourhood's maximum: the slerp d(alpha) between where the
ascent went (v0, from w_k - w_0) and where the loss rises at its end (v1, from the last gradient),
scaled to the last gradient's length. alpha = 1 is SAM; ``dynamic=True`` re-chooses alpha by the
largest loss at w_0 + rho_max d(alpha) on a grid, when ``step`` is given ``search_alpha``.

On the engine of FusedLESAM/FusedSAM (`SharpnessAware`, engine.py): the ascent steps are its norm and perturb
ops (the backup of w_0 written at the first only); the end of the step is ``xsam_dots`` (three
reductions in one pass), the slerp coefficients on the device, and ``xsam_restore_``, one pass
that restores w_0 and writes the update gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import checkpoint, distributed, skip
from .checks import check_value, is_real, refuse_foreign_kwargs
from .engine import NO_LOSS, SharpnessAware
from .maths import slerp_coefficients
from .throughput import Modes, needs_pass

__all__ = ["FusedXSAM"]


class FusedXSAM(SharpnessAware):
    """XSAM on the fused engine.

    Args:
        params, base, **base_kwargs: as for `FusedLESAM`.
        rho: total ascent length, split over ``steps`` ascent steps (per param group).
        steps: ascent steps k (each needs a forward and backward: ``closure`` runs k times).
        alpha: the slerp's position, 0 = along the ascent, 1 = SAM (per param group); with
            ``dynamic`` the starting value of the one alpha the search chooses for the model.
        dynamic: choose alpha by the search (`step(closure, search_alpha=loss_fn)`).
        rho_max: the probe radius of the search (per param group).
        alpha_max, alpha_delta: the search grid {0, delta, 2 delta, ..., alpha_max}.
        eps: added to ||w_k - w_0|| and ||g_hat|| before dividing by them. The ascent steps use
            the engine's perturbation (the same guard, 1e-12, as FusedSAM), the default here.
        base_update: as for `FusedLESAM`: "auto" runs torch.optim.SGD/Adam/AdamW's step in the
            backends' fused update after ``xsam_restore_`` (which restores w_0 and writes the update
            gradient), "generic" runs the base optimizer's own step there.
        sam_interval, sam_start: the throughput modes of `FusedSAM` (README "Throughput modes"):
            the other steps are plain base steps with the gradient at w_0 (one pass; no ascent, no
            alpha search: ``search_alpha`` is not called on them). LookSAM (``look_k``) is refused.

    Telemetry (device tensors, no sync until read): ``last_alpha``, ``last_theta`` (angle
    between the ascent and g_hat), ``last_ghat_norm``, ``last_ascent_norm`` (||w_k - w_0||),
    with the engine's ``last_grad_norm``, ``last_rho`` (rho / steps) and ``skipped_steps``.
    """

    _hyper_names = ("rho", "rho_max", "alpha")

    def __init__(
        self,
        params,
        base: Callable[..., torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.15,
        steps: int = 1,
        alpha: float = 1.0,
        dynamic: bool = False,
        rho_max: float = 0.3,
        alpha_max: float = 2.0,
        alpha_delta: float = 0.1,
        eps: float = 1e-12,
        backend: str = "auto",
        capturable: bool = False,
        base_update: str = "auto",
        sam_interval: int = 1,
        sam_start: int = 0,
        **base_kwargs,
    ):
        modes = Modes(sam_interval, sam_start)
        refuse_foreign_kwargs(
            "FusedXSAM",
            base,
            base_kwargs,
            {
                "sigma": "XSAM ascends by the fixed length rho; LE-SAM's loss budget sigma is FusedLESAM's",
                "momentum_sam": "XSAM ascends along gradients and turns towards the last one; Momentum-SAM "
                "is FusedSAM(momentum_sam=True, rho=...)",
                **{
                    name: "LookSAM reuses SAM's direction; no reuse rule is defined for XSAM's update gradient "
                    "(use FusedSAM or FusedLESAM with look_k)"
                    for name in ("look_k", "look_alpha")
                },
            },
        )
        check_value(
            "steps", steps, isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, "an int >= 1"
        )
        check_value("dynamic", dynamic, isinstance(dynamic, bool), "a bool")
        check_value(
            "alpha_delta",
            alpha_delta,
            is_real(alpha_delta) and math.isfinite(alpha_delta) and alpha_delta > 0,
            "a finite number > 0",
        )
        check_value(
            "alpha_max",
            alpha_max,
            is_real(alpha_max) and math.isfinite(alpha_max) and alpha_max >= 0,
            "a finite number >= 0",
        )
        check_value("eps", eps, is_real(eps) and math.isfinite(eps) and eps > 0, "a finite number > 0")
        points = alpha_max / alpha_delta
        check_value(
            "alpha_max",
            alpha_max,
            abs(points - round(points)) < 1e-6,
            f"a whole multiple of alpha_delta={alpha_delta!r}",
        )
        self.steps, self.dynamic, self.eps = steps, dynamic, eps
        self.alpha_grid = [i * alpha_delta for i in range(round(points) + 1)]
        self._initial_alpha = alpha
        super().__init__(
            params,
            base,
            dict(rho=rho, rho_max=rho_max, alpha=alpha),
            backend,
            capturable,
            base_update,
            modes=modes,
            **base_kwargs,
        )

    def _build(self) -> None:
        super()._build()
        main = self._main_device
        # The chosen alpha of dynamic mode: one value for the model (the search maximises one loss).
        old = getattr(self, "alpha", None)
        self.alpha = torch.tensor(float(self._initial_alpha), device=main) if old is None else old.to(main)
        self.last_alpha = torch.zeros(len(self.param_groups), device=main)
        self.last_theta = torch.zeros((), device=main)
        self.last_ghat_norm = torch.zeros((), device=main)
        self.last_ascent_norm = torch.zeros((), device=main)
        self._alpha_grid = torch.tensor(self.alpha_grid, device=main)  # on the device once, for the search

    def _check_group(self, group: dict[str, Any]) -> None:
        rho, rho_max, alpha = group["rho"], group["rho_max"], group["alpha"]
        check_value("rho", rho, is_real(rho) and math.isfinite(rho) and rho >= 0, "a finite number >= 0")
        check_value(
            "rho_max", rho_max, is_real(rho_max) and math.isfinite(rho_max) and rho_max >= 0, "a finite number >= 0"
        )
        check_value("alpha", alpha, is_real(alpha) and math.isfinite(alpha), "a finite number")

    def _radius_args(self, group: dict[str, Any]) -> tuple[float, float, float]:
        return math.inf, group["rho"] / self.steps, 1.0  # a fixed step: SAM's perturbation, length rho / k

    # ------------------------------------------------------------------ the step
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """The first ascent step, from the gradient at w_0 (the caller's first backward); it writes
        the exact backup of w_0. ``grad_scaler`` only with steps=1 (GradScaler unscales once per pass
        of an optimizer, and the later ascent steps have none)."""
        if grad_scaler is not None and self.steps != 1:
            raise ValueError(f"grad_scaler works with steps=1; this FusedXSAM has steps={self.steps}")
        super().first_step(zero_grad, grad_scaler)

    @torch.no_grad()
    def ascent_step(self, zero_grad: bool = False) -> None:
        """Ascent steps 2..k: w_i = w_{i-1} + (rho / k) g_i / ||g_i|| from the gradient at w_{i-1}."""
        if not self._progress.perturbed:
            raise RuntimeError("ascent_step() called before first_step(): the first ascent step writes the backup of w")
        if not needs_pass(self._progress.kind):
            raise RuntimeError(
                "ascent_step() on a one-pass step (sam_interval, sam_start): no ascent is taken; call second_step() "
                "without a backward (opt.needs_perturbed_pass says which steps ascend)"
            )
        if self._progress.ascents >= self.steps:
            raise RuntimeError(
                f"ascent_step() after {self._progress.ascents} of steps={self.steps} ascent steps: call second_step()"
            )
        for bucket in self._buckets:
            bucket.bind_grads()
        sq = self._global_sq_norm(adaptive_aware=False)
        sq_on = self._on_devices(sq)
        for launch in self._launches:
            _, step_length, _ = self._radius_args(self.param_groups[launch.group_index])
            self._ops[launch.device].multi_perturb_(
                params=launch.tensors("param"),
                grads=launch.tensors("grad"),
                backups=None,
                sq=sq_on[launch.device],
                sigma=math.inf,
                rho_max=step_length,
                varrho=1.0,
                adaptive=False,
            )
        # A non-finite gradient on the way skips the step at the end, as one in the first pass does.
        self._progress.first_sq = self._progress.first_sq + sq
        self._progress.ascents += 1
        if zero_grad:
            for bucket in self._buckets:
                bucket.zero_grad()
        if not torch.compiler.is_compiling():  # for step(closure): does the next closure call backward?
            self._mark_grads()

    def _dots(self) -> Tensor:
        """[||w_k - w_0||^2, ||g_hat||^2, (w_k - w_0) . g_hat] over every bucket, on the main device."""
        return self._reduce_buckets(
            lambda ops, mine: ops.xsam_dots([b.param for b in mine], [b.backup for b in mine], [b.grad for b in mine])
        )

    def _check_search(self, search_alpha: Callable[[], Any] | None) -> None:
        if search_alpha is not None and not self.dynamic:
            raise ValueError("search_alpha is for dynamic=True: with a fixed alpha there is nothing to search")

    def _group_alpha(self, group: dict[str, Any]) -> float | Tensor:
        return self.alpha if self.dynamic else group["alpha"]

    def _probe(self, dots: Tensor, search_alpha: Callable[[], Any]) -> None:
        """Dynamic alpha: w <- w_0 + rho_max d(alpha) for each alpha of the grid, keep the one with
        the largest loss (on the device; a non-finite loss never wins, and when all are, alpha stays).
        Under torch.distributed the losses are summed over the ranks (one all-reduce per search)."""
        for bucket in self._buckets:
            bucket.ensure_delta()  # D = w_k - w_0, saved by the first probe
        losses = []
        for i, alpha in enumerate(self.alpha_grid):
            by_group = [slerp_coefficients(dots, alpha, group["rho_max"], self.eps)[0] for group in self.param_groups]
            for launch in self._launches:
                self._ops[launch.device].multi_xsam_probe_(
                    params=launch.tensors("param"),
                    backups=launch.tensors("backup"),
                    grads=launch.tensors("grad"),
                    deltas=launch.tensors("delta"),
                    coefs=by_group[launch.group_index].to(launch.device),
                    save_delta=i == 0,
                )
            loss = search_alpha()
            losses.append(torch.as_tensor(loss, device=self._main_device).detach().float().reshape(()))
        losses = torch.stack(losses)
        # Each rank saw its own batch: sum the losses so that every rank keeps the same alpha.
        distributed.sum_over_ranks(losses, self._shard_group)
        losses = torch.where(torch.isfinite(losses), losses, -math.inf)
        best = self._alpha_grid.gather(0, losses.argmax().view(1)).view(())
        self.alpha.copy_(torch.where(torch.isfinite(losses).any(), best, self.alpha))

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        search_alpha: Callable[[], Any] | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        """After the last backward (g_hat at w_k): with ``search_alpha`` (dynamic mode) choose alpha;
        then restore w_0 exactly, write ||g_hat|| d(alpha) into the gradient, and base-step."""
        if max_grad_norm is not None:
            raise TypeError(
                "FusedXSAM has no max_grad_norm: clip by hand (README, Gradient clipping); its update "
                "gradient ||g_hat|| d(alpha) is built after the last backward"
            )
        if not self._progress.perturbed:
            raise RuntimeError(
                "second_step() called before first_step(): nothing to restore; the parameters were not changed"
            )
        self._check_search(search_alpha)
        if not needs_pass(self._progress.kind):  # a plain step: nothing to search around
            self._one_pass_step(zero_grad, grad_scaler, None)
            return
        if self._progress.ascents != self.steps:
            raise RuntimeError(
                f"second_step() after {self._progress.ascents} of steps={self.steps} ascent steps: "
                f"call ascent_step() after each backward until all are done"
            )
        self._take_final_grads(grad_scaler)
        dots = self._dots()
        searched = search_alpha is not None
        if searched:
            try:
                self._probe(dots, search_alpha)
            except BaseException:
                self._restore()
                raise
        ghat_norm = dots[1].sqrt()
        by_group = {}
        for index, group in enumerate(self.param_groups):
            alpha = self._group_alpha(group)
            by_group[index], theta = slerp_coefficients(dots, alpha, ghat_norm, self.eps)
            if isinstance(alpha, Tensor):
                self.last_alpha[index].copy_(alpha)
            else:
                self.last_alpha[index].fill_(alpha)
        for launch in self._launches:
            self._ops[launch.device].multi_xsam_restore_(
                params=launch.tensors("param"),
                backups=launch.tensors("backup"),
                grads=launch.tensors("grad"),
                deltas=launch.tensors("delta") if searched else None,  # the probes overwrote w_k
                coefs=by_group[launch.group_index].to(launch.device),
            )
        self._progress.perturbed = False
        self._progress.ascents = 0
        self.last_theta.copy_(theta)
        self.last_ascent_norm.copy_(dots[0].sqrt())
        self.last_ghat_norm.copy_(ghat_norm)
        found_inf = skip.skip_flag([self._progress.first_sq, dots], self._progress.device_hypers)
        self._update(found_inf, zero_grad, restored=True)

    def local_first_pass(self, model: torch.nn.Module):
        raise RuntimeError(
            "FusedXSAM has no local (per-rank) perturbation mode: its update is built from the "
            "ascent direction w_k - w_0, which would differ between ranks and make their weights "
            "drift apart; let DDP all-reduce every backward (the default)"
        )

    @contextlib.contextmanager
    def perturbed(self, grad_scaler: torch.amp.GradScaler | None = None) -> Iterator[FusedXSAM]:
        if self.steps != 1:
            raise RuntimeError(f"perturbed() covers one ascent step; with steps={self.steps} use step(closure)")
        with super().perturbed(grad_scaler) as opt:
            yield opt

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        search_alpha: Callable[[], Any] | None = None,
    ) -> Any:
        """One XSAM step. The first backward (at w_0) is done by the caller; ``closure`` redoes the
        forward and backward and runs once per ascent step (at w_1, ..., w_k); its last loss is
        returned. ``search_alpha`` (dynamic mode): a function returning the loss at the current
        parameters, forward only (it is called under no_grad, once per grid point).

        If ``closure`` or ``search_alpha`` raises, w_0 is restored bit-exactly and the step is skipped.
        After ``first_step()`` (and every ascent step), ``step()`` finishes the step as ``second_step()``
        does (FusedLESAM.step)."""
        if self._progress.perturbed:
            return self._finish_begun_step(
                closure, grad_scaler, lambda: self.second_step(grad_scaler=grad_scaler, search_alpha=search_alpha)
            )
        closure = self._check_step_call(closure, grad_scaler)
        self._check_search(search_alpha)
        self._progress.in_step = True  # torch's wrapper of step fires the step hooks, not first/second_step
        try:
            first_loss = self._first_pass_by_closure(closure)  # as FusedLESAM.step: the closure-only convention
            if not self.needs_perturbed_pass:  # a plain step: the closure is not called again
                self.first_step(grad_scaler=grad_scaler)
                self.second_step(grad_scaler=grad_scaler)
                return None if first_loss is NO_LOSS else first_loss
            self.first_step(zero_grad=True, grad_scaler=grad_scaler)
            try:
                for i in range(self.steps):
                    loss = self._call_closure(closure)
                    if i + 1 < self.steps:
                        self.ascent_step(zero_grad=True)
            except BaseException:
                with torch.no_grad():
                    self._restore()
                raise
            self.second_step(grad_scaler=grad_scaler, search_alpha=search_alpha)
        finally:
            self._progress.in_step = False
        return loss if first_loss is NO_LOSS else first_loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[checkpoint.STATE_KEY]["alpha"] = self.alpha.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        checkpoint.loadable(self, state_dict)  # the checks of every kind first: another kind's state dict is named
        alpha = state_dict.get(checkpoint.STATE_KEY, {}).get("alpha")
        if alpha is None:
            raise ValueError("this state dict has no XSAM alpha: it was not saved by FusedXSAM.state_dict()")
        super().load_state_dict(state_dict)
        self.alpha.copy_(alpha)
