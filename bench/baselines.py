"""What users run today, for the benchmarks to compare against: SAM and LE-SAM as the widely
copied per-tensor loop. Its operations, one tensor at a time, are kept as that code has them: a
norm per tensor and a stacked global norm, a clone of each weight for the restore, the
perturbation built as ``(w^2 or 1.0) * grad * scale`` (two temporaries) and added, and the restore
by rebinding ``p.data`` to the clone. Written for timing; the maths itself is checked against
tests/reference/lesam_loop.py by the test suite."""

from __future__ import annotations

import torch


class PerTensorSAM(torch.optim.Optimizer):
    """``rho`` fixed (SAM), or with ``sigma`` given the LE-SAM radius min(sigma/(||g||+varrho), rho_max)."""

    def __init__(self, params, base, rho=0.05, sigma=None, rho_max=float("inf"), varrho=1e-12, adaptive=False,
                 **base_kwargs):
        super().__init__(params, dict(rho=rho, sigma=sigma, rho_max=rho_max, varrho=varrho, adaptive=adaptive))
        self.base = base(self.param_groups, **base_kwargs)
        self.param_groups = self.base.param_groups

    def _grad_norm(self):
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)

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
