"""The throughput modes (fused_lesam/throughput.py): ``sam_interval``, ``sam_start`` and LookSAM
(``look_k``, ``look_alpha``) on FusedSAM and FusedLESAM.

Each schedule is checked against a per-tensor fp64 reference written here (the gradients by
autograd on an fp64 copy of the model, the base step by torch's own optimizer on fp64 copies), on
every CPU backend and both base-update paths; which steps took a second pass; the skip of a
non-finite full, plain and reuse step; GradScaler; checkpoint resume; the misuse errors.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import assert_bits_equal, assert_close
from helpers.models import through_bytes
from torch import nn

from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, available_backends

BACKENDS = [name for name in ("torch", "cpp", "triton") if not available_backends()[name]]
STEPS = 12

BASES = {
    "momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}

# name: (optimizer, its hyperparameters, base, modes). LE-SAM+ (alpha > 0) with LookSAM: g_v
# comes from g_hat before the combine.
SCHEDULES = {
    "sam-interval-start": ("sam", dict(rho=0.05), "momentum", dict(sam_interval=3, sam_start=2)),
    "lesam-start": ("lesam", dict(sigma=0.02, rho_max=0.4), "adamw", dict(sam_start=5)),
    "sam-looksam": ("sam", dict(rho=0.05), "adamw", dict(look_k=4, look_alpha=0.7)),
    "lesam+-looksam-start": (
        "lesam",
        dict(sigma=0.02, rho_max=0.4, alpha=0.5),
        "momentum",
        dict(look_k=3, sam_start=1),
    ),
}


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(5, 4, dtype=dtype)
        self.b = nn.Linear(4, 3, dtype=dtype)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def data(n=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)) for _ in range(n)]


def loss_of(model, x, y):
    return F.mse_loss(model(x.to(model.a.weight.dtype)), y.to(model.a.weight.dtype))


def make(kind, hypers, base, modes, model, backend="torch", base_update="auto"):
    cls = FusedSAM if kind == "sam" else FusedLESAM
    base_cls, base_kwargs = BASES[base]
    return cls(model.parameters(), base_cls, backend=backend, base_update=base_update, **hypers, **modes, **base_kwargs)


def run(model, opt, batches, poison=None):
    """The README loop; returns which steps took the second pass. ``poison(t, pass_index, model)``
    may write a non-finite gradient after a backward."""
    passes = []
    for t, (x, y) in enumerate(batches):
        loss_of(model, x, y).backward()
        if poison:
            poison(t, 0, model)
        opt.first_step(zero_grad=True)
        passes.append(opt.needs_perturbed_pass)
        if opt.needs_perturbed_pass:
            loss_of(model, x, y).backward()
            if poison:
                poison(t, 1, model)
        opt.second_step(zero_grad=True)
    return passes


def expected_kinds(modes, steps=STEPS):
    """The schedule as the brief states it: full iff t >= start and (t - start) % period == 0."""
    start = modes.get("sam_start", 0)
    period = modes.get("look_k", 1) if modes.get("look_k", 1) > 1 else modes.get("sam_interval", 1)
    kinds = []
    for t in range(steps):
        if t >= start and (t - start) % period == 0:
            kinds.append("full")
        else:
            kinds.append("reuse" if modes.get("look_k", 1) > 1 and t > start else "plain")
    return kinds


def reference(kind, hypers, base, modes, model, batches):
    """The schedule in fp64, per tensor: the final parameters."""
    ref = copy.deepcopy(model).double()
    params = list(ref.parameters())
    base_cls, base_kwargs = BASES[base]
    base_opt = base_cls(params, **base_kwargs, foreach=False)
    look_alpha = modes.get("look_alpha", 0.7)
    g_v, g_v_norm = None, 0.0

    def grads_at(x, y):
        return torch.autograd.grad(loss_of(ref, x, y), params)

    for step_kind, (x, y) in zip(expected_kinds(modes, len(batches)), batches):
        g = grads_at(x, y)
        norm = math.sqrt(sum(float((t * t).sum()) for t in g))
        if step_kind == "full":
            if kind == "sam":
                rho = hypers["rho"]
            else:
                rho = min(hypers["sigma"] / (norm + 1e-12), hypers["rho_max"])
            with torch.no_grad():
                saved = [p.clone() for p in params]
                for p, gi in zip(params, g):
                    p.add_(gi, alpha=rho / (norm + 1e-12))
            g_hat = grads_at(x, y)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            if modes.get("look_k", 1) > 1:
                dot = sum(float((h * gi).sum()) for h, gi in zip(g_hat, g))
                c = dot / norm**2
                g_v = [h - c * gi for h, gi in zip(g_hat, g)]
                g_v_norm = math.sqrt(sum(float((v * v).sum()) for v in g_v))
            alpha = hypers.get("alpha", 0.0)
            update = [(1 + alpha) * h - alpha * gi for h, gi in zip(g_hat, g)]
        elif step_kind == "reuse" and g_v_norm > 0:
            update = [gi + look_alpha * norm / g_v_norm * v for gi, v in zip(g, g_v)]
        else:
            update = list(g)
        for p, u in zip(params, update):
            p.grad = u
        base_opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("base_update", ["fused", "generic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_against_fp64_reference(schedule, base_update, backend):
    kind, hypers, base, modes = SCHEDULES[schedule]
    torch.manual_seed(1)
    model = Tiny()
    batches = data()
    want = reference(kind, hypers, base, modes, model, batches)
    opt = make(kind, hypers, base, modes, model, backend, base_update)
    assert opt.base_update == base_update
    passes = run(model, opt, batches)
    assert passes == [k == "full" for k in expected_kinds(modes)]
    assert int(opt.skipped_steps) == 0
    for got, ref in zip(model.parameters(), want):
        # fp32 model against the fp64 truth over 12 steps: the forward/backward's fp32 rounding
        # dominates (observed < 4e-6); a wrong coefficient or step kind fails it (mutation-checked).
        torch.testing.assert_close(got.detach().double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("schedule", ["sam-interval-start", "lesam+-looksam-start", "sam-looksam"])
def test_fp64_schedule_is_the_reference_to_rounding(schedule):
    """In fp64 the optimizer and the reference differ by rounding only: a bound 1e6 times tighter."""
    kind, hypers, base, modes = SCHEDULES[schedule]
    torch.manual_seed(1)
    model = Tiny(torch.float64)
    batches = data()
    want = reference(kind, hypers, base, modes, model, batches)
    opt = make(kind, hypers, base, modes, model, "cpp" if "cpp" in BACKENDS else "torch", "fused")
    run(model, opt, batches)
    assert opt._look_norm is None or opt._look_norm.dtype == torch.float64
    for got, ref in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), ref, rtol=0, atol=1e-11)


def test_schedule_kinds_and_property_before_and_during_a_step():
    model = Tiny()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_interval=2, sam_start=3, backend="torch")
    seen = []
    for x, y in data(9):
        before = opt.needs_perturbed_pass
        loss_of(model, x, y).backward()
        opt.first_step()
        assert opt.needs_perturbed_pass == before  # the begun step's kind, not the next one's
        seen.append(before)
        if before:
            opt.zero_grad()
            loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    assert seen == [False, False, False, True, False, True, False, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_update", ["fused", "generic"])
@pytest.mark.parametrize("where", ["full-first", "full-second", "plain", "reuse"])
def test_non_finite_step_is_skipped(backend, base_update, where):
    """A NaN gradient on a full (either pass), plain or reuse step: nothing moves (parameters,
    base state, LookSAM's g_v and its norm, bit for bit) and the skip is counted."""
    torch.manual_seed(2)
    model = Tiny()
    look = where != "plain"
    modes = dict(look_k=3) if look else dict(sam_interval=3)
    opt = FusedSAM(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, base_update=base_update, **modes
    )
    batches = data(5)
    run(model, opt, batches[:4])  # steps 0..3: full, one-pass, one-pass, full
    # step 4 is a one-pass step (plain or reuse); step 3 again would be full: choose the step to poison
    target = {"full-first": 3, "full-second": 3, "plain": 4, "reuse": 4}[where]
    pass_index = 1 if where == "full-second" else 0
    if target == 3:  # rebuild up to step 3 so that the poisoned step is the full one
        torch.manual_seed(2)
        model = Tiny()
        opt = FusedSAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, base_update=base_update, **modes
        )
        run(model, opt, batches[:3])
    before = [p.detach().clone() for p in model.parameters()]
    state = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    dirs = [b.look_dir.clone() for b in opt._buckets] if look else []
    norm = opt._look_norm.clone() if look else None

    def poison(t, index, m):
        if index == pass_index:
            m.a.weight.grad[0, 0] = float("nan")

    passes = run(model, opt, [batches[target]], poison=poison)
    assert passes == [target == 3]
    assert int(opt.skipped_steps) == 1
    for p, w in zip(model.parameters(), before):
        assert_bits_equal(p.detach(), w, "a skipped step must leave the parameters bit-exact")
    for p, b in zip(model.parameters(), state):
        assert_bits_equal(opt.state[p]["momentum_buffer"], b, "a skipped step must leave the base state")
    if look:
        for bucket, d in zip(opt._buckets, dirs):
            assert_bits_equal(bucket.look_dir, d, "a skipped step must not change g_v")
        assert_bits_equal(opt._look_norm, norm)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b.look_dir).all() for b in opt._buckets) if look else True


