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
    with pytest.raises(
        RuntimeError,
        match=r"Linear.weight .*replaced by a new Parameter.*assign=True.*Build the "
        r"optimizer after loading",
    ):
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


# ---------------------------------------------------------------------- 5: non-finite hyperparameters
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(weight_decay=float("inf")), "weight_decay"),
    ],
)
def test_non_finite_base_hyperparameter_is_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}=(nan|inf) is not finite.*set a finite {name}"):
        FusedLESAM(mlp().parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("value", [float("nan"), torch.tensor(float("inf"))], ids=["float", "cpu-tensor"])
def test_non_finite_lr_written_later_is_refused_at_the_step(backend, update, value):
    """A scheduler or the user writes lr=nan into a group: refused at the next step, nothing changed."""
    model = mlp()
    opt = lesam(model, backend, update)
    x, y = batches(1)[0]
    opt.param_groups[0]["lr"] = value
    loss_of(model, x, y).backward()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="lr=.*is not finite"):
        opt.step(lambda: loss_of(model, x, y).backward())
    assert_same_params(model, before)
    with pytest.raises(ValueError, match="lr=.*is not finite"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": float("inf")})
    assert len(opt.param_groups) == 1


def test_non_finite_tensor_hyperparameter_on_an_accelerator_skips_the_step(monkeypatch):
    """Where reading the value would be a host sync (a GPU tensor) the step is skipped on the device
    and counted instead. Simulated on the CPU: the check is told the tensor is elsewhere."""
    from fused_lesam import checks

    model = mlp()
    before = copy.deepcopy(model)
    opt = lesam(model, "torch", "generic")
    lr = torch.tensor(float("nan"))
    opt.param_groups[0]["lr"] = lr

    real = checks.check_base_hypers

    def as_if_on_device(group, ours, on_device=None):
        if on_device is not None and group.get("lr") is lr:
            on_device.append(lr)
            group = {k: v for k, v in group.items() if k != "lr"}
        real(group, ours, on_device)

    monkeypatch.setattr("fused_lesam.engine.check_base_hypers", as_if_on_device)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())
    assert int(opt.skipped_steps) == 1
    assert_same_params(model, before)


