"""FusedLESAM / FusedSAM equal the independent per-tensor loop (tests/reference) over many steps."""

import copy

import pytest
import torch
from helpers.asserts import assert_close
from helpers.models import SmallConvNet, groups_of, make_batches, sam_step
from reference.lesam_loop import ReferenceSAM

from fused_lesam import FusedLESAM, FusedSAM, available_backends

BACKENDS = [name for name, why in available_backends().items() if not why]
STEPS = 12


CASES = {
    # name: (kind, optimizer kwargs, second-group overrides or None, model dtype, head dtype)
    "lesam": ("lesam", dict(sigma=0.35, rho_max=0.4), None, torch.float32, None),
    "lesam-clipped": ("lesam", dict(sigma=5.0, rho_max=0.05), None, torch.float32, None),
    "lesam-groups": ("lesam", dict(sigma=0.3, rho_max=0.5), dict(sigma=0.1, rho_max=0.2), torch.float32, None),
    "lesam-adaptive": ("lesam", dict(sigma=0.5, rho_max=2.0, adaptive=True), None, torch.float32, None),
    "lesam-plus": ("lesam", dict(sigma=0.2, rho_max=0.4, alpha=0.5), dict(alpha=1.5), torch.float32, None),
    "lesam-anneal": (
        "lesam",
        dict(sigma=0.35, rho_max=0.4, total_steps=STEPS, anneal_steps=6),
        None,
        torch.float32,
        None,
    ),
    "lesam-mixed-groups": ("lesam", dict(sigma=0.3), dict(adaptive=True, alpha=0.3), torch.float32, None),
    "lesam-bf16": ("lesam", dict(sigma=0.35, rho_max=0.4), None, torch.bfloat16, None),
    "lesam-fp32-bf16-buckets": ("lesam", dict(sigma=0.35, rho_max=0.4), None, torch.float32, torch.bfloat16),
    "sam": ("sam", dict(rho=0.05), None, torch.float32, None),
    "sam-adaptive": ("sam", dict(rho=0.5, adaptive=True), dict(rho=0.1), torch.float32, None),
    "sam-bf16": ("sam", dict(rho=0.05), None, torch.bfloat16, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_per_tensor_loop(case, backend):
    kind, kwargs, split, dtype, head_dtype = CASES[case]
    torch.manual_seed(0)
    model = SmallConvNet(dtype, head_dtype)
    model.conv2.weight.requires_grad_(False)  # a frozen parameter inside a group
    ref_model = copy.deepcopy(model)
    unused_before = model.unused.weight.detach().clone()
    base = dict(lr=0.05, momentum=0.9, weight_decay=5e-3)
    fused_cls = FusedLESAM if kind == "lesam" else FusedSAM
    opt = fused_cls(groups_of(model, split), torch.optim.SGD, backend=backend, **kwargs, **base)
    ref = ReferenceSAM(groups_of(ref_model, split), torch.optim.SGD, mode=kind, **kwargs, **base)
    for step, (x, y) in enumerate(make_batches(STEPS, dtype)):
        sam_step(model, opt, x, y)
        sam_step(ref_model, ref, x, y)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            # The fused base update computes a bf16 head's step in fp32 and rounds once, torch's SGD
            # rounds each operation in bf16: the head may differ by its ulps, and every parameter of
            # the model reads the head's output, so all are held to the head's tolerance.
            assert_close(p, q, dtype=head_dtype, msg=f"{name} differs after step {step}")
    # Frozen and unused parameters are never touched: no perturbation residue, no weight decay.
    assert model.unused.weight.grad is None
    assert torch.equal(model.unused.weight, unused_before)
    assert torch.equal(model.conv2.weight, ref_model.conv2.weight)
    assert int(opt.skipped_steps) == 0


def test_step_closure_equals_manual_two_step():
    torch.manual_seed(1)
    a = SmallConvNet()
    b = copy.deepcopy(a)
    opt_a = FusedLESAM(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = FusedLESAM(b.parameters(), lr=0.05, momentum=0.9)
    for x, y in make_batches(4):
        sam_step(a, opt_a, x, y)
        torch.nn.functional.cross_entropy(b(x), y).backward()
        opt_b.step(lambda: torch.nn.functional.cross_entropy(b(x), y).backward())
        opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


KERNEL_BACKENDS = [name for name in BACKENDS if name != "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_backend_equals_torch_backend(case, backend):
    """The same optimizer on a kernel backend and on the "torch" reference, 40 steps, every case."""
    kind, kwargs, split, dtype, head_dtype = CASES[case]
    kwargs = {**kwargs, "total_steps": 40, "anneal_steps": 15} if "anneal_steps" in kwargs else kwargs
    torch.manual_seed(0)
    model = SmallConvNet(dtype, head_dtype)
    ref_model = copy.deepcopy(model)
    fused_cls = FusedLESAM if kind == "lesam" else FusedSAM
    base = dict(lr=0.05, momentum=0.9, weight_decay=5e-3)
    opt = fused_cls(groups_of(model, split), torch.optim.SGD, backend=backend, **kwargs, **base)
    ref = fused_cls(groups_of(ref_model, split), torch.optim.SGD, backend="torch", **kwargs, **base)
    assert set(opt.backend_names.values()) == {backend}
    for step, (x, y) in enumerate(make_batches(40, dtype, seed=3)):
        sam_step(model, opt, x, y)
        sam_step(ref_model, ref, x, y)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            # The fused base update computes a bf16 head's step in fp32 and rounds once, torch's SGD
            # rounds each operation in bf16: the head may differ by its ulps, and every parameter of
            # the model reads the head's output, so all are held to the head's tolerance.
            assert_close(p, q, dtype=head_dtype, msg=f"{name} differs after step {step}")
        assert_close(opt.last_rho, ref.last_rho, dtype=torch.float32)
        assert_close(opt.last_grad_norm, ref.last_grad_norm, dtype=torch.float32)