def test_backward_on_a_one_pass_step_is_refused():
    model = Tiny()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_interval=2, backend="torch")
    (x, y), *_ = data(1)
    for _ in range(2):  # step 0 full, step 1 one-pass
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()  # the loop forgot to ask needs_perturbed_pass
        if opt._progress.count == 0:
            opt.second_step(zero_grad=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="needs_perturbed_pass"):
        opt.second_step()
    for p, w in zip(model.parameters(), before):
        assert_bits_equal(p.detach(), w)
    assert opt._progress.count == 1
    opt.zero_grad()
    loss_of(model, x, y).backward()  # the dropped step can be taken again
    opt.first_step()
    opt.second_step()
    assert opt._progress.count == 2


def test_step_with_closure_calls_it_once_per_pass_taken():
    """step(closure): a one-pass step calls the closure only for the first pass, when no backward
    came before (returning its loss), and not at all after the caller's backward (returning None)."""
    torch.manual_seed(3)
    model = Tiny()
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_interval=2, backend="torch")
    ref = FusedSAM(twin.parameters(), torch.optim.SGD, lr=0.1, sam_interval=2, backend="torch")
    batches = data(4)
    calls = []
    for t, (x, y) in enumerate(batches):

        def closure():
            calls.append(t)
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.zero_grad()
        if t < 2:  # the caller's backward first
            loss_of(model, x, y).backward()
            result = opt.step(closure)
            assert (result is None) == (t == 1)
        else:  # torch's closure convention: no backward before step
            result = opt.step(closure)
            assert isinstance(result, torch.Tensor)
    assert calls == [0, 2, 2, 3]
    run(twin, ref, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_bits_equal(p.detach(), q.detach(), "step(closure) must take the steps the manual loop takes")


def test_perturbed_on_a_one_pass_step_recomputes_the_gradient():
    """perturbed() cannot skip its body: on a one-pass step the body's backward (at w, not
    perturbed) gives the gradient it steps with: the same steps as the manual loop."""
    torch.manual_seed(4)
    model = Tiny()
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, look_k=2, backend="torch")
    ref = FusedSAM(twin.parameters(), torch.optim.AdamW, lr=1e-2, look_k=2, backend="torch")
    batches = data(5)
    for x, y in batches:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        with opt.perturbed():
            assert all(p.grad.eq(0).all() for p in model.parameters())
            loss_of(model, x, y).backward()
    run(twin, ref, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_bits_equal(p.detach(), q.detach())


def test_hooks_and_lr_schedulers_see_every_step_of_every_kind():
    model = Tiny()
    # step 0 is a plain one: the scheduler's check of the first optimizer step reads what it sets
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_interval=3, sam_start=1, backend="torch")
    fired = []
    opt.register_step_pre_hook(lambda *_: fired.append("pre"))
    opt.register_step_post_hook(lambda *_: fired.append("post"))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in data(4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns when the scheduler steps before the optimizer
            run(model, opt, [batch])
            scheduler.step()
    assert fired == ["pre", "post"] * 4
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**4


@pytest.mark.parametrize("base_update", ["fused", "generic"])
def test_grad_scaler(base_update):
    """Scaled by a power of two, unscaled by the engine: the same bits as without a scaler, on every
    step kind; an inf on a one-pass step is skipped and makes the scaler back off."""
    torch.manual_seed(5)
    model = Tiny()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, look_k=3, backend="cpp" if "cpp" in BACKENDS else "torch", base_update=base_update)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, **kw)
    ref = FusedSAM(twin.parameters(), torch.optim.SGD, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    batches = data(7)
    for x, y in batches:
        scaler.scale(loss_of(model, x, y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        if opt.needs_perturbed_pass:
            scaler.scale(loss_of(model, x, y)).backward()
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
    run(twin, ref, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_bits_equal(p.detach(), q.detach())
    assert scaler.get_scale() == 2.0**10
    x, y = batches[0]  # step 7: a reuse step
    assert not opt.needs_perturbed_pass
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss_of(model, x, y)).backward()
    model.b.bias.grad[0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and int(opt.skipped_steps) == 1
    for p, w in zip(model.parameters(), before):
        assert_bits_equal(p.detach(), w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modes", [dict(look_k=3, sam_start=1), dict(sam_interval=3, sam_start=2)])
def test_checkpoint_resumes_bit_identically(backend, modes):
    torch.manual_seed(6)
    model = Tiny()
    start = copy.deepcopy(model)
    batches = data(10)

    def build(m):
        return FusedLESAM(m.parameters(), torch.optim.AdamW, lr=1e-2, sigma=0.02, backend=backend, **modes)

    opt = build(model)
    run(model, opt, batches)
    half = copy.deepcopy(start)
    half_opt = build(half)
    run(half, half_opt, batches[:5])  # step 4 is a one-pass step after a full one: g_v matters
    saved = through_bytes({"model": half.state_dict(), "opt": half_opt.state_dict()})
    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.needs_perturbed_pass == half_opt.needs_perturbed_pass
    run(resumed, resumed_opt, batches[5:])
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert_bits_equal(p.detach(), q.detach(), "a resumed run must continue bit-identically")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sam_interval=0), "sam_interval must be an int >= 1"),
        (dict(sam_interval=2.0), "sam_interval must be an int >= 1"),
        (dict(sam_interval=True), "sam_interval must be an int >= 1"),
        (dict(sam_start=-1), "sam_start must be an int >= 0"),
        (dict(look_k=0), "look_k must be an int >= 1"),
        (dict(look_k=2, look_alpha=-0.1), "look_alpha must be a finite number >= 0"),
        (dict(look_k=2, look_alpha=math.nan), "look_alpha must be a finite number >= 0"),
        (dict(look_k=2, sam_interval=3), "choose one, look_k .* or sam_interval"),
        (dict(look_k=2, adaptive=True), "adaptive=True"),
        (dict(sam_interval=2, capturable=True), "capturable=True cannot take"),
        (dict(look_k=2, capturable=True), "capturable=True cannot take"),
    ],
)
@pytest.mark.parametrize("cls", [FusedSAM, FusedLESAM])
def test_bad_values_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(Tiny().parameters(), torch.optim.SGD, lr=0.1, backend="torch", **kwargs)


def test_looksam_refuses_an_adaptive_group_added_later():
    model = Tiny()
    opt = FusedSAM(model.a.parameters(), torch.optim.SGD, lr=0.1, look_k=2, backend="torch")
    with pytest.raises(ValueError, match="adaptive=True"):
        opt.add_param_group({"params": model.b.parameters(), "adaptive": True})


@pytest.mark.parametrize("name", ["look_k", "look_alpha"])
def test_xsam_refuses_looksam(name):
    with pytest.raises(TypeError, match=name):
        FusedXSAM(Tiny().parameters(), torch.optim.SGD, lr=0.1, backend="torch", **{name: 2})


@pytest.mark.parametrize("base_update", ["generic", "fused"])
@pytest.mark.parametrize("how", ["manual", "closure", "perturbed"])
def test_xsam_with_sam_interval_takes_plain_steps_in_between(how, base_update):
    """FusedXSAM(sam_interval=2, sam_start=1): step 0 and 2 plain (torch's SGD with the gradient at
    w), steps 1 and 3 the XSAM steps of a FusedXSAM without the option; bit for bit, by the manual
    API, step(closure) and perturbed(). With the fused base update, the plain steps' rounding is the
    fused update's, not torch.optim.SGD's: equal to rounding then."""
    torch.manual_seed(9)
    model = Tiny()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, rho=0.1, alpha=0.5, backend="torch", base_update=base_update)
    opt = FusedXSAM(model.parameters(), torch.optim.SGD, sam_interval=2, sam_start=1, **kw)
    full, plain = FusedXSAM(twin.parameters(), torch.optim.SGD, **kw), torch.optim.SGD(twin.parameters(), lr=0.1)
    passes = []
    for t, (x, y) in enumerate(data(4)):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        passes.append(opt.needs_perturbed_pass)
        if how == "manual":
            opt.first_step(zero_grad=True)
            if opt.needs_perturbed_pass:
                loss_of(model, x, y).backward()
            opt.second_step()
        elif how == "closure":
            opt.step(lambda: loss_of(model, x, y).backward())
        else:
            with opt.perturbed():
                loss_of(model, x, y).backward()
        full.zero_grad()
        plain.zero_grad()
        loss_of(twin, x, y).backward()
        if t % 2:
            full.step(lambda: loss_of(twin, x, y).backward())
        else:
            plain.step()
    assert passes == [False, True, False, True] and opt.base_update == base_update
    for p, q in zip(model.parameters(), twin.parameters()):
        if base_update == "generic":
            assert_bits_equal(p.detach(), q.detach())
        else:
            assert_close(p.detach(), q.detach())
    with pytest.raises(RuntimeError, match="ascent_step\\(\\) on a one-pass step"):
        loss_of(model, x, y).backward()
        opt.first_step()
        opt.ascent_step()


