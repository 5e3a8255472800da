"""Per-layer quantization errors of a case's calibrated model on its golden inputs (cached).

`case_layers(ctx)` runs `harness.quant.analysis.layer_errors` on every stage of the case's
calibrated model with that stage's golden inputs (`ctx.stage_feeds()`), says why each float
layer is float (the case's `keep_float` / `exclude` / `include` pattern, or its type), and keeps
the result in the case's cache keyed by the quantized model's identity and the feeds. The
`layers` item, the sensitivity ranking and metric-gate failure messages share it.

`ort_float_layers(ctx, stage_layers)` reads ONNX Runtime's optimized graph of the case's
ONNX-Runtime-layout Q/DQ export and names the quantized layers that still run a float
convolution there (ConvTranspose has no integer kernel on ONNX Runtime's CPU provider).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from harness.backends.registry import backend_info
from harness.cache import content_key
from harness.cases import QuantSpec
from harness.errors import HarnessError
from harness.quant.analysis import LayerError, layer_errors, worst
from harness.quant.transform import keep_float_index, name_matches

if TYPE_CHECKING:
    from harness.context import CaseContext

LAYERS_FILE = "layers.json"
VERSION = 1


@dataclass(frozen=True)
class StageLayers:
    """The per-layer errors of one stage (layer names relative to the whole model)."""

    stage: str
    errors: tuple[LayerError, ...]


def float_reason(spec: QuantSpec, name: str, quantizable_type: bool) -> str:
    """Why layer `name` (full module name) of a case stays float, from the case's patterns."""
    index = keep_float_index(name, spec.keep_float)
    if index is not None:
        return f"keep_float '{spec.keep_float[index]}'"
    excluded = next((p for p in spec.exclude if name_matches(name, (p,))), None)
    if excluded is not None:
        return f"exclude '{excluded}'"
    if not name_matches(name, spec.include):
        return "not in include"
    return "kept float by the quantizer" if quantizable_type else "not a quantizable type"


def _feeds_digest(feeds: dict[str, dict[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for stage in sorted(feeds):
        for name in sorted(feeds[stage]):
            t = feeds[stage][name].detach().cpu().contiguous()
            digest.update(f"{stage}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _model_names(model: nn.Module, stage: nn.Module) -> dict[str, str]:
    """Names of the layers under a stage module (relative to it) -> their names in the whole
    model; a stage may be a submodule or a wrapper holding the model (FastBEV's `pre`)."""
    full = {id(m): n for n, m in model.named_modules()}
    names = {rel: full[id(m)] for rel, m in stage.named_modules() if rel and id(m) in full}
    if not names and id(stage) not in full:
        raise HarnessError(f"stage module {type(stage).__name__} holds no layer of the quantized model")
    return names


def case_layers(ctx: CaseContext) -> dict[str, StageLayers]:
    """Per-layer errors of every stage of the case's calibrated model on the golden inputs
    (computed once, then read from the cache). Names are full module names of the model."""
    feeds = ctx.stage_feeds()
    key = content_key("layers", VERSION, ctx.quant_key, _feeds_digest(feeds))

    def build(folder: Path) -> None:
        result = {s: [e.to_dict() for e in errors] for s, errors in _compute(ctx, feeds).items()}
        (folder / LAYERS_FILE).write_text(json.dumps(result), encoding="utf-8")

    folder = ctx.cache.entry(f"{ctx.case.name}/layers", key, build)
    data = json.loads((folder / LAYERS_FILE).read_text(encoding="utf-8"))
    return {s: StageLayers(s, tuple(LayerError.from_dict(e) for e in rows)) for s, rows in data.items()}


def _compute(ctx: CaseContext, feeds: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[LayerError]]:
    from harness.quant.registry import quantizable

    model = copy.deepcopy(ctx.quantized_model()).to(ctx.options.device)
    program = ctx.program(model)
    spec = ctx.case.spec.quant
    out: dict[str, list[LayerError]] = {}
    for stage_name, stage in program.stages.items():
        names = _model_names(model, stage.module)
        batch = tuple(feeds[stage_name][n].to(ctx.options.device) for n in stage.inputs)
        reasons = {n: float_reason(spec, names.get(n, n), quantizable(m) is not None)
                   for n, m in stage.module.named_modules() if n}
        errors = layer_errors(stage.module, [batch], float_reasons=reasons)
        out[stage_name] = [LayerError.from_dict({**e.to_dict(), "name": names.get(e.name, e.name)}) for e in errors]
    return out


def ort_float_layers(ctx: CaseContext) -> dict[str, str] | str:
    """{layer name: ONNX Runtime op} for quantized layers that run a float convolution in ONNX
    Runtime's optimized graph of the ONNX-Runtime-layout export, or a sentence saying why this
    was not checked (the case runs no CPU int8 ONNX backend, or the export failed)."""
    from harness.export.qdq import int8_report, optimize_with_onnxruntime, resolve_module

    onnx_int8 = [b for b in ctx.case.spec.backends
                 if (info := backend_info(b)).graph == "onnx" and info.quantized and not info.needs_cuda]
    if not onnx_int8:
        return "not checked: the case runs no int8 ONNX backend on CPU"
    reason = ctx.adapter.unsupported_reason(backend_info(onnx_int8[0]), ctx.options.device)
    if reason:
        return f"not checked: {reason}"
    model = ctx.quantized_model()
    program = ctx.program(model)
    found: dict[str, str] = {}
    try:
        paths = ctx.qdq_onnx("onnxruntime")
        with tempfile.TemporaryDirectory() as tmp:
            for stage_name, path in paths.items():
                stage = program.stages[stage_name]
                names = _model_names(model, stage.module)
                report = int8_report(optimize_with_onnxruntime(path, Path(tmp) / f"{stage_name}.onnx"))
                for node, op in report.float_convs:
                    name, module = resolve_module(stage.module, node)
                    if module is not None:
                        found[names.get(name, name)] = op
    except (HarnessError, ImportError, OSError) as exc:
        return f"not checked: {exc}"
    return found


def worst_layers_text(ctx: CaseContext, k: int = 5) -> str:
    """A few lines naming the `k` layers with the lowest alone SNR (every stage), for failure
    messages; a sentence saying why when they cannot be computed."""
    try:
        layers = case_layers(ctx)
    except HarnessError as exc:
        return f"worst layers: not available ({exc})"
    ranked = worst([e for s in layers.values() for e in s.errors], k)
    if not ranked:
        return "worst layers: no quantized layer was reached"
    lines = [f"worst {len(ranked)} layers by SNR with only that layer int8 (golden inputs):"]
    lines += [f"  {e.name:<40} {e.type:<18} alone {e.alone_snr_db:7.2f} dB  accumulated "
              f"{e.accumulated_snr_db:7.2f} dB" for e in ranked]
    return "\n".join(lines)
