"""TensorQuantizer: an nn.Module that calibrates an int8 range and fake-quantizes with it.

Quantization is 8-bit, symmetric, zero point 0, `scale = amax / 127` (float32), per tensor or
per channel along `axis`. The fake quantization is exactly what ONNX Runtime computes for
`QuantizeLinear -> DequantizeLinear` with that scale:

    q   = clamp(round_half_to_even(x / scale), -128, 127)      # full int8 range, narrow_range off
    out = q * scale                                            # -0.0 never appears (q is an int)

Eager PyTorch evaluates that formula directly (division, `torch.round`, clamp, multiply, all
float32). Under `torch.onnx.export` the same quantizer emits `torch.fake_quantize_per_tensor_affine`
/ `..._per_channel_affine`, which the exporter writes as `QuantizeLinear`/`DequantizeLinear`.
The eager path does not call those functions because they multiply by a precomputed `1/scale`
instead of dividing by `scale`: that differs from ONNX Runtime (and TensorRT) for inputs whose
`x / scale` lies within an ulp of a half-integer, and returns +0.0 where the division gives -0.0.
NVIDIA Model Optimizer's fake quantization is a third variant: `scale' = 127 / amax`,
`out = clamp(round(x * scale'), ...) / scale'`; its outputs differ from ONNX Runtime's in the last
ulp for many elements and its codes differ at near-ties. `tests/test_quant_tensor_quantizer.py`
proves the eager path bit-equal to ONNX Runtime and measures the other two.

Training (quantization-aware training, `harness.quant.qat`): outside ONNX export the quantizer's
forward is an autograd function whose forward is exactly the formula above and whose backward is
the straight-through estimator: the gradient passes to `x` where `round(x / scale)` lies in
[-128, 127] and is 0 where the value was clipped (pytorch-quantization's / Model Optimizer's
clipped STE). When `amax` is a learnable parameter (`make_amax_learnable`) it gets the LSQ
gradient (Esser et al., "Learned Step Size Quantization", ICLR 2020) of the step s = amax / 127:
d out / d s is `round(x/s) - x/s` inside the range and the clipped code outside, scaled by
`g = 1 / sqrt(numel_per_scale * 127)`; amax's gradient is `127 * g * dL/ds`, so that a gradient
step moves amax as LSQ moves 127 * s.

Modes are explicit: `calibrate` (collect statistics, pass x through unchanged), `quantize`
(fake-quantize; an uncalibrated quantizer raises `QuantError` naming it) and `disabled`
(identity, and left out of calibration and export). The `amax` buffer is part of `state_dict`
and loads into a quantizer of any state, calibrated or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from harness.errors import QuantError
from harness.quant.calib import HIST_METHODS, HistogramCalibrator, MaxCalibrator

QMIN = -128
QMAX = 127
CALIBRATORS: tuple[str, ...] = ("max", "histogram")
MIN_LEARNED_AMAX = 1e-6
"""A learnable amax is clamped to at least this in training forward passes (no division by 0)."""


@dataclass(frozen=True)
class QuantDescriptor:
    """How one tensor is quantized: bits, channel axis, calibrator and its amax method.

    `calibrator="max"` takes `method=None`; `calibrator="histogram"` needs `method` in
    {"percentile", "mse", "entropy"} and is per tensor only (`axis=None`), as in Model Optimizer.
    `percentile`, `num_bins`, `start_bin` and `stride` are the histogram method's parameters.
    """

    num_bits: int = 8
    axis: int | None = None
    calibrator: str = "max"
    method: str | None = None
    percentile: float = 99.99
    num_bins: int = 2048
    start_bin: int = 128
    stride: int = 1

    def __post_init__(self) -> None:
        if self.num_bits != 8:
            raise QuantError(f"num_bits: only 8-bit quantization is supported, got {self.num_bits}")
        if self.calibrator not in CALIBRATORS:
            raise QuantError(f"calibrator: unknown calibrator '{self.calibrator}' (expected one of {', '.join(CALIBRATORS)})")
        if self.calibrator == "max" and self.method is not None:
            raise QuantError(f"method: the max calibrator takes no method, got '{self.method}'")
        if self.calibrator == "histogram":
            if self.method not in HIST_METHODS:
                raise QuantError(
                    f"method: histogram calibration needs a method in {', '.join(HIST_METHODS)}, got {self.method!r}"
                )
            if self.axis is not None:
                raise QuantError(f"axis: histogram calibration is per tensor only, got axis {self.axis}")
        if not 0.0 <= self.percentile <= 100.0:
            raise QuantError(f"percentile: must be in [0, 100], got {self.percentile}")
        if self.num_bins < 1 or self.start_bin < 0 or self.stride < 1:
            raise QuantError(
                f"num_bins/start_bin/stride: need num_bins >= 1, start_bin >= 0, stride >= 1, "
                f"got {self.num_bins}/{self.start_bin}/{self.stride}"
            )

    def make_calibrator(self) -> MaxCalibrator | HistogramCalibrator:
        """A fresh calibrator of the kind this descriptor names."""
        if self.calibrator == "histogram":
            return HistogramCalibrator(num_bins=self.num_bins)
        return MaxCalibrator(axis=self.axis)


class QuantMode(StrEnum):
    """What a TensorQuantizer does in forward."""

    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"
    DISABLED = "disabled"


def amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    """The float32 int8 scale `amax / 127` (elementwise, shape kept)."""
    return amax.float() / float(QMAX)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` to int8 with `scale = amax / 127`, bit-equal to ONNX Runtime's Q -> DQ.

    Per tensor (`axis=None`, 0-d or 1-element amax) or per channel: `amax` then holds one value
    per index of `x`'s dim `axis`, in any shape with that many elements (e.g. `[C, 1, 1, 1]`).
    Computed in float32 and returned in `x`'s dtype. Inside `torch.onnx.export` this emits
    `fake_quantize_per_tensor_affine` / `fake_quantize_per_channel_affine` (QuantizeLinear +
    DequantizeLinear in the graph).
    """
    scale = amax_to_scale(amax).to(x.device)
    if torch.onnx.is_in_onnx_export():
        if axis is None:
            zero = torch.zeros((), dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero, QMIN, QMAX)
        flat = scale.reshape(-1)
        zeros = torch.zeros(flat.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, flat, zeros, axis % x.dim(), QMIN, QMAX)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale = scale.reshape(shape)
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale), QMIN, QMAX)
    return (q * scale + 0.0).to(x.dtype)


