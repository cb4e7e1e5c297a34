"""A small model with BatchNorm and an unused layer, its data, and one SAM-style step."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn


class SmallConvNet(nn.Module):
    """Conv + BatchNorm + two heads; ``unused`` never takes part in forward (its grad stays None)."""

    def __init__(self, dtype=torch.float32, head_dtype=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(8, dtype=dtype)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, dtype=dtype)
        self.head = nn.Linear(8, 5, dtype=head_dtype or dtype)
        self.unused = nn.Linear(4, 4, dtype=dtype)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x.to(self.head.weight.dtype))


def make_batches(n, dtype=torch.float32, seed=0, batch=8):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 6, 6, generator=gen).to(dtype), torch.randint(0, 5, (batch,), generator=gen))
        for _ in range(n)
    ]


def groups_of(model, split):
    """One group, or two groups with their own lr / hyperparameters (the head apart)."""
    if not split:
        return list(model.parameters())
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return [{"params": rest}, {"params": head, "lr": 0.02, **split}]


def through_bytes(checkpoint):
    """``checkpoint`` saved with torch.save and loaded back (weights_only), as a resumed run sees it."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def sam_step(model, opt, x, y, loss=loss_fn, first_step=None, second_step=None):
    """One SAM-style step through the manual two-step API (works for the reference loop too);
    ``first_step``/``second_step`` replace the optimizer's halves (e.g. compiled ones)."""
    loss(model, x, y).backward()
    (first_step or opt.first_step)(zero_grad=True)
    loss(model, x, y).backward()
    (second_step or opt.second_step)(zero_grad=True)
