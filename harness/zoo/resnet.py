"""mmdet-style ResNet (depths 18/34/50) whose residual additions quantization can find.

Module names follow mmdet's `ResNet` so quantization rules and checkpoints written against
mmdet / BEVFusion / FastBEV name the same layers: stem `conv1`, `bn1`, `relu`, `maxpool`, stages
`layer1..layer4`, blocks with `conv1/bn1/conv2/bn2(/conv3/bn3)` and
`downsample = Sequential(conv, bn)`. Each block adds its identity through a
`harness.zoo.ops.Add` module named `add`, called as `add(out, identity)`: the first input is the
residual branch (the output of the block's last BN), the second the identity (or the downsample
output). That lets the `bottleneck_residual` rule give the identity path its own quantizer.
Bottlenecks put the stride on the 3x3 conv (mmdet `style='pytorch'`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from harness.errors import HarnessError
from harness.quant.modules import QuantAdd, QuantConv2d, QuantModule
from harness.quant.registry import register_rule
from harness.quant.rules import QuantConfigError, TraceGraph, share
from harness.quant.tensor_quantizer import TensorQuantizer
from harness.zoo.ops import Add

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN projection of the identity, or None when shapes already agree."""
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(outplanes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; `relu(add(bn2(conv2(relu(bn1(conv1(x))))), identity))`."""

    expansion: ClassVar[int] = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(self.add(out, identity))
        return out


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs with BN, expansion 4; the add as in `BasicBlock`."""

    expansion: ClassVar[int] = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(self.add(out, identity))
        return out


_ARCH: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet backbone returning the feature maps of the stages in `out_indices`.

    Stage `i` has `base_channels * 2**i * expansion` output channels and stride `2**(i+2)`
    (ResNet50 with the default width: 256/512/1024/2048 at strides 4/8/16/32).
    `base_channels` shrinks every width proportionally for CI profiles; the structure (blocks,
    strides, downsample projections) stays that of the full network.
    """

    def __init__(
        self,
        depth: int,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        base_channels: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise HarnessError(f"ResNet: depth {depth} is not one of {sorted(_ARCH)}")
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise HarnessError(
                f"ResNet: out_indices {tuple(out_indices)} must be a non-empty subset of 0..3"
            )
        if base_channels < 1:
            raise HarnessError(f"ResNet: base_channels must be positive, got {base_channels}")
        block, stage_blocks = _ARCH[depth]
        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.conv1 = nn.Conv2d(in_channels, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes = base_channels
        self.out_channels: list[int] = []
        self.layer1 = self._make_layer(block, base_channels, stage_blocks[0], 1)
        self.layer2 = self._make_layer(block, base_channels * 2, stage_blocks[1], 2)
        self.layer3 = self._make_layer(block, base_channels * 4, stage_blocks[2], 2)
        self.layer4 = self._make_layer(block, base_channels * 8, stage_blocks[3], 2)
        self._init_weights()

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        blocks: list[nn.Module] = []
        for j in range(num_blocks):
            blocks.append(block(self._inplanes, planes, stride if j == 0 else 1))
            self._inplanes = planes * block.expansion
        self.out_channels.append(self._inplanes)
        return nn.Sequential(*blocks)

    @property
    def stages(self) -> list[nn.Sequential]:
        """`[layer1, layer2, layer3, layer4]`."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def resnet18(out_indices: Sequence[int] = (0, 1, 2, 3), base_channels: int = 64) -> ResNet:
    """ResNet18 (BasicBlock, 2-2-2-2)."""
    return ResNet(18, out_indices, base_channels)


def resnet34(out_indices: Sequence[int] = (0, 1, 2, 3), base_channels: int = 64) -> ResNet:
    """ResNet34 (BasicBlock, 3-4-6-3)."""
    return ResNet(34, out_indices, base_channels)


def resnet50(out_indices: Sequence[int] = (0, 1, 2, 3), base_channels: int = 64) -> ResNet:
    """ResNet50 (Bottleneck, 3-4-6-3)."""
    return ResNet(50, out_indices, base_channels)


# -- quantization: the deployment guides' residual rule for these blocks -----------------------
#
# `bottleneck_residual` (registered with harness.quant): for every BasicBlock / Bottleneck, the
# downsample conv shares conv1's input quantizer (both read the block input); the identity enters
# the add through a residual quantizer (conv1's input quantizer without a downsample, a new one
# on the downsample output with one) and the branch input of the add (the last conv's output)
# stays unquantized, so TensorRT fuses the add into that conv with an int8 identity. A block
# whose conv1, downsample conv and add are not all quantized (or all float) is an error naming it.


@dataclass(frozen=True)
class _BlockParts:
    """The layers of one residual block the residual rule acts on (None: the block has no downsample)."""

    block: str
    conv1: str
    downsample: str | None
    add: str


def _residual_blocks(model: nn.Module) -> list[_BlockParts]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, BasicBlock | Bottleneck):
            prefix = f"{name}." if name else ""
            down = f"{prefix}downsample.0" if module.downsample is not None else None
            found.append(_BlockParts(name, f"{prefix}conv1", down, f"{prefix}add"))
    return found


@dataclass(frozen=True)
class BottleneckResidual:
    """Residual quantizers for ResNet blocks (see the module docstring)."""

    name: str = "bottleneck_residual"
    needs_trace: bool = False

    def apply(self, model: nn.Module, graph: TraceGraph | None) -> int:
        del graph
        matched = 0
        for block in _residual_blocks(model):
            conv1, add = model.get_submodule(block.conv1), model.get_submodule(block.add)
            down = model.get_submodule(block.downsample) if block.downsample else None
            parts = {block.conv1: conv1, block.add: add, **({block.downsample: down} if block.downsample else {})}
            floats = [n for n, m in parts.items() if not isinstance(m, QuantModule)]
            if len(floats) == len(parts):
                continue
            if floats:
                raise QuantConfigError(
                    f"rule '{self.name}': block '{block.block}' is partly quantized "
                    f"({', '.join(floats)} float); quantize its conv1, downsample conv and add together or not at all",
                    "rules",
                )
            assert isinstance(conv1, QuantConv2d) and isinstance(add, QuantAdd)
            shared = conv1.get_input_quantizer(0)
            if shared is None:
                raise QuantConfigError(f"rule '{self.name}': '{block.conv1}' has no input quantizer to share", "rules")
            if isinstance(down, QuantConv2d):
                share(model, [shared, *down.input_quantizers()])
                residual = TensorQuantizer(shared.descriptor)
            else:
                residual = shared
            add.set_input_quantizer(0, None)
            add.set_input_quantizer(1, residual)
            matched += 1
        return matched

    def targets(self, model: nn.Module, graph: TraceGraph | None) -> list[str]:
        """conv1, the downsample conv and the add of every block."""
        del graph
        return [n for b in _residual_blocks(model) for n in (b.conv1, b.downsample, b.add) if n is not None]



register_rule("bottleneck_residual", BottleneckResidual)
