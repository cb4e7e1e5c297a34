"""FusedXSAM equals the independent per-tensor XSAM loop (tests/reference/xsam_loop.py), reproduces
SAM at alpha = 1, and keeps the engine's guarantees: exact restore, skipped non-finite steps,
bit-identical resume. The guards of the slerp each have a test that fails without them."""

import copy
import math

import pytest
import torch
from helpers.asserts import assert_close
from helpers.models import SmallConvNet, groups_of, loss_fn, make_batches, sam_step, through_bytes
from reference.xsam_loop import ReferenceXSAM

from fused_lesam import FusedSAM, FusedXSAM, available_backends, frozen_bn_stats, maths

BACKENDS = [name for name, why in available_backends().items() if not why]
STEPS = 8
BASE = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def xsam_step(model, opt, x, y, search=False):
    """One step through opt.step: the first backward here, the closure once per ascent step."""
    loss_fn(model, x, y).backward()

    def closure():
        with frozen_bn_stats(model):
            loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    def loss_at():
        with frozen_bn_stats(model):
            return loss_fn(model, x, y)

    opt.step(closure, search_alpha=loss_at if search else None)
    opt.zero_grad()


def loop_step(model, loop, x, y, search=None):
    loss_fn(model, x, y).backward()
    for _ in range(loop.steps):
        loop.ascend()
        with frozen_bn_stats(model):
            loss_fn(model, x, y).backward()
    if search is not None:
        grid, rho_max = search

        def loss_at():
            with frozen_bn_stats(model):
                return loss_fn(model, x, y)

        loop.search(loss_at, grid, rho_max)
    loop.finish()


CASES = {
    # name: (FusedXSAM kwargs, second-group overrides or None, model dtype)
    "k1-alpha0": (dict(rho=0.15, steps=1, alpha=0.0), None, torch.float32),
    "k1-alpha0.5": (dict(rho=0.15, steps=1, alpha=0.5), None, torch.float32),
    "k1-alpha1": (dict(rho=0.15, steps=1, alpha=1.0), None, torch.float32),
    "k1-alpha1.5": (dict(rho=0.15, steps=1, alpha=1.5), None, torch.float32),
    "k3-alpha0.5": (dict(rho=0.15, steps=3, alpha=0.5), None, torch.float32),
    "k3-alpha1.5": (dict(rho=0.3, steps=3, alpha=1.5), None, torch.float32),
    "groups": (dict(rho=0.15, steps=2, alpha=0.5), dict(rho=0.05, alpha=1.5), torch.float32),
    "bf16": (dict(rho=0.15, steps=1, alpha=0.5), None, torch.bfloat16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_xsam_equals_the_per_tensor_loop(case, backend):
    kwargs, split, dtype = CASES[case]
    torch.manual_seed(0)
    model = SmallConvNet(dtype)
    loop_model = copy.deepcopy(model)
    opt = FusedXSAM(groups_of(model, split), backend=backend, **kwargs, **BASE)
    loop = ReferenceXSAM(groups_of(loop_model, split), torch.optim.SGD, **kwargs, **BASE)
    for x, y in make_batches(STEPS, dtype):
        xsam_step(model, opt, x, y)
        loop_step(loop_model, loop, x, y)
    for (name, p), q in zip(model.named_parameters(), loop_model.parameters()):
        assert_close(p, q, msg=f"{name} after {STEPS} steps ({case}, {backend})")
    assert torch.isfinite(opt.last_theta) and opt.last_ascent_norm.item() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 3])
def test_dynamic_alpha_chooses_what_the_loop_chooses(backend, steps):
    torch.manual_seed(0)
    model = SmallConvNet()
    loop_model = copy.deepcopy(model)
    kwargs = dict(rho=0.15, steps=steps, alpha=1.0, rho_max=0.3, alpha_max=2.0, alpha_delta=0.25)
    opt = FusedXSAM(model.parameters(), backend=backend, dynamic=True, **kwargs, **BASE)
    loop = ReferenceXSAM(
        model_params := list(loop_model.parameters()),
        torch.optim.SGD,
        **{k: kwargs[k] for k in ("rho", "steps", "alpha")},
        **BASE,
    )
    grid = [i * 0.25 for i in range(9)]
    chosen = []
    for i, (x, y) in enumerate(make_batches(4)):
        search = i % 2 == 0  # re-chosen every other step, kept in between
        xsam_step(model, opt, x, y, search=search)
        loop_step(loop_model, loop, x, y, search=(grid, 0.3) if search else None)
        assert opt.alpha.item() == pytest.approx(loop.alpha_chosen)
        assert opt.last_alpha[0].item() == pytest.approx(loop.alpha_chosen)
        chosen.append(loop.alpha_chosen)
    for p, q in zip(model.parameters(), model_params):
        assert_close(p, q)
    assert chosen[0] != 1.0 or chosen[2] != 1.0, "the search never moved alpha: the test would not see a wrong one"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_update", ["fused", "generic"])
