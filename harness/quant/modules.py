"""Quantized layers: ordinary torch layers plus input and weight TensorQuantizers.

`QuantConv2d`, `QuantConvTranspose2d` and `QuantLinear` quantize their input (per tensor,
histogram calibration by default) and their weight (per output channel, max calibration: axis 0,
axis 1 for ConvTranspose2d whose weight is `[in, out/groups, kH, kW]`). `QuantAdd` and
`QuantConcat` are the quantized versions of join layers (a model library registers its add /
concat modules for them in `harness.quant.registry`): by default one quantizer is shared by all
inputs; any input can get its own quantizer or none (`set_input_quantizer`), which is how rules
such as a residual add that quantizes only its identity input are expressed.

Every quantized layer exposes the same small interface used by rules and calibration:
`num_quantized_inputs`, `get_input_quantizer(i)` / `set_input_quantizer(i, q_or_None)` and,
for layers with weights, `weight_quantizer` plus `calibrate_weight()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import QuantError
from harness.quant.registry import register_quantizable
from harness.quant.tensor_quantizer import QuantDescriptor, QuantMode, TensorQuantizer

DEFAULT_INPUT_DESC = QuantDescriptor(calibrator="histogram", method="percentile")
DEFAULT_WEIGHT_DESC = QuantDescriptor(axis=0)


def _as_quantizer(q: nn.Module) -> TensorQuantizer | None:
    return q if isinstance(q, TensorQuantizer) else None


class QuantModule(nn.Module):
    """Base of quantized layers: access to the quantizer of each input (None = not quantized)."""

    num_quantized_inputs: int | None = 1  # None: any number (QuantConcat)

    def get_input_quantizer(self, index: int) -> TensorQuantizer | None:
        """The quantizer applied to positional input `index`, or None."""
        raise NotImplementedError

    def set_input_quantizer(self, index: int, quantizer: TensorQuantizer | None) -> None:
        """Apply `quantizer` (None: nothing) to positional input `index`."""
        raise NotImplementedError

    def input_quantizers(self) -> list[TensorQuantizer]:
        """The distinct quantizers this layer applies to its inputs."""
        raise NotImplementedError


class _QuantWeighted(QuantModule):
    """Shared code of layers with one input quantizer and one weight quantizer."""

    input_quantizer: nn.Module
    weight_quantizer: TensorQuantizer

    def _init_quantizers(self, input_desc: QuantDescriptor, weight_desc: QuantDescriptor) -> None:
        self.input_quantizer = TensorQuantizer(input_desc)
        self.weight_quantizer = TensorQuantizer(weight_desc)

    def get_input_quantizer(self, index: int) -> TensorQuantizer | None:
        self._check_index(index)
        return _as_quantizer(self.input_quantizer)

    def set_input_quantizer(self, index: int, quantizer: TensorQuantizer | None) -> None:
        self._check_index(index)
        self.input_quantizer = quantizer if quantizer is not None else nn.Identity()

    def input_quantizers(self) -> list[TensorQuantizer]:
        q = _as_quantizer(self.input_quantizer)
        return [] if q is None else [q]

    def calibrate_weight(self) -> None:
        """Calibrate the weight quantizer once from the current weight (skipped when disabled)."""
        wq = self.weight_quantizer
        if wq.mode is QuantMode.DISABLED:
            return
        wq.reset_calibration()
        weight: torch.Tensor = self.weight  # type: ignore[assignment]
        wq.calibrator.collect(weight.detach())
        amax = wq.compute_amax()
        if amax is None:
            raise QuantError(f"quantizer '{wq.label}': weight calibration produced no amax")
        wq.load_amax(amax)
        wq.check_amax()

    def _check_index(self, index: int) -> None:
        if index != 0:
            raise QuantError(f"{type(self).__name__} has one quantized input, not input {index}")


def _weight_desc_for_axis(desc: QuantDescriptor, axis: int) -> QuantDescriptor:
    if desc.axis is None:
        return desc
    return QuantDescriptor(**{**desc.__dict__, "axis": axis})


class QuantConv2d(nn.Conv2d, _QuantWeighted):
    """Conv2d whose input and weight pass through quantizers (weight per output channel, axis 0)."""

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, input_desc: QuantDescriptor = DEFAULT_INPUT_DESC, weight_desc: QuantDescriptor = DEFAULT_WEIGHT_DESC
    ) -> QuantConv2d:
        """A quantized copy of `conv` sharing its parameters."""
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,  # type: ignore[arg-type]
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        q.weight = conv.weight
        q.bias = conv.bias
        q._init_quantizers(input_desc, _weight_desc_for_axis(weight_desc, 0))
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return out


class QuantConvTranspose2d(nn.ConvTranspose2d, _QuantWeighted):
    """ConvTranspose2d with quantized input and weight (weight per output channel: axis 1)."""

    @classmethod
    def from_float(
        cls,
        conv: nn.ConvTranspose2d,
        input_desc: QuantDescriptor = DEFAULT_INPUT_DESC,
        weight_desc: QuantDescriptor = DEFAULT_WEIGHT_DESC,
    ) -> QuantConvTranspose2d:
        """A quantized copy of `conv` sharing its parameters; a per-channel weight axis becomes 1."""
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
            output_padding=conv.output_padding, groups=conv.groups, bias=conv.bias is not None,  # type: ignore[arg-type]
            dilation=conv.dilation, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,  # type: ignore[arg-type]
        )
        q.weight = conv.weight
        q.bias = conv.bias
        q._init_quantizers(input_desc, _weight_desc_for_axis(weight_desc, 1))
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2, list(self.dilation)  # type: ignore[arg-type]
        )
        return F.conv_transpose2d(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias,
            self.stride, self.padding, output_padding, self.groups, self.dilation,  # type: ignore[arg-type]
        )


class QuantLinear(nn.Linear, _QuantWeighted):
    """Linear with quantized input (per tensor) and weight (per output feature, axis 0)."""

    @classmethod
    def from_float(
        cls, linear: nn.Linear, input_desc: QuantDescriptor = DEFAULT_INPUT_DESC, weight_desc: QuantDescriptor = DEFAULT_WEIGHT_DESC
    ) -> QuantLinear:
        """A quantized copy of `linear` sharing its parameters."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q._init_quantizers(input_desc, _weight_desc_for_axis(weight_desc, 0))
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class _QuantJoin(QuantModule):
    """Inputs pass through `input_quantizer` (shared) unless `input_overrides[str(i)]` says otherwise."""

    input_quantizer: nn.Module

    def __init__(self, input_desc: QuantDescriptor = DEFAULT_INPUT_DESC) -> None:
        super().__init__()
        self.input_quantizer = TensorQuantizer(input_desc)
        self.input_overrides = nn.ModuleDict()

    def _quantizer_module(self, index: int) -> nn.Module:
        key = str(index)
        if key in self.input_overrides:  # ModuleDict has no .get
            return self.input_overrides[key]
        return self.input_quantizer

    def get_input_quantizer(self, index: int) -> TensorQuantizer | None:
        self._check_index(index)
        return _as_quantizer(self._quantizer_module(index))

    def set_input_quantizer(self, index: int, quantizer: TensorQuantizer | None) -> None:
        """Give input `index` its own quantizer (or none); `set_shared_quantizer` for all inputs."""
        self._check_index(index)
        self.input_overrides[str(index)] = quantizer if quantizer is not None else nn.Identity()
        if self.num_quantized_inputs is not None and all(
            str(i) in self.input_overrides for i in range(self.num_quantized_inputs)
        ):
            self.input_quantizer = nn.Identity()

    def set_shared_quantizer(self, quantizer: TensorQuantizer | None) -> None:
        """Use one quantizer (or none) for every input, dropping per-input overrides."""
        self.input_overrides = nn.ModuleDict()
        self.input_quantizer = quantizer if quantizer is not None else nn.Identity()

    def input_quantizers(self) -> list[TensorQuantizer]:
        found: list[TensorQuantizer] = []
        for m in [self.input_quantizer, *self.input_overrides.values()]:
            q = _as_quantizer(m)
            if q is not None and all(q is not f for f in found):
                found.append(q)
        return found

    def _check_index(self, index: int) -> None:
        if index < 0 or (self.num_quantized_inputs is not None and index >= self.num_quantized_inputs):
            raise QuantError(f"{type(self).__name__} has no input {index}")

    def _quantize_inputs(self, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [self._quantizer_module(i)(x) for i, x in enumerate(xs)]


class QuantAdd(_QuantJoin):
    """A two-input sum with quantized inputs: `forward(a, b) == qa(a) + qb(b)`, qa is qb by default."""

    num_quantized_inputs = 2

    @classmethod
    def from_float(cls, add: nn.Module, input_desc: QuantDescriptor = DEFAULT_INPUT_DESC) -> QuantAdd:
        """A quantized replacement of the two-input sum `add` with one shared input quantizer."""
        del add
        return cls(input_desc)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa, qb = self._quantize_inputs((a, b))
        return qa + qb


class QuantConcat(_QuantJoin):
    """A concatenation with quantized inputs (one shared quantizer for all inputs by default)."""

    num_quantized_inputs = None

    def __init__(self, dim: int = 1, input_desc: QuantDescriptor = DEFAULT_INPUT_DESC) -> None:
        super().__init__(input_desc)
        self.dim = dim

    @classmethod
    def from_float(cls, concat: nn.Module, input_desc: QuantDescriptor = DEFAULT_INPUT_DESC) -> QuantConcat:
        """A quantized replacement of `concat` (same `dim`, default 1) with one shared input quantizer."""
        return cls(int(getattr(concat, "dim", 1)), input_desc)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._quantize_inputs(xs), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def weighted_modules(model: nn.Module) -> list[tuple[str, _QuantWeighted]]:
    """(name, module) of every quantized layer with a weight quantizer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantWeighted)]


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """(name, module) of every quantized layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def _conv_like(cls: type[QuantConv2d] | type[QuantConvTranspose2d] | type[QuantLinear]) -> Callable[
        [nn.Module, QuantDescriptor, QuantDescriptor], nn.Module]:
    def convert(module: nn.Module, input_desc: QuantDescriptor, weight_desc: QuantDescriptor) -> nn.Module:
        return cls.from_float(module, input_desc, weight_desc)  # type: ignore[arg-type]
    return convert


register_quantizable(nn.Conv2d, _conv_like(QuantConv2d))
register_quantizable(nn.ConvTranspose2d, _conv_like(QuantConvTranspose2d))
register_quantizable(nn.Linear, _conv_like(QuantLinear))


def add_converter(module: nn.Module, input_desc: QuantDescriptor, weight_desc: QuantDescriptor) -> nn.Module:
    """`register_quantizable` converter for a model's two-input add module (a `QuantAdd`)."""
    del weight_desc
    return QuantAdd.from_float(module, input_desc)


def concat_converter(module: nn.Module, input_desc: QuantDescriptor, weight_desc: QuantDescriptor) -> nn.Module:
    """`register_quantizable` converter for a model's concat module (a `QuantConcat`, its `dim`)."""
    del weight_desc
    return QuantConcat.from_float(module, input_desc)
