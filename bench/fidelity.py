"""Fidelity of the throughput modes: how closely each mode's update gradient follows LE-SAM's full
one, g_hat, along one shared training trajectory.

It measures each mode's approximation on a shared trajectory, computed by the bench's own torch
code (plain autograd on the model, not the optimizers' modes): the trajectory is driven by
FusedLESAM with full steps (sigma 0.15, rho_max 0.4, momentum SGD), and at every step, at that step's
w and batch, the bench computes the gradient g at w, the radius rho_t = min(sigma / ||g||, rho_max),
the reference g_hat (the gradient at w + rho_t g/||g||), and each mode's update gradient:

  interval k=2   g_hat on its full steps (t = 0, 2, 4, ...), g on the others;
  LookSAM k=5    g_hat on its full steps (t = 0, 5, 10, ...), where it stores
                 g_v = g_hat - (g_hat.g / ||g||^2) g; on the others g + 0.7 ||g|| / ||g_v|| g_v,
                 g_v from this trajectory's last full step;
  Momentum-SAM   the gradient at w - rho v/||v||, v the trajectory optimizer's momentum buffer
                 (opt.state[p]["momentum_buffer"]) before this step, rho = this step's rho_t (so that
                 only the direction differs from LE-SAM's); g at step 0, before any momentum.

Per step: the cosine similarity to g_hat and the relative error ||g_mode - g_hat|| / ||g_hat||;
printed as a summary (mean and min of the cosine, mean and max of the error over the steps), and
charted over the steps. Data: synthetic (bench/radius_dynamics.py's: each of 10 classes a fixed
random 3x16x16 image plus strong noise), fixed batches; the model: a small conv net without
BatchNorm, so that every gradient here is of the same function. Seconds on a CPU (one thread,
common.one_thread).

    python bench/fidelity.py [--steps 200] [--batch 64]

Writes bench/results/fidelity.json (every per-step figure, the summary, the machine) and fidelity.png.
"""

from __future__ import annotations

import argparse
import time

import report
import torch
import torch.nn.functional as F
from common import MODES, Progress, machine, one_thread, results_dir, write_json
from radius_dynamics import synthetic_data
from torch import nn

from fused_lesam import FusedLESAM

SIGMA, RHO_MAX = 0.15, 0.4  # bench/radius_dynamics.py's budget for this problem, the paper's cap
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
INTERVAL_K = MODES["interval"].kwargs["sam_interval"]
LOOK_K, LOOK_ALPHA = MODES["looksam"].kwargs["look_k"], MODES["looksam"].kwargs["look_alpha"]
LABELS = {key: mode.label for key, mode in MODES.items()}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def gradient_at(model: nn.Module, params: list[torch.Tensor], x, y, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The flat gradient of the batch loss at w + ``shift`` (flat; None: at w); w is left as it was."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        if shift is not None:
            torch._foreach_add_(params, list(unflatten(shift, params)))
    try:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    return torch.cat([g.reshape(-1) for g in grads])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]):
    start = 0
    for p in like:
        yield flat[start : start + p.numel()].view_as(p)
        start += p.numel()


def looksam_direction(g: torch.Tensor, g_hat: torch.Tensor) -> torch.Tensor:
    """LookSAM's stored direction: the part of g_hat orthogonal to g."""
    return g_hat - (g_hat @ g) / (g @ g) * g


def looksam_gradient(g: torch.Tensor, g_v: torch.Tensor, alpha: float) -> torch.Tensor:
    """LookSAM's update gradient on a reuse step: g plus g_v scaled to alpha ||g||."""
    return g + alpha * g.norm() / g_v.norm() * g_v


def agreement(g_mode: torch.Tensor, g_hat: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and relative error ||g_mode - g_hat|| / ||g_hat||, in float64."""
    a, b = g_mode.double(), g_hat.double()
    return (a @ b / (a.norm() * b.norm())).item(), ((a - b).norm() / b.norm()).item()


def run(steps: int, batch: int, device: torch.device, progress: Progress) -> dict[str, dict[str, list[float]]]:
    """The trajectory and, per step, each mode's cosine and relative error to g_hat."""
    torch.manual_seed(0)
    model = make_model().to(device)
    params = list(model.parameters())
    opt = FusedLESAM(params, torch.optim.SGD, sigma=SIGMA, rho_max=RHO_MAX, **SGD)
    per_step = {label: dict(cosine=[], rel_error=[]) for label in LABELS.values()}
    g_v = None
    for t, (x, y) in enumerate(synthetic_data(steps, batch, device)):
        g = gradient_at(model, params, x, y)
        rho = min(SIGMA / g.norm().item(), RHO_MAX)
        g_hat = gradient_at(model, params, x, y, rho * g / g.norm())
        if t % LOOK_K == 0:
            g_v = looksam_direction(g, g_hat)
        buffers = [opt.state[p].get("momentum_buffer") for p in params]
        if buffers[0] is None:  # step 0: no momentum yet
            g_msam = g
        else:
            v = torch.cat([b.reshape(-1) for b in buffers])
            g_msam = gradient_at(model, params, x, y, -rho * v / v.norm())
        mode_gradients = {
            LABELS["interval"]: g_hat if t % INTERVAL_K == 0 else g,
            LABELS["looksam"]: g_hat if t % LOOK_K == 0 else looksam_gradient(g, g_v, LOOK_ALPHA),
            LABELS["msam"]: g_msam,
        }
        for label, g_mode in mode_gradients.items():
            cosine, rel_error = agreement(g_mode, g_hat)
            per_step[label]["cosine"].append(cosine)
            per_step[label]["rel_error"].append(rel_error)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        progress.advance()
    return per_step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    with one_thread():  # on a GPU it changes nothing that matters
        per_step = run(args.steps, args.batch, device, Progress(args.steps, "fidelity"))
    seconds = time.perf_counter() - start
    summary = report.fidelity_summary(per_step)
    print(
        f"\nEach mode's update gradient against LE-SAM's g_hat over {args.steps} steps of one FusedLESAM "
        f"trajectory (synthetic data, small conv net; computed by the bench's own torch code; {seconds:.1f} s)"
    )
    print(report.fidelity_table(summary))
    write_json("fidelity.json", dict(machine=machine(device), config=vars(args), summary=summary, per_step=per_step))
    title = f"update gradient of each mode against LE-SAM's g_hat, one shared trajectory ({args.steps} steps)"
    report.plot_fidelity(per_step, title, results_dir() / "fidelity.png")
    print(f"wrote {results_dir() / 'fidelity.json'} and {results_dir() / 'fidelity.png'}")
    return dict(summary=summary, per_step=per_step)


if __name__ == "__main__":
    main()
