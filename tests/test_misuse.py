"""Ordinary user mistakes (issue 15): each one either works as the user meant or is refused with a
message naming the problem and the fix, never a silently wrong step. Every backend, and both the
fused base update and torch's own base step."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, available_backends

BACKENDS = [name for name, why in available_backends().items() if not why]
UPDATES = ["fused", "generic"]


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def lesam(model, backend, update, **kwargs):
    hyper = dict(lr=0.1, momentum=0.9, sigma=0.2, rho_max=0.5, alpha=0.3)
    hyper.update(kwargs)
    return FusedLESAM(model.parameters(), backend=backend, base_update=update, **hyper)


def reference_run(backend, update, steps, **kwargs):
    """The plain loop of the README: first backward by hand, closure for the second."""
    model = mlp()
    opt = lesam(model, backend, update, **kwargs)
    for x, y in batches(steps):
        loss_of(model, x, y).backward()
        opt.step(lambda: loss_of(model, x, y).backward())
        opt.zero_grad()
    return model


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()


# ---------------------------------------------------------------------- 1: scaler.step(opt, closure)
@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
def test_grad_scaler_step_with_closure_unscales_both_passes(backend, update):
    """`scaler.step(opt, closure)`, as users write for any torch optimizer: GradScaler hands itself
    to our step, which unscales both passes. Before, the closure's gradient reached the base step
    still scaled (an update 1024x too large here)."""
    model = mlp()
    opt = lesam(model, backend, update)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)  # exact scaling
    for x, y in batches(3):
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.step(opt, lambda: scaler.scale(loss_of(model, x, y)).backward())
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0**10
    assert_same_params(model, reference_run(backend, update, 3))


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
def test_grad_scaler_step_skips_on_an_overflow_in_the_closure():
    model = mlp()
    before = copy.deepcopy(model)
    opt = lesam(model, "torch", "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches(1)[0]

    def closure():
        scaler.scale(loss_of(model, x, y)).backward()
        model[0].weight.grad[0, 0] = float("inf")

    scaler.scale(loss_of(model, x, y)).backward()
    scaler.step(opt, closure)
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and int(opt.skipped_steps) == 1
    assert_same_params(model, before)


# ---------------------------------------------------------------------- 2: the closure-only convention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
def test_closure_only_step_runs_the_closure_for_the_first_pass_too(backend, update):
    """torch's and PyTorch Lightning's convention: zero_grad() then step(closure), the closure doing
    zero_grad, forward, backward. Before, there was no first gradient, no perturbation, plain SGD."""
    model = mlp()
    opt = lesam(model, backend, update)
    calls = []
    for x, y in batches(3):
        def closure():
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            calls.append(loss.detach())
            return loss

        opt.zero_grad()
        loss = opt.step(closure)
        assert torch.equal(loss.detach(), calls[-2])  # the first pass's loss, at w, as torch's step returns
    assert len(calls) == 6
    assert float(opt.last_rho[0]) > 0
    assert_same_params(model, reference_run(backend, update, 3))


def test_closure_only_step_works_after_set_to_none_and_first_step():
    """Dropped gradients (model.zero_grad()) are not a first gradient either; the very first step
    (no .grad at all yet) and a step after `first_step(zero_grad=True)`'s manual form too."""
    model = mlp()
    opt = lesam(model, "torch", "fused")
    x, y = batches(1)[0]

    def closure():
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)  # no gradient exists yet
    model.zero_grad(set_to_none=True)
    opt.step(closure)
    opt.zero_grad()
    ref = mlp()
    ref_opt = lesam(ref, "torch", "fused")
    for _ in range(2):
        loss_of(ref, x, y).backward()
        ref_opt.step(lambda: loss_of(ref, x, y).backward())
        ref_opt.zero_grad()
    assert_same_params(model, ref)


def test_closure_only_step_for_xsam_and_sam():
    for cls, hyper in ((FusedSAM, dict(rho=0.1)), (FusedXSAM, dict(rho=0.1, alpha=0.5, steps=2))):
        model, ref = mlp(), mlp()
        opt = cls(model.parameters(), lr=0.1, momentum=0.9, **hyper)
        ref_opt = cls(ref.parameters(), lr=0.1, momentum=0.9, **hyper)
        for x, y in batches(2):
            opt.zero_grad()
            opt.step(lambda: loss_of(model, x, y).backward())
            loss_of(ref, x, y).backward()
            ref_opt.step(lambda: loss_of(ref, x, y).backward())
            ref_opt.zero_grad()
        assert_same_params(model, ref)


# ---------------------------------------------------------------------- 3: load_state_dict(assign=True)
@pytest.mark.parametrize("update", UPDATES)
def test_parameters_replaced_by_load_state_dict_assign_are_detected(update):
    """The model's new Parameters would get the gradients and the optimizer step the old ones."""
    model = mlp()
    opt = lesam(model, "torch", update)
    x, y = batches(1)[0]
    model.load_state_dict(copy.deepcopy(mlp(5).state_dict()), assign=True)
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"Linear.weight .*replaced by a new Parameter.*assign=True.*Build the "
                                           r"optimizer after loading"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="replaced by a new Parameter"):
        opt.step(lambda: loss_of(model, x, y).backward())


def test_a_parameter_put_back_is_no_longer_an_error_and_copying_loads_are_fine():
    model = mlp()
    opt = lesam(model, "torch", "fused")
    x, y = batches(1)[0]
    model.load_state_dict(mlp(5).state_dict())  # copying: fine
    old = model[0].weight
    model[0].weight = torch.nn.Parameter(old.detach().clone())
    with pytest.raises(RuntimeError, match=r"Linear.weight \(and 0 more\)"):
        opt.step(lambda: loss_of(model, x, y).backward())
    model[0].weight = old  # put back: the optimizer's parameter is the model's again
    opt.step(lambda: loss_of(model, x, y).backward())
    assert float(opt.last_rho[0]) > 0


# ---------------------------------------------------------------------- 4: a closure without backward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
def test_closure_that_never_calls_backward_is_refused_and_nothing_changes(backend, update):
    model = mlp()
    opt = lesam(model, backend, update)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match=r"closure returned without calling backward\(\).*parameters are unchanged"):
        opt.step(lambda: loss_of(model, x, y))  # forgot .backward()
    assert_same_params(model, before)
    assert not opt.state and int(opt.skipped_steps) == 0 and opt._progress.count == 0
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no backward"):
        opt.step(lambda: loss_of(model, x, y))  # no first backward either
    assert_same_params(model, before)


def test_xsam_closure_without_backward_in_a_later_ascent_step_is_refused():
    model = mlp()
    opt = FusedXSAM(model.parameters(), lr=0.1, rho=0.1, steps=2)
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model, x, y)
        if len(calls) == 1:
            loss.backward()
        return loss

    loss_of(model, x, y).backward()
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(closure)
    assert_same_params(model, before)
