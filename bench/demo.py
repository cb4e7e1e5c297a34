"""A short training run: SAM vs LE-SAM on a small conv net, printing loss, ||g|| and rho_t.

The main job until the benchmark suite lands. Data are synthetic (each class is a fixed random
image, each sample one of them plus strong noise), so it runs anywhere in seconds on a CPU.

    ./dev demo [--steps 150] [--batch 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fused_lesam import FusedLESAM, FusedSAM, frozen_bn_stats


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def synthetic_data(steps: int, batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(10, 3, 16, 16, generator=gen)
    for _ in range(steps):
        y = torch.randint(0, 10, (batch,), generator=gen)
        x = prototypes[y] + 2.0 * torch.randn(batch, 3, 16, 16, generator=gen)
        yield x.to(device), y.to(device)


def train(name: str, make_opt, args) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = make_model().to(device)  # move first, then build the optimizer (it flattens the parameters)
    opt = make_opt(model.parameters())
    print(f"\n{name}  (backend: {opt.backend_names})")
    print(f"{'step':>5} {'loss':>8} {'||g||':>8} {'rho_t':>8} {'sigma_t':>8}")
    start = time.perf_counter()
    for step, (x, y) in enumerate(synthetic_data(args.steps, args.batch, device)):
        loss = F.cross_entropy(model(x), y)
        loss.backward()

        def closure():
            with frozen_bn_stats(model):
                perturbed_loss = F.cross_entropy(model(x), y)
            perturbed_loss.backward()
            return perturbed_loss

        opt.step(closure)
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps - 1:
            # .item() syncs; only done when printing, never inside the step.
            print(f"{step:>5} {loss.item():>8.4f} {opt.last_grad_norm.item():>8.4f} "
                  f"{opt.last_rho[0].item():>8.4f} {opt.last_sigma[0].item():>8.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--every", type=int, default=15, help="print every N steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    train("SAM (rho = 0.05)", lambda p: FusedSAM(p, torch.optim.SGD, rho=0.05, **sgd), args)
    train("LE-SAM (sigma = 0.35, rho_max = 0.4, sigma annealed over the last third)",
          lambda p: FusedLESAM(p, torch.optim.SGD, sigma=0.35, rho_max=0.4, total_steps=args.steps,
                               anneal_steps=args.steps // 3, **sgd), args)


if __name__ == "__main__":
    main()
