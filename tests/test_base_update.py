"""The base optimizer's step fused into the restore (fused_lesam/base_update.py).

The fused path must compute what torch's own step computes (torch.optim.SGD/Adam/AdamW with
foreach=False, on the generic path), keep torch's state under torch's names, resume from
checkpoints bit-identically in both directions with plain torch optimizers, leave parameters
without a gradient alone, and skip non-finite steps without touching parameters or state.
Comparisons run in fp64, where both paths agree to rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.asserts import assert_bits_equal, assert_close
from helpers.models import loss_fn, make_batches, sam_step, through_bytes
from torch import nn

from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, available_backends

BACKENDS = [b for b in ("torch", "cpp") if not available_backends()[b]]

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "dampening-maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99))),
    "adamw-amsgrad-maximize": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True)),
}


class Net(nn.Module):
    """fp64 conv + linear; ``unused`` never gets a gradient, ``sometimes`` on odd steps only."""

    def __init__(self, with_idle=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        self.head = nn.Linear(4, 5, dtype=torch.float64)
        self.with_idle = with_idle
        if with_idle:
            self.unused = nn.Linear(3, 3, dtype=torch.float64)
            self.sometimes = nn.Linear(4, 5, dtype=torch.float64)
        self.calls = 0

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        out = self.head(h)
        if self.with_idle and self.calls % 4 >= 2:  # both passes of every other step
            out = out + self.sometimes(h)
        self.calls += 1
        return out


def batches(n):
    return [(x.double(), y) for x, y in make_batches(n)]


def pair(config, backend, alpha=0.0, with_idle=False, groups=False, **extra):
    """Two copies of one model: the fused path (default) and torch's own step (generic, foreach=False)."""
    base, kwargs = BASES[config]
    model = Net(with_idle)
    models = model, copy.deepcopy(model)

    def params(m):
        if not groups:
            return m.parameters()
        return [
            {"params": m.conv.parameters()},
            {"params": [p for n, p in m.named_parameters() if not n.startswith("conv.")], "lr": kwargs["lr"] / 2},
        ]

    fused = FusedLESAM(params(models[0]), base=base, backend=backend, alpha=alpha, **kwargs, **extra)
    generic = FusedLESAM(
        params(models[1]),
        base=base,
        backend=backend,
        alpha=alpha,
        base_update="generic",
        foreach=False,
        **kwargs,
        **extra,
    )
    assert fused.base_update == "fused" and generic.base_update == "generic"
    return models, (fused, generic)


def assert_same_training(models, opts, msg=""):
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert_close(a, b, msg=f"{msg} {name}")
        sa, sb = opts[0].state.get(a, {}), opts[1].state.get(b, {})
        assert sa.keys() == sb.keys(), f"{msg} {name}: state {sorted(sa)} vs torch's {sorted(sb)}"
        for key in sb:
            assert_close(sa[key].double(), sb[key].double(), msg=f"{msg} {name} {key}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("config", list(BASES))
def test_fused_step_equals_torch_step(config, alpha, backend):
    """Over 8 steps with two param groups and an LR scheduler that changes lr mid-run."""
    models, opts = pair(config, backend, alpha, groups=True)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 if t < 4 else 0.3) for o in opts]
    for x, y in batches(8):
        for model, opt, sched in zip(models, opts, schedulers):
            sam_step(model, opt, x, y)
            sched.step()
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"] != BASES[config][1]["lr"]
    assert_same_training(models, opts, config)


def xsam_step(model, opt, x, y):
    """Two ascent steps and the dynamic alpha search (forward only at each probe)."""
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    opt.ascent_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    with torch.no_grad():
        opt.second_step(zero_grad=True, search_alpha=lambda: loss_fn(model, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["momentum", "nesterov", "adamw-amsgrad-maximize"])
def test_xsam_fused_step_equals_torch_step(config, backend):
    """FusedXSAM's update gradient (written by xsam_restore_) taken by the fused base update equals
    torch's own step taking it, over 8 steps with two param groups, an idle parameter and a
    scheduler changing lr mid-run."""
    base, kwargs = BASES[config]
    models = (Net(with_idle=True),)
    models += (copy.deepcopy(models[0]),)
    xsam = dict(rho=0.2, steps=2, dynamic=True, alpha_delta=0.5, backend=backend)

    def params(m):
        return [{"params": m.conv.parameters()}, {"params": m.head.parameters(), "lr": kwargs["lr"] / 2}]

    opts = (
        FusedXSAM(params(models[0]), base=base, **xsam, **kwargs),
        FusedXSAM(params(models[1]), base=base, **xsam, base_update="generic", foreach=False, **kwargs),
    )
    assert [o.base_update for o in opts] == ["fused", "generic"]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 if t < 4 else 0.3) for o in opts]
    for x, y in batches(8):
        for model, opt, sched in zip(models, opts, schedulers):
            xsam_step(model, opt, x, y)
            sched.step()
    assert_same_training(models, opts, config)
    assert torch.equal(opts[0].alpha, opts[1].alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["momentum", "adamw-amsgrad-maximize"])