def test_compiled_steps_equal_eager():
    """torch.compile takes the step kind from the host step count as eager does (first_step as one
    graph): the same plain, full and reuse steps. One case (compiling is slow): the extension's ops,
    which the fused base update's path shares with the spec's."""
    backend = "cpp" if "cpp" in BACKENDS else "torch"
    modes = dict(look_k=3, sam_start=1)
    torch.manual_seed(7)
    model = Tiny()
    eager_model = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, rho=0.05, backend=backend, **modes)
    opt, eager = (
        FusedSAM(model.parameters(), torch.optim.SGD, **kw),
        FusedSAM(eager_model.parameters(), torch.optim.SGD, **kw),
    )
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, backend="aot_eager")
    batches = data(5)
    for x, y in batches:
        loss_of(model, x, y).backward()
        first(zero_grad=True)
        if opt.needs_perturbed_pass:
            loss_of(model, x, y).backward()
        second(zero_grad=True)
    passes = run(eager_model, eager, batches)
    assert passes == [k == "full" for k in expected_kinds(modes, 5)]
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_zero_grad_on_a_begun_one_pass_step_is_refused():
    model = Tiny()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_start=1, backend="torch")
    (x, y), *_ = data(1)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="needs_perturbed_pass"):
        opt.zero_grad()
    for p, g in zip(model.parameters(), grads):
        assert_bits_equal(p.grad, g, "first_step(zero_grad=True) and the refused zero_grad() keep g")
    opt.second_step()
    assert opt._progress.count == 1


