"""`step()` after `first_step()` finishes the step begun there, as `second_step()` does.

Training frameworks make the `optimizer.step()` call themselves: the Hugging Face Trainer calls
`optimizer.step()` (through accelerate's wrapper, without a closure) after the training step that a
subclass can override, and Lightning's manual optimization steps through `LightningOptimizer.step`,
which always passes a closure (one that does nothing unless given one). With the first half done
in the training step (`first_step()`, the second forward and backward), that call must finish the
step. Before, it was refused ("needs a closure") or failed ("first_step() called twice")."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, available_backends

BACKENDS = [name for name, why in available_backends().items() if not why]
OPTIMIZERS = {
    "lesam-fused": lambda params, backend: FusedLESAM(
        params, lr=0.1, momentum=0.9, sigma=0.2, rho_max=0.5, alpha=0.3, backend=backend, base_update="fused"
    ),
    "lesam-generic": lambda params, backend: FusedLESAM(
        params, lr=0.1, momentum=0.9, sigma=0.2, rho_max=0.5, backend=backend, base_update="generic"
    ),
    "sam": lambda params, backend: FusedSAM(params, lr=0.1, momentum=0.9, rho=0.1, backend=backend),
    "xsam": lambda params, backend: FusedXSAM(params, lr=0.1, momentum=0.9, rho=0.1, alpha=0.5, backend=backend),
}


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def plain_run(kind, backend, steps=3):
    """The README's loop: the first backward by hand, the closure for the second."""
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters(), backend)
    for x, y in batches(steps):
        loss_of(model, x, y).backward()
        opt.step(lambda: loss_of(model, x, y).backward())
        opt.zero_grad()
    return model


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("form", ["no-closure", "closure-does-second-pass", "closure-does-nothing"])
def test_step_after_first_step_finishes_the_step(kind, backend, form):
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters(), backend)
    for x, y in batches(3):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        if form == "no-closure":  # the Hugging Face Trainer's optimizer.step()
            loss_of(model, x, y).backward()
            assert opt.step() is None
        elif form == "closure-does-second-pass":

            def closure():
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert loss is not None and loss.requires_grad  # the closure's loss, at w + eps
        else:  # Lightning's manual optimization: manual_backward, then opt.step() (its closure does nothing)
            loss_of(model, x, y).backward()
            opt.step(lambda: None)
        opt.zero_grad()
    assert opt._progress.count == 3 and not opt._progress.perturbed
    assert_same_params(model, plain_run(kind, backend))


@pytest.mark.parametrize("kind", ["lesam-fused", "lesam-generic", "xsam"])
@pytest.mark.parametrize("mistake", ["no-second-backward", "two-second-backwards"])
def test_a_second_pass_with_no_gradient_or_two_is_refused_and_w_restored(kind, mistake):
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters(), "torch")
    x, y = batches(1)[0]
    before = copy.deepcopy(model)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    if mistake == "no-second-backward":
        with pytest.raises(
            RuntimeError, match=r"step\(\) after first_step\(\): no backward ran at the perturbed point"
        ):
            opt.step()
    else:
        loss_of(model, x, y).backward()
        with pytest.raises(RuntimeError, match="computed twice, by a backward before step"):
            opt.step(lambda: loss_of(model, x, y).backward())
    assert_same_params(model, before)  # w restored bit-exactly, no update
    assert opt._progress.count == 0 and not opt._progress.perturbed and not opt.state
    opt.zero_grad()
    loss_of(model, x, y).backward()  # and the optimizer goes on as if the step had not begun
    opt.step(lambda: loss_of(model, x, y).backward())
    assert opt._progress.count == 1


def test_step_without_a_closure_and_without_first_step_is_still_refused():
    model = mlp()
    opt = OPTIMIZERS["lesam-fused"](model.parameters(), "torch")
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_step_hooks_post_once_pre_at_first_step_and_again_at_step():
    """The post-hooks fire once per step. The pre-hooks fire at first_step() and once more when
    step() is entered: torch's wrapper of step() calls them before the optimizer can tell that the
    step was begun already. (second_step() fires each once.)"""
    model = mlp()
    opt = OPTIMIZERS["lesam-fused"](model.parameters(), "torch")
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    for x, y in batches(2):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.step()
    assert seen == ["pre", "pre", "post"] * 2


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_step_without_a_closure_after_first_step(backend):
    """accelerate's fp16 path: `scaler.step(optimizer)` (no closure) after the training step did
    first_step(grad_scaler=scaler) and the second scaled backward: both passes unscaled once."""

    def run(finish):
        model = mlp()
        opt = OPTIMIZERS["lesam-fused"](model.parameters(), backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for x, y in batches(3):
            scaler.scale(loss_of(model, x, y)).backward()
            finish(model, opt, scaler, x, y)
            scaler.update()
            opt.zero_grad()
        return model

    def begun(model, opt, scaler, x, y):
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.step(opt)

    def whole(model, opt, scaler, x, y):
        opt.step(lambda: scaler.scale(loss_of(model, x, y)).backward(), grad_scaler=scaler)

    a, b = run(begun), run(whole)
    assert_same_params(a, b)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), mlp().parameters()))


def test_a_refused_finish_restores_w():
    """A GradScaler that cannot pass itself (accelerate's fp16 wrapper hides the argument) is refused
    in this form too, with w restored rather than left perturbed."""
    model = mlp()
    opt = OPTIMIZERS["lesam-fused"](model.parameters(), "torch")
    x, y = batches(1)[0]
    before = copy.deepcopy(model)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.grad_scale = torch.tensor(2.0)  # what GradScaler.step sets on an optimizer it cannot pass itself to
    with pytest.raises(RuntimeError, match="did not pass itself as grad_scaler="):
        opt.step()
    del opt.grad_scale
    assert_same_params(model, before)
    assert not opt._progress.perturbed and opt._progress.count == 0