def test_parameters_without_a_gradient_are_left_alone(config, backend):
    """``unused`` never has a gradient, ``sometimes`` on every other step (gradients dropped with
    set_to_none between steps): no state for the first (torch creates none), and Adam's step count
    of the second lags behind, as in torch."""

    def step_dropping_grads(model, opt, x, y):
        loss_fn(model, x, y).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        opt.second_step()
        opt.zero_grad(set_to_none=True)

    models, opts = pair(config, backend, with_idle=True)
    before = models[0].unused.weight.detach().clone()
    for x, y in batches(6):
        for model, opt in zip(models, opts):
            step_dropping_grads(model, opt, x, y)
    assert_bits_equal(models[0].unused.weight.detach(), before)
    assert not opts[0].state.get(models[0].unused.weight)
    if "adam" in config:
        assert opts[0].state[models[0].sometimes.weight]["step"].item() == 3
        assert opts[0].state[models[0].head.weight]["step"].item() == 6
    assert_same_training(models, opts, config)


def test_the_path_is_chosen_whatever_flags_the_base_got():
    params = list(Net().parameters())
    for base in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        for flags in ({}, {"foreach": True}, {"foreach": False}, {"fused": True}):
            opt = FusedSAM(params, base=base, lr=0.1, **flags)
            assert opt.base_update == "fused", (base, flags)
            assert "Base update: fused" in repr(opt)

    class MySGD(torch.optim.SGD):
        pass

    for base in (torch.optim.RMSprop, MySGD):
        opt = FusedLESAM(params, base=base, lr=0.1)
        assert opt.base_update == "generic" and "is not torch.optim.SGD, Adam or AdamW" in opt.base_update_reason
        with pytest.raises(ValueError, match="base_update='fused' is not possible: .* is not torch.optim.SGD"):
            FusedLESAM(params, base=base, lr=0.1, base_update="fused")
    assert FusedLESAM(params, lr=0.1, base_update="generic").base_update == "generic"
    with pytest.raises(ValueError, match="base_update must be 'auto', 'fused' or 'generic'"):
        FusedLESAM(params, lr=0.1, base_update="fast")
    assert FusedXSAM(params, lr=0.1).base_update == "fused"
    assert FusedXSAM(params, lr=0.1, base_update="generic").base_update == "generic"


@pytest.mark.parametrize("config", ["momentum", "adamw-amsgrad-maximize"])
def test_state_is_torch_s_and_lives_in_flat_buffers(config):
    models, opts = pair(config, "torch")
    for x, y in batches(2):
        for model, opt in zip(models, opts):
            sam_step(model, opt, x, y)
    fused, generic = opts
    storages = set()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert fused.state[p].keys() == generic.state[q].keys()
        for key, value in fused.state[p].items():
            assert value.shape == generic.state[q][key].shape and value.dtype == generic.state[q][key].dtype
            if key != "step":
                storages.add(value.untyped_storage().data_ptr())
    assert len(storages) == len(fused.state[next(models[0].parameters())]) - ("adam" in config)  # one buffer per name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["momentum", "adamw-amsgrad-maximize"])