@pytest.mark.parametrize("modes", [dict(sam_interval=2), dict(look_k=2)])
def test_max_grad_norm_clips_the_gradient_a_one_pass_step_uses(modes):
    """Plain SGD: on the one-pass step (plain, or reuse: g + coefficient * g_v) the update is lr
    times the clipped gradient, whose norm is max_grad_norm."""
    torch.manual_seed(8)
    model = Tiny()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, backend="torch", **modes)
    batches = data(2)
    run(model, opt, batches[:1])
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches[1]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert not opt.needs_perturbed_pass
    opt.second_step(zero_grad=True, max_grad_norm=1e-2)
    moved = math.sqrt(sum(float(((p.detach() - w) ** 2).sum()) for p, w in zip(model.parameters(), before)))
    assert float(opt.last_grad_norm) > 0.05  # so the clipping bites
    assert moved / 0.1 == pytest.approx(1e-2, rel=1e-3)  # fp32 rounding of w: 3e-6 observed


def _ranks_main(rank, out):
    """Two runs per rank: FSDP2 with LookSAM (its dots and ||g_v|| summed over the shards), and DDP
    with every first backward local while every step is a plain one (its gradient averaged at
    second_step, since no second pass follows to be all-reduced)."""
    from helpers.ddp_cases import HYPER, STEPS, batches, mlp
    from test_distributed import WORLD, process_group, train
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    with process_group(rank, out):
        model = mlp()
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = FusedLESAM(model.parameters(), torch.optim.SGD, backend="cpp", look_k=2, **HYPER)
        sharded = train(model, opt, batches(), rank, WORLD, snapshot=lambda p: p.full_tensor())
        model = DistributedDataParallel(mlp())
        opt = FusedLESAM(model.parameters(), torch.optim.SGD, sam_start=STEPS, **HYPER)
        local = train(model, opt, batches(), rank, WORLD, local=True)
        torch.save(dict(sharded=sharded, local=local), f"{out}/rank{rank}.pt")


def test_distributed_runs_equal_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    from helpers.ddp_cases import HYPER, STEPS, batches, mlp
    from test_distributed import WORLD, train

    mp.spawn(_ranks_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    expected = {}
    for name, modes in (("sharded", dict(look_k=2, backend="cpp")), ("local", dict(sam_start=STEPS))):
        model = mlp()
        expected[name] = train(model, FusedLESAM(model.parameters(), torch.optim.SGD, **HYPER, **modes), batches())
    for rank in (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)):
        for name, want in expected.items():
            for step, (got_step, want_step) in enumerate(zip(rank[name], want)):
                for got, ref in zip(got_step, want_step):
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"{name}, step {step}")
