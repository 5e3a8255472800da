"""fakequant-int8 and qat-int8: the calibrated (PTQ) and the quantization-aware-trained model with
Q/DQ fake quantization, run eagerly in float32."""

from __future__ import annotations

import copy

import torch

from harness.backends.base import Backend, PrepareContext, Runner
from harness.backends.torch_eager import disable_tf32, eager_runner


class FakeQuantInt8(Backend):
    """PyTorch with every quantizer in quantize mode (CPU or CUDA), the accuracy model of int8."""

    name = "fakequant-int8"
    precision = "int8"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """A private copy of the shared calibrated model on ctx.device."""
        if ctx.device.type == "cuda":
            disable_tf32()
        model = copy.deepcopy(ctx.quantized_model())
        return eager_runner(model, ctx.program, ctx.device, torch.float32, "int8 fake-quant (fp32 Q/DQ)")


class QatInt8(Backend):
    """The quantization-aware-trained model (`quant.qat.checkpoint`) with Q/DQ fake quantization,
    run eagerly in float32 like fakequant-int8."""

    name = "qat-int8"
    precision = "int8"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """A private copy of the shared QAT model on ctx.device."""
        if ctx.device.type == "cuda":
            disable_tf32()
        model = copy.deepcopy(ctx.qat_model())
        return eager_runner(model, ctx.program, ctx.device, torch.float32, "int8 fake-quant (fp32 Q/DQ), QAT weights")
