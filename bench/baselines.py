"""What users run today, for the benchmarks to compare against: SAM and LE-SAM as the widely
copied per-tensor loop, and XSAM (one ascent step, fixed alpha) written the same way. Its
operations, one tensor at a time, are kept as that code has them: a norm per tensor and a stacked
global norm, a clone of each weight for the restore, the perturbation built as ``(w^2 or 1.0) * grad
* scale`` (two temporaries) and added, and the restore by rebinding ``p.data`` to the clone. Written
for timing; the maths itself is checked against tests/reference/lesam_loop.py and
tests/reference/xsam_loop.py by the test suite."""

from __future__ import annotations

import torch


class PerTensorSAM(torch.optim.Optimizer):
    """``rho`` fixed (SAM), or with ``sigma`` given the LE-SAM radius min(sigma/(||g||+varrho), rho_max)."""

    def __init__(
        self, params, base, rho=0.05, sigma=None, rho_max=float("inf"), varrho=1e-12, adaptive=False, **base_kwargs
    ):
        super().__init__(params, dict(rho=rho, sigma=sigma, rho_max=rho_max, varrho=varrho, adaptive=adaptive))
        self.base = base(self.param_groups, **base_kwargs)
        self.param_groups = self.base.param_groups

    def _grad_norm(self):
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = self._grad_norm()
        for group in self.param_groups:
            if group["sigma"] is None:
                rho = group["rho"]
            else:  # on the device, as the LE-SAM paper's loop does it (its .item() sync left out)
                rho = torch.clamp(group["sigma"] / (norm + group["varrho"]), max=group["rho_max"])
            scale = rho / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base.step()
        if zero_grad:
            self.zero_grad()


class PerTensorXSAM(PerTensorSAM):
    """XSAM with one ascent step (SAM's, of length ``rho``) and a fixed ``alpha``, per tensor: the
    three global reductions as stacked per-tensor ones, the slerp on the device, then the update
    gradient ||g_hat|| d(alpha) built per tensor before the restore and the base step."""

    def __init__(self, params, base, rho=0.15, alpha=0.5, eps=1e-12, **base_kwargs):
        super().__init__(params, base, rho=rho, **base_kwargs)
        self.alpha, self.eps = alpha, eps

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        deltas = [p - self.state[p]["old_p"] for p in params]
        norm_d = torch.norm(torch.stack([d.norm(p=2) for d in deltas]), p=2)
        norm_g = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        dot = torch.stack([(d * p.grad).sum() for d, p in zip(deltas, params)]).sum()
        theta = torch.arccos(torch.clamp(dot / ((norm_d + self.eps) * (norm_g + self.eps)), -1.0, 1.0))
        a = torch.sin((1 - self.alpha) * theta) / torch.sin(theta)
        b = torch.sin(self.alpha * theta) / torch.sin(theta)
        for p, d in zip(params, deltas):
            p.grad = norm_g * (a * d / (norm_d + self.eps) + b * p.grad / (norm_g + self.eps))
            p.data = self.state[p]["old_p"]
        self.base.step()
        if zero_grad:
            self.zero_grad()
