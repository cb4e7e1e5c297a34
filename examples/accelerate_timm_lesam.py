"""LE-SAM in an `accelerate` training loop, on a timm model with timm's LR scheduler.

Run it: `python examples/accelerate_timm_lesam.py` (a few steps on synthetic images, CPU; the
model is built with `pretrained=False`, nothing is downloaded). tests/test_recipes.py checks that it
takes exactly the plain loop's steps, in fp32 and with `mixed_precision="bf16"`.

- `accelerator.prepare(model, optimizer, loader)` as for any optimizer. The prepared optimizer is
  accelerate's wrapper: `optimizer.step(closure)` goes through it (the closure uses
  `accelerator.backward`); for `first_step`/`second_step` use the optimizer you built (or
  `optimizer.optimizer`).
- BatchNorm (timm's ResNets have it): the second forward under `frozen_bn_stats`.
- timm's schedulers set `lr` in the param groups, which FusedLESAM shares with its base:
  `step_update(num_updates)` after each step (or `step(epoch)` per epoch), as in timm's train.py.
- Gradient accumulation: not through `accelerator.accumulate()`, whose last micro-batch would run
  only inside the closure (the same trap as Lightning's, see lightning_lesam.py); accumulate in both
  passes by hand (README, Gradient accumulation). Gradient clipping: `optimizer.step(closure,
  max_grad_norm=...)`, not `accelerator.clip_grad_norm_` before the step (that would clip the first
  gradient, which sets LE-SAM's radius).
- fp16 with a GradScaler (`mixed_precision="fp16"` on a GPU): accelerate's wrapper hides the
  optimizer's `grad_scaler` argument from `scaler.step`, so the scaler would leave the closure's
  pass scaled; FusedLESAM refuses that ("was stepped by a GradScaler that did not pass itself as
  grad_scaler="; tested with accelerate's wrapper and a CPU GradScaler). Step the optimizer you
  built instead: `opt.step(closure, grad_scaler=accelerator.scaler)`, then
  `accelerator.scaler.update()` (README, Mixed precision). On a CPU accelerate uses no GradScaler.
"""

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.scheduler import CosineLRScheduler

from fused_lesam import FusedLESAM, frozen_bn_stats

OPTIMIZER = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, sigma=0.2, rho_max=0.5)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=10)


def make_scheduler(opt, steps: int):
    return CosineLRScheduler(opt, t_initial=steps, warmup_t=1, warmup_lr_init=1e-3, t_in_epochs=False)


def synthetic_loader(batches: int = 4, batch_size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (batches * batch_size,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def train(model: torch.nn.Module, loader, steps: int, mixed_precision: str = "no") -> torch.nn.Module:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    optimizer = FusedLESAM(model.parameters(), **OPTIMIZER)  # build it on the model's parameters, then prepare
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = make_scheduler(optimizer, steps)
    model.train()
    for step, (x, y) in zip(range(steps), loader):
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)  # first pass, at w

        def closure():  # second pass, at w + eps
            with frozen_bn_stats(model):
                accelerator.backward(F.cross_entropy(model(x), y))

        optimizer.step(closure)
        optimizer.zero_grad()
        scheduler.step_update(num_updates=step + 1)
    return accelerator.unwrap_model(model)


if __name__ == "__main__":
    model = train(make_model(), synthetic_loader(), steps=4)
    print(f"trained {type(model).__name__} for 4 steps")
