"""PIDNet-S real-time semantic segmentation network (Xu et al., CVPR 2023), official layout.

The module tree and parameter names follow the official implementation
(github.com/XuJiacong/PIDNet, `models/pidnet.py` and `models/model_utils.py`) so an official
checkpoint loads with `load_state_dict(strict=True)` once its `model.` prefix is stripped.
Residual additions go through `harness.zoo.ops.Add` and concatenations through
`harness.zoo.ops.Concat` so the quantization library can replace them; these modules hold no
parameters and do not change the state_dict.

Three branches: P (detail, 1/8 resolution), I (context, down to 1/64 then a pyramid pooling
module), D (boundary, 1/8). PagFM fuses I into P, Light-Bag fuses P and I under the guidance of
D. `pidnet_s(augment=False)` returns the main logits at 1/8 of the input resolution (official
inference); `augment=True` adds the two training heads and returns
`(aux P logits, main logits, boundary logits)`, all at 1/8 resolution.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from harness.zoo.ops import Add, Concat

BN_MOMENTUM = 0.1

TRAINING_ONLY_PREFIXES: tuple[str, ...] = ("seghead_p.", "seghead_d.")
"""State-dict key prefixes of the heads that only `augment=True` models have."""


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _hw(x: torch.Tensor) -> tuple[int, int]:
    return (x.shape[-2], x.shape[-1])


def _conv_bn(cin: int, cout: int, kernel: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=kernel, padding=padding, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
    )


def _bn_relu_conv(cin: int, cout: int, kernel: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel_size=kernel, padding=kernel // 2, groups=groups, bias=False),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet basic block)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        no_relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample
        self.add = Add()
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        summed: torch.Tensor = self.add(out, residual)
        if self.no_relu:
            return summed
        activated: torch.Tensor = self.relu(summed)
        return activated


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 convolutions with a residual connection, expansion 2."""

    expansion = 2

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        no_relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.add = Add()
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        summed: torch.Tensor = self.add(out, residual)
        if self.no_relu:
            return summed
        activated: torch.Tensor = self.relu(summed)
        return activated


class SegmentHead(nn.Module):
    """BN-ReLU-3x3 conv, BN-ReLU-1x1 conv (with bias) to class logits."""

    def __init__(self, inplanes: int, interplanes: int, outplanes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, momentum=BN_MOMENTUM)
        self.conv1 = nn.Conv2d(inplanes, interplanes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(interplanes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(interplanes, outplanes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu(self.bn1(x)))
        logits: torch.Tensor = self.conv2(self.relu(self.bn2(x)))
        return logits


class PAPPM(nn.Module):
    """Parallel aggregation pyramid pooling: four pooled scales processed in one grouped conv."""

    def __init__(self, inplanes: int, branch_planes: int, outplanes: int) -> None:
        super().__init__()
        self.scale1 = nn.Sequential(
            nn.AvgPool2d(kernel_size=5, stride=2, padding=2),
            *_bn_relu_conv(inplanes, branch_planes),
        )
        self.scale2 = nn.Sequential(
            nn.AvgPool2d(kernel_size=9, stride=4, padding=4),
            *_bn_relu_conv(inplanes, branch_planes),
        )
        self.scale3 = nn.Sequential(
            nn.AvgPool2d(kernel_size=17, stride=8, padding=8),
            *_bn_relu_conv(inplanes, branch_planes),
        )
        self.scale4 = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), *_bn_relu_conv(inplanes, branch_planes)
        )
        self.scale0 = _bn_relu_conv(inplanes, branch_planes)
        self.scale_process = _bn_relu_conv(branch_planes * 4, branch_planes * 4, kernel=3, groups=4)
        self.compression = _bn_relu_conv(branch_planes * 5, outplanes)
        self.shortcut = _bn_relu_conv(inplanes, outplanes)
        self.scale_adds = nn.ModuleList(Add() for _ in range(4))
        self.cat_scales = Concat(dim=1)
        self.cat_all = Concat(dim=1)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _hw(x)
        x_ = self.scale0(x)
        scales = (self.scale1, self.scale2, self.scale3, self.scale4)
        pooled = [
            add(_upsample(scale(x), size), x_)
            for scale, add in zip(scales, self.scale_adds, strict=True)
        ]
        scale_out = self.scale_process(self.cat_scales(*pooled))
        out: torch.Tensor = self.add(
            self.compression(self.cat_all(x_, scale_out)), self.shortcut(x)
        )
        return out


class PagFM(nn.Module):
    """Pixel-attention-guided fusion: blends the I-branch feature `y` into the P-branch `x`."""

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.f_x = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.f_y = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.add = Add()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = _hw(x)
        y_q = _upsample(self.f_y(y), size)
        x_k = self.f_x(x)
        sim_map = torch.sigmoid(torch.sum(x_k * y_q, dim=1).unsqueeze(1))
        y = _upsample(y, size)
        out: torch.Tensor = self.add((1 - sim_map) * x, sim_map * y)
        return out


class LightBag(nn.Module):
    """Light boundary-attention-guided fusion of P (`p`), I (`i`) and D (`d`) features."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_p = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.conv_i = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.add_p = Add()
        self.add_i = Add()
        self.add = Add()

    def forward(self, p: torch.Tensor, i: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        edge_att = torch.sigmoid(d)
        p_add = self.conv_p(self.add_p((1 - edge_att) * i, p))
        i_add = self.conv_i(self.add_i(i, edge_att * p))
        out: torch.Tensor = self.add(p_add, i_add)
        return out


BlockType = type[BasicBlock] | type[Bottleneck]


def _make_layer(
    block: BlockType, inplanes: int, planes: int, blocks: int, stride: int = 1
) -> nn.Sequential:
    """Stack of `blocks` blocks; the first may downsample, the last has no final ReLU."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = _downsample(block, inplanes, planes, stride)
    layers: list[nn.Module] = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    for i in range(1, blocks):
        layers.append(block(inplanes, planes, stride=1, no_relu=i == blocks - 1))
    return nn.Sequential(*layers)


