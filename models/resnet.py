"""CIFAR ResNets: res20s / res56s (He et al. 2016, widths 16/32/64) and res18 (CIFAR stem).

Every conv and linear is a module call so forward hooks see it. The stem conv (`conv1`) is
never pruned; every other Conv2d weight is prunable (ALGORITHM.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stem for 32x32 input; `widths` per stage, `blocks` per stage."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes, stages = widths[0], []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, 2 if (i > 0 and j == 0) else 1))
                in_planes = w
            stages.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in self.layers:
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))

    def prunable_layers(self) -> list[str]:
        """Names of the modules whose `.weight` is pruned: every conv but the stem."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]

    def conv_norms(self) -> dict[str, str]:
        """The BatchNorm right after each conv."""
        out = {"conv1": "bn1"}
        for n, m in self.named_modules():
            if isinstance(m, BasicBlock):
                out.update({f"{n}.conv1": f"{n}.bn1", f"{n}.conv2": f"{n}.bn2"})
                if len(m.shortcut):
                    out[f"{n}.shortcut.0"] = f"{n}.shortcut.1"
        return out

    def channel_chains(self) -> list[tuple[str, str, str]]:
        """(producer conv, its BN, consumer) of every block-internal channel dimension:
        conv1 -> bn1 -> ReLU -> conv2. Between them only BN and ReLU act, so a channel whose
        filter is zero reaches conv2 as a constant. Residual-stream channels (conv2 and
        shortcut outputs) are tied to the sum and are not listed."""
        return [(f"{n}.conv1", f"{n}.bn1", f"{n}.conv2") for n, m in self.named_modules() if isinstance(m, BasicBlock)]


def res20s(num_classes: int, img_size: int = 32, width: int = 16) -> CifarResNet:
    return CifarResNet([3, 3, 3], [width, 2 * width, 4 * width], num_classes)


def res56s(num_classes: int, img_size: int = 32, width: int = 16) -> CifarResNet:
    return CifarResNet([9, 9, 9], [width, 2 * width, 4 * width], num_classes)


def res18(num_classes: int, img_size: int = 32, width: int = 64) -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes)