# ---------------------------------------------------------------------- 6: davda54/sam's names
def test_davda54_sam_names_work():
    import functools

    model, ref = mlp(), mlp()
    opt = FusedSAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1, momentum=0.9)
    assert opt.base_optimizer is opt.base and isinstance(opt.base, torch.optim.SGD)
    partial = FusedSAM(
        ref.parameters(), functools.partial(torch.optim.SGD, momentum=0.9), rho=0.05, adaptive=True, lr=0.1
    )
    assert partial.base_update == "fused" and partial.param_groups[0]["momentum"] == 0.9
    for x, y in batches(2):
        for m, o in ((model, opt), (ref, partial)):
            loss_of(m, x, y).backward()
            o.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
    assert_same_params(model, ref)
    with pytest.raises(TypeError, match="base= and base_optimizer="):
        FusedSAM(mlp().parameters(), torch.optim.SGD, base_optimizer=torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize(
    "cls, name, says",
    [
        (FusedLESAM, "rho", r"FusedLESAM has no argument 'rho'.*sigma=.*FusedSAM"),
        (FusedSAM, "sigma", r"FusedSAM has no argument 'sigma'.*FusedLESAM"),
        (FusedXSAM, "sigma", r"FusedXSAM has no argument 'sigma'.*FusedLESAM"),
    ],
)
def test_a_name_that_means_something_else_here_says_what_to_use(cls, name, says):
    with pytest.raises(TypeError, match=says):
        cls(mlp().parameters(), lr=0.1, **{name: 0.05})


def test_a_name_the_base_takes_itself_passes_through():
    opt = FusedLESAM(mlp().parameters(), base=torch.optim.Adadelta, lr=0.1, rho=0.8)  # Adadelta's own rho
    assert opt.param_groups[0]["rho"] == 0.8 and opt.base.defaults["rho"] == 0.8


def test_closure_only_bases_are_refused_at_construction():
    with pytest.raises(TypeError, match="LBFGS cannot be the base optimizer: its step\\(\\) needs a closure"):
        FusedLESAM(mlp().parameters(), base=torch.optim.LBFGS, lr=0.1)


# ---------------------------------------------------------------------- 7: another optimizer's state dict
@pytest.mark.parametrize(
    "saver, loader",
    [
        (FusedSAM, FusedLESAM),
        (FusedLESAM, FusedSAM),
        (FusedSAM, FusedXSAM),
        (FusedXSAM, FusedSAM),
        (FusedLESAM, FusedXSAM),
        (FusedXSAM, FusedLESAM),
    ],
    ids=lambda c: c.__name__,
)
def test_state_dict_of_another_class_is_refused_and_nothing_changes(saver, loader):
    model = mlp()
    other = saver(model.parameters(), lr=0.3, momentum=0.9)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    other.step(lambda: loss_of(model, x, y).backward())
    target_model = mlp()
    opt = loader(target_model.parameters(), lr=0.1, momentum=0.9)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(
        ValueError,
        match=rf"saved by {saver.__name__}, and this is a {loader.__name__}.*"
        rf"load it into a {saver.__name__}. Nothing was changed",
    ):
        opt.load_state_dict(other.state_dict())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    loss_of(target_model, x, y).backward()
    opt.step(lambda: loss_of(target_model, x, y).backward())  # still works


def test_state_dict_with_a_bad_value_is_refused_before_anything_changes():
    model = mlp()
    opt = lesam(model, "torch", "fused")
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())
    opt.zero_grad()
    bad = opt.state_dict()
    bad["param_groups"][0]["sigma"] = -1.0
    with pytest.raises(ValueError, match="sigma"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["sigma"] == 0.2
    bad["param_groups"][0]["sigma"] = 0.2
    bad["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr=nan is not finite"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())


# ---------------------------------------------------------------------- 8: schedules after add_param_group
def test_sigma_annealing_takes_in_groups_added_later():
    from fused_lesam import SigmaAnnealing

    model = mlp()
    opt = FusedLESAM(model[0].parameters(), lr=0.1, sigma=0.4)
    sched = SigmaAnnealing(opt, total=4, anneal=2)
    opt.add_param_group({"params": model[2].parameters(), "sigma": 0.2})
    for _ in range(3):
        sched.step()
    assert sched.get_last_sigma() == [pytest.approx(0.0), pytest.approx(0.0)]
    sched2 = SigmaAnnealing(FusedLESAM(mlp()[0].parameters(), lr=0.1, sigma=0.4), total=4, anneal=2)
    sched2.optimizer.add_param_group({"params": mlp()[2].parameters(), "sigma": 0.2})
    sched2.step()
    sched2.step()  # epoch 2 of 4, halfway down the cosine
    assert sched2.get_last_sigma() == [pytest.approx(0.4), pytest.approx(0.2)]


# ---------------------------------------------------------------------- 10: step hooks
@pytest.mark.parametrize("api", ["step", "manual", "perturbed"])
@pytest.mark.parametrize(
    "cls, update",
    [(FusedLESAM, "fused"), (FusedLESAM, "generic"), (FusedXSAM, "generic")],
    ids=["lesam-fused", "lesam-generic", "xsam-generic"],
)  # XSAM has the generic update only
def test_step_hooks_fire_once_per_full_step_in_every_api(cls, update, api):
    """register_step_pre_hook/post_hook (ours and torch's global ones) once per full step. Before,
    first_step/second_step fired none of ours, and step(closure) with the generic base update fired
    the global ones twice (once more for the base's step)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = mlp()
    opt = cls(model.parameters(), lr=0.1, momentum=0.9, base_update=update)
    seen = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o))),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o))),
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global-pre", o))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global-post", o))),
    ]
    try:
        for x, y in batches(2):
            loss_of(model, x, y).backward()
            if api == "step":
                opt.step(lambda: loss_of(model, x, y).backward())
            elif api == "manual":
                opt.first_step(zero_grad=True)
                loss_of(model, x, y).backward()
                opt.second_step()
            else:
                with opt.perturbed():
                    loss_of(model, x, y).backward()
            opt.zero_grad()
    finally:
        for handle in handles:
            handle.remove()
    assert [name for name, _ in seen] == ["global-pre", "pre", "post", "global-post"] * 2
    assert all(o is opt for _, o in seen)
    assert opt._progress.count == 2 and opt.state  # the steps were taken


# ---------------------------------------------------------------------- 11: gradient clipping by hand
@pytest.mark.parametrize("update", UPDATES)
def test_clipping_by_hand_with_a_grad_scaler(update):
    """The README's recipe: unscale the pass yourself (scaler.unscale_(opt) for the first,
    scaler.unscale_(opt.base) for the final gradient), clip, then the step with the scaler, which
    does not unscale again. Before, the step's own unscale_ raised ("already been called")."""

    def run(scaler):
        model = mlp()
        opt = lesam(model, "torch", update)
        for x, y in batches(3):
            scale = scaler.scale if scaler else (lambda t: t)
            scale(loss_of(model, x, y)).backward()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scale(loss_of(model, x, y)).backward()
            if scaler:
                scaler.unscale_(opt.base)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            assert float(norm) > 0.05  # the clipping does something
            opt.second_step(zero_grad=True, grad_scaler=scaler)
            if scaler:
                scaler.update()
        return model

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    assert_same_params(run(scaler), run(None))
    assert scaler.get_scale() == 2.0**10


