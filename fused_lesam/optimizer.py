"""The optimizers people use: FusedLESAM and FusedSAM, each the step engine (engine.py) with its
hyperparameters, their checks, and how it finds the radius each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .checks import check_schedule, check_value, is_real, refuse_foreign_kwargs
from .engine import SharpnessAware
from .maths import sigma_at
from .momentum_sam import check_available
from .throughput import Modes

__all__ = ["SharpnessAware", "FusedLESAM", "FusedSAM"]


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
        sam_interval, sam_start, look_k, look_alpha: the throughput modes (README "Throughput
            modes"): the full LE-SAM step at step t iff t >= sam_start and (t - sam_start) is a
            multiple of sam_interval (or of look_k); the other steps take one pass, a plain base step
            or (look_k > 1, LookSAM) the gradient plus look_alpha * ||g|| / ||g_v|| * g_v. With
            alpha > 0 the full steps are LE-SAM+ steps and g_v comes from g_hat before the combine.
            ``opt.needs_perturbed_pass`` says whether the coming step needs the second pass.
    """

    _hyper_names = ("sigma", "rho_max", "varrho", "alpha", "alpha_form", "adaptive")

    def __init__(
        self,
        params,
        base: Callable[..., torch.optim.Optimizer] | None = None,
        *,
        sigma: float = 0.35,
        rho_max: float | None = 0.4,
        varrho: float = 1e-12,
        alpha: float = 0.0,
        alpha_form: str = "paper",
        adaptive: bool = False,
        total_steps: int | None = None,
        anneal_steps: int = 0,
        backend: str = "auto",
        capturable: bool = False,
        base_update: str = "auto",
        sam_interval: int = 1,
        sam_start: int = 0,
        look_k: int = 1,
        look_alpha: float = 0.7,
        **base_kwargs,
    ):
        modes = Modes(sam_interval, sam_start, look_k, look_alpha)
        refuse_foreign_kwargs(
            "FusedLESAM",
            base,
            base_kwargs,
            {
                "rho": "LE-SAM has no fixed radius: it back-solves rho_t = min(sigma_t / ||g||, rho_max) from the loss "
                "budget sigma each step; give sigma= (the budget, default 0.35) and rho_max= (the cap), or use "
                "FusedSAM(rho=...) for SAM's fixed radius (davda54/sam's rho)",
                "momentum_sam": "LE-SAM's radius is back-solved from the loss budget with ||g|| at w, which "
                "Momentum-SAM's one pass never computes; use FusedSAM(momentum_sam=True, rho=...), its fixed radius",
            },
        )
        check_schedule(total_steps, anneal_steps, suffix="_steps")
        self.total_steps = total_steps
        self.anneal_steps = anneal_steps
        self._sigma_tables: dict[float, Tensor] = {}
        hyper = dict(
            sigma=sigma,
            rho_max=math.inf if rho_max is None else rho_max,
            varrho=varrho,
            alpha=alpha,
            alpha_form=alpha_form,
            adaptive=adaptive,
        )
        super().__init__(params, base, hyper, backend, capturable, base_update, modes=modes, **base_kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        sigma, rho_max, varrho, alpha = group["sigma"], group["rho_max"], group["varrho"], group["alpha"]
        check_value("sigma", sigma, is_real(sigma) and math.isfinite(sigma) and sigma >= 0, "a finite number >= 0")
        check_value("rho_max", rho_max, is_real(rho_max) and rho_max > 0, "a number > 0 (or None / inf for no cap)")
        check_value("varrho", varrho, is_real(varrho) and math.isfinite(varrho) and varrho > 0, "a finite number > 0")
        check_value("alpha", alpha, is_real(alpha) and math.isfinite(alpha) and alpha >= 0, "a finite number >= 0")
        check_value(
            "alpha_form", group["alpha_form"], group["alpha_form"] in ("paper", "released"), "'paper' or 'released'"
        )
        check_value("adaptive", group["adaptive"], isinstance(group["adaptive"], bool), "a bool")

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
            values = [sigma0] + [
                sigma_at(t, sigma0, self.total_steps, self.anneal_steps) for t in range(start, self.total_steps)
            ]
            table = torch.tensor(values, dtype=torch.float64, device=self._main_device)
            self._sigma_tables[sigma0] = table
        index = (self._device_count - start + 1).clamp(0, self.anneal_steps)
        return table.gather(0, index.view(1)).view(())  # a gather, not table[index]: no data-dependent shape to trace

    def _center_coefs(self, group: dict[str, Any]) -> tuple[float, float] | None:
        alpha = group["alpha"]
        if alpha == 0:
            return None
        return (1.0 + alpha if group["alpha_form"] == "paper" else 1.0), alpha


class FusedSAM(SharpnessAware):
    """Classic SAM (Foret et al.) with a fixed radius ``rho``, on the same fused engine.

    eps = rho * g / ||g|| (``adaptive=True``: ASAM, eps = rho * w^2 g / ||w g||), the numbers the
    most used PyTorch SAM implementation computes. The baseline of every comparison.

    ``momentum_sam=True`` is Momentum-SAM (`fused_lesam.momentum_sam`): eps = -rho * v / ||v||, v the
    base's momentum (SGD with momentum > 0, Adam, AdamW, on the fused base update), one forward/backward
    per step; its useful rho is larger than SAM's (the paper's runs: 3, against SAM's 0.2).
    ``sam_interval``, ``sam_start``, ``look_k``, ``look_alpha``: the throughput modes, as for
    `FusedLESAM` (LookSAM refuses ``adaptive=True``; Momentum-SAM, already one pass per step, takes none).
    """

    _hyper_names = ("rho", "adaptive")

    def __init__(
        self,
        params,
        base: Callable[..., torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        momentum_sam: bool = False,
        backend: str = "auto",
        capturable: bool = False,
        base_update: str = "auto",
        sam_interval: int = 1,
        sam_start: int = 0,
        look_k: int = 1,
        look_alpha: float = 0.7,
        **base_kwargs,
    ):
        modes = Modes(sam_interval, sam_start, look_k, look_alpha)
        refuse_foreign_kwargs(
            "FusedSAM",
            base,
            base_kwargs,
            {
                name: f"{name} is LE-SAM's (FusedLESAM); SAM's radius is the fixed rho="
                for name in ("sigma", "rho_max", "varrho")
            },
        )
        check_value("momentum_sam", momentum_sam, isinstance(momentum_sam, bool), "a bool")
        if momentum_sam and not modes.default:
            raise ValueError(
                "momentum_sam=True with sam_interval, sam_start or look_k: Momentum-SAM already takes one "
                "forward/backward per step, and those options choose which steps pay SAM's second pass; "
                "use one or the other"
            )
        self.momentum_sam = momentum_sam
        super().__init__(
            params,
            base,
            dict(rho=rho, adaptive=adaptive),
            backend,
            capturable,
            base_update,
            modes=modes,
            **base_kwargs,
        )
        if momentum_sam:
            check_available(self)

    def _check_group(self, group: dict[str, Any]) -> None:
        rho = group["rho"]
        check_value("rho", rho, is_real(rho) and math.isfinite(rho) and rho >= 0, "a finite number >= 0")
        check_value("adaptive", group["adaptive"], isinstance(group["adaptive"], bool), "a bool")
        if self.momentum_sam and group["adaptive"]:
            raise ValueError(
                "adaptive=True with momentum_sam=True: ASAM's scaling is defined for a gradient, and "
                "Momentum-SAM perturbs along the momentum; drop one of the two"
            )

    def _radius_args(self, group: dict[str, Any]) -> tuple[float, float, float]:
        # Momentum-SAM goes along -v: a signed radius, which min(inf, -rho) keeps in every backend.
        return math.inf, -group["rho"] if self.momentum_sam else group["rho"], 1.0
