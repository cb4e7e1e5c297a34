"""LE-SAM with the Hugging Face `transformers.Trainer`: a small subclass, `LESAMTrainer`.

Run it: `python examples/hf_trainer_lesam.py` (a few steps of a tiny model on synthetic data, CPU;
nothing is downloaded). tests/test_recipes.py checks that it takes exactly the plain loop's steps.

The Trainer's own loop stays as it is, and keeps doing its part of the step:
- `training_step` (overridden) runs the first forward and backward at w of each micro-batch as
  usual; after the last micro-batch of a `gradient_accumulation_steps` window it perturbs
  (`first_step`) and runs the window's second forwards and backwards at w + eps, each loss
  scaled as in the first pass, BatchNorm's statistics frozen. The loss it returns (and the Trainer
  logs) is the one at w.
- The Trainer then clips (`max_grad_norm`, default 1.0): by then the gradients are the final ones
  at w + eps, so this is the clipping of the final gradient, what FusedLESAM's own `max_grad_norm=`
  does (README, Gradient clipping); set `max_grad_norm=0` for none. It calls `optimizer.step()`,
  without a closure, which finishes the step begun by `first_step()`; then it steps its LR
  scheduler (built on this optimizer as on any other: `lr_scheduler_type`, warm-up) and zeroes the
  gradients.
- `create_optimizer` (overridden) wraps the optimizer that `TrainingArguments.optim` names (AdamW,
  fused, by default: `lr`, betas, eps from the arguments) in FusedLESAM, with the Trainer's param
  groups (no weight decay on biases and norms). Give LE-SAM's own arguments as `lesam=dict(...)`.

Any model the Trainer takes works the same (a transformers model built from a config, or an
`nn.Module` that returns a dict with a "loss", as here). Tested on the CPU in fp32; fp16 with a
GradScaler is not supported here (the Trainer unscales the gradients for its clipping and
gradient-norm logging through accelerate, which meets the first pass's unscale and fails), and
bf16 autocast needs nothing of the optimizer. DeepSpeed and FSDP through the Trainer are untested.
"""

import contextlib

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from fused_lesam import FusedLESAM, frozen_bn_stats


class LESAMTrainer(Trainer):
    def __init__(self, *args, lesam: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lesam = dict(lesam or {})
        self._window = []  # this step's micro-batches, for the second pass

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            base, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
            self.optimizer_cls_and_kwargs = (FusedLESAM, {"base": base, **base_kwargs, **self.lesam})
        return super().create_optimizer(model)  # the Trainer's param groups, then our class with those kwargs

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward and backward at w
        self._window.append(inputs)
        if not self.accelerator.sync_gradients:  # more micro-batches to accumulate before the step
            return loss
        window, self._window = self._window, []
        self.optimizer.optimizer.first_step(zero_grad=True)  # accelerate wraps ours: perturb to w + eps
        with frozen_bn_stats(model):
            for i, micro_batch in enumerate(window):  # DDP all-reduces the last backward only, as in the first pass
                sync = contextlib.nullcontext() if i == len(window) - 1 else self.accelerator.no_sync(model)
                with sync:
                    super().training_step(model, micro_batch, num_items_in_batch)
        return loss  # the Trainer clips, calls optimizer.step() (which finishes the step) and its scheduler


class TinyClassifier(torch.nn.Module):
    """A model as the Trainer takes it: keyword inputs, a dict with the loss."""

    def __init__(self, features: int = 6, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, classes)
        )

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}


def synthetic_dataset(n: int = 64, features: int = 6, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


LESAM = dict(sigma=0.2, rho_max=0.5)


def arguments(output_dir: str, steps: int, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.01,
        warmup_steps=1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        trainer = LESAMTrainer(
            model=TinyClassifier(), args=arguments(out, steps=3), train_dataset=synthetic_dataset(), lesam=LESAM
        )
        trainer.train()
    print(trainer.optimizer.optimizer)
    for entry in trainer.state.log_history:
        print(entry)
