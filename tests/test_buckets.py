"""Flat buckets: layout, views, in-place zero_grad, and re-binding of replaced or dropped grads."""

import copy

import pytest
import torch
from helpers.models import SmallConvNet, loss_fn, make_batches, sam_step

from fused_lesam import FusedLESAM
from fused_lesam.buckets import ALIGN


def test_layout_aligned_zero_padded_and_values_preserved():
    torch.manual_seed(0)
    model = SmallConvNet(head_dtype=torch.bfloat16)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FusedLESAM(model.parameters(), lr=0.1)
    assert sorted(str(b.param.dtype) for b in opt._buckets) == ["torch.bfloat16", "torch.float32"]
    for bucket in opt._buckets:
        covered = torch.zeros(bucket.param.numel(), dtype=torch.bool)
        for p, offset in zip(bucket.params, bucket.offsets):
            assert offset % ALIGN == 0
            assert p.data_ptr() == bucket.param.data_ptr() + offset * p.element_size()
            covered[offset : offset + p.numel()] = True
        assert bucket.param.numel() % ALIGN == 0
        assert torch.count_nonzero(bucket.param[~covered]) == 0 and torch.count_nonzero(bucket.grad[~covered]) == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n


def test_channels_last_parameters_keep_their_memory_format():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    weight = conv.weight.detach().clone()
    opt = FusedLESAM(conv.parameters(), lr=0.1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight, weight)
    conv(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).sum().backward()
    opt.first_step()
    assert conv.weight.grad is opt._buckets[0].grad_views[0]  # autograd accumulated into our view


def test_grads_become_views_and_zero_grad_is_in_place():
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1)
    sam_step(model, opt, *make_batches(1)[0])
    loss_fn(model, *make_batches(1, seed=1)[0]).backward()
    bucket = opt._buckets[0]
    views = {id(p): v for p, v in zip(bucket.params, bucket.grad_views)}
    for p in bucket.params:
        if p.grad is not None:
            assert p.grad is views[id(p)]
    assert torch.count_nonzero(bucket.grad) > 0
    opt.zero_grad()
    assert torch.count_nonzero(bucket.grad) == 0
    assert model.conv1.weight.grad is views[id(model.conv1.weight)]
    assert model.unused.weight.grad is None  # never had a gradient: never bound


@pytest.mark.parametrize(
    "how", ["model.zero_grad(set_to_none=True)", "opt.zero_grad(set_to_none=True)", "replace .grad"]
)
def test_dropped_or_replaced_grads_are_rebound_with_the_same_result(how):
    torch.manual_seed(0)
    a = SmallConvNet()
    b = copy.deepcopy(a)
    opt_a = FusedLESAM(a.parameters(), lr=0.05, momentum=0.9, alpha=0.4)
    opt_b = FusedLESAM(b.parameters(), lr=0.05, momentum=0.9, alpha=0.4)
    for x, y in make_batches(5):
        sam_step(a, opt_a, x, y)

        if how == "model.zero_grad(set_to_none=True)":
            b.zero_grad(set_to_none=True)
        elif how == "opt.zero_grad(set_to_none=True)":
            opt_b.zero_grad(set_to_none=True)
        loss_fn(b, x, y).backward()
        if how == "replace .grad":
            for p in b.parameters():
                if p.grad is not None:
                    p.grad = p.grad.clone()
        opt_b.first_step(zero_grad=True)
        loss_fn(b, x, y).backward()
        opt_b.second_step()
        if how != "replace .grad":
            b.zero_grad(set_to_none=True)
        else:
            opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_grad_dropped_after_binding_stops_counting():
    """A param whose grad is set to None after it was bound must not keep its old gradient in the norm."""
    model = SmallConvNet()
    opt = FusedLESAM(model.parameters(), lr=0.1, sigma=1.0, rho_max=100.0)
    x, y = make_batches(1)[0]
    sam_step(model, opt, x, y)
    loss_fn(model, x, y).backward()
    model.head.weight.grad = None
    head_before = model.head.weight.detach().clone()
    expected = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    opt.first_step()
    torch.testing.assert_close(opt.last_grad_norm, expected)
    assert torch.equal(model.head.weight, head_before)  # not perturbed
    opt.second_step()
