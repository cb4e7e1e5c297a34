"""The benchmark's models (bench/models.py) are the architectures the paper's table names: each
parameter count equals a closed-form count written from the architecture here, and is within 1%
of the figure the literature gives for it."""

import math

import pytest
import torch
from models import MODELS, param_shapes


def conv(cin, cout, k=3):
    return cin * cout * k * k


def bn(c):
    return 2 * c


def resnet18_count(classes=100):
    total, cin = conv(3, 64) + bn(64), 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            total += conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout)
            if block == 0 and cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + 512 * classes + classes


def wrn_count(depth=28, widen=10, classes=100):
    total, cin = conv(3, 16), 16
    for width in (16 * widen, 32 * widen, 64 * widen):
        for _ in range((depth - 4) // 6):
            total += bn(cin) + conv(cin, width) + bn(width) + conv(width, width)
            if cin != width:
                total += conv(cin, width, 1)
            cin = width
    return total + bn(cin) + cin * classes + classes


def pyramidnet_count(depth=110, alpha=270, classes=100):
    blocks = 3 * ((depth - 2) // 6)
    total, cin = conv(3, 16) + bn(16), 16
    for k in range(1, blocks + 1):
        cout = round(16 + k * alpha / blocks)
        total += bn(cin) + conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout)
        cin = cout
    return total + bn(cin) + cin * classes + classes


@pytest.mark.parametrize(
    "name, closed_form, published_millions",
    [
        ("resnet18", resnet18_count(), 11.2),
        ("wrn28_10", wrn_count(), 36.5),
        ("pyramidnet110", pyramidnet_count(), 28.3),  # alpha = 270, as the PyramidNet paper reports it
    ],
)
def test_parameter_count(name, closed_form, published_millions):
    count = sum(math.prod(shape) for shape in param_shapes(name))
    assert count == closed_form
    assert abs(count / 1e6 - published_millions) / published_millions < 0.01


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_gives_class_scores(name):
    with torch.device("meta"):
        out = MODELS[name]()(torch.empty(2, 3, 32, 32))
    assert out.shape == (2, 100)
