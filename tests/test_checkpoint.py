"""Checkpoints resume bit-identically; LR schedulers reach the base optimizer."""

import copy
import warnings

import torch
from helpers.models import SmallConvNet, make_batches, sam_step, through_bytes

from fused_lesam import FusedLESAM, SigmaAnnealing

OPT_KW = dict(
    lr=0.05, momentum=0.9, weight_decay=5e-3, sigma=0.35, rho_max=0.4, alpha=0.3, total_steps=12, anneal_steps=6
)


def train(model, opt, batches, sched=None):
    for x, y in batches:
        sam_step(model, opt, x, y)
        if sched is not None:
            sched.step()


def test_resume_from_checkpoint_is_bit_identical():
    torch.manual_seed(0)
    batches = make_batches(12)
    model = SmallConvNet()
    fresh_copy = copy.deepcopy(model)

    opt = FusedLESAM(model.parameters(), **OPT_KW)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    train(model, opt, batches, sched)

    # The same run, stopped after 6 steps, saved to bytes, and resumed in new objects.
    first = copy.deepcopy(fresh_copy)
    opt1 = FusedLESAM(first.parameters(), **OPT_KW)
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=4, gamma=0.5)
    train(first, opt1, batches[:6], sched1)
    saved = through_bytes({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()})

    resumed = SmallConvNet()
    opt2 = FusedLESAM(resumed.parameters(), **OPT_KW)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5)
    resumed.load_state_dict(saved["model"])  # copies into the flat buckets in place
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(resumed, opt2, batches[6:], sched2)

    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for (n1, b1), (_, b2) in zip(model.named_buffers(), resumed.named_buffers()):
        assert torch.equal(b1, b2), n1
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key])
    assert torch.equal(opt.last_sigma, opt2.last_sigma) and torch.equal(opt.last_rho, opt2.last_rho)
    assert opt2.param_groups is opt2.base.param_groups and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_sigma_scheduler_state_survives_a_checkpoint():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.05, sigma=0.5)
    sched = SigmaAnnealing(opt, total=4, anneal=3)
    sched.step()
    sched.step()
    state = opt.state_dict()
    other = FusedLESAM(SmallConvNet().parameters(), lr=0.05, sigma=0.5)
    other.load_state_dict(state)
    assert other.param_groups[0]["sigma"] == opt.param_groups[0]["sigma"] == sched.get_last_sigma()[0]
    assert other.param_groups[0]["initial_sigma"] == 0.5


def test_lr_scheduler_on_the_wrapper_reaches_the_base_without_warnings():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    x, y = make_batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sam_step(model, opt, x, y)
        sched.step()
    lr_now = opt.base.param_groups[0]["lr"]
    assert abs(lr_now - 0.01) < 1e-12

    # And the update really uses the new lr: SGD with momentum moves w by lr * (new momentum buffer).
    before = model.head.bias.detach().clone()
    sam_step(model, opt, x, y)
    torch.testing.assert_close(model.head.bias.detach(), before - 0.01 * opt.state[model.head.bias]["momentum_buffer"])


def test_lr_scheduler_on_the_base_optimizer_also_works():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt.base, step_size=1, gamma=0.5)
    sam_step(model, opt, *make_batches(1)[0])
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
