"""Cached ONNX artefacts of a program: the float export and the Q/DQ exports of the calibrated model.

Builders take the cache, a namespace (usually the case name), the identity of what is exported
(`identity`: a content key of the model's weights, graph inputs and quantization) and the
program's stages; they know nothing about cases. Entries are keyed by that identity, the export
flavour, the stages' input shapes (without the batch dimension), the opset and the library
versions, so a different model, calibration or library never reuses an export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch

from harness.cache import Cache, content_key, file_sha256
from harness.environment import library_versions
from harness.export.onnx import OPSET, export_stage
from harness.program import Program

Feeds = Mapping[str, Mapping[str, torch.Tensor]]
Layout = Literal["tensorrt", "onnxruntime"]
WeightCodes = Literal["int8", "uint8"]


def export_key(identity: str, flavour: str, feeds: Feeds) -> str:
    """Cache key of an export: identity, flavour, input shapes (dim 0 free), opset, library versions."""
    shapes = {s: {n: list(t.shape[1:]) for n, t in f.items()} for s, f in feeds.items()}
    return content_key("onnx", flavour, identity, shapes, OPSET, library_versions())


def float_onnx(cache: Cache, namespace: str, identity: str, program: Callable[[], Program],
               feeds: Feeds) -> dict[str, Path]:
    """The float ONNX of every stage of `program()` (called only when the entry is built),
    traced on `feeds`, exported once per key and shared by every backend that takes it."""
    def build(folder: Path) -> None:
        built = program()
        for name, stage in built.stages.items():
            export_stage(stage, feeds[name], folder / f"{name}.onnx")

    folder = cache.entry(f"{namespace}/onnx-fp32", export_key(identity, "fp32", feeds), build)
    return {name: folder / f"{name}.onnx" for name in feeds}


def qdq_onnx(cache: Cache, namespace: str, identity: str, program: Callable[[], Program], feeds: Feeds,
             layout: Layout, weight_codes: WeightCodes = "int8") -> dict[str, Path]:
    """The Q/DQ ONNX of every stage of the calibrated `program()` in `layout` (TensorRT's: Q/DQ
    on conv inputs and weights; ONNX Runtime's: conv outputs quantized too so ORT runs int8
    kernels, weights as `weight_codes`), exported once per key; dim 0 stays dynamic where the
    stage's batch is. `identity` must cover the quantization (calibration) as well."""
    from harness.export.qdq import export_qdq

    def build(folder: Path) -> None:
        built = program()
        for name, stage in built.stages.items():
            example = tuple(feeds[name][n] for n in stage.inputs)
            dynamic = {n: {0: "batch"} for n in (*stage.inputs, *stage.outputs)} if stage.dynamic_batch else None
            export_qdq(stage.module, example, folder / f"{name}.onnx", layout=layout, weight_codes=weight_codes,
                       input_names=list(stage.inputs), output_names=list(stage.outputs), dynamic_axes=dynamic)

    flavour = f"qdq-{layout}" if weight_codes == "int8" else f"qdq-{layout}-{weight_codes}"
    folder = cache.entry(f"{namespace}/onnx-{flavour}", export_key(identity, flavour, feeds), build)
    return {name: folder / f"{name}.onnx" for name in feeds}


def fp16_onnx(cache: Cache, namespace: str, onnx_paths: Mapping[str, Path], qdq: bool) -> dict[str, Path]:
    """The FP16 graph of every stage's ONNX (`harness.export.fp16.to_fp16`, or
    `qdq_high_precision` when `qdq`), converted once and cached under `namespace` by the source's
    sha256, the converter's version and the conversion; returns the converted paths by stage."""
    from harness.export.fp16 import FP32_OPS, convert_file, converter_version

    converted = {}
    for stage, source in onnx_paths.items():
        key = content_key("fp16-graph", file_sha256(source), converter_version(), qdq, FP32_OPS)

        def build(folder: Path, source: Path = source, stage: str = stage) -> None:
            convert_file(source, folder / f"{stage}.onnx", high_precision_qdq=qdq)

        converted[stage] = cache.entry(f"{namespace}/onnx-fp16{'-qdq' if qdq else ''}", key, build) / f"{stage}.onnx"
    return converted
