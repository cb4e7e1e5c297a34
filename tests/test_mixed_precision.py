"""Mixed precision without a scaler: bf16 autocast over fp32 parameters, on every backend, equals
the independent per-tensor loop under the same autocast (bf16 parameters, i.e. bf16 buckets with
fp32 accumulation, are in test_equivalence.py)."""

import copy

import pytest
import torch
from helpers.asserts import assert_close
from helpers.models import SmallConvNet, make_batches, sam_step
from reference.lesam_loop import ReferenceSAM

from fused_lesam import FusedLESAM, available_backends

BACKENDS = [name for name, why in available_backends().items() if not why]


def autocast_loss(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16  # autocast is really on
    return torch.nn.functional.cross_entropy(logits.float(), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_on_fp32_parameters(backend):
    torch.manual_seed(0)
    model = SmallConvNet()
    ref_model = copy.deepcopy(model)
    hyper = dict(lr=0.05, momentum=0.9, sigma=0.2, rho_max=0.4, alpha=0.5)
    opt = FusedLESAM(model.parameters(), torch.optim.SGD, backend=backend, **hyper)
    ref = ReferenceSAM(ref_model.parameters(), torch.optim.SGD, mode="lesam", **hyper)
    for x, y in make_batches(6):
        sam_step(model, opt, x, y, loss=autocast_loss)
        sam_step(ref_model, ref, x, y, loss=autocast_loss)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
        assert_close(p, q)
