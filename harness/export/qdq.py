"""Q/DQ ONNX export of a calibrated model, in TensorRT's and in ONNX Runtime's layout.

Both layouts come from the same calibrated quantizers (`harness.quant`). The model is exported
with the TorchScript exporter (`dynamo=False`, opset 17, constant folding), every quantizer
becoming `QuantizeLinear -> DequantizeLinear` with `scale = amax / 127` and zero point 0; weight
quantizers are then folded into int8 initializers feeding a `DequantizeLinear` (per channel:
axis 0, axis 1 for ConvTranspose). The int8 codes are the ones the fake-quant model uses.

`layout="tensorrt"`: Q/DQ exactly where the quantizers are (conv / linear inputs and weights,
inputs of quantized adds and concats). TensorRT's explicit quantization fuses the rest.

`layout="onnxruntime"`: the same graph rewritten so that ONNX Runtime (1.31, CPU) fuses
`DQ -> op -> Q` into integer kernels (QLinearConv, QLinearAdd, QLinearConcat, QLinearMul,
QLinearSigmoid, int8 MaxPool) without changing what is computed:

1. activation Q/DQ use uint8 with zero point 128 instead of int8 with zero point 0 (the same
   256 values: ONNX Runtime otherwise converts lone Q/DQ pairs to uint8 itself, and a pair whose
   Q feeds two DQs stays int8, so a conv would see int8 in and uint8 out and stay float);
2. after every node whose inputs are all dequantized (conv, add, concat, relu, ...), a
   `Q -> DQ` is inserted when every path from its output reaches `QuantizeLinear` nodes with one
   common scale through ops that commute with that quantization (Relu, MaxPool, Concat,
   reshapes and transposes, nearest Resize, Identity). Since Q(s) o DQ(s) o Q(s) = Q(s) and a
   symmetric zero-point-0 quantizer commutes with ReLU and max, the outputs are unchanged: a
   conv's output is quantized before its ReLU with the scale of the quantizer that consumes it;
3. a Relu between `DQ(s)` and `Q(s)` gets the Q/DQ after it with zero point 0 (uint8), so
   ONNX Runtime drops the Relu (its ReluQuantFusion) and the clamp to [0, 127]·s stays exact;
   MaxPool and reshapes of such tensors keep zero point 0 and run on the integers;
4. a quantized conv that gets no output Q (its output reaches the graph output, a float layer,
   or quantizers with different scales) becomes
   `ConvInteger` (int8 codes, int32 accumulation; weights shifted to uint8, zero point 128)
   followed by `Cast`, `Mul(s_x * s_w)` and `Add(bias)`: the "int32 output" of a
   high-precision last layer, equal to fake quantization up to float summation order;
5. with `weight_codes="uint8"` every int8 weight initializer is shifted to uint8 with zero point
   128 (the same 255 values). ONNX Runtime then runs U8U8 kernels instead of U8S8. On x86-64
   CPUs without VNNI, MLAS's U8S8 kernels multiply with `vpmaddubsw`, which adds pairs of
   u8 x s8 products in saturating int16: activation codes near 255 (zero point 128) times
   weights near 127 overflow and the int8 model silently loses accuracy (measured on an AVX2
   EPYC: PIDNet-S logits cosine 0.979 against float instead of 0.999, mIoU -0.009). U8U8
   widens to int16 before multiplying and is exact, about 5% slower. `weight_codes="auto"`
   picks uint8 exactly where the CPU running the export saturates
   (`harness.environment.int8_gemm_saturates`).

Measured here (ORT 1.31, AVX512-VNNI): the TensorRT layout leaves float `FusedConv` between
Q/DQ in ONNX Runtime and is slower than fp32; the ONNX Runtime layout makes every conv whose
output reaches quantized consumers a QLinearConv.

Where fake quantization and ONNX Runtime can still differ (the graph itself is exact):

* integer kernels requantize: QLinearConv / QLinearAdd / QLinearConcat / QLinearMul compute
  `round(acc * s_in * s_w / s_out)` with their own fixed-point or float arithmetic, and ORT
  quantizes a float conv bias to int32 at scale `s_in * s_w`; fake quantization adds the float
  bias and rounds once in float32. Outputs differ by at most one code in rare elements;
* adds and concats whose inputs have different scales are requantized to the output scale;
  an add that quantizes only one input (a residual identity) leaves the other branch's conv
  float in ONNX Runtime (TensorRT instead fuses the add into that conv);
* a conv output that reaches float consumers or quantizers with different scales (a tensor read
  by several layers without the `shared_input` rule) gets no output Q: the conv becomes
  ConvInteger with a float output (4. above) and what follows it (ReLU, add) runs in float;
* ConvTranspose has no integer kernel in ONNX Runtime's CPU provider: it runs in float between
  DQ and Q in both layouts (exactly what fake quantization computes);
* a linear Resize runs in float between DQ and Q in both layouts (ORT does not fuse it).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from harness.errors import ExportError, QuantError
from harness.export.onnx import check_reads_inputs, tracer_warnings
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer

Layout = Literal["tensorrt", "onnxruntime"]
LAYOUTS: tuple[str, ...] = ("tensorrt", "onnxruntime")
WeightCodes = Literal["auto", "int8", "uint8"]
WEIGHT_CODES: tuple[str, ...] = ("auto", "int8", "uint8")
OPSET = 17

# ops through which a symmetric per-tensor quantization commutes exactly (data input only)
_PASS_THROUGH = {
    "Relu", "MaxPool", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
    "Identity", "Slice", "Split", "Gather", "Expand", "Resize",
}
_SHAPE_ONLY = {"Shape", "Size"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear"}
_INT8_OPS = {
    "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearAdd",
    "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConvTranspose", "DynamicQuantizeLinear",
}
_FLOAT_CONV_OPS = {"Conv", "FusedConv", "NchwcConv", "ConvTranspose"}


def _quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def check_exportable(model: nn.Module) -> None:
    """Raise `QuantError` naming every quantizer that would export without a valid amax."""
    calibrating = [n for n, q in _quantizers(model) if q.mode is QuantMode.CALIBRATE]
    if calibrating:
        raise QuantError(f"cannot export: quantizers still in calibrate mode: {', '.join(calibrating)}")
    missing = [n for n, q in _quantizers(model) if q.mode is QuantMode.QUANTIZE and not q.is_calibrated]
    if missing:
        raise QuantError(f"cannot export an uncalibrated model: quantizers without amax: {', '.join(missing)}")
    for _, q in _quantizers(model):
        if q.mode is QuantMode.QUANTIZE:
            q.check_amax()


def export_qdq(
    model: nn.Module,
    args: tuple[Any, ...],
    path: str | Path,
    *,
    layout: Layout = "tensorrt",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = OPSET,
    weight_codes: WeightCodes = "auto",
) -> Path:
    """Export calibrated `model` on example `args` to `path` as Q/DQ ONNX in `layout`; returns the path.

    The model must be float32 with every enabled quantizer calibrated (`QuantError` names the
    ones that are not). Weights become int8 initializers with DequantizeLinear; in the
    onnxruntime layout `weight_codes` may shift them to uint8 (see the module docstring, 5.).
    """
    if layout not in LAYOUTS:
        raise ExportError(f"unknown Q/DQ layout '{layout}' (expected one of {', '.join(LAYOUTS)})")
    if weight_codes not in WEIGHT_CODES:
        raise ExportError(f"unknown weight codes '{weight_codes}' (expected one of {', '.join(WEIGHT_CODES)})")
    if opset < 13:
        raise ExportError(f"Q/DQ export needs opset >= 13 (per-channel axis), got {opset}")
    check_exportable(model)
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp, tracer_warnings(type(model).__name__), torch.no_grad():
            raw = Path(tmp) / "raw.onnx"
            torch.onnx.export(
                model, args, str(raw), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_axes=dynamic_axes,
            )
            proto = onnx.load(str(raw))
    except (QuantError, ExportError):
        raise
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {err}") from err
    finally:
        model.train(was_training)
    if input_names:
        check_reads_inputs(proto, input_names, type(model).__name__)
    fold_weight_quantizers(proto)
    if layout == "onnxruntime":
        to_onnxruntime_layout(proto, resolve_weight_codes(weight_codes))
    onnx.checker.check_model(proto)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out


class _Graph:
    """Index over an ONNX graph: constants by name, producers and consumers of each tensor."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.graph = proto.graph
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.inits: dict[str, onnx.TensorProto] = {i.name: i for i in self.graph.initializer}
        self.constants: dict[str, npt.NDArray[Any]] = {n: numpy_helper.to_array(t) for n, t in self.inits.items()}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            elif node.op_type == "Identity" and node.input[0] in self.constants:
                self.constants[node.output[0]] = self.constants[node.input[0]]
        self.reindex()

    def inline_constant_identities(self) -> None:
        """Drop `Identity(initializer)` nodes (the exporter's deduplicated constants), rewiring their users."""
        for node in [n for n in self.nodes if n.op_type == "Identity" and n.input[0] in self.inits]:
            if node.output[0] in self.outputs:
                continue
            for c in self.consumers.get(node.output[0], []):
                for k, i in enumerate(c.input):
                    if i == node.output[0]:
                        c.input[k] = node.input[0]
            self.nodes.remove(node)
        self.reindex()

    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}

    def add_initializer(self, name: str, value: npt.NDArray[Any]) -> str:
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        self.constants[name] = value
        return name

    def unique(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {n.name for n in self.nodes}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def commit(self) -> None:
        used = {i for n in self.nodes for i in n.input} | {o.name for o in self.graph.output}
        self.nodes = [n for n in self.nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def _axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1


def _broadcast(values: npt.NDArray[Any], ndim: int, axis: int) -> npt.NDArray[Any]:
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return values.reshape(shape)


def fold_weight_quantizers(proto: onnx.ModelProto) -> int:
    """Replace `QuantizeLinear(float initializer)` by an int8 initializer (same codes); returns how many."""
    g = _Graph(proto)
    g.inline_constant_identities()
    folded = 0
    for node in list(g.nodes):
        if node.op_type != "QuantizeLinear" or node.input[0] not in g.inits:
            continue
        w = g.constants[node.input[0]].astype(np.float32)
        scale = g.constants[node.input[1]].astype(np.float32)
        zero = g.constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
        if np.any(zero != 0):
            raise ExportError(f"weight quantizer {node.name}: zero point must be 0")
        codes = np.clip(np.round(w / _broadcast(scale, w.ndim, _axis(node))), -128, 127).astype(np.int8)
        name = g.add_initializer(g.unique(f"{node.input[0]}_int8"), codes)
        for consumer in g.consumers.get(node.output[0], []):
            for k, i in enumerate(consumer.input):
                if i == node.output[0]:
                    consumer.input[k] = name
        g.nodes.remove(node)
        folded += 1
    g.commit()
    return folded


def _is_activation_pair(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type == "QuantizeLinear":
        return node.input[0] not in g.inits
    if node.op_type == "DequantizeLinear":
        src = node.input[0]
        return src not in g.inits and src in g.producer and g.producer[src].op_type == "QuantizeLinear"
    return False


def resolve_weight_codes(weight_codes: WeightCodes) -> Literal["int8", "uint8"]:
    """The weight encoding `weight_codes` stands for on this machine: "auto" is uint8 where this
    CPU's U8S8 int8 kernels saturate, int8 elsewhere."""
    if weight_codes == "auto":
        from harness.environment import int8_gemm_saturates

        return "uint8" if int8_gemm_saturates() else "int8"
    return weight_codes


def to_onnxruntime_layout(proto: onnx.ModelProto, weight_codes: Literal["int8", "uint8"] = "int8") -> None:
    """Rewrite a TensorRT-layout Q/DQ graph in place into ONNX Runtime's layout (see module docstring)."""
    g = _Graph(proto)
    _activations_to_uint8(g)
    _merge_duplicate_quantizers(g)
    _insert_output_quantizers(g)
    _relu_zero_points(g)
    _conv_integer_for_float_outputs(g)
    if weight_codes == "uint8":
        _weights_to_uint8(g)
    g.commit()


def _weights_to_uint8(g: _Graph) -> None:
    """Shift every int8 weight initializer read by a DequantizeLinear to uint8 with zero point 128."""
    for node in g.nodes:
        if node.op_type != "DequantizeLinear" or node.input[0] not in g.inits:
            continue
        codes = g.constants[node.input[0]]
        if codes.dtype != np.int8:
            continue
        zero = g.constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
        if zero.dtype != np.int8 or np.any(zero != 0):
            raise ExportError(f"{node.name}: expected an int8 weight zero point of 0, got {zero.dtype} {zero.reshape(-1)[:4]}")
        node.input[0] = g.add_initializer(g.unique(f"{node.input[0]}_u8"), (codes.astype(np.int16) + 128).astype(np.uint8))
        zp = g.add_initializer(g.unique(f"{node.input[0]}_zp"), np.full(zero.shape, 128, np.uint8))
        if len(node.input) > 2:
            node.input[2] = zp
        else:
            node.input.append(zp)
    g.reindex()


def _activations_to_uint8(g: _Graph) -> None:
    for node in g.nodes:
        if not _is_activation_pair(g, node):
            continue
        zero = g.constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
        if zero.dtype != np.int8 or np.any(zero != 0):
            raise ExportError(f"{node.name}: expected an int8 zero point of 0, got {zero.dtype} {zero.reshape(-1)[:4]}")
        zp = g.add_initializer(g.unique(f"{node.name}_zp_u8"), np.full(zero.shape, 128, np.uint8))
        if len(node.input) > 2:
            node.input[2] = zp
        else:
            node.input.append(zp)


def _merge_duplicate_quantizers(g: _Graph) -> None:
    """One Q (and one DQ after it) per tensor and scale: ORT fuses `op -> Q` only when the op has one consumer."""
    for kind in ("QuantizeLinear", "DequantizeLinear"):
        first: dict[tuple[str, bytes, bytes, int], onnx.NodeProto] = {}
        for node in list(g.nodes):
            if node.op_type != kind or not _is_activation_pair(g, node):
                continue
            scale, zero = _q_params(g, node)
            key = (node.input[0], scale.tobytes(), zero.tobytes(), _axis(node))
            keep = first.setdefault(key, node)
            if keep is node:
                continue
            for c in g.consumers.get(node.output[0], []):
                for k, i in enumerate(c.input):
                    if i == node.output[0]:
                        c.input[k] = keep.output[0]
            g.nodes.remove(node)
            g.reindex()


def _q_params(g: _Graph, q: onnx.NodeProto) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    return g.constants[q.input[1]], g.constants[q.input[2]]


def _terminal_quantizers(g: _Graph, tensor: str) -> list[onnx.NodeProto] | None:
    """Q nodes reached from `tensor` through pass-through ops, or None if a path leaves to anything else."""
    found: list[onnx.NodeProto] = []
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.outputs:
            return None
        for c in g.consumers.get(t, []):
            if c.op_type == "QuantizeLinear" and c.input[0] == t:
                found.append(c)
            elif c.op_type in _SHAPE_ONLY:
                continue
            elif c.op_type in _PASS_THROUGH and (c.op_type == "Concat" or c.input[0] == t) and _pass_through_ok(g, c):
                stack.extend(o for o in c.output if o)
            else:
                return None
    return found


def _pass_through_ok(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type == "Resize":
        return any(a.name == "mode" and a.s == b"nearest" for a in node.attribute)
    return True


def _inputs_dequantized(g: _Graph, node: onnx.NodeProto) -> bool:
    data = [i for i in node.input if i and i not in g.constants]
    return bool(data) and all(i in g.producer and g.producer[i].op_type == "DequantizeLinear" for i in data)


def _insert_output_quantizers(g: _Graph) -> None:
    k = 0
    while k < len(g.nodes):
        node = g.nodes[k]
        k += 1
        if node.op_type in _QUANT_OPS or node.op_type == "Constant" or len(node.output) != 1:
            continue
        if not _inputs_dequantized(g, node):
            continue
        out = node.output[0]
        consumers = g.consumers.get(out, [])
        if consumers and all(c.op_type == "QuantizeLinear" for c in consumers):
            continue
        terminals = _terminal_quantizers(g, out)
        if not terminals:
            continue
        scale, zero = _q_params(g, terminals[0])
        if scale.size != 1 or any(
            not (np.array_equal(_q_params(g, t)[0], scale) and np.array_equal(_q_params(g, t)[1], zero)) for t in terminals
        ):
            continue
        scope = terminals[0].name.rpartition("/")[0]
        tag = node.name.strip("/").replace("/", "_") or node.output[0]
        s_name = g.add_initializer(g.unique(f"{scope}/ort_out_{tag}_scale"), scale.copy())
        z_name = g.add_initializer(g.unique(f"{scope}/ort_out_{tag}_zp"), zero.copy())
        q_out, dq_out = g.unique(f"{out}_ort_q"), g.unique(f"{out}_ort_dq")
        q = helper.make_node("QuantizeLinear", [out, s_name, z_name], [q_out], name=g.unique(f"{scope}/QuantizeLinear_ort_{tag}"))
        dq = helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=g.unique(f"{scope}/DequantizeLinear_ort_{tag}"))
        for c in consumers:
            for j, i in enumerate(c.input):
                if i == out:
                    c.input[j] = dq_out
        g.nodes[k:k] = [q, dq]
        k += 2
        g.reindex()


def _relu_zero_points(g: _Graph) -> None:
    """Zero point 0 (uint8) for Q/DQ after a Relu of `DQ(s)`, and after pass-through ops of such tensors.

    The values there lie in [0, 127]·s (the Relu's input was clamped by its Q), so uint8 with
    zero point 0 represents them exactly; ONNX Runtime then drops the Relu and can run MaxPool
    and friends on the integers.
    """
    for node in g.nodes:
        if node.op_type not in _PASS_THROUGH or node.op_type == "Concat":
            continue
        src = g.producer.get(node.input[0])
        if src is None or src.op_type != "DequantizeLinear" or src.input[1] not in g.constants:
            continue
        if node.op_type != "Relu" and not (
            src.input[2] in g.constants and g.constants[src.input[2]].dtype == np.uint8 and not g.constants[src.input[2]].any()
        ):
            continue
        if not _pass_through_ok(g, node):
            continue
        scale = g.constants[src.input[1]]
        consumers = g.consumers.get(node.output[0], [])
        if not consumers or node.output[0] in g.outputs:
            continue
        if not all(c.op_type == "QuantizeLinear" and np.array_equal(g.constants[c.input[1]], scale) for c in consumers):
            continue
        for q in consumers:
            zp = g.add_initializer(g.unique(f"{q.name}_zp_relu"), np.zeros(g.constants[q.input[2]].shape, np.uint8))
            q.input[2] = zp
            for dq in g.consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    dq.input[2] = zp


def _conv_integer_for_float_outputs(g: _Graph) -> None:
    """Quantized convs whose output stays float: ConvInteger (int32 accumulation) then `* s_x * s_w + bias`.

    "Stays float" means anything but a single QuantizeLinear consumer (ONNX Runtime only fuses
    DQ -> Conv -> Q into QLinearConv when the Q is the conv's only consumer).

    This is the "int32 output" of a high-precision last layer: inputs and weights are the
    int8 codes, only the rescale runs in float, so it matches fake quantization up to float
    summation order. Weights are shifted to uint8 (zero point 128) for ONNX Runtime's kernel.
    """
    for node in list(g.nodes):
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        consumers = g.consumers.get(node.output[0], [])
        if len(consumers) == 1 and consumers[0].op_type == "QuantizeLinear" and node.output[0] not in g.outputs:
            continue  # DQ -> Conv -> Q with a single consumer: ONNX Runtime fuses it into QLinearConv
        x_dq, w_dq = g.producer.get(node.input[0]), g.producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if not _is_activation_pair(g, x_dq) or w_dq.input[0] not in g.inits:
            continue
        x_scale, x_zero = g.constants[x_dq.input[1]], g.constants[x_dq.input[2]]
        w = g.constants[w_dq.input[0]]
        w_scale = g.constants[w_dq.input[1]].astype(np.float32).reshape(-1)
        if x_scale.size != 1 or w.dtype != np.int8 or x_zero.dtype != np.uint8 or _axis(w_dq) != 0:
            continue
        tag = node.name or node.output[0]
        w_u8 = g.add_initializer(g.unique(f"{w_dq.input[0]}_u8"), (w.astype(np.int16) + 128).astype(np.uint8))
        w_zp = g.add_initializer(g.unique(f"{w_dq.input[0]}_u8_zp"), np.array(128, np.uint8))
        rescale = (np.float32(x_scale.reshape(())) * np.broadcast_to(w_scale, (w.shape[0],))).astype(np.float32)
        scale_name = g.add_initializer(g.unique(f"{tag}_int32_rescale"), rescale.reshape(1, -1, *([1] * (w.ndim - 2))))
        acc, acc_f, scaled = g.unique(f"{tag}_int32"), g.unique(f"{tag}_int32_float"), g.unique(f"{tag}_rescaled")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        new = [
            helper.make_node("ConvInteger", [x_dq.input[0], w_u8, x_dq.input[2], w_zp], [acc], name=g.unique(f"{tag}_ConvInteger"), **attrs),
            helper.make_node("Cast", [acc], [acc_f], name=g.unique(f"{tag}_Cast"), to=onnx.TensorProto.FLOAT),
        ]
        if len(node.input) > 2 and node.input[2]:
            bias = g.constants[node.input[2]].astype(np.float32)
            bias_name = g.add_initializer(g.unique(f"{tag}_bias"), bias.reshape(1, -1, *([1] * (w.ndim - 2))))
            new += [
                helper.make_node("Mul", [acc_f, scale_name], [scaled], name=g.unique(f"{tag}_Rescale")),
                helper.make_node("Add", [scaled, bias_name], [node.output[0]], name=g.unique(f"{tag}_Bias")),
            ]
        else:
            new.append(helper.make_node("Mul", [acc_f, scale_name], [node.output[0]], name=g.unique(f"{tag}_Rescale")))
        at = g.nodes.index(node)
        g.nodes[at : at + 1] = new
        g.reindex()
    used = {i for n in g.nodes for i in n.input} | g.outputs
    g.nodes = [n for n in g.nodes if n.op_type != "DequantizeLinear" or n.output[0] in used]
    g.reindex()


@dataclass(frozen=True)
class ScaleCheck:
    """One exported Q/DQ node matched to its quantizer."""

    node: str
    quantizer: str
    scale: tuple[float, ...]


def check_qdq_scales(onnx_path: str | Path, model: nn.Module) -> list[ScaleCheck]:
    """Check that every Q/DQ scale in the exported graph equals `amax / 127` of its quantizer, bit for bit.

    Nodes are matched to quantizers through the module scope in their names. Raises
    `ExportError` naming the node and its scale tensor when a node has no quantizer, a scale
    differs, or a zero point is not the symmetric one (int8 0, uint8 128, or uint8 0 after a Relu).
    """
    proto = onnx.load(str(onnx_path))
    g = _Graph(proto)
    checked: list[ScaleCheck] = []
    for node in g.nodes:
        if node.op_type not in _QUANT_OPS:
            continue
        scope, quantizer = resolve_module(model, node.name)
        if not isinstance(quantizer, TensorQuantizer):
            raise ExportError(f"{node.op_type} '{node.name}' (scale '{node.input[1]}') maps to no quantizer (scope '{scope}')")
        expected = quantizer.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
        got = g.constants.get(node.input[1])
        if got is None:
            raise ExportError(f"{node.op_type} '{node.name}': scale '{node.input[1]}' is not a constant")
        got32 = got.astype(np.float32).reshape(-1)
        if got32.shape != expected.shape or not np.array_equal(got32.view(np.int32), expected.view(np.int32)):
            raise ExportError(
                f"{node.op_type} '{node.name}': scale '{node.input[1]}' = {got32[:4]} but quantizer "
                f"'{scope}' has amax/127 = {expected[:4]}"
            )
        zero = g.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
        if zero is None or not _symmetric_zero(zero):
            raise ExportError(f"{node.op_type} '{node.name}': zero point '{node.input[2]}' is not symmetric")
        checked.append(ScaleCheck(node.name, scope, tuple(float(v) for v in got32)))
    return checked


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def resolve_module(model: nn.Module, node_name: str) -> tuple[str, nn.Module | None]:
    """(qualified module name, module) of an exported node, from its scope-derived name.

    The TorchScript exporter names nodes `/a/b/.../Op`; a component may repeat a prefix of the
    path (`/stem/stem.0/`, `/block/conv1/conv1.0/`), and a module's k-th extra call within one
    parent scope gets a `_k` suffix (`input_quantizer_1`).
    """
    path = ""
    module: nn.Module | None = model
    for part in node_name.strip("/").split("/")[:-1]:
        if module is None:
            return path, None
        last = path.rpartition(".")[2]
        options = [part]
        if path:
            options = [part[len(path) + 1 :]] if part.startswith(path + ".") else []
            if last and part.startswith(last + "."):
                options.append(part[len(last) + 1 :])
            options.append(part)
        options += [re.sub(r"_\d+$", "", o) for o in options]
        found = next(((o, c) for o in options if o and (c := _child(module, o)) is not None), None)
        if found is None:
            return f"{path}.{part}" if path else part, None
        path = f"{path}.{found[0]}" if path else found[0]
        module = found[1]
    return path, module


def _symmetric_zero(zero: npt.NDArray[Any]) -> bool:
    if zero.dtype == np.int8:
        return bool(np.all(zero == 0))
    if zero.dtype == np.uint8:
        return bool(np.all(zero == 128) or np.all(zero == 0))
    return False


@dataclass(frozen=True)
class Int8Report:
    """Operators in ONNX Runtime's optimized graph: integer kernels and float convolutions."""

    int8_ops: tuple[tuple[str, str], ...]
    float_convs: tuple[tuple[str, str], ...]

    def count(self, op_type: str) -> int:
        """How many integer kernels of `op_type`."""
        return sum(1 for _, t in self.int8_ops if t == op_type)


def optimize_with_onnxruntime(onnx_path: str | Path, optimized_path: str | Path) -> Path:
    """Let ONNX Runtime (CPU, all optimizations) optimize the model and save the graph it will run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized_path)
    options.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return Path(optimized_path)


def int8_report(optimized_path: str | Path) -> Int8Report:
    """Integer kernels and float convolutions in a graph saved by `optimize_with_onnxruntime`."""
    proto = onnx.load(str(optimized_path))
    int8 = tuple((n.name, n.op_type) for n in proto.graph.node if n.op_type in _INT8_OPS)
    floats = tuple((n.name, n.op_type) for n in proto.graph.node if n.op_type in _FLOAT_CONV_OPS)
    return Int8Report(int8, floats)
