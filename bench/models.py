"""The models of the paper's timing table, in the CIFAR variants the SAM literature trains, and a
small ViT for a parameter set of many small tensors.

- ResNet-18: 3x3 stem, no max-pool, basic blocks [2, 2, 2, 2] of 64-512 channels (11.2M params).
- WideResNet-28-10: pre-activation wide basic blocks, 4 per group, widths 160/320/640 (36.5M).
- PyramidNet-110 (alpha = 270): basic blocks whose width grows by alpha / 54 each, zero-padded
  identity shortcuts, average pooling when downsampling (28.3M, the PyramidNet paper's figure).
- ViT for 32x32 images: 4x4 patches, 12 encoder layers of width 384 (about 150 tensors).
Build them on the "meta" device to get parameter shapes without memory (`param_shapes`).

Two more parameter sets serve only the step microbenchmark (bench/test_step_overhead.py), which
needs shapes, not a model to train on CIFAR images (`PARAM_SETS`):
- vit_s16: ViT-S/16 at 224 px (16x16 patches, a class token, 12 layers of width 384) with a
  100-class head, as ViTs are fine-tuned on upscaled CIFAR-100: 152 tensors, 21.7M parameters.
- many600: 600 small tensors of 2083 elements, 1.25M parameters: where per-tensor work dominates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _ResNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(3, 64), nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_ResNetBlock(cin, cout, stride), _ResNetBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 100):
        super().__init__()
        per_group = (depth - 4) // 6
        self.conv1 = _conv3x3(3, 16)
        blocks, cin = [], 16
        for width, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(per_group):
                blocks.append(_WideBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _PyramidBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = self.bn3(self.conv2(F.relu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = F.avg_pool2d(x, 2) if self.stride != 1 else x
        return out + F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))  # zero channels for the added width


class PyramidNet(nn.Module):
    def __init__(self, depth: int = 110, alpha: int = 270, num_classes: int = 100):
        super().__init__()
        per_stage = (depth - 2) // 6
        step = alpha / (3 * per_stage)
        self.conv1, self.bn1 = _conv3x3(3, 16), nn.BatchNorm2d(16)
        blocks, width, cin = [], 16.0, 16
        for stage in range(3):
            for i in range(per_stage):
                width += step
                cout = int(round(width))
                blocks.append(_PyramidBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ViT(nn.Module):
    def __init__(self, depth: int = 12, dim: int = 384, heads: int = 6, patch: int = 4, num_classes: int = 100):
        super().__init__()
        tokens = (32 // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.encoder(x)).mean(dim=1))


class ViTS16(nn.Module):
    def __init__(
        self, depth: int = 12, dim: int = 384, heads: int = 6, patch: int = 16, image: int = 224, num_classes: int = 100
    ):
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.fc(self.norm(self.encoder(x))[:, 0])


MODELS = {"resnet18": ResNet18, "wrn28_10": WideResNet, "pyramidnet110": PyramidNet, "vit": ViT}
PAPER_NAMES = {"resnet18": "ResNet-18", "wrn28_10": "WideResNet-28-10", "pyramidnet110": "PyramidNet-110", "vit": "ViT"}


# Shape-only sets: built by the step microbenchmark, never trained by epoch_time.py (whose --models
# all walks MODELS with CIFAR's 32x32 images).
PARAM_SETS = {"vit_s16": ViTS16, "many600": lambda: [(2083,)] * 600}


def param_shapes(name: str) -> list[tuple[int, ...]]:
    """Shapes of the set's parameters; a model's from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        made = {**MODELS, **PARAM_SETS}[name]()
    if isinstance(made, nn.Module):
        return [tuple(p.shape) for p in made.parameters()]
    return made
