"""Small conv nets shared by the quantization tests and benchmarks (not a test module)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from harness.zoo import ops


class ConvBNReLU(nn.Sequential):
    """conv 3x3 (no bias) + BatchNorm2d + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Block(nn.Module):
    """Residual basic block with an `ops.Add`."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.add = ops.Add()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.add(self.bn2(self.conv2(self.conv1(x))), x))
        return out


class SmallNet(nn.Module):
    """conv-bn-relu stacks, a residual add, a max pool, two branches joined by a concat, a float head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, width, 2)
        self.block = Block(width)
        self.pool = nn.MaxPool2d(2)
        self.left = ConvBNReLU(width, width // 2)
        self.right = ConvBNReLU(width, width // 2)
        self.cat = ops.Concat(1)
        self.fuse = ConvBNReLU(width, width)
        self.head = nn.Conv2d(width, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.block(self.stem(x)))
        out: torch.Tensor = self.head(self.fuse(self.cat(self.left(y), self.right(y))))
        return out


class FourConv(nn.Module):
    """Four 3x3 conv + ReLU layers (the issue's latency probe) with a float 1x1 output conv."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width, width, width]
        self.body = nn.Sequential(*[ConvBNReLU(a, b) for a, b in itertools.pairwise(chans)])
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


class ResNetish(nn.Module):
    """Stem, max pool, three stages of two residual blocks with strided transitions, float head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, width, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        c = width
        for k in range(3):
            layers: list[nn.Module] = [] if k == 0 else [ConvBNReLU(c, c * 2, 2)]
            c = c if k == 0 else c * 2
            layers += [Block(c), Block(c)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.stages(self.pool(self.stem(x))))
        return out


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)  # type: ignore[union-attr]
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)  # type: ignore[union-attr]
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model.eval()
