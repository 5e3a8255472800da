"""Eager PyTorch backends: torch-fp32 (CPU or CUDA) and torch-fp16 (CUDA only)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.backends.base import Backend, PrepareContext, Runner
from harness.environment import cuda_available, device_name
from harness.program import Program


@dataclass
class EagerRunner(Runner):
    """Runs a program's stages eagerly on one device in one dtype."""

    program: Program | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def run_stage(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cast float inputs to the runner's dtype on its device; outputs come back float32."""
        assert self.program is not None
        with torch.inference_mode():
            outputs = self.program.stages[stage](self._to_device(feeds))
        return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}

    def timed_call(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Inputs already on the device; the call synchronises CUDA before returning."""
        assert self.program is not None
        bound = self._to_device(feeds)
        module = self.program.stages[stage]
        cuda = self.device.type == "cuda"

        def call() -> None:
            with torch.inference_mode():
                module(bound)
            if cuda:
                torch.cuda.synchronize()
        return call

    def _to_device(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in feeds.items()
        }

    def close(self) -> None:
        """Drop the model and free cached CUDA memory."""
        self.program = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def eager_runner(model: nn.Module, program: Callable[[nn.Module], Program], device: torch.device,
                 dtype: torch.dtype, precision_note: str) -> EagerRunner:
    """Move `model` to `device`/`dtype` and wrap its program in an EagerRunner."""
    model = model.to(device=device, dtype=dtype).eval()
    info = {"provider": f"torch {torch.__version__}", "device": device_name(device), "precision": precision_note}
    return EagerRunner(info=info, program=program(model), device=device, dtype=dtype)


def disable_tf32() -> None:
    """Make CUDA float32 matmul/conv real float32 (TF32 would blur golden compares)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class TorchFP32(Backend):
    """Eager float32 PyTorch on the session's device (TF32 off on CUDA)."""

    name = "torch-fp32"
    precision = "fp32"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """The float model on ctx.device in float32."""
        if ctx.device.type == "cuda":
            disable_tf32()
        return eager_runner(ctx.float_model(), ctx.program, ctx.device, torch.float32, "fp32")


class TorchFP16(Backend):
    """Eager half-precision PyTorch; CUDA only (CPU half kernels are slow and not deployed)."""

    name = "torch-fp16"
    precision = "fp16"

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Skip without CUDA, or when the session is pinned to the CPU."""
        if not cuda_available():
            return "torch-fp16 needs a CUDA device: no CUDA device"
        if device.type != "cuda":
            return "torch-fp16 needs a CUDA device: --device is cpu"
        return None

    def prepare(self, ctx: PrepareContext) -> Runner:
        """The float model on CUDA in half precision."""
        return eager_runner(ctx.float_model(), ctx.program, ctx.device, torch.float16, "fp16")
