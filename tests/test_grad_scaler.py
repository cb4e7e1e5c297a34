"""fp16-style loss scaling with torch.amp.GradScaler: both passes unscaled before use, an overflow
in either pass skips the whole step (no perturbation residue, no base update) and makes the
scaler back off, and a run with scaling equals the run without it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.models import SmallConvNet, make_batches

from fused_lesam import FusedLESAM, FusedXSAM, available_backends, frozen_bn_stats

BACKENDS = [name for name, why in available_backends().items() if not why]
KINDS = {  # optimizer class and its hyperparameters (XSAM: one ascent step, the scaler's case)
    "lesam": (FusedLESAM, dict(lr=0.05, momentum=0.9, sigma=0.2, rho_max=0.4, alpha=0.5)),
    "xsam": (FusedXSAM, dict(lr=0.05, momentum=0.9, rho=0.15, alpha=0.5)),
}


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def scaled_step(model, opt, scaler, x, y, overflow=None):
    """One step; ``overflow`` ("first" or "second") puts an inf into that pass's gradients, as an
    fp16 overflow of the scaled gradients would."""
    scaler.scale(loss_of(model, x, y)).backward()
    if overflow == "first":
        model.conv1.weight.grad[0, 0, 0, 0] = float("inf")

    def closure():
        with frozen_bn_stats(model):
            loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        if overflow == "second":
            model.conv1.weight.grad[0, 0, 0, 0] = float("inf")

    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-sgd"])
def test_scaled_run_equals_unscaled_run(kind, backend, fused):
    cls, hyper = KINDS[kind]
    torch.manual_seed(0)
    model = SmallConvNet()
    plain = copy.deepcopy(model)
    opt = cls(model.parameters(), backend=backend, fused=fused, **hyper)
    ref = cls(plain.parameters(), backend=backend, fused=fused, **hyper)
    # A power-of-two scale that never overflows: scaling and unscaling are exact.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for x, y in make_batches(5):
        scaled_step(model, opt, scaler, x, y)
        loss_of(plain, x, y).backward()
        ref.step(lambda: loss_of(plain, x, y).backward())
        ref.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**10 and int(opt.skipped_steps) == 0


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-sgd"])
@pytest.mark.parametrize("overflow", ["first", "second"])
def test_overflow_in_either_pass_skips_the_step_and_backs_off(kind, fused, overflow):
    cls, hyper = KINDS[kind]
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = cls(model.parameters(), fused=fused, **hyper)
    init = 2.0**4
    scaler = torch.amp.GradScaler("cpu", init_scale=init, backoff_factor=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1)[0]
    scaled_step(model, opt, scaler, x, y, overflow=overflow)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q), "an overflowing step must leave the parameters exactly as they were"
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert int(opt.skipped_steps) == 1
    assert scaler.get_scale() == init * 0.5, "the scaler must see the overflow and back off"
    scaled_step(model, opt, scaler, x, y)  # the next step trains normally again
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
