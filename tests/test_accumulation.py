"""Gradient accumulation over micro-batches, in both passes, equals the step on the whole batch."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_lesam import FusedLESAM, FusedSAM, available_backends

BACKENDS = [name for name, why in available_backends().items() if not why]


def mlp():
    # No BatchNorm: its batch statistics would differ between micro-batches and the whole batch.
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, b: FusedLESAM(ps, lr=0.1, momentum=0.9, sigma=0.1, rho_max=0.5, alpha=0.5, backend=b),
        lambda ps, b: FusedSAM(ps, lr=0.1, momentum=0.9, rho=0.05, adaptive=True, backend=b),
    ],
    ids=["lesam-plus", "asam"],
)
def test_micro_batches_equal_the_whole_batch(make, backend):
    torch.manual_seed(0)
    whole = mlp()
    micro = copy.deepcopy(whole)
    opt_whole, opt_micro = make(whole.parameters(), backend), make(micro.parameters(), backend)
    gen = torch.Generator().manual_seed(1)
    parts = 4
    for _ in range(6):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)

        loss_of(whole, x, y).backward()
        opt_whole.step(lambda: loss_of(whole, x, y).backward())
        opt_whole.zero_grad()

        def accumulate():
            # Each micro-batch's loss is scaled by 1/parts, so the sum of gradients is the mean's.
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                (loss_of(micro, xs, ys) / parts).backward()

        accumulate()  # first pass, at w
        opt_micro.step(accumulate)  # second pass, at w + eps
        opt_micro.zero_grad()
        for p, q in zip(micro.parameters(), whole.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt_micro.last_grad_norm, opt_whole.last_grad_norm, rtol=1e-5, atol=1e-7)
