"""Float ONNX export of a stage: torch.onnx.export, onnxslim, the ONNX checker."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from harness.atomic import write_bytes_atomic
from harness.errors import ExportError
from harness.program import Stage

OPSET = 17


def export_stage(stage: Stage, feeds: Mapping[str, torch.Tensor], path: Path, *, opset: int = OPSET,
                 simplify: bool = True) -> Path:
    """Export `stage` traced on `feeds` to `path` (atomically), slimmed and checker-clean.

    The first dimension of every input and output is dynamic when `stage.dynamic_batch`.
    Raises ExportError naming the stage when tracing, slimming or checking fails.
    """
    module = stage.module.eval()
    args = tuple(feeds[n].detach().cpu() for n in stage.inputs)
    dynamic_axes = None
    if stage.dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in (*stage.inputs, *stage.outputs)}
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = Path(tmp) / "traced.onnx"
            torch.onnx.export(
                module, args, traced, input_names=list(stage.inputs), output_names=list(stage.outputs),
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
            model = onnx.load(str(traced))
    except Exception as exc:
        raise ExportError(f"stage '{stage.name}': torch.onnx.export failed: {exc}") from exc
    if simplify:
        model = slim(model, stage.name)
    check(model, stage.name)
    write_bytes_atomic(path, model.SerializeToString())
    return path


def slim(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Simplify with onnxslim (constant folding, dead-node and identity removal)."""
    import onnxslim

    try:
        slimmed = onnxslim.slim(model)
    except Exception as exc:
        raise ExportError(f"{what}: onnxslim failed: {exc}") from exc
    if not isinstance(slimmed, onnx.ModelProto):
        raise ExportError(f"{what}: onnxslim returned {type(slimmed).__name__}, not a model")
    return slimmed


def check(model: onnx.ModelProto, what: str) -> None:
    """Run the ONNX checker with shape inference; raise ExportError naming `what` on failure."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{what}: the exported ONNX is invalid: {exc}") from exc
