"""VGG-16 with batch norm for CIFAR-size input. The first conv (stem) is not pruned."""

from __future__ import annotations

import torch
import torch.nn as nn

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int, width_div: int = 1):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                v = max(1, v // width_div)
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def prunable_layers(self) -> list[str]:
        convs = [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]
        return convs[1:]

    def conv_norms(self) -> dict[str, str]:
        """The BatchNorm right after each conv."""
        convs = [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]
        norms = [n for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]
        return dict(zip(convs, norms))

    def channel_chains(self) -> list[tuple[str, str, str]]:
        """(producer conv, its BN, consumer) for each conv: the next conv, or the classifier
        after the last. Between them only BN, ReLU, max pooling (no padding) and the global
        average pool act, so a channel whose filter is zero reaches the consumer as a constant."""
        convs = [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]
        norms = [n for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]
        return list(zip(convs, norms, convs[1:] + ["classifier"]))


def vgg16_bn(num_classes: int, img_size: int = 32, width_div: int = 1) -> VGG:
    return VGG(CFG16, num_classes, width_div)
