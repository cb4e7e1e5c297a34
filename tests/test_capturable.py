"""capturable=True: the step count, sigma_t of the annealing and the skip flag live on the device.

On the CPU this is proven two ways: a capturable run gives the bits of the default run through the
whole annealing (sigma_t read from device memory equals the host's float), and torch.compile
traces first_step (fullgraph=True) once for every step of the annealing, where the default mode's
host-side step count and float sigma_t are guarded on and recompile. The CUDA-graph capture and replay is
tests/test_cuda.py::test_cuda_graph_replay_equals_eager.
"""

import copy

import pytest
import torch
from helpers.models import SmallConvNet, groups_of, loss_fn, make_batches, sam_step, through_bytes

from fused_lesam import FusedLESAM, FusedSAM, available_backends

BACKENDS = [name for name, why in available_backends().items() if not why]
STEPS = 10
HYPER = dict(
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-3,
    fused=True,
    sigma=0.3,
    rho_max=0.4,
    alpha=0.5,
    total_steps=STEPS,
    anneal_steps=6,
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_run_equals_the_default_bit_for_bit(backend):
    torch.manual_seed(0)
    model = SmallConvNet()
    other = copy.deepcopy(model)
    opt = FusedLESAM(groups_of(model, dict(sigma=0.1)), backend=backend, capturable=True, **HYPER)
    default = FusedLESAM(groups_of(other, dict(sigma=0.1)), backend=backend, **HYPER)
    sigmas = []
    for x, y in make_batches(STEPS + 2):  # two steps past the end of the schedule
        sam_step(model, opt, x, y)
        sam_step(other, default, x, y)
        assert torch.equal(opt.last_sigma, default.last_sigma)
        assert torch.equal(opt.last_rho, default.last_rho)
        sigmas.append(opt.last_sigma[0].item())
    assert sigmas[0] == pytest.approx(0.3) and sigmas[-1] == 0.0 and sigmas[5] < sigmas[4]  # it did anneal
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["fused_lesam"]["step"] == STEPS + 2


def test_compiled_capturable_step_traces_once_for_the_whole_annealing():
    torch.manual_seed(0)
    model = SmallConvNet()
    eager_model = copy.deepcopy(model)
    opt = FusedLESAM(model.parameters(), backend="torch", capturable=True, **HYPER)
    eager = FusedLESAM(eager_model.parameters(), backend="torch", capturable=True, **HYPER)
    torch._dynamo.reset()
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    for i, (x, y) in enumerate(make_batches(STEPS + 1)):
        # Step 0 traces without the backup and center buffers, step 1 with them (as torch's own
        # optimizers recompile once their state exists); after that, through the whole annealing, a
        # recompile (a guard on the step count or on sigma_t) is an error.
        with torch.compiler.set_stance("fail_on_recompile" if i >= 2 else "default"):
            sam_step(model, opt, x, y, first_step=first)
        sam_step(eager_model, eager, x, y)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.last_sigma, eager.last_sigma)


def test_capturable_checkpoint_resumes_bit_identically():
    torch.manual_seed(0)
    batches = make_batches(STEPS)
    model = SmallConvNet()
    start = copy.deepcopy(model)
    opt = FusedLESAM(model.parameters(), capturable=True, **HYPER)
    for x, y in batches:
        sam_step(model, opt, x, y)

    half = copy.deepcopy(start)
    opt1 = FusedLESAM(half.parameters(), capturable=True, **HYPER)
    for x, y in batches[:5]:  # stopped inside the annealing
        sam_step(half, opt1, x, y)
    saved = through_bytes({"model": half.state_dict(), "opt": opt1.state_dict()})
    resumed = SmallConvNet()
    opt2 = FusedLESAM(resumed.parameters(), capturable=True, **HYPER)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x, y in batches[5:]:
        sam_step(resumed, opt2, x, y)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.last_sigma, opt2.last_sigma)


def test_capturable_sam_counts_a_non_finite_step_on_the_device():
    torch.manual_seed(0)
    model = SmallConvNet()
    opt = FusedSAM(model.parameters(), rho=0.05, lr=0.05, momentum=0.9, fused=True, capturable=True)
    batches = make_batches(3)
    sam_step(model, opt, *batches[0])  # the base optimizer's state exists from here on
    before = [p.detach().clone() for p in model.parameters()]
    state = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if opt.state[p]}
    x, y = batches[1]
    loss_fn(model, x, y).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    opt.step(lambda: loss_fn(model, x, y).backward())
    assert opt.skipped_steps.item() == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert state and all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in state.items())


def test_capturable_needs_a_base_that_skips_on_the_device():
    model = SmallConvNet()
    with pytest.raises(ValueError, match="capturable=True needs a base update that can skip"):
        FusedLESAM(model.parameters(), lr=0.1, momentum=0.9, capturable=True, base_update="generic")
    with pytest.raises(ValueError, match="capturable=True needs a base update that can skip"):
        FusedLESAM(model.parameters(), base=torch.optim.RMSprop, lr=0.1, capturable=True)
    assert FusedLESAM(model.parameters(), lr=0.1, momentum=0.9, capturable=True).base_update == "fused"
    with pytest.raises(ValueError, match="capturable must be a bool"):
        FusedSAM(model.parameters(), lr=0.1, fused=True, capturable=1)
