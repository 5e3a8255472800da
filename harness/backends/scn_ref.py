"""SCN reference backends: the exported custom-op ONNX run by qharness's own executor.

NVIDIA's 3DSparseConvolution engine is closed source, so the harness checks what it would be
given: the model is exported in NVIDIA's SCN schema (`harness.export.custom.export_scn`), the
file is validated against the loader's attribute table (`harness.export.scn_schema`: any
violation is an ExportError naming node and attribute, so every item of the backend fails before
anything runs), and `harness.export.scn_executor.ScnExecutor` runs it node by node reading only
the file.

- `scn-ref` (ScnRefFP16): the float model, BN fused into the sparse convs as NVIDIA's exporter
  does, run with fp16 storage (inputs, weights and every node's output rounded to fp16, fp32
  accumulation), as the engine's fp16 mode.
- `scn-ref-int8` (ScnRefInt8): the calibrated model of the case's quantizer
  (`quant.quantizer: harness.quant.sparse:quantize_scn_model`, the same calibration and amax
  cache as fakequant-int8), exported with its int8 precisions and dynamic ranges; the executor
  applies the ranges as fake quantization with fp32 storage, so it differs from fakequant-int8
  only where the export does.

Exports are cached by content hash (model, quantization, example shapes, index order, library
versions); the executor runs on the CPU whatever the session's device.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.backends.base import Backend, PrepareContext, Runner
from harness.cache import content_key
from harness.environment import cpu_name, library_versions
from harness.errors import ExportError
from harness.export.scn_executor import Precision, ScnExecutor

ONNX_FILE = "scn.onnx"
EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class ScnOnnx:
    """An exported, validated SCN graph in the cache and what its export measured."""

    path: Path
    num_nodes: int
    export_s: float


def _io_names(ctx: PrepareContext, model: nn.Module) -> tuple[str, str, str]:
    """(features, indices, output) names of the case's single stage; ExportError otherwise."""
    program = ctx.program(model)
    stage = program.stages.get("model")
    if not program.is_single or stage is None or len(stage.inputs) != 2 or len(stage.outputs) != 1:
        shown = {n: (list(s.inputs), list(s.outputs)) for n, s in program.stages.items()}
        raise ExportError(f"{ctx.case.name}: the SCN backends run one stage with inputs (features, indices) "
                          f"and one output, got {shown}")
    return stage.inputs[0], stage.inputs[1], stage.outputs[0]


def fused(model: nn.Module) -> nn.Module:
    """`model` with BN folded into its sparse convs by the folder its type registered (as
    NVIDIA's exporter does before tracing); models without BN as they are."""
    from harness.quant.sparse import fold_sparse_bn

    return fold_sparse_bn(model.eval())


def scn_onnx(ctx: PrepareContext, flavour: str, model: nn.Module, extra_key: str = "") -> ScnOnnx:
    """Export `model` (traced on the case's example sweep) in NVIDIA's schema, validate it and
    cache it under `flavour`; the cached file is validated again before use."""
    from harness.export import scn_schema
    from harness.export.custom import export_scn
    from harness.tasks.lidar import index_order

    features_name, indices_name, _ = _io_names(ctx, model)
    feeds = ctx.stage_feeds()["model"]
    features = feeds[features_name].float()
    indices = feeds[indices_name].int()
    order = index_order(ctx.case)

    def build(folder: Path) -> None:
        export = export_scn(model, features, indices, order=order, native_order=order)
        violations = scn_schema.validate(export.model)
        if violations:
            raise ExportError(f"{ctx.case.name}: the {flavour} SCN export has {len(violations)} schema "
                              "violation(s):\n  " + "\n  ".join(str(v) for v in violations))
        export.save(folder / ONNX_FILE)
        (folder / EXPORT_FILE).write_text(json.dumps({"seconds": export.seconds, "nodes": export.num_nodes}))

    shapes = {features_name: list(features.shape), indices_name: list(indices.shape)}
    key = content_key("scn-onnx", flavour, ctx.model_key, extra_key, shapes, order, library_versions())
    folder = ctx.cache.entry(f"{ctx.case.name}/scn-{flavour}", key, build)
    path = folder / ONNX_FILE
    scn_schema.check(path)
    measured: dict[str, Any] = json.loads((folder / EXPORT_FILE).read_text())
    return ScnOnnx(path, int(measured["nodes"]), float(measured["seconds"]))


@dataclass
class ScnRefRunner(Runner):
    """Runs the single stage through a ScnExecutor on the CPU; the output comes back float32."""

    executor: ScnExecutor | None = None
    features: str = "features"
    indices: str = "indices"
    output: str = "dense"

    def run_stage(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense output for the stage's features and indices (errors name the input and row)."""
        assert self.executor is not None
        out = self.executor(feeds[self.features], feeds[self.indices],
                            features_source=f"input '{self.features}'", indices_source=f"input '{self.indices}'")
        return {self.output: out.float()}

    def close(self) -> None:
        """Drop the executor."""
        self.executor = None


def executor_runner(ctx: PrepareContext, model: nn.Module, onnx: ScnOnnx, precision: Precision, int8: bool,
                    note: str) -> ScnRefRunner:
    """A runner executing `onnx`, described by the executor, the export and the precision."""
    features, indices, output = _io_names(ctx, model)
    import spconv

    info = {
        "provider": f"qharness SCN reference executor (spconv {spconv.__version__}, torch {torch.__version__})",
        "device": cpu_name(),
        "precision": note,
        "onnx_nodes": str(onnx.num_nodes),
        "export_s": f"{onnx.export_s:.3f}",
        "schema": "0 violations",
    }
    executor = ScnExecutor(onnx.path, precision=precision, int8=int8)
    return ScnRefRunner(info=info, artifacts={"onnx:model": str(onnx.path)}, executor=executor,
                        features=features, indices=indices, output=output)


class _ScnRef(Backend):
    def unavailable_reason(self, device: torch.device) -> str | None:
        """Skip without spconv; the executor runs on the CPU on any session device."""
        if importlib.util.find_spec("spconv") is None:
            return f"{self.name} needs spconv (pip install 'qharness[lidar]')"
        return None


class ScnRefFP16(_ScnRef):
    """The BN-fused float model's SCN export, executed with fp16 storage."""

    name = "scn-ref"
    precision = "fp16"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """Export (cached), validate and load the executor."""
        model = fused(ctx.float_model())
        onnx = scn_onnx(ctx, "fp16", model)
        return executor_runner(ctx, model, onnx, "fp16", False, "fp16 storage, fp32 accumulation")


class ScnRefInt8(_ScnRef):
    """The calibrated sparse-quantized model's SCN export with int8 ranges, executed with the
    ranges as fake quantization."""

    name = "scn-ref-int8"
    precision = "int8"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """Export the shared calibrated model with its ranges (cached), validate, load the executor."""
        model = copy.deepcopy(ctx.deployed_model())
        onnx = scn_onnx(ctx, "int8", model, extra_key=ctx.deployed_key())
        runner = executor_runner(ctx, model, onnx, "fp32", True, "int8 ranges as fake quantization (fp32 storage)")
        runner.info["int8_model"] = ctx.deployed_source()
        return runner
