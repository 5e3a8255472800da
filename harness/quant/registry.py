"""Registries that models fill: which float layer types are quantizable, and named rules.

The quantization library knows torch's own layers (Conv2d, ConvTranspose2d, Linear, registered
by `harness.quant.modules`); a model library registers its own layer types (the zoo's `Add` and
`Concat` join modules) and rules (the zoo's ResNet residual rule) here, the way Model Optimizer's
`QuantModuleRegistry` is filled, so the library never imports a model.

A join (`join="add"` / `"concat"`) is a layer whose quantized version shares one input quantizer
among its inputs by default; the `shared_add` / `shared_concat` rules act on joins of that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from harness.registry import Registry

if TYPE_CHECKING:
    from harness.quant.rules import Rule
    from harness.quant.tensor_quantizer import QuantDescriptor

Convert = Callable[[nn.Module, "QuantDescriptor", "QuantDescriptor"], nn.Module]
JoinKind = Literal["add", "concat"]


@dataclass(frozen=True)
class Quantizable:
    """A float layer type and how to make its quantized version.

    `convert(module, input_desc, weight_desc)` returns the quantized layer; `quantized_inputs`
    says how many positional inputs it quantizes (None: all of them); `join` marks add / concat
    layers for the sharing rules.
    """

    float_type: type[nn.Module]
    convert: Convert
    quantized_inputs: int | None = 1
    join: JoinKind | None = None


_QUANTIZABLE: dict[type[nn.Module], Quantizable] = {}
RULES: Registry[Callable[[], Rule]] = Registry("quantization rule")


def register_quantizable(float_type: type[nn.Module], convert: Convert, *, quantized_inputs: int | None = 1,
                         join: JoinKind | None = None) -> None:
    """Make layers of exactly `float_type` quantizable (subclasses register themselves)."""
    _QUANTIZABLE[float_type] = Quantizable(float_type, convert, quantized_inputs, join)


def quantizable(module: nn.Module) -> Quantizable | None:
    """The registration of `module`'s exact type, or None when it is not quantizable."""
    return _QUANTIZABLE.get(type(module))


def float_types(join: JoinKind | None = None) -> tuple[type[nn.Module], ...]:
    """Every registered float layer type (only the joins of kind `join` when given)."""
    return tuple(t for t, q in _QUANTIZABLE.items() if join is None or q.join == join)


def register_rule(name: str, factory: Callable[[], Rule]) -> None:
    """Make a rule available to `QuantConfig.rules` and case files under `name`."""
    RULES.register(name, factory, replace=True)
