"""Small building blocks shared by the zoo's BEV models (mmcv-style `ConvModule`)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvModule", "init_kaiming"]


class ConvModule(nn.Module):
    """Conv2d, then optional BatchNorm2d and ReLU, named `conv`, `bn`, `activate` as mmcv's.

    The conv has no bias when a BN follows it (mmcv's `bias='auto'`). Quantization rules and
    checkpoints refer to the conv as `<name>.conv`, as in the deployment guides.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        norm: bool = True,
        act: bool = True,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=not norm
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        if self.activate is not None:
            out = self.activate(out)
        return out


def init_kaiming(module: nn.Module) -> None:
    """He-normal (fan_in, ReLU gain) conv weights, zero conv biases, unit BN, in place.

    Random-weight zoo models use it so activations keep their scale through deep stacks of
    convs (PyTorch's default init shrinks them layer by layer).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
