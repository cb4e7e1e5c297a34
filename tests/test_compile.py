"""torch.compile of the optimizer step: first_step traces as one graph (fullgraph=True), through the
torch ops of the reference backend or the custom ops of the extension, so it holds no host sync;
second_step compiles too, with the one graph break torch's own optimizers put in their step.
The compiled steps equal the eager ones."""

import copy

import pytest
import torch

from conftest import SmallConvNet, make_batches, sam_step
from fused_lesam import FusedLESAM

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
