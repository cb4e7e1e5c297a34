"""The loss-budget schedule: sigma_t of Algorithm 1, line 6.

One function holds the formula (`fused_lesam.maths.sigma_at`); the optimizer's built-in per-step
annealing and the per-epoch `SigmaAnnealing` scheduler both call it. Everything here is host arithmetic on Python
numbers, so computing sigma_t never touches a device.
"""

from __future__ import annotations

import math
from typing import Any

from .checks import check_schedule
from .maths import sigma_at

__all__ = ["sigma_at", "SigmaAnnealing"]


class SigmaAnnealing:
    """Per-epoch loss-budget schedule for `FusedLESAM`, in the style of ``torch.optim.lr_scheduler``.

    The paper anneals once per epoch (200 epochs, cosine over the last 40). Build it after the
    optimizer and call ``.step()`` once at the end of every epoch; it writes ``group["sigma"]``
    of every param group from that group's ``initial_sigma`` (recorded at construction)::

        opt = FusedLESAM(model.parameters(), sigma=0.35, rho_max=0.4, lr=0.05)
        sched = SigmaAnnealing(opt, total=200, anneal=40)
        for epoch in range(200):
            train_one_epoch(...)
            sched.step()

    Use it instead of the optimizer's per-step ``anneal_steps``, never both.
    """

    def __init__(
        self, optimizer, total: int, anneal: int, *, sigma_min: float = 0.0, warmup: int = 0, last_epoch: int = -1
    ):
        check_schedule(total, anneal, warmup)
        if not math.isfinite(sigma_min) or sigma_min < 0:
            raise ValueError(f"sigma_min must be finite and >= 0, got {sigma_min!r}")
        groups = getattr(optimizer, "param_groups", [])
        if not groups or any("sigma" not in g for g in groups):
            raise TypeError("SigmaAnnealing needs an optimizer whose param groups hold 'sigma' (FusedLESAM)")
        if getattr(optimizer, "anneal_steps", 0):
            raise ValueError(
                "the optimizer already anneals sigma per step (anneal_steps > 0); use one schedule, not both"
            )
        self.optimizer = optimizer
        self.total, self.anneal, self.sigma_min, self.warmup = total, anneal, sigma_min, warmup
        for group in groups:
            group.setdefault("initial_sigma", group["sigma"])
        self.last_epoch = last_epoch
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        for group in self.optimizer.param_groups:
            # A group added since (opt.add_param_group) joins the schedule from its own sigma.
            group.setdefault("initial_sigma", group["sigma"])
            group["sigma"] = sigma_at(
                self.last_epoch, group["initial_sigma"], self.total, self.anneal, self.sigma_min, self.warmup
            )

    def get_last_sigma(self) -> list[float]:
        return [group["sigma"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