def test_alpha_one_is_sam_bit_for_bit(backend, base_update):
    """alpha = 1 writes g_hat itself as the update gradient: the same base step as SAM's, on either path."""
    torch.manual_seed(0)
    model = SmallConvNet()
    sam_model = copy.deepcopy(model)
    opt = FusedXSAM(model.parameters(), rho=0.1, steps=1, alpha=1.0, backend=backend, base_update=base_update, **BASE)
    sam = FusedSAM(sam_model.parameters(), rho=0.1, backend=backend, base_update=base_update, **BASE)
    assert opt.base_update == sam.base_update == base_update
    for x, y in make_batches(6):
        xsam_step(model, opt, x, y)
        sam_step(sam_model, sam, x, y)
    for p, q in zip(model.parameters(), sam_model.parameters()):
        assert torch.equal(p, q)


def test_telemetry_is_the_step_s_geometry():
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedXSAM(model.parameters(), rho=0.2, steps=1, alpha=0.5, backend="torch", **BASE)
    ((x, y),) = make_batches(1)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    w1 = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    ghat = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    opt.second_step()
    delta = torch.cat([(a - b).flatten() for a, b in zip(w1, w0)])
    g = torch.cat([t.flatten() for t in ghat])
    assert opt.last_ascent_norm.item() == pytest.approx(0.2, rel=1e-4)  # one ascent step of length rho
    assert opt.last_ghat_norm.item() == pytest.approx(g.norm().item(), rel=1e-5)
    cos = (delta @ g / (delta.norm() * g.norm())).item()
    assert opt.last_theta.item() == pytest.approx(math.acos(cos), rel=1e-4, abs=1e-5)
    assert opt.last_alpha[0].item() == 0.5


# ---------------------------------------------------------------------- the slerp's guards
def coefs(d_sq, g_sq, dot, alpha=0.5, length=1.0):
    return maths.slerp_coefficients(torch.tensor([d_sq, g_sq, dot]), alpha, length, 1e-12)


def test_cosine_is_clamped_before_arccos():
    c, theta = coefs(1.0, 1.0, 1.0 + 1e-4)  # rounding can push v0 . v1 past 1
    assert torch.isfinite(c).all() and theta.item() == 0.0


def test_parallel_directions_take_the_slerp_limit():
    c, _ = coefs(4.0, 1.0, 2.0, alpha=0.25)  # D = 2 g: theta = 0, sin theta = 0
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c, torch.tensor([0.75 / 2.0, 0.25]))  # (1 - alpha) v0 + alpha v1


def test_zero_ascent_updates_along_the_gradient():
    c, _ = coefs(0.0, 4.0, 0.0, alpha=0.0, length=2.0)  # w_k = w_0 (rho = 0 or a zero gradient)
    torch.testing.assert_close(c, torch.tensor([0.0, 1.0]))  # ||g|| v1 = g, not the zero vector


