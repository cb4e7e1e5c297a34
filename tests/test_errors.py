"""Bad input: a clear error naming the problem, and the parameters untouched."""

import pytest
import torch
from helpers.models import SmallConvNet, loss_fn, make_batches, sam_step

from fused_lesam import FusedLESAM, FusedSAM, backends


def params():
    return SmallConvNet().parameters()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma=-0.1), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(sigma=float("inf")), "sigma"),
        (dict(rho_max=0.0), "rho_max"),
        (dict(rho_max=-1.0), "rho_max"),
        (dict(varrho=0.0), "varrho"),
        (dict(alpha=-0.5), "alpha"),
        (dict(alpha_form="paperish"), "alpha_form"),
        (dict(adaptive="yes"), "adaptive"),
        (dict(total_steps=None, anneal_steps=5), "total_steps"),
        (dict(total_steps=10, anneal_steps=11), "anneal_steps"),
        (dict(backend="cudnn"), "backend"),
    ],
)
def test_bad_lesam_hyperparameter_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FusedLESAM(params(), lr=0.1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name", [(dict(rho=-0.05), "rho"), (dict(rho=float("inf")), "rho"), (dict(adaptive=1), "adaptive")]
)
def test_bad_sam_hyperparameter_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FusedSAM(params(), lr=0.1, **kwargs)


def test_bad_value_in_a_param_group_is_caught_at_construction_and_per_step():
    model = SmallConvNet()
    with pytest.raises(ValueError, match="sigma"):
        FusedLESAM([{"params": model.head.parameters(), "sigma": -1.0}], lr=0.1)
    opt = FusedLESAM(model.parameters(), lr=0.1)
    opt.param_groups[0]["rho_max"] = 0.0  # e.g. a buggy hand-written schedule
    loss_fn(model, *make_batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="rho_max"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_base_must_be_an_optimizer_class():
    model = SmallConvNet()
    with pytest.raises(TypeError, match="base"):
        FusedLESAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="base"):
        FusedLESAM(model.parameters(), base=dict)


def test_step_without_closure_is_a_clear_error():
    opt = FusedLESAM(params(), lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_second_step_before_first_step_leaves_params_untouched():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1)
    loss_fn(model, *make_batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.state


def test_first_step_twice_refuses_and_the_backup_survives():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1, sigma=1.0, rho_max=1.0)
    x, y = make_batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    opt._restore()  # what second_step does first: the original w comes back exactly
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cpp", ("fused_lesam.backends._not_built", frozenset({"cpu"})))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available: fused_lesam.backends._not_built"):
        FusedLESAM(params(), lr=0.1, backend="cpp")
    assert "fused_lesam.backends._not_built" in backends.available_backends()["cpp"]


def test_backend_for_another_device_is_refused():
    with pytest.raises(ValueError, match="'cuda' runs on"):
        FusedLESAM(params(), lr=0.1, backend="cuda")


def test_model_moved_after_building_the_optimizer_is_detected():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1)
    model.double()  # replaces every parameter's storage
    loss_fn(model, *[t.double() if t.is_floating_point() else t for t in make_batches(1)[0]]).backward()
    with pytest.raises(RuntimeError, match="moved or replaced after the optimizer was built"):
        opt.first_step()


def test_non_float_parameters_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        FusedLESAM([torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)], lr=0.1)


def test_state_dict_from_another_kind_is_refused_before_anything_changes():
    """A FusedSAM checkpoint lacks FusedLESAM's hyperparameters: refused, and the optimizer still
    steps with its own (a plain torch optimizer's state dict loads: tests/test_base_update.py)."""
    model = SmallConvNet()
    sam = FusedSAM(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batches(1)[0]
    sam_step(model, sam, x, y)
    opt = FusedLESAM(model.parameters(), lr=0.2, sigma=0.1)
    with pytest.raises(ValueError, match=r"saved by FusedSAM, and this is a FusedLESAM.*Nothing was changed"):
        opt.load_state_dict(sam.state_dict())
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["sigma"] == 0.1
    sam_step(model, opt, x, y)
