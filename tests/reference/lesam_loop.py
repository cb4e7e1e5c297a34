"""LE-SAM and SAM as a plain per-tensor loop, written from Algorithm 1 of the paper and docs/design.md §1.

Independent of the package on purpose (it imports nothing from fused_lesam): the fused optimizer
is checked against this, so a mistake shared by both would need to be made twice. It follows the
shape of the most used PyTorch SAM code: a norm per tensor, a stacked global norm, eps per tensor,
an exact copy of w kept per tensor.
"""

from __future__ import annotations

import math

import torch


def cosine_sigma(t, sigma0, total, anneal):
    """Algorithm 1 line 6, as the authors' code computes it (written out again, not imported)."""
    if not anneal:
        return sigma0
    start = total - anneal
    if t < start:
        return sigma0
    if total - start <= 1 or t >= total - 1:
        return 0.0
    return 0.5 * sigma0 * (1 + math.cos(math.pi * (t - start) / (total - 1 - start)))


class ReferenceSAM:
    """mode="lesam": rho_t = min(sigma_t / (||g|| + varrho), rho_max); mode="sam": rho_t = rho."""

    def __init__(
        self,
        params,
        base_cls,
        *,
        mode,
        sigma=0.35,
        rho_max=0.4,
        varrho=1e-12,
        alpha=0.0,
        rho=0.05,
        adaptive=False,
        total_steps=None,
        anneal_steps=0,
        **base_kwargs,
    ):
        defaults = dict(sigma=sigma, rho_max=rho_max, varrho=varrho, alpha=alpha, rho=rho, adaptive=adaptive)
        groups = list(params)
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**defaults, **g} for g in groups]
        self.base = base_cls(groups, **base_kwargs)
        self.mode, self.total_steps, self.anneal_steps = mode, total_steps, anneal_steps
        self.t = 0
        self.saved = {}

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        assert zero_grad, "the reference always starts the second backward from zero"

        def scaled(p, g):
            return (p.abs() if g_adaptive[p] else 1.0) * g

        g_adaptive = {p: grp["adaptive"] for grp in self.base.param_groups for p in grp["params"]}
        with_grad = [p for grp in self.base.param_groups for p in grp["params"] if p.grad is not None]
        norm = torch.stack([scaled(p, p.grad.float()).norm(p=2) for p in with_grad]).norm(p=2)
        for grp in self.base.param_groups:
            if self.mode == "sam":
                rho_t = torch.tensor(float(grp["rho"]))
            else:
                sigma_t = cosine_sigma(self.t, grp["sigma"], self.total_steps, self.anneal_steps)
                rho_t = torch.clamp(sigma_t / (norm + grp["varrho"]), max=grp["rho_max"])
            for p in grp["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                w = p.float()
                direction = w * w * g if grp["adaptive"] else g
                eps = rho_t * direction / (norm + 1e-12)
                self.saved[p] = (p.clone(), p.grad.clone())
                p.copy_(w + eps)
                p.grad = None

    @torch.no_grad()
    def second_step(self, zero_grad=True):
        assert zero_grad, "the reference always zeroes (to None) after the step"
        for grp in self.base.param_groups:
            for p in grp["params"]:
                if p not in self.saved:
                    continue
                w_old, g_center = self.saved[p]
                p.copy_(w_old)
                a = grp["alpha"]
                if a and p.grad is not None:
                    p.grad.copy_((1 + a) * p.grad.float() - a * g_center.float())
        self.saved.clear()
        self.base.step()
        self.base.zero_grad(set_to_none=True)
        self.t += 1