def test_non_finite_dots_give_zero_coefficients():
    for bad in (math.nan, math.inf):
        c, _ = coefs(1.0, bad, 0.5)
        assert torch.equal(c, torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_ascent_is_plain_sgd(backend):
    torch.manual_seed(0)
    model = SmallConvNet()
    sgd_model = copy.deepcopy(model)
    opt = FusedXSAM(model.parameters(), rho=0.0, alpha=0.0, backend=backend, **BASE)
    sgd = torch.optim.SGD(sgd_model.parameters(), **BASE)
    for x, y in make_batches(3):
        xsam_step(model, opt, x, y)
        loss_fn(sgd_model, x, y).backward()
        sgd.step()
        sgd.zero_grad()
    for p, q in zip(model.parameters(), sgd_model.parameters()):
        assert_close(p, q)


# ---------------------------------------------------------------------- never lose the user's data
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_pass", [0, 1, 2], ids=["first", "middle-ascent", "last"])
def test_non_finite_gradient_skips_the_step(backend, bad_pass):
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedXSAM(model.parameters(), rho=0.15, steps=2, alpha=0.5, backend=backend, fused=True, **BASE)
    batches = make_batches(2)
    xsam_step(model, opt, *batches[0])  # the base state exists
    before = [p.detach().clone() for p in model.parameters()]
    state = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if opt.state[p]}
    x, y = batches[1]
    passes = 0

    def backward():
        nonlocal passes
        loss_fn(model, x, y).backward()
        if passes == bad_pass:
            model.conv1.weight.grad.view(-1)[0] = math.nan
        passes += 1

    backward()
    opt.step(backward)
    assert passes == 3 and opt.skipped_steps.item() == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in state.items())


@pytest.mark.parametrize("where", ["ascent", "search"])
def test_an_exception_mid_step_restores_w_exactly(where):
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedXSAM(model.parameters(), rho=0.15, steps=3, dynamic=True, backend="torch", **BASE)
    ((x, y),) = make_batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        if where == "ascent" and calls == 2:
            raise KeyboardInterrupt
        loss_fn(model, x, y).backward()

    def loss_at():
        if calls == 3 and where == "search":
            raise MemoryError("out of memory in the search")
        return loss_fn(model, x, y)

    loss_fn(model, x, y).backward()
    with pytest.raises((KeyboardInterrupt, MemoryError)):
        opt.step(closure, search_alpha=loss_at)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert opt.skipped_steps.item() == 0
    opt.zero_grad()
    xsam_step(model, opt, x, y)  # and the optimizer is usable again
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_checkpoint_with_dynamic_alpha_resumes_bit_identically():
    torch.manual_seed(0)
    batches = make_batches(6)
    model = SmallConvNet()
    start = copy.deepcopy(model)
    kwargs = dict(rho=0.15, dynamic=True, alpha_delta=0.5, backend="torch", **BASE)
    opt = FusedXSAM(model.parameters(), **kwargs)
    for i, (x, y) in enumerate(batches):
        xsam_step(model, opt, x, y, search=i == 0)

    half = copy.deepcopy(start)
    opt1 = FusedXSAM(half.parameters(), **kwargs)
    for i, (x, y) in enumerate(batches[:3]):
        xsam_step(half, opt1, x, y, search=i == 0)
    saved = through_bytes({"model": half.state_dict(), "opt": opt1.state_dict()})
    resumed = SmallConvNet()
    opt2 = FusedXSAM(resumed.parameters(), **kwargs)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.alpha.item() == opt1.alpha.item() != 1.0  # the searched alpha came back
    for x, y in batches[3:]:
        xsam_step(resumed, opt2, x, y)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_batchnorm_statistics_move_once_per_step_search_included():
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedXSAM(model.parameters(), rho=0.15, steps=2, dynamic=True, alpha_delta=0.5, backend="torch", **BASE)
    for x, y in make_batches(3):
        xsam_step(model, opt, x, y, search=True)
    assert model.bn1.num_batches_tracked.item() == 3


def test_bad_arguments_are_clear_errors():
    params = list(SmallConvNet().parameters())
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        FusedXSAM(params, lr=0.1, steps=0)
    with pytest.raises(ValueError, match="alpha_max must be a whole multiple of alpha_delta"):
        FusedXSAM(params, lr=0.1, alpha_max=1.0, alpha_delta=0.3)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        FusedXSAM(params, lr=0.1, rho=-1.0)
    opt = FusedXSAM(params, lr=0.1)
    with pytest.raises(ValueError, match="search_alpha is for dynamic=True"):
        model = SmallConvNet()
        opt = FusedXSAM(model.parameters(), lr=0.1)
        ((x, y),) = make_batches(1)
        loss_fn(model, x, y).backward()
        opt.step(lambda: loss_fn(model, x, y).backward(), search_alpha=lambda: 0.0)
    assert not opt._progress.perturbed
    with pytest.raises(RuntimeError, match="ascent_step\\(\\) called before first_step"):
        opt.ascent_step()
    with pytest.raises(RuntimeError, match="no local \\(per-rank\\) perturbation mode"):
        opt.local_first_pass(model)
