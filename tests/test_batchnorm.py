"""frozen_bn_stats: batch statistics as usual, running statistics bit-for-bit untouched."""

import pytest
import torch

from fused_lesam import frozen_bn_stats


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 3 * 3)
    )


def test_running_stats_untouched_and_output_unchanged():
    net = model().train()
    x = torch.randn(6, 3, 5, 5)
    net(x)  # give the running statistics some history
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with frozen_bn_stats(net):
        frozen_out = net(x)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    normal_out = net(x)  # the usual train-mode forward normalises with the same batch statistics
    torch.testing.assert_close(frozen_out, normal_out)
    assert not torch.equal(net[1].running_mean, buffers["1.running_mean"])  # and outside, they update again


def test_flags_restored_when_the_block_raises():
    net = model().train()
    with pytest.raises(ZeroDivisionError):
        with frozen_bn_stats(net):
            _ = 1 / 0
    assert net[1].track_running_stats and net[3].track_running_stats


def test_layers_without_running_stats_stay_so():
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with frozen_bn_stats(net):
        net(torch.randn(4, 3))
    assert not net[0].track_running_stats
