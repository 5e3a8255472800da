"""fakequant-int8 and qat-int8: the calibrated (PTQ) and the quantization-aware-trained model with
Q/DQ fake quantization, run eagerly in float32."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from harness.backends.base import Backend, PrepareContext, Runner
from harness.backends.torch_eager import disable_tf32, eager_runner


class _FakeQuant(Backend):
    """A private copy of one of the case's shared fake-quant models on ctx.device (TF32 off)."""

    precision = "int8"
    description: ClassVar[str]

    def model(self, ctx: PrepareContext) -> nn.Module:
        """The shared model this backend runs."""
        raise NotImplementedError

    def prepare(self, ctx: PrepareContext) -> Runner:
        """A private copy of the shared model on ctx.device, run eagerly in float32."""
        if ctx.device.type == "cuda":
            disable_tf32()
        return eager_runner(copy.deepcopy(self.model(ctx)), ctx.program, ctx.device, torch.float32, self.description)


class FakeQuantInt8(_FakeQuant):
    """PyTorch with every quantizer in quantize mode (CPU or CUDA), the accuracy model of int8."""

    name = "fakequant-int8"
    description = "int8 fake-quant (fp32 Q/DQ)"

    def model(self, ctx: PrepareContext) -> nn.Module:
        """The calibrated (PTQ) model."""
        return ctx.quantized_model()


class QatInt8(_FakeQuant):
    """The quantization-aware-trained model (`quant.qat.checkpoint`) with Q/DQ fake quantization."""

    name = "qat-int8"
    description = "int8 fake-quant (fp32 Q/DQ), QAT weights"

    def model(self, ctx: PrepareContext) -> nn.Module:
        """The QAT model."""
        return ctx.qat_model()
