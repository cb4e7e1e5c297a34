"""XSAM as a plain per-tensor loop, written from docs/design.md §1 "XSAM" (Chen & Zhou, ICLR 2026).

Independent of the package on purpose (it imports nothing from fused_lesam), like lesam_loop.py:
norms per tensor stacked into global ones, an exact copy of w_0 per tensor, the slerp written out
with Python's math on the host (the fused optimizer computes it on the device).
"""

from __future__ import annotations

import math

import torch


def slerp_weights(cos, alpha):
    """(a, b) with d(alpha) = a v0 + b v1; the linear limit when sin theta < 1e-8."""
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    if s < 1e-8:
        return 1.0 - alpha, alpha, theta
    return math.sin((1.0 - alpha) * theta) / s, math.sin(alpha * theta) / s, theta


class ReferenceXSAM:
    """k ascent steps of length rho / k, then the base step with ||g_hat|| d(alpha) at w_0."""

    def __init__(self, params, base_cls, *, rho=0.15, steps=1, alpha=1.0, eps=1e-12, **base_kwargs):
        groups = list(params)
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{"rho": rho, "alpha": alpha, **g} for g in groups]
        self.base = base_cls(groups, **base_kwargs)
        self.steps, self.eps = steps, eps
        self.w0 = {}
        self.alpha_chosen = None  # set by search(): overrides every group's alpha

    def _with_grad(self):
        return [p for grp in self.base.param_groups for p in grp["params"] if p.grad is not None]

    @torch.no_grad()
    def ascend(self):
        """One ascent step from the current gradients (the first one also saves w_0)."""
        params = self._with_grad()
        norm = torch.stack([p.grad.float().norm() for p in params]).norm().item()
        for grp in self.base.param_groups:
            for p in grp["params"]:
                if p.grad is None:
                    continue
                if p not in self.w0:
                    self.w0[p] = p.clone()
                p.copy_(p.float() + (grp["rho"] / self.steps) * p.grad.float() / (norm + 1e-12))
                p.grad = None

    def _stats(self):
        params = [p for p in self.w0 if p.grad is not None]
        delta = {p: p.float() - self.w0[p].float() for p in params}
        norm_d = math.sqrt(sum((d * d).sum().item() for d in delta.values()))
        norm_g = math.sqrt(sum((p.grad.float() ** 2).sum().item() for p in params))
        dot = sum((delta[p] * p.grad.float()).sum().item() for p in params)
        cos = dot / ((norm_d + self.eps) * (norm_g + self.eps))
        return delta, norm_d, norm_g, cos

    def _direction(self, p, delta, norm_d, norm_g, cos, alpha):
        a, b, _ = slerp_weights(cos, alpha)
        if norm_d == 0:  # no ascent: d = v1
            a, b = 0.0, 1.0
        return a * delta[p] / (norm_d + self.eps) + b * p.grad.float() / (norm_g + self.eps)

    @torch.no_grad()
    def search(self, loss_at, grid, rho_max):
        """Dynamic alpha: the grid point whose w_0 + rho_max d(alpha) has the largest loss."""
        delta, norm_d, norm_g, cos = self._stats()
        w_k = {p: p.clone() for p in delta}
        losses = []
        for alpha in grid:
            for p in delta:
                p.copy_(self.w0[p].float() + rho_max * self._direction(p, delta, norm_d, norm_g, cos, alpha))
            losses.append(float(loss_at()))
        for p in delta:
            p.copy_(w_k[p])
        self.alpha_chosen = grid[max(range(len(grid)), key=lambda i: losses[i])]

    @torch.no_grad()
    def finish(self):
        """Restore w_0, set the gradient to ||g_hat|| d(alpha), base step."""
        delta, norm_d, norm_g, cos = self._stats()
        for grp in self.base.param_groups:
            alpha = grp["alpha"] if self.alpha_chosen is None else self.alpha_chosen
            for p in grp["params"]:
                if p not in delta:
                    continue
                p.grad.copy_(norm_g * self._direction(p, delta, norm_d, norm_g, cos, alpha))
                p.copy_(self.w0[p])
        self.w0.clear()
        self.base.step()
        self.base.zero_grad(set_to_none=True)
