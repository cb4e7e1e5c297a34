"""Parameter sets shaped like the models of the paper's timing table, for the optimizer-step
benchmarks (no forward/backward: only the shapes of the parameters matter there)."""

from __future__ import annotations


def _conv(cout, cin, k):
    return [(cout, cin, k, k)]


def _bn(c):
    return [(c,), (c,)]


def resnet18_cifar(num_classes: int = 100) -> list[tuple[int, ...]]:
    """CIFAR ResNet-18 (3x3 stem, no max-pool): 62 tensors, 11,220,132 parameters for 100 classes."""
    shapes = _conv(64, 3, 3) + _bn(64)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += _conv(cout, cin, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout)
            if first and (stride != 1 or cin != cout):
                shapes += _conv(cout, cin, 1) + _bn(cout)  # projection shortcut
            cin = cout
    return shapes + [(num_classes, 512), (num_classes,)]


PARAM_SETS = {"resnet18": resnet18_cifar}


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
