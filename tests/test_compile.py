"""torch.compile of the optimizer step: first_step traces as one graph (fullgraph=True), through the
torch ops of the spec backend or the custom ops of the extension, so it holds no host sync;
second_step compiles too, and its only graph breaks are the ones torch's own optimizers put around
their step (torch also declines to trace its fused optimizers' kernels). The compiled steps equal
the eager ones. capturable=True (tests/test_capturable.py) keeps one graph through an annealing."""

import copy
import os

import pytest
import torch
from helpers.models import SmallConvNet, loss_fn, make_batches, sam_step

from fused_lesam import FusedLESAM, FusedXSAM

BACKENDS = ["torch", "cpp"]  # Triton's interpreter cannot run under fake tensors: its compile test is a GPU test


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_equals_eager(backend):
    torch.manual_seed(0)
    model = SmallConvNet()
    eager_model = copy.deepcopy(model)
    hyper = dict(lr=0.05, momentum=0.9, fused=True, sigma=0.2, rho_max=0.4, alpha=0.5, backend=backend)
    opt, eager = FusedLESAM(model.parameters(), **hyper), FusedLESAM(eager_model.parameters(), **hyper)
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, backend="aot_eager")
    for x, y in make_batches(4):
        sam_step(model, opt, x, y, first_step=first, second_step=second)
        sam_step(eager_model, eager, x, y)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.last_rho, eager.last_rho)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("base_update", ["fused", "generic"])
def test_second_step_breaks_only_inside_torchs_optimizer(backend, capturable, base_update):
    """Restore, combine, the norm of the final gradient and the skip flag trace without a break (so
    without a host sync). With the base update fused into the restore the whole second step is one
    graph; with torch's own base step every break torch.compile reports is in torch/optim."""
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedLESAM(
        model.parameters(),
        lr=0.05,
        momentum=0.9,
        fused=True,
        sigma=0.2,
        alpha=0.5,
        total_steps=8,
        anneal_steps=4,
        capturable=capturable,
        backend=backend,
        base_update=base_update,
    )
    ((x, y),) = make_batches(1)
    sam_step(model, opt, x, y)  # the base optimizer's state exists: its skip is decided on the device
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    explained = torch._dynamo.explain(opt.second_step)()
    assert not opt._progress.perturbed  # the explained call did the step
    torch_optim = os.path.join("torch", "optim") + os.sep
    where = [reason.user_stack[-1].filename for reason in explained.break_reasons]
    if base_update == "fused":
        assert explained.graph_count == 1 and not where, where
    else:
        assert where and all(torch_optim in filename for filename in where), where


def test_optimizers_with_different_hyperparameters_compile_in_one_process():
    """After a second value of sigma, torch.compile makes the float a symbol; first_step must still
    trace as one graph (its host-side checks of the hyperparameters are skipped while tracing)."""
    for sigma in (0.2, 0.3, 0.4):
        torch.manual_seed(0)
        model = SmallConvNet()
        eager_model = copy.deepcopy(model)
        opt = FusedLESAM(model.parameters(), lr=0.05, sigma=sigma, backend="torch")
        eager = FusedLESAM(eager_model.parameters(), lr=0.05, sigma=sigma, backend="torch")
        first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
        for x, y in make_batches(2):
            sam_step(model, opt, x, y, first_step=first)
            sam_step(eager_model, eager, x, y)
        torch.testing.assert_close(opt.last_rho, eager.last_rho)
        for p, q in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_xsam_step_traces_without_a_sync(backend):
    """FusedXSAM: every ascent step as one fullgraph graph, and second_step, alpha search included
    (the model's forward passes traced with it), breaking only inside torch's base step; the
    compiled run equals the eager one."""
    torch.manual_seed(0)
    model = SmallConvNet()
    eager_model = copy.deepcopy(model)
    hyper = dict(lr=0.05, momentum=0.9, fused=True, rho=0.2, steps=2, dynamic=True, alpha_delta=0.5, backend=backend)
    opt, eager = FusedXSAM(model.parameters(), **hyper), FusedXSAM(eager_model.parameters(), **hyper)
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    ascent = torch.compile(opt.ascent_step, fullgraph=True, backend="aot_eager")
    torch_optim = os.path.join("torch", "optim") + os.sep
    for i, (x, y) in enumerate(make_batches(3)):
        for m, o, compiled in ((model, opt, True), (eager_model, eager, False)):
            loss_fn(m, x, y).backward()
            (first if compiled else o.first_step)(zero_grad=True)
            loss_fn(m, x, y).backward()
            (ascent if compiled else o.ascent_step)(zero_grad=True)
            loss_fn(m, x, y).backward()
            search = lambda m=m: loss_fn(m, x, y)  # noqa: E731
            if compiled and i > 0:  # after the first step the base optimizer's state exists
                explained = torch._dynamo.explain(o.second_step)(search_alpha=search)
                where = [reason.user_stack[-1].filename for reason in explained.break_reasons]
                assert all(torch_optim in filename for filename in where), where
            else:
                o.second_step(search_alpha=search)
            o.zero_grad()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.alpha.item() == eager.alpha.item()


def test_a_base_that_cannot_skip_on_the_device_breaks_the_graph_at_the_skip_decision():
    """What the README says compiles with which base: a plain base on torch's own step decides the
    skip on the host (bool(found_inf)), a graph break in our skip.base_step besides torch's own."""
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.05, momentum=0.9, base_update="generic", backend="torch")
    ((x, y),) = make_batches(1)
    sam_step(model, opt, x, y)
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    explained = torch._dynamo.explain(opt.second_step)()
    assert not opt._progress.perturbed
    ours = [
        reason
        for reason in explained.break_reasons
        if reason.user_stack[-1].filename.endswith(os.path.join("fused_lesam", "skip.py"))
    ]
    assert ours and all(reason.user_stack[-1].name == "base_step" for reason in ours), explained.break_reasons
