"""The loss-budget schedule: cosine annealing values worked out by hand."""

import math

import pytest
import torch
from helpers.models import SmallConvNet, make_batches, sam_step

from fused_lesam import FusedLESAM, SigmaAnnealing, sigma_at

# total = 10, anneal = 5: held at sigma0 for t = 0..5, cosine over t = 5..9, 0 from t = 9 on.
C = 0.5 * (1 + math.cos(math.pi / 4))  # 0.8535...
EXPECTED = [1, 1, 1, 1, 1, 1, C, 0.5, 1 - C, 0, 0, 0]


def test_cosine_values_by_hand():
    got = [sigma_at(t, 1.0, total=10, anneal=5) for t in range(12)]
    assert got == pytest.approx(EXPECTED, abs=1e-12)


def test_sigma_min_and_degenerate_lengths():
    assert sigma_at(7, 1.0, 10, 5, sigma_min=0.2) == pytest.approx(0.6)  # halfway between 1 and 0.2
    assert sigma_at(9, 1.0, 10, 5, sigma_min=0.2) == pytest.approx(0.2)
    assert sigma_at(9, 1.0, 10, 1) == 0.0  # a one-unit annealing is sigma_min at once
    assert sigma_at(8, 1.0, 10, 1) == 1.0
    assert sigma_at(100, 1.0, 10, 0) == 1.0  # no annealing


def test_warmup_rises_linearly_from_zero():
    got = [sigma_at(t, 0.4, total=20, anneal=5, warmup=4) for t in range(6)]
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_optimizer_anneals_per_step():
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.01, sigma=1.0, rho_max=100.0, total_steps=10, anneal_steps=5)
    seen = []
    for x, y in make_batches(12):
        sam_step(model, opt, x, y)
        seen.append(opt.last_sigma[0].item())
    assert seen == pytest.approx(EXPECTED, abs=1e-6)
    assert opt.last_rho[0].item() == 0.0  # sigma 0 -> radius 0


def test_scheduler_writes_group_sigma_per_epoch_and_round_trips():
    model = SmallConvNet()
    opt = FusedLESAM(
        [{"params": model.head.parameters(), "sigma": 2.0}, {"params": model.conv1.parameters()}], sigma=1.0, lr=0.01
    )
    sched = SigmaAnnealing(opt, total=10, anneal=5)
    got = []
    for _ in range(10):
        got.append(sched.get_last_sigma())
        sched.step()
    assert [g[0] for g in got] == pytest.approx([2 * e for e in EXPECTED[:10]], abs=1e-12)
    assert [g[1] for g in got] == pytest.approx(EXPECTED[:10], abs=1e-12)
    saved = sched.state_dict()
    again = SigmaAnnealing(opt, total=10, anneal=5)
    again.load_state_dict(saved)
    again.step()
    assert again.last_epoch == 11 and again.get_last_sigma() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(total=10, anneal=11), "anneal"),
        (dict(total=0, anneal=5), "total"),
        (dict(total=10, anneal=-1), "anneal"),
        (dict(total=10, anneal=5, warmup=6), "warmup"),
        (dict(total=10, anneal=5, sigma_min=-1.0), "sigma_min"),
    ],
)
def test_scheduler_rejects_bad_lengths(kwargs, name):
    opt = FusedLESAM(SmallConvNet().parameters(), lr=0.01)
    with pytest.raises(ValueError, match=name):
        SigmaAnnealing(opt, **kwargs)


def test_scheduler_refuses_double_annealing():
    opt = FusedLESAM(SmallConvNet().parameters(), lr=0.01, total_steps=10, anneal_steps=2)
    with pytest.raises(ValueError, match="anneal_steps"):
        SigmaAnnealing(opt, total=10, anneal=5)