# ---------------------------------------------------------------------- errors that name the right cause
def test_an_optimizer_superseded_by_a_newer_one_on_the_same_parameters_says_so():
    """Before, the old one blamed a model.to() / load_state_dict(assign=True)."""
    model = mlp()
    old = lesam(model, "torch", "fused")
    new = FusedSAM(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="superseded: a FusedSAM built later on the same parameters"):
        old.step(lambda: loss_of(model, x, y).backward())
    new.step(lambda: loss_of(model, x, y).backward())


class RebindingSGD(torch.optim.Optimizer):
    """A base that writes new tensors into p.data instead of updating in place."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = p - group["lr"] * p.grad


def test_a_base_that_rebinds_param_data_is_named():
    model = mlp()
    opt = FusedLESAM(model.parameters(), base=RebindingSGD, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"RebindingSGD's step\(\) replaced parameter 0 .*in place"):
        opt.step(lambda: loss_of(model, x, y).backward())


def test_numpy_and_tensor_hyperparameters():
    import numpy as np

    model, ref = mlp(), mlp()
    opt = FusedLESAM(model.parameters(), lr=0.1, sigma=np.float32(0.25), rho_max=np.float64(0.5))
    ref_opt = FusedLESAM(ref.parameters(), lr=0.1, sigma=float(np.float32(0.25)), rho_max=0.5)
    assert type(opt.param_groups[0]["sigma"]) is float
    for m, o in ((model, opt), (ref, ref_opt)):
        x, y = batches(1)[0]
        loss_of(m, x, y).backward()
        o.step(lambda: loss_of(m, x, y).backward())
    assert_same_params(model, ref)
    with pytest.raises(ValueError, match=r"sigma must be .* as a Python number, got a Tensor .*pass float\(sigma\)"):
        FusedLESAM(mlp().parameters(), lr=0.1, sigma=torch.tensor(0.3))


def test_sparse_gradients_name_the_fix_and_sparse_adam_is_refused_at_construction():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    with pytest.raises(TypeError, match="SparseAdam cannot be the base optimizer"):
        FusedLESAM(emb.parameters(), base=torch.optim.SparseAdam, lr=0.1)
    opt = FusedLESAM(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradient.*sparse=False"):
        opt.first_step()


# ---------------------------------------------------------------------- 9 and 12: documented behaviours
def test_zero_grad_set_to_none_keeps_a_part_without_gradients_still():
    """Item 9, documented rather than changed: the default zero_grad() keeps gradients bound (a zero
    gradient still moves AdamW's state); set_to_none=True, the README's remedy, leaves a head that
    stopped getting gradients untouched, as torch's optimizers do by default."""
    for set_to_none in (False, True):
        model = mlp()
        opt = FusedLESAM(model.parameters(), base=torch.optim.AdamW, lr=0.01)
        x, y = batches(1)[0]
        loss_of(model, x, y).backward()
        opt.step(lambda: loss_of(model, x, y).backward())
        opt.zero_grad(set_to_none=set_to_none)
        model[2].weight.requires_grad_(False)  # the head stops getting gradients
        head = model[2].weight.detach().clone()
        loss_of(model, x, y).backward()
        opt.step(lambda: loss_of(model, x, y).backward())
        opt.zero_grad(set_to_none=set_to_none)
        assert torch.equal(model[2].weight, head) == set_to_none


def test_saving_part_of_a_model_writes_the_bucket_unless_cloned(tmp_path):
    """Item 12, documented: a view saved alone writes its whole storage (the flat bucket); the
    README's fix, clone(), writes the layer only; the whole model's and optimizer's state dicts are
    compact and round-trip."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4096))
    opt = FusedLESAM(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 64)
    model(x).square().mean().backward()
    opt.step(lambda: model(x).square().mean().backward())
    opt.zero_grad()
    part = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    layer_bytes = sum(v.numel() * v.element_size() for v in part.values())
    torch.save(part, tmp_path / "view.pt")
    torch.save({k: v.clone() for k, v in part.items()}, tmp_path / "clone.pt")
    assert (tmp_path / "view.pt").stat().st_size > 10 * layer_bytes  # the whole bucket
    assert (tmp_path / "clone.pt").stat().st_size < 2 * layer_bytes + 4096
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "all.pt")
    assert (tmp_path / "all.pt").stat().st_size < 2.2 * model_bytes  # weights + momentum, once each
    loaded = torch.load(tmp_path / "all.pt")
    other = copy.deepcopy(model)
    other_opt = FusedLESAM(other.parameters(), lr=0.1, momentum=0.9)
    other.load_state_dict(loaded["model"])
    other_opt.load_state_dict(loaded["opt"])
    for o, m in ((other_opt, other), (opt, model)):
        m(x).square().mean().backward()
        o.step(lambda: m(x).square().mean().backward())
    assert_same_params(model, other)


# ---------------------------------------------------------------------- 11: max_grad_norm=
@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
def test_max_grad_norm_clips_the_final_gradient_like_clip_grad_norm(backend, update):
    """step(closure, max_grad_norm=) equals clipping by hand with torch's clip_grad_norm_ (up to the
    rounding of the two norms), with a GradScaler too (the clip comes after the unscale)."""

    def run(how):
        model = mlp()
        opt = lesam(model, backend, update)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        for x, y in batches(3):
            if how == "by-hand":
                loss_of(model, x, y).backward()
                opt.first_step(zero_grad=True)
                loss_of(model, x, y).backward()
                assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)) > 0.05
                opt.second_step(zero_grad=True)
            elif how == "option":
                loss_of(model, x, y).backward()
                opt.step(lambda: loss_of(model, x, y).backward(), max_grad_norm=0.05)
                opt.zero_grad()
            else:
                scaler.scale(loss_of(model, x, y)).backward()
                scaler.step(opt, lambda: scaler.scale(loss_of(model, x, y)).backward(), max_grad_norm=0.05)
                scaler.update()
                opt.zero_grad()
        return model

    by_hand = run("by-hand")
    for how in ("option", "scaler"):
        for p, q in zip(run(how).parameters(), by_hand.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    unclipped = reference_run(backend, update, 3)
    assert any(
        not torch.allclose(p, q, rtol=1e-3, atol=1e-4) for p, q in zip(by_hand.parameters(), unclipped.parameters())
    )


def test_max_grad_norm_is_checked_before_anything_changes():
    model = mlp()
    opt = lesam(model, "torch", "fused")
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        opt.step(lambda: loss_of(model, x, y).backward(), max_grad_norm=float("nan"))
    assert_same_params(model, before)
    with pytest.raises(TypeError, match="FusedXSAM has no max_grad_norm"):
        xsam = FusedXSAM(mlp().parameters(), lr=0.1)
        with xsam.perturbed():
            pass
        xsam.second_step(max_grad_norm=1.0)


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
def test_grad_scaler_step_without_a_closure_says_how():
    model = mlp()
    opt = lesam(model, "torch", "fused")
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(1)[0]
    scaler.scale(loss_of(model, x, y)).backward()
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match=r"With a GradScaler: scaler.step\(opt, closure\)"):
        scaler.step(opt)
    assert_same_params(model, before)
