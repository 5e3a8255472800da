"""The backend protocol: availability, lazy preparation, and a runner per stage.

A backend turns the case's model into something that runs (eager PyTorch, a fake-quant model,
an ONNX Runtime session, a TensorRT engine). Building artefacts is lazy and cached; comparison,
metrics and timing never know which backend produced a tensor.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from harness.cache import Cache
    from harness.cases import Case
    from harness.program import Program


@dataclass
class PrepareContext:
    """What a backend may use to prepare its runner; every callable is lazy and memoised.

    `float_onnx()` and `qdq_onnx(layout, weight_codes)` are the case's cached exports
    (`harness.export.artifacts`), shared by every backend that takes ONNX; `qdq_onnx` exports the
    deployed int8 model. `quantized_model()` is the PTQ model (calibrated), `qat_model()` the
    quantization-aware-trained one (`quant.qat.checkpoint`), `deployed_model()` the one the int8
    kernels run (QAT under `quant.qat.deploy`, else PTQ) with identity `deployed_key()` and a
    description for reports, `deployed_source()`.
    """

    case: Case
    cache: Cache
    device: torch.device
    program: Callable[[nn.Module], Program]
    float_model: Callable[[], nn.Module]
    quantized_model: Callable[[], nn.Module]
    stage_feeds: Callable[[], dict[str, dict[str, torch.Tensor]]]
    model_key: str
    quant_key: Callable[[], str]
    qat_model: Callable[[], nn.Module]
    deployed_model: Callable[[], nn.Module]
    deployed_key: Callable[[], str]
    deployed_source: Callable[[], str]
    float_onnx: Callable[[], dict[str, Path]]
    qdq_onnx: Callable[[Literal["tensorrt", "onnxruntime"], Literal["int8", "uint8"]], dict[str, Path]]


@dataclass
class Runner(abc.ABC):
    """Runs the stages of one prepared backend."""

    info: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    @abc.abstractmethod
    def run_stage(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one stage on named inputs; outputs are float32/int tensors on any device."""

    def timed_call(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """A zero-argument callable that runs `stage` once on `feeds` bound in advance and
        returns only when the work is finished (device synchronised); used by benchmarks."""
        def call() -> None:
            self.run_stage(stage, feeds)
        return call

    def close(self) -> None:  # noqa: B027 - optional hook; runners without resources need nothing
        """Release sessions, engines and device memory."""


class Backend(abc.ABC):
    """A family member such as ort-int8: says whether it can run here and prepares a runner."""

    name: ClassVar[str]
    precision: ClassVar[str]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run with `device`, else the skip reason shown to users."""
        return None

    @abc.abstractmethod
    def prepare(self, ctx: PrepareContext) -> Runner:
        """Build (or load from the cache) what this backend needs and return its runner."""
