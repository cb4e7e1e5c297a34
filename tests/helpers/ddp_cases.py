"""The model, data and hyperparameters of the distributed runs (tests/test_distributed.py on the CPU,
tests/test_cuda_distributed.py on GPUs)."""

from __future__ import annotations

import torch
from torch import nn

STEPS = 5
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, sigma=0.1, rho_max=0.5, alpha=0.3)
XSAM_HYPER = dict(lr=0.1, momentum=0.9, rho=0.3, steps=2, dynamic=True, alpha=1.0, rho_max=1.0, alpha_delta=0.25)


def mlp():
    torch.manual_seed(0)
    # No BatchNorm: DDP keeps per-rank batch statistics, which the whole-batch run cannot match.
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(STEPS)]
