"""LE-SAM in PyTorch Lightning: automatic optimization and manual optimization.

Run it: `python examples/lightning_lesam.py` (a few steps on synthetic data, CPU).
tests/test_recipes.py runs both forms and checks that they take exactly the plain loop's steps.

**Automatic optimization** (`LESAMClassifier`): an ordinary LightningModule; only
`configure_optimizers` returns a FusedLESAM. Lightning calls `optimizer.step(closure)` with a closure
that runs `training_step`, `zero_grad` and `backward`; as no backward has happened since the last
step, FusedLESAM calls that closure for both passes: at w, then at w + eps. So `training_step` runs
twice per step, and what it logs is logged for both passes (the step's loss at w and at w + eps).

- BatchNorm: the closure cannot tell which pass it is, so the second forward updates the running
  statistics too. Use manual optimization (below) with `frozen_bn_stats` for such models.
- `Trainer(accumulate_grad_batches=k)` with k > 1 would be silently wrong: Lightning runs the first
  k - 1 micro-batches' backwards before the step and the last one inside the closure, so the first
  pass would miss the last micro-batch and the second pass would see only it. `LESAMClassifier`
  refuses it; accumulate in both passes with manual optimization instead.
- `Trainer(gradient_clip_val=...)` clips inside the closure, so in both passes: the first gradient
  too, which sets LE-SAM's radius (rho_t = sigma_t / ||g||). Clip the final gradient only with the
  step's own `max_grad_norm` (`optimizer_step` below passes it). With `precision="bf16-mixed"`
  Lightning refuses `gradient_clip_val` for this optimizer ("does not allow for gradient clipping
  because it performs unscaling of gradients internally"), so `max_grad_norm` is the way there.
- `precision="bf16-mixed"` works (autocast around each pass; tested). `"16-mixed"` on a GPU does not:
  Lightning's fp16 plugin runs the closure itself and then calls `scaler.step(optimizer)` without
  it, which leaves no second pass to run, and FusedLESAM refuses it with a message; use
  `"bf16-mixed"`, or manual optimization with a GradScaler (README, Mixed precision). On a CPU
  Lightning turns `"16-mixed"` into `"bf16-mixed"` itself.

**Manual optimization** (`ManualLESAMClassifier`): `self.automatic_optimization = False`; the first
backward, `opt.first_step(zero_grad=True)`, the second forward under `frozen_bn_stats` and its
backward, then `opt.step()`, which finishes the step begun by `first_step()` and lets Lightning count
it (`trainer.global_step`, which `max_steps` reads; `opt.second_step()` does the same maths but
Lightning does not see a step). `opt.step(closure)` with the second pass in the closure works too.
"""

import lightning as L
import torch
import torch.nn.functional as F

from fused_lesam import FusedLESAM, frozen_bn_stats

OPTIMIZER = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, sigma=0.2, rho_max=0.5)


def make_optimizer(params):
    return FusedLESAM(params, **OPTIMIZER)


def make_scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # anything torch's


class LESAMClassifier(L.LightningModule):
    """Automatic optimization: an ordinary LightningModule apart from `configure_optimizers`."""

    def __init__(self, model: torch.nn.Module, max_grad_norm: float | None = None):
        super().__init__()
        self.model = model
        self.max_grad_norm = max_grad_norm

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # Lightning's default is `optimizer.step(closure=optimizer_closure)`; this only adds the
        # clipping of the final gradient (drop the override when you do not clip).
        optimizer.step(closure=optimizer_closure, max_grad_norm=self.max_grad_norm)

    def on_fit_start(self):
        if self.trainer.accumulate_grad_batches != 1:
            raise RuntimeError(
                "accumulate_grad_batches > 1 splits LE-SAM's two passes between micro-batches in "
                "automatic optimization: use ManualLESAMClassifier and accumulate in both passes"
            )


class ManualLESAMClassifier(L.LightningModule):
    """Manual optimization: both passes written out, BatchNorm's statistics frozen in the second."""

    def __init__(self, model: torch.nn.Module, closure_form: bool = False):
        super().__init__()
        self.model = model
        self.automatic_optimization = False
        self.closure_form = closure_form

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.manual_backward(loss)  # first pass, at w

        def second_pass():  # at w + eps, BatchNorm's running statistics left alone
            with frozen_bn_stats(self.model):
                self.manual_backward(F.cross_entropy(self.model(x), y))

        if self.closure_form:
            opt.step(second_pass)  # perturb, second pass, restore, base step
        else:
            opt.first_step(zero_grad=True)  # perturb to w + eps
            second_pass()
            opt.step()  # finishes the step begun by first_step(); Lightning counts it
        opt.zero_grad()
        self.lr_schedulers().step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters())
        return {"optimizer": opt, "lr_scheduler": make_scheduler(opt)}


def train(
    module: L.LightningModule, loader, steps: int, precision: str | None = "32-true", **trainer_kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def synthetic_loader(batches: int = 4, batch_size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batches * batch_size,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def small_cnn(seed: int = 0, batchnorm: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8) if batchnorm else torch.nn.Identity(),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


if __name__ == "__main__":
    loader = synthetic_loader()
    for module in (LESAMClassifier(small_cnn(batchnorm=False)), ManualLESAMClassifier(small_cnn())):
        trainer = train(module, loader, steps=4)
        print(
            f"{type(module).__name__}: {trainer.global_step} steps, "
            f"last loss {trainer.callback_metrics['train_loss']:.4f}"
        )