def test_checkpoints_move_between_plain_torch_and_fused(config, backend):
    """A plain torch optimizer's checkpoint loads into ours and ours into a plain one; each run
    then continues like torch's own; and ours resumes from its own checkpoint bit-identically."""
    base, kwargs = BASES[config]
    data = batches(6)
    model = Net()
    plain = base(model.parameters(), foreach=False, **kwargs)
    for x, y in data[:2]:  # a plain (non-SAM) run makes the state
        plain.zero_grad()
        loss_fn(model, x, y).backward()
        plain.step()
    checkpoint = through_bytes({"model": model.state_dict(), "opt": plain.state_dict()})

    def resumed(base_update):
        m = Net()
        m.load_state_dict(checkpoint["model"])
        opt = FusedLESAM(m.parameters(), base=base, backend=backend, base_update=base_update, foreach=False, **kwargs)
        opt.load_state_dict(copy.deepcopy(checkpoint["opt"]))  # a plain torch optimizer's state dict
        return m, opt

    models, opts = zip(resumed("auto"), resumed("generic"))
    assert opts[0].base_update == "fused"
    for x, y in data[2:4]:
        for m, opt in zip(models, opts):
            sam_step(m, opt, x, y)
    assert_same_training(models, opts, "from a plain checkpoint")

    ours = through_bytes({"model": models[0].state_dict(), "opt": opts[0].state_dict()})
    back = Net()
    back.load_state_dict(ours["model"])
    plain_again = base(back.parameters(), foreach=False, **kwargs)
    plain_again.load_state_dict({k: v for k, v in ours["opt"].items() if k != "fused_lesam"})
    assert_same_training((models[0], back), (opts[0], plain_again), "into a plain optimizer")

    again = Net()
    again.load_state_dict(ours["model"])
    opt_again = FusedLESAM(again.parameters(), base=base, backend=backend, **kwargs)
    opt_again.load_state_dict(ours["opt"])
    for x, y in data[4:]:
        sam_step(models[0], opts[0], x, y)
        sam_step(again, opt_again, x, y)
    for a, b in zip(models[0].parameters(), again.parameters()):
        assert_bits_equal(a.detach(), b.detach(), "resumed run differs")
        for key in opts[0].state[a]:
            assert_bits_equal(opts[0].state[a][key], opt_again.state[b][key], f"resumed {key} differs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["momentum", "dampening-maximize", "adamw-amsgrad-maximize"])
@pytest.mark.parametrize("at_step", [0, 2])
def test_non_finite_step_leaves_parameters_and_state_untouched(config, at_step, backend):
    """A NaN in the final gradient at step ``at_step`` (0: the very first, where SGD's momentum
    buffer would be created): parameters and state bit-identical, the skip counted, and the run
    goes on as torch's does."""
    models, opts = pair(config, backend)
    data = batches(5)
    for t, (x, y) in enumerate(data):
        if t == at_step:
            params = list(models[0].parameters())
            before = [p.detach().clone() for p in params]
            state = {p: {k: v.clone() for k, v in opts[0].state[p].items()} for p in params if p in opts[0].state}

            def poisoned(model, x, y):
                return loss_fn(model, x, y) * (math.nan if model.calls % 2 == 0 else 1.0)  # the second pass

            sam_step(models[0], opts[0], x, y, loss=poisoned)
            assert opts[0].skipped_steps.item() == 1
            for p, b in zip(params, before):
                assert_bits_equal(p.detach(), b)
                if p not in state:  # none before: none after, or Adam's fresh state (torch's fused Adam makes it)
                    assert all(not v.any() for v in opts[0].state.get(p, {}).values()), "state from a skipped step"
                    continue
                assert state[p].keys() == opts[0].state[p].keys()
                for k, v in state[p].items():
                    assert_bits_equal(opts[0].state[p][k], v, f"{k} changed by a skipped step")
            models[1].calls += 2
            opts[1].skipped_steps += 1
            continue
        for model, opt in zip(models, opts):
            sam_step(model, opt, x, y)
    assert_same_training(models, opts, config)


def test_tensor_lr_takes_torch_s_step():
    models, opts = pair("momentum", "torch")
    for opt in opts:
        opt.param_groups[0]["lr"] = torch.tensor(0.05, dtype=torch.float64)
    for x, y in batches(3):
        for model, opt in zip(models, opts):
            sam_step(model, opt, x, y)
    assert_same_training(models, opts, "tensor lr")


def test_add_param_group_keeps_the_state():
    models, opts = pair("adamw", "torch")
    for x, y in batches(2):
        for model, opt in zip(models, opts):
            sam_step(model, opt, x, y)
    kept = {p: {k: v.clone() for k, v in opts[0].state[p].items()} for p in models[0].head.parameters()}
    for opt in opts:
        opt.add_param_group({"params": list(nn.Linear(3, 3, dtype=torch.float64).parameters()), "lr": 0.1})
    for p, state in kept.items():
        for key, value in state.items():
            assert_bits_equal(opts[0].state[p][key], value)
    for x, y in batches(2):
        for model, opt in zip(models, opts):
            sam_step(model, opt, x, y)
    assert_same_training(models, opts, "after add_param_group")