def _broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int] | None:
    """The shape that broadcasts a per-channel scale along `axis` of `x` (None per tensor)."""
    if axis is None:
        return None
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return shape


class _FakeQuantSTE(torch.autograd.Function):
    """`fake_quantize` forward; clipped straight-through gradient for x, LSQ gradient for amax."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, amax: torch.Tensor, axis: int | None) -> torch.Tensor:
        ctx.save_for_backward(x, amax)
        ctx.axis = axis
        return fake_quantize(x, amax, axis)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, amax = ctx.saved_tensors
        scale = amax_to_scale(amax).to(x.device)
        shape = _broadcast_shape(x, ctx.axis)
        if shape is not None:
            scale = scale.reshape(shape)
        y = x.float() / scale
        codes = torch.round(y)
        inside = (codes >= QMIN) & (codes <= QMAX)
        grad_x = (grad * inside).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_amax = None
        if ctx.needs_input_grad[1]:
            d_scale = torch.where(inside, codes - y, torch.clamp(codes, QMIN, QMAX))
            per_scale = x.numel() // max(amax.numel(), 1)
            # LSQ's step-size gradient g * dL/ds (g = 1/sqrt(N * 127)) for the step s = amax / 127,
            # expressed on amax so that an SGD step moves amax by 127 times LSQ's step on s.
            g = grad.float() * d_scale * (QMAX / math.sqrt(per_scale * QMAX))
            if shape is None:
                grad_amax = g.sum().reshape(amax.shape)
            else:
                dims = [d for d in range(x.dim()) if d != ctx.axis % x.dim()]
                grad_amax = g.sum(dim=dims).reshape(amax.shape)
        return grad_x, grad_amax, None


def fake_quantize_ste(x: torch.Tensor, amax: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """`fake_quantize` with straight-through gradients (values identical to `fake_quantize`)."""
    out: torch.Tensor = _FakeQuantSTE.apply(x, amax, axis)  # type: ignore[no-untyped-call]
    return out


def quantize_to_int8(x: torch.Tensor, amax: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """The int8 codes `clamp(round(x / scale), -128, 127)` that `fake_quantize` dequantizes."""
    scale = amax_to_scale(amax).to(x.device)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x.float() / scale), QMIN, QMAX).to(torch.int8)


class TensorQuantizer(nn.Module):
    """Calibrates and fake-quantizes one tensor; holds `amax` as a buffer.

    `name` is a label for error messages (set by `quantize_model` / `calibrate`).
    A fresh quantizer is in mode `quantize` without amax: running it raises `QuantError`
    until it is calibrated or an amax is loaded.
    """

    amax: torch.Tensor

    def __init__(self, descriptor: QuantDescriptor | None = None, name: str = "") -> None:
        super().__init__()
        self.descriptor = descriptor if descriptor is not None else QuantDescriptor()
        self.name = name
        self.mode = QuantMode.QUANTIZE
        self.calibrator = self.descriptor.make_calibrator()
        self.collected = 0
        self.register_buffer("amax", torch.empty(0))

    @property
    def label(self) -> str:
        """The name used in messages."""
        return self.name or "<unnamed quantizer>"

    @property
    def is_calibrated(self) -> bool:
        """True when an amax is present."""
        return self.amax.numel() > 0

    @property
    def axis(self) -> int | None:
        """The channel axis, None for per-tensor quantization."""
        return self.descriptor.axis

    @property
    def scale(self) -> torch.Tensor:
        """`amax / 127` (float32, amax's shape); raises `QuantError` when uncalibrated."""
        self._require_amax()
        return amax_to_scale(self.amax)

    def set_mode(self, mode: QuantMode | str) -> None:
        """Switch to `calibrate`, `quantize` or `disabled`."""
        self.mode = QuantMode(mode)

    def reset_calibration(self) -> None:
        """Drop collected statistics (not the amax)."""
        self.calibrator.reset()
        self.collected = 0

    @property
    def amax_is_learnable(self) -> bool:
        """True while amax is a trainable parameter (quantization-aware training)."""
        return isinstance(self.amax, nn.Parameter)

    def make_amax_learnable(self) -> None:
        """Turn the calibrated amax into an nn.Parameter (same state_dict key); QuantError when
        uncalibrated. `freeze_amax` turns it back into a buffer."""
        self._require_amax()
        if self.amax_is_learnable:
            return
        value = self.amax.detach().clone()
        del self._buffers["amax"]
        self.amax = nn.Parameter(value)

    def freeze_amax(self) -> None:
        """Make amax a buffer again (a learnable amax is detached; QuantError naming the quantizer
        when training drove it to 0, a negative value, NaN or Inf)."""
        if not self.amax_is_learnable:
            return
        value = self.amax.detach().clone()
        del self._parameters["amax"]
        self.register_buffer("amax", value)
        self.check_amax()

    def load_amax(self, amax: torch.Tensor) -> None:
        """Set amax (float32, on the buffer's device); the value is checked by `check_amax`."""
        value = amax.detach().to(device=self.amax.device, dtype=torch.float32).clone()
        if self.amax_is_learnable:
            with torch.no_grad():
                self.amax.data = value
        else:
            self.amax = value

    def compute_amax(self) -> torch.Tensor | None:
        """amax from the collected statistics with this quantizer's descriptor (None if nothing came)."""
        d = self.descriptor
        if isinstance(self.calibrator, HistogramCalibrator):
            assert d.method is not None
            return self.calibrator.compute_amax(d.method, percentile=d.percentile, start_bin=d.start_bin, stride=d.stride)
        return self.calibrator.compute_amax()

    def check_amax(self) -> None:
        """Raise `QuantError` naming this quantizer when amax is missing, 0, negative, NaN or Inf."""
        self._require_amax()
        bad = ~torch.isfinite(self.amax) | (self.amax <= 0)
        if bool(bad.any()):
            where = "" if self.axis is None else f" at channels {torch.nonzero(bad.reshape(-1)).reshape(-1).tolist()[:16]}"
            values = self.amax[bad].reshape(-1).tolist()[:4]
            raise QuantError(f"quantizer '{self.label}': invalid amax {values}{where} (must be finite and > 0)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.DISABLED:
            return x
        if self.mode is QuantMode.CALIBRATE:
            try:
                self.calibrator.collect(x)
            except QuantError as err:
                raise QuantError(f"quantizer '{self.label}': {err}") from err
            self.collected += 1
            return x
        if torch.onnx.is_in_onnx_export():  # export checks every quantizer beforehand
            return fake_quantize(x, self.amax, self.axis)
        self._require_amax()
        if torch.is_grad_enabled() and (x.requires_grad or self.amax.requires_grad):
            amax = self.amax.clamp_min(MIN_LEARNED_AMAX) if self.amax_is_learnable else self.amax
            return fake_quantize_ste(x, amax, self.axis)
        return fake_quantize(x, self.amax, self.axis)

    def _require_amax(self) -> None:
        if not self.is_calibrated:
            raise QuantError(f"quantizer '{self.label}' is not calibrated (no amax)")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "amax"
        if key in state_dict and not self.amax_is_learnable:
            self.amax = torch.empty_like(state_dict[key], device=self.amax.device, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        d = self.descriptor
        how = d.calibrator if d.method is None else f"{d.calibrator}/{d.method}"
        axis = "per-tensor" if d.axis is None else f"axis={d.axis}"
        amax = "uncalibrated" if not self.is_calibrated else f"amax shape {tuple(self.amax.shape)}"
        if self.amax_is_learnable:
            amax += " (learnable)"
        return f"{how}, {axis}, mode={self.mode.value}, {amax}"
