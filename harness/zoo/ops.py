"""Tensor joins as modules (add, concat) so quantization can find and replace them.

Models in the zoo write residual additions and concatenations through these modules rather
than `x + y` / `torch.cat`, so `harness.quant` can swap them for quantized versions whose
inputs go through (shared) quantizers, as the deployment guides require. Both are registered
with `harness.quant.registry` as joins (`QuantAdd` / `QuantConcat`) when this module is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.quant.modules import add_converter, concat_converter
from harness.quant.registry import register_quantizable


class Add(nn.Module):
    """Elementwise sum of two tensors: `forward(a, b) == a + b`."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    """Concatenation along `dim`: `forward(*xs) == torch.cat(xs, dim)`."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


register_quantizable(Add, add_converter, quantized_inputs=2, join="add")
register_quantizable(Concat, concat_converter, quantized_inputs=None, join="concat")
