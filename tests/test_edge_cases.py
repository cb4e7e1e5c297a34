"""Zero and non-finite gradients, exceptions in the perturbed region, and no host sync."""

import copy

import pytest
import torch
from helpers.models import SmallConvNet, loss_fn, make_batches, sam_step

from fused_lesam import FusedLESAM, FusedSAM


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: FusedLESAM(p, lr=0.1, sigma=0.35, rho_max=None, varrho=1e-30),  # no cap, tiny varrho: the risky case
        lambda p: FusedSAM(p, lr=0.1, rho=0.05),
        lambda p: FusedLESAM(p, lr=0.1, adaptive=True),
    ],
)
def test_zero_gradient_gives_exactly_zero_perturbation(make):
    model = SmallConvNet()
    opt = make(model.parameters())
    before = snapshot(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    assert_unchanged(model, before)
    assert torch.isfinite(opt.last_rho).all()
    opt.second_step()


def state_snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}


@pytest.mark.parametrize("fused_base", [False, True], ids=["sgd", "sgd-fused"])
@pytest.mark.parametrize("bad_pass", ["first", "second"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_never_reaches_params_or_state(bad, bad_pass, fused_base):
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, alpha=0.5, fused=fused_base)
    batches = make_batches(3)
    for x, y in batches[:2]:  # some good steps first, so there is momentum state to protect
        sam_step(model, opt, x, y)
    params_before, state_before = snapshot(model), state_snapshot(opt)

    x, y = batches[2]
    loss_fn(model, x, y).backward()
    if bad_pass == "first":
        model.conv1.weight.grad[0, 0, 0, 0] = bad
    opt.first_step(zero_grad=True)
    if bad_pass == "first":
        assert_unchanged(model, params_before)  # no perturbation at all
        assert opt.last_rho.item() == 0.0
    loss_fn(model, x, y).backward()
    if bad_pass == "second":
        model.head.bias.grad[1] = bad
    opt.second_step(zero_grad=True)

    assert_unchanged(model, params_before)
    assert all(
        torch.equal(v, state_before[id(p)][k]) for p, s in opt.state.items() for k, v in s.items() if torch.is_tensor(v)
    )
    assert int(opt.skipped_steps) == 1
    sam_step(model, opt, *batches[0])  # training goes on normally afterwards
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.skipped_steps) == 1


def test_exception_in_perturbed_region_restores_bit_exactly():
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batches(1)[0]
    before = snapshot(model)
    loss_fn(model, x, y).backward()
    with pytest.raises(torch.OutOfMemoryError):
        with opt.perturbed():
            assert not torch.equal(model.conv1.weight, before[0])  # really perturbed inside
            raise torch.OutOfMemoryError("simulated OOM in the second forward")
    assert_unchanged(model, before)
    assert not opt.state  # no base step was taken
    loss_fn(model, x, y).backward()  # and the next step works
    opt.step(lambda: loss_fn(model, x, y).backward())


def test_exception_in_closure_restores_bit_exactly():
    model = SmallConvNet()
    opt = FusedSAM(model.parameters(), lr=0.1, rho=0.5)
    x, y = make_batches(1)[0]
    before = snapshot(model)
    loss_fn(model, x, y).backward()

    def closure():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert_unchanged(model, before)


def test_no_host_sync_in_the_step(monkeypatch):
    """Every Python-level way to read a tensor's value on the host raises while the step runs."""
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedLESAM(
        [
            {"params": model.head.parameters(), "alpha": 0.5, "adaptive": True},
            {"params": [p for n, p in model.named_parameters() if not n.startswith("head.")]},
        ],
        lr=0.1,
        momentum=0.9,
        fused=True,
        total_steps=4,
        anneal_steps=2,
    )
    batches = make_batches(4)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync inside the optimizer step")

    def without_host_reads(half_step):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
                m.setattr(torch.Tensor, name, host_sync)
            half_step(zero_grad=True)

    sam_step(model, opt, *batches[0])  # the base's first step is decided on the host (see next test)
    for x, y in batches[1:]:
        loss_fn(model, x, y).backward()
        without_host_reads(opt.first_step)
        loss_fn(model, x, y).backward()
        without_host_reads(opt.second_step)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipped_first_step_with_fused_sgd_leaves_no_uninitialised_state():
    """torch's fused SGD creates its momentum buffers with empty_like and fills them in the kernel;
    a first step skipped on the device would keep that garbage. It is decided on the host instead."""
    torch.manual_seed(0)
    model = SmallConvNet()
    reference = copy.deepcopy(model)
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    ref = FusedLESAM(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
    x, y = make_batches(1)[0]
    loss_fn(model, x, y).backward()
    model.conv1.weight.grad[0, 0, 0, 0] = float("nan")
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert int(opt.skipped_steps) == 1 and not opt.state  # no momentum buffers were made
    for _ in range(2):  # afterwards it trains exactly like an optimizer that never saw the NaN
        sam_step(model, opt, x, y)
        sam_step(reference, ref, x, y)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_unfused_base_syncs_once_for_the_non_finite_guard(monkeypatch):
    """The documented exception: a base optimizer that cannot skip on the device costs one sync."""
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batches(1)[0]
    calls = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append(1) or real_bool(t))
    sam_step(model, opt, x, y)
    assert len(calls) == 1


def test_alpha_changed_between_the_two_halves_uses_the_first_halfs_decision():
    """Turning LE-SAM+ on mid-step must not combine with a stale center gradient from an older step."""
    torch.manual_seed(0)
    a = SmallConvNet()
    b = copy.deepcopy(a)
    opt_a = FusedLESAM(a.parameters(), lr=0.1, alpha=0.5)
    opt_b = FusedLESAM(b.parameters(), lr=0.1, alpha=0.5)
    batches = make_batches(2)
    sam_step(a, opt_a, *batches[0])
    sam_step(b, opt_b, *batches[0])  # leaves a center gradient from step 0 in b's buckets
    opt_a.param_groups[0]["alpha"] = 0.0
    opt_b.param_groups[0]["alpha"] = 0.0
    x, y = batches[1]
    sam_step(a, opt_a, x, y)
    loss_fn(b, x, y).backward()
    opt_b.first_step(zero_grad=True)
    opt_b.param_groups[0]["alpha"] = 0.5  # changed between the halves
    loss_fn(b, x, y).backward()
    opt_b.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
