"""Tests of harness/export/fp16.py: FP16 graphs run in ONNX Runtime, typed as promised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

from harness.cache import Cache
from harness.errors import ExportError
from harness.export.artifacts import fp16_onnx
from harness.export.fp16 import (
    convert_file,
    converter_version,
    qdq_high_precision,
    to_fp16,
    value_types,
)
from harness.export.onnx import export_stage
from harness.program import Stage

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


class Sensitive(nn.Module):
    """Conv, a LayerNorm, a mean (ReduceMean) and a Softmax: fp16 and fp32 ops."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(torch.relu(self.conv(image)))
        x = x - x.mean(dim=(2, 3), keepdim=True)
        logits = self.head(x)
        return logits, torch.softmax(logits, dim=1)


class QDQNet(nn.Module):
    """Q/DQ on the first conv's input and weight (TensorRT layout); the head stays float."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(image, 4.0 / 127, 0, -128, 127)
        amax = self.conv.weight.detach().abs().amax(dim=(1, 2, 3))
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, amax / 127,
                                                   torch.zeros_like(amax, dtype=torch.int32), 0, -128, 127)
        out: torch.Tensor = self.head(torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1)))
        return out


IMAGE = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _export(module: nn.Module, path: Path, outputs: tuple[str, ...]) -> onnx.ModelProto:
    export_stage(Stage("model", module.eval(), ("image",), outputs), {"image": IMAGE}, path, opset=17)
    return onnx.load(str(path))


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"image": IMAGE.numpy()}))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _op_types(model: onnx.ModelProto, op: str, types: dict[str, int]) -> set[int]:
    """Element types of every input and output of every `op` node (initializers included)."""
    return {types[name] for node in model.graph.node if node.op_type == op
            for name in (*node.input, *node.output) if name in types}


def test_fp16_graph_runs_close_to_fp32_with_float_io_and_sensitive_ops_fp32(tmp_path: Path) -> None:
    source = _export(Sensitive(), tmp_path / "m.onnx", ("logits", "probs"))
    converted = to_fp16(source, "m.onnx")
    types = value_types(converted)
    assert all(v.type.tensor_type.elem_type == FLOAT for v in (*converted.graph.input, *converted.graph.output))
    assert _op_types(converted, "Conv", types) == {HALF}
    for op in ("Softmax", "ReduceMean", "LayerNormalization"):
        assert _op_types(converted, op, types) - {TensorProto.INT64} == {FLOAT}, op
    assert any(n.op_type == "Cast" for n in converted.graph.node)
    for ours, ref in zip(_run(converted), _run(source), strict=True):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-2, rtol=1e-2)
        assert _cosine(ours, ref) > 0.9999
    assert all(n.op_type != "Cast" for n in source.graph.node)  # the input model is left alone


def test_graph_ending_in_a_blocked_op_converts(tmp_path: Path) -> None:
    # onnxconverter-common 1.16 alone raises on blocked op -> graph output (here: Softmax).
    class EndsInSoftmax(nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.softmax(image * 2.0, dim=1)

    source = _export(EndsInSoftmax(), tmp_path / "s.onnx", ("probs",))
    converted = to_fp16(source)
    assert [o.name for o in converted.graph.output] == ["probs"]
    np.testing.assert_allclose(_run(converted)[0], _run(source)[0], atol=1e-3)


def test_already_fp16_io_is_refused(tmp_path: Path) -> None:
    converted = to_fp16(_export(Sensitive(), tmp_path / "m.onnx", ("logits", "probs")))
    converted.graph.input[0].type.tensor_type.elem_type = HALF
    with pytest.raises(ExportError, match="already has float16"):
        to_fp16(converted, "half.onnx")


def test_qdq_high_precision_keeps_qdq_fp32_and_the_rest_fp16(tmp_path: Path) -> None:
    source = _export(QDQNet(), tmp_path / "q.onnx", ("logits",))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in source.graph.node}
    converted = qdq_high_precision(source, "q.onnx")
    types = value_types(converted)
    # opset 17 Q/DQ: float32 scales and float32 on the float side
    assert _op_types(converted, "QuantizeLinear", types) <= {FLOAT, TensorProto.INT8}
    assert _op_types(converted, "DequantizeLinear", types) <= {FLOAT, TensorProto.INT8}
    for node in converted.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert types[node.input[1]] == FLOAT, node.name
    conv_data = {types[n.input[0]] for n in converted.graph.node if n.op_type == "Conv"}
    assert conv_data == {HALF}  # both convs compute in fp16: the quantized one after DQ -> Cast
    assert all(v.type.tensor_type.elem_type == FLOAT for v in (*converted.graph.input, *converted.graph.output))
    (ours,), (ref,) = _run(converted), _run(source)
    # fp16 arithmetic after exact int8 codes: errors of a few fp16 ulps of the output's range
    assert np.abs(ours - ref).max() <= 2e-2 * np.abs(ref).max()
    assert _cosine(ours, ref) > 0.9999


def test_qdq_high_precision_of_a_stage_without_qdq_is_the_fp16_graph(tmp_path: Path) -> None:
    # A stage the quantization leaves float (BEVFusion's camera_vtransform) still runs in FP16.
    source = _export(Sensitive(), tmp_path / "m.onnx", ("logits", "probs"))
    converted = qdq_high_precision(source, "m.onnx")
    assert converted.graph == to_fp16(source).graph
    assert _op_types(converted, "Conv", value_types(converted)) == {HALF}


def test_convert_file_and_unreadable_source(tmp_path: Path) -> None:
    _export(Sensitive(), tmp_path / "m.onnx", ("logits", "probs"))
    out = convert_file(tmp_path / "m.onnx", tmp_path / "m16.onnx")
    assert value_types(onnx.load(str(out)))  # a readable, typed graph
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match=r"bad\.onnx"):
        convert_file(tmp_path / "bad.onnx", tmp_path / "x.onnx")
    assert converter_version().startswith("onnxconverter-common ")


def test_fp16_graphs_are_cached_by_source_content(tmp_path: Path) -> None:
    _export(Sensitive(), tmp_path / "m.onnx", ("logits", "probs"))
    cache = Cache(tmp_path / "cache")
    first = fp16_onnx(cache, "case", {"model": tmp_path / "m.onnx"}, qdq=False)["model"]
    built = first.stat().st_mtime_ns
    assert fp16_onnx(cache, "case", {"model": tmp_path / "m.onnx"}, qdq=False)["model"].stat().st_mtime_ns == built
    _export(QDQNet(), tmp_path / "m.onnx", ("logits",))  # another graph at the same path
    other = fp16_onnx(cache, "case", {"model": tmp_path / "m.onnx"}, qdq=True)["model"]
    assert other != first and "QuantizeLinear" in {n.op_type for n in onnx.load(str(other)).graph.node}
