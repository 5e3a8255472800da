"""FP16 graphs for strongly typed TensorRT (11.x): float ONNX -> FP16 ONNX, Q/DQ ONNX -> FP16 remainder.

TensorRT 11 removed the builder precision flags (`BuilderFlag.FP16`, `INT8`): an engine runs in
the types its ONNX graph declares. These pure functions write the precision into the graph with
onnxconverter-common's float16 converter (Microsoft's, the one onnxmltools and ONNX Runtime's
transformer tools use; chosen over ModelOpt AutoCast because it is a small pure-Python package
with no CUDA or TensorRT dependency, so the converted graphs are produced and checked on any CI
machine, and its op block list expresses "keep these ops in FP32" directly):

* `to_fp16`: every float32 tensor and initializer becomes float16, graph inputs and outputs stay
  float32 (a Cast at each end), and numerically sensitive ops (`FP32_OPS`: Softmax, reductions,
  normalisations, Exp/Log/Pow, plus the converter's defaults such as Resize, TopK, NMS) keep
  float32 with Casts around them;
* `qdq_high_precision`: the same over a Q/DQ graph with QuantizeLinear / DequantizeLinear blocked
  as well, so their scales, zero points and float sides stay float32 (opset 17 requires float32
  scales) and everything outside the quantized regions runs in FP16: TensorRT 10's
  `--int8 --fp16` written into the graph.

Nothing here knows about cases; callers key the results by the source graph's sha256 and
`converter_version()`.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from harness.atomic import write_bytes_atomic
from harness.errors import ExportError

CONVERTER = "onnxconverter-common"

# Ops kept in float32 on top of the converter's own block list: softmax, reductions (sums and
# means of many fp16 values lose digits), normalisations and the exponential family.
FP32_OPS: tuple[str, ...] = (
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "ReduceProd", "LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization",
    "LpNormalization", "MeanVarianceNormalization", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
    "Erf", "CumSum",
)
QDQ_OPS: tuple[str, ...] = ("QuantizeLinear", "DequantizeLinear")


def converter_version() -> str:
    """"onnxconverter-common <version>" (part of every cache key of a converted graph)."""
    try:
        return f"{CONVERTER} {importlib.metadata.version(CONVERTER)}"
    except importlib.metadata.PackageNotFoundError:
        raise ExportError(f"{CONVERTER} is not installed; it converts float ONNX to FP16 for TensorRT 11 "
                          f"(pip install {CONVERTER})") from None


def _blocked(extra: Iterable[str]) -> list[str]:
    from onnxconverter_common import float16

    return sorted({*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OPS, *extra})


def _separate_blocked_outputs(model: onnx.ModelProto, block: list[str]) -> None:
    """Put an Identity between a blocked (float32) op and the graph output it produces.

    onnxconverter-common 1.16 fails ("The downstream node of the second cast node should be
    graph output") on blocked op -> Cast(fp16) -> Cast(fp32) -> graph output, e.g. a network
    ending in Softmax; with the Identity in between the chain is no longer a removable pair.
    """
    outputs = {o.name for o in model.graph.output}
    blocked = set(block)
    added = []
    for node in model.graph.node:
        if node.op_type not in blocked:
            continue
        for i, name in enumerate(node.output):
            if name in outputs:
                node.output[i] = f"{name}__fp32"
                added.append(helper.make_node("Identity", [f"{name}__fp32"], [name], name=f"{name}__io_identity"))
    model.graph.node.extend(added)


def _convert(model: onnx.ModelProto, block: list[str], what: str) -> onnx.ModelProto:
    from onnxconverter_common import float16

    _separate_blocked_outputs(model, block)

    if any(_is_float16(t.elem_type) for t in _io_types(model)):
        raise ExportError(f"{what}: the graph already has float16 inputs or outputs; FP16 conversion expects float32")
    try:
        with warnings.catch_warnings():  # one warning per clipped tiny weight: noise, not news
            warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
            converted: onnx.ModelProto = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=block, check_fp16_ready=False)
    except Exception as exc:  # the converter raises ValueError / KeyError / onnx errors alike
        raise ExportError(f"{what}: {converter_version()} could not convert the graph to FP16: {exc}") from exc
    # The converter leaves stale float32 value_info on some tensors it re-types (around blocked
    # Resize nodes, for one); ONNX Runtime then rejects the graph. Types are re-inferred instead.
    del converted.graph.value_info[:]
    converted = onnx.shape_inference.infer_shapes(converted)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{what}: the FP16 graph from {converter_version()} is invalid: {exc}") from exc
    return converted


def _io_types(model: onnx.ModelProto) -> list[onnx.TypeProto.Tensor]:
    return [v.type.tensor_type for v in (*model.graph.input, *model.graph.output)]


def _is_float16(elem_type: int) -> bool:
    return elem_type == TensorProto.FLOAT16


def to_fp16(model: onnx.ModelProto, what: str = "ONNX model", keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of float32 `model` computing in FP16: I/O stay float32, `FP32_OPS`, the
    converter's default block list and the op types in `keep_fp32` stay float32 (with Casts).

    Raises ExportError naming `what` and the converter version when the conversion fails or the
    result does not pass the ONNX checker.
    """
    source = onnx.ModelProto()
    source.CopyFrom(model)
    return _convert(source, _blocked(keep_fp32), what)


def qdq_high_precision(model: onnx.ModelProto, what: str = "Q/DQ ONNX model") -> onnx.ModelProto:
    """A copy of Q/DQ `model` whose layers outside the quantized regions compute in FP16, while
    every QuantizeLinear / DequantizeLinear (scales, zero points, its float input or output) and
    the `FP32_OPS` stay float32; I/O stay float32. A stage without any Q/DQ (a stage the
    quantization leaves float) comes out as `to_fp16` would make it, as TensorRT 10's
    `--int8 --fp16` ran it. Raises ExportError naming `what`."""
    source = onnx.ModelProto()
    source.CopyFrom(model)
    return _convert(source, _blocked(QDQ_OPS), what)


def convert_file(source: Path, target: Path, high_precision_qdq: bool = False) -> Path:
    """Convert the ONNX file `source` (`to_fp16`, or `qdq_high_precision` when
    `high_precision_qdq`) and write it atomically to `target`; returns `target`."""
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # OSError, protobuf's DecodeError, onnx's errors alike
        raise ExportError(f"{source}: cannot read the ONNX file for FP16 conversion: {exc}") from exc
    converted = qdq_high_precision(model, str(source)) if high_precision_qdq else to_fp16(model, str(source))
    write_bytes_atomic(target, converted.SerializeToString())
    return target


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor of `model` (inputs, outputs, value_info after shape
    inference, initializers): the view the tests and reports use to say what runs in FP16."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types
