"""ONNX Runtime backends: ort-fp32 (float ONNX) and ort-int8 (Q/DQ ONNX, real int8 kernels).

The CUDA execution provider is used when onnxruntime-gpu is installed and the session's device
is CUDA; otherwise the CPU provider. The provider actually used is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from harness.backends.base import Backend, PrepareContext, Runner
from harness.environment import cpu_name, device_name

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def providers_for(device: torch.device) -> list[str]:
    """Execution providers to request: CUDA first when available and wanted, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: Path, device: torch.device, optimized_path: Path | None = None) -> Any:
    """An InferenceSession with full graph optimisation (optionally saving the optimised graph)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), sess_options=options, providers=providers_for(device))


@dataclass
class OrtRunner(Runner):
    """One InferenceSession per stage."""

    sessions: dict[str, Any] = field(default_factory=dict)

    def run_stage(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feed numpy copies of the inputs (cast to the graph's input types)."""
        session = self.sessions[stage]
        outputs = session.run(None, self._numpy_feeds(session, feeds))
        names = [o.name for o in session.get_outputs()]
        return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, outputs, strict=True)}

    def timed_call(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Inputs bound in advance: numpy arrays on the CPU provider; on the CUDA provider, torch
        CUDA tensors bound through IOBinding with outputs left on the device (no host copies in
        the timed region), synchronised before returning."""
        session = self.sessions[stage]
        bound = self._numpy_feeds(session, feeds)
        if session.get_providers()[0] != "CUDAExecutionProvider":
            def call() -> None:
                session.run(None, bound)
            return call
        binding = session.io_binding()
        keep = []
        for name, array in bound.items():
            tensor = torch.from_numpy(array).cuda()
            keep.append(tensor)
            binding.bind_input(name, "cuda", tensor.device.index or 0, array.dtype, list(array.shape),
                               tensor.data_ptr())
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def call_cuda() -> None:
            binding.synchronize_inputs()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        call_cuda.keep_alive = keep  # type: ignore[attr-defined]
        return call_cuda

    @staticmethod
    def _numpy_feeds(session: Any, feeds: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for inp in session.get_inputs():
            dtype = _NP_TYPES.get(inp.type, np.float32)
            out[inp.name] = np.ascontiguousarray(feeds[inp.name].detach().cpu().numpy(), dtype=dtype)
        return out

    def close(self) -> None:
        """Drop the sessions."""
        self.sessions.clear()


def session_runner(ctx: PrepareContext, paths: dict[str, Path], precision: str) -> OrtRunner:
    """Open one session per stage ONNX and describe the provider and device used."""
    sessions = {stage: make_session(path, ctx.device) for stage, path in paths.items()}
    provider = next(iter(sessions.values())).get_providers()[0]
    import onnxruntime as ort

    device = device_name(ctx.device) if provider == "CUDAExecutionProvider" else cpu_name()
    info = {"provider": f"onnxruntime {ort.__version__} {provider}", "device": device, "precision": precision}
    return OrtRunner(info=info, artifacts={f"onnx:{s}": str(p) for s, p in paths.items()}, sessions=sessions)


class OrtFP32(Backend):
    """ONNX Runtime on the float ONNX export (one graph per stage)."""

    name = "ort-fp32"
    precision = "fp32"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """Export every stage (cached by content hash) and open sessions."""
        return session_runner(ctx, ctx.float_onnx(), "fp32")


def ort_weight_codes(device: torch.device) -> Literal["int8", "uint8"]:
    """Weight codes for ONNX Runtime's int8 kernels on `device`: the export's "auto" choice for
    this CPU when the CPU provider runs them, int8 under the CUDA provider."""
    from harness.export.qdq import resolve_weight_codes

    return resolve_weight_codes("auto") if providers_for(device)[0] == "CPUExecutionProvider" else "int8"


class OrtInt8(Backend):
    """ONNX Runtime on the Q/DQ ONNX in ONNX Runtime's layout: QLinearConv / ConvInteger kernels.

    On x86-64 CPUs without VNNI the weights travel as uint8 (zero point 128) so that ONNX Runtime
    runs its exact U8U8 kernels instead of the U8S8 ones that saturate in int16 there
    (`harness.export.qdq`, 5.); the report's precision says which."""

    name = "ort-int8"
    precision = "int8"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """Export the deployed int8 model's stages (PTQ, or QAT under `quant.qat.deploy`) in the
        onnxruntime layout (cached) and open sessions; the runner's info says which model."""
        codes = ort_weight_codes(ctx.device)
        kernels = "U8S8" if codes == "int8" else "U8U8: U8S8 would saturate on this CPU (no VNNI)"
        runner = session_runner(ctx, ctx.qdq_onnx("onnxruntime", codes), f"int8 (QDQ, onnxruntime layout, {kernels})")
        if not ctx.case.onnx:
            runner.info["int8_model"] = ctx.deployed_source()
        return runner