def _make_single_layer(block: BlockType, inplanes: int, planes: int) -> nn.Module:
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = _downsample(block, inplanes, planes, 1)
    return block(inplanes, planes, 1, downsample, no_relu=True)


def _downsample(block: BlockType, inplanes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion, momentum=BN_MOMENTUM),
    )


class PIDNet(nn.Module):
    """PIDNet with two-block P/D stages (m=2): PAPPM context module and Light-Bag fusion."""

    def __init__(
        self,
        m: int = 2,
        n: int = 3,
        num_classes: int = 19,
        planes: int = 32,
        ppm_planes: int = 96,
        head_planes: int = 128,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if m != 2:
            raise ValueError(f"only m=2 (PIDNet-S/M) is built here, got m={m}")
        self.augment = augment
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, planes, 3, stride=2, padding=1),
            nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=2, padding=1),
            nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        )
        self.relu = nn.ReLU(inplace=True)
        # I branch
        self.layer1 = _make_layer(BasicBlock, planes, planes, m)
        self.layer2 = _make_layer(BasicBlock, planes, planes * 2, m, stride=2)
        self.layer3 = _make_layer(BasicBlock, planes * 2, planes * 4, n, stride=2)
        self.layer4 = _make_layer(BasicBlock, planes * 4, planes * 8, n, stride=2)
        self.layer5 = _make_layer(Bottleneck, planes * 8, planes * 8, 2, stride=2)
        # P branch
        self.compression3 = _conv_bn(planes * 4, planes * 2)
        self.compression4 = _conv_bn(planes * 8, planes * 2)
        self.pag3 = PagFM(planes * 2, planes)
        self.pag4 = PagFM(planes * 2, planes)
        self.layer3_ = _make_layer(BasicBlock, planes * 2, planes * 2, m)
        self.layer4_ = _make_layer(BasicBlock, planes * 2, planes * 2, m)
        self.layer5_ = _make_layer(Bottleneck, planes * 2, planes * 2, 1)
        # D branch
        self.layer3_d = _make_single_layer(BasicBlock, planes * 2, planes)
        self.layer4_d = _make_layer(Bottleneck, planes, planes, 1)
        self.diff3 = _conv_bn(planes * 4, planes, kernel=3, padding=1)
        self.diff4 = _conv_bn(planes * 8, planes * 2, kernel=3, padding=1)
        self.layer5_d = _make_layer(Bottleneck, planes * 2, planes * 2, 1)
        self.add_d3 = Add()
        self.add_d4 = Add()
        # context and fusion
        self.spp = PAPPM(planes * 16, ppm_planes, planes * 4)
        self.dfm = LightBag(planes * 4, planes * 4)
        # heads
        if augment:
            self.seghead_p = SegmentHead(planes * 2, head_planes, num_classes)
            self.seghead_d = SegmentHead(planes * 2, planes, 1)
        self.final_layer = SegmentHead(planes * 4, head_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(
        self, x: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.relu(self.layer2(self.relu(x)))
        x_ = self.layer3_(x)
        x_d = self.layer3_d(x)
        size = _hw(x_d)

        x = self.relu(self.layer3(x))
        x_ = self.pag3(x_, self.compression3(x))
        x_d = self.add_d3(x_d, _upsample(self.diff3(x), size))
        temp_p = x_

        x = self.relu(self.layer4(x))
        x_ = self.layer4_(self.relu(x_))
        x_d = self.layer4_d(self.relu(x_d))
        x_ = self.pag4(x_, self.compression4(x))
        x_d = self.add_d4(x_d, _upsample(self.diff4(x), size))
        temp_d = x_d

        x_ = self.layer5_(self.relu(x_))
        x_d = self.layer5_d(self.relu(x_d))
        x = _upsample(self.spp(self.layer5(x)), size)
        out: torch.Tensor = self.final_layer(self.dfm(x_, x, x_d))
        if self.augment:
            return self.seghead_p(temp_p), out, self.seghead_d(temp_d)
        return out


def pidnet_s(num_classes: int = 19, augment: bool = False) -> nn.Module:
    """PIDNet-S (m=2, n=3, planes=32, ppm_planes=96, head_planes=128), freshly initialised.

    Returned in eval mode. `augment=False`: `forward(x)` gives `(N, num_classes, H/8, W/8)`
    logits. `augment=True`: `(aux P logits, main logits, boundary logits)`, the official training
    outputs; its state_dict is a superset of the `augment=False` one.
    """
    model = PIDNet(
        m=2,
        n=3,
        num_classes=num_classes,
        planes=32,
        ppm_planes=96,
        head_planes=128,
        augment=augment,
    )
    return model.eval()


def inference_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a (training or official) state_dict that an `augment=False` model has.

    Official checkpoints are saved from a wrapper holding the network as `model` (and the loss
    modules beside it): when `model.`-prefixed keys are present only those are kept, unprefixed.
    The training heads (`TRAINING_ONLY_PREFIXES`) are dropped.
    """
    wrapped = any(key.startswith("model.") for key in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if wrapped and not key.startswith("model."):
            continue
        name = key.removeprefix("model.") if wrapped else key
        if not name.startswith(TRAINING_ONLY_PREFIXES):
            out[name] = value
    return out
