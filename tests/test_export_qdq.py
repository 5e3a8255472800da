"""Q/DQ export: int8 weights, scales equal amax/127, ONNX Runtime layout runs every quantized conv as int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from quant_nets import SmallNet, randomize_bn
from torch import nn

from harness.environment import int8_gemm_saturates
from harness.errors import ExportError, QuantError
from harness.export.qdq import (
    check_qdq_scales,
    export_qdq,
    int8_report,
    optimize_with_onnxruntime,
    resolve_module,
    resolve_weight_codes,
)
from harness.quant.calibrate import calibrate
from harness.quant.modules import QuantConv2d
from harness.quant.rules import get_rule
from harness.quant.transform import QuantConfig, quantize_model

torch.manual_seed(0)
X = torch.randn(1, 3, 64, 96)
BATCHES = [(torch.randn(2, 3, 64, 96),) for _ in range(4)]


def _calibrated(rules: tuple[str, ...] = ("shared_input",)) -> nn.Module:
    torch.manual_seed(3)
    model = randomize_bn(SmallNet())
    cfg = QuantConfig(keep_float=("head",), rules=tuple(get_rule(r) for r in rules))
    q = quantize_model(model, cfg, example_inputs=BATCHES[0])
    calibrate(q, BATCHES, progress=False)
    return q


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x.numpy()})[0]
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def test_uncalibrated_export_names_the_quantizers(tmp_path: Path) -> None:
    q = quantize_model(SmallNet().eval(), QuantConfig())
    with pytest.raises(QuantError, match=r"uncalibrated.*stem\.0\.input_quantizer"):
        export_qdq(q, (X,), tmp_path / "m.onnx")


def test_tensorrt_layout_int8_weights_and_exact_scales(tmp_path: Path) -> None:
    q = _calibrated()
    path = export_qdq(q, (X,), tmp_path / "trt.onnx", input_names=["x"], output_names=["y"])
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    inits.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"})
    weight_dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    assert len(weight_dqs) == len(convs) == 6
    for node in weight_dqs:
        assert inits[node.input[0]].dtype == np.int8
        assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any()
        assert [a.i for a in node.attribute if a.name == "axis"] == [0]
    assert not [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    checks = check_qdq_scales(path, q)
    assert {c.quantizer for c in checks} >= {"stem.0.input_quantizer", "stem.0.weight_quantizer", "block.add.input_quantizer"}
    convs_in_graph = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert all(inits.get(n.input[1]) is None for n in convs_in_graph[:-1])  # only the float head keeps float weights
    with torch.no_grad():
        ref = q(X).numpy()
    assert _cosine(_run(path, X), ref) > 0.9999


def test_conv_transpose_weights_on_axis_1(tmp_path: Path) -> None:
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, 2)), QuantConfig())
    calibrate(model, [(torch.randn(1, 3, 8, 8),)], progress=False)
    proto = onnx.load(str(export_qdq(model, (torch.randn(1, 3, 8, 8),), tmp_path / "t.onnx")))
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and "1/weight_quantizer" in n.name.replace("2/", "1/") and "2" in n.name)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    check_qdq_scales(tmp_path / "t.onnx", model)


def test_scale_check_names_a_wrong_scale(tmp_path: Path) -> None:
    q = _calibrated()
    path = export_qdq(q, (X,), tmp_path / "trt.onnx", input_names=["x"])
    q.left[0].input_quantizer.load_amax(q.left[0].input_quantizer.amax * 1.01)
    with pytest.raises(ExportError, match=r"scale '.*' = .* but quantizer 'left\.0\.input_quantizer'"):
        check_qdq_scales(path, q)


def test_onnxruntime_layout_runs_every_quantized_conv_as_int8(tmp_path: Path) -> None:
    q = _calibrated()
    path = export_qdq(q, (X,), tmp_path / "ort.onnx", layout="onnxruntime", input_names=["x"], output_names=["y"])
    check_qdq_scales(path, q)
    report = int8_report(optimize_with_onnxruntime(path, tmp_path / "ort.optimized.onnx"))
    quantized_convs = sum(isinstance(m, QuantConv2d) for m in q.modules())
    assert quantized_convs == 6
    assert report.count("QLinearConv") == 5  # every conv whose output is quantized downstream
    assert report.count("ConvInteger") == 1  # fuse.0 feeds the float head: int32 output, float rescale
    assert len(report.float_convs) == 1  # the head, kept float on purpose
    assert report.count("QLinearAdd") == 1 and report.count("QLinearConcat") == 1
    with torch.no_grad():
        fake = q(X).numpy()
    ort_int8 = _run(path, X)
    cosine = _cosine(ort_int8, fake)
    print(f"fakequant vs ort-int8 (onnxruntime layout): cosine {cosine:.7f}, max abs {np.abs(ort_int8 - fake).max():.3g}")
    assert cosine > 0.9999


def test_without_shared_input_a_conv_feeding_two_scales_gets_int32_output(tmp_path: Path) -> None:
    q = _calibrated(rules=())
    path = export_qdq(q, (X,), tmp_path / "ort.onnx", layout="onnxruntime", input_names=["x"])
    report = int8_report(optimize_with_onnxruntime(path, tmp_path / "opt.onnx"))
    assert report.count("QLinearConv") == 4 and report.count("ConvInteger") == 2  # stem feeds block.conv1 and the add
    assert len(report.float_convs) == 1


def test_layout_and_opset_are_validated(tmp_path: Path) -> None:
    q = _calibrated()
    with pytest.raises(ExportError, match="unknown Q/DQ layout 'tflite'"):
        export_qdq(q, (X,), tmp_path / "m.onnx", layout="tflite")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="opset >= 13"):
        export_qdq(q, (X,), tmp_path / "m.onnx", opset=11)


def test_node_names_resolve_to_modules() -> None:
    model = SmallNet()
    assert resolve_module(model, "/stem/stem.0/Conv") == ("stem.0", model.stem[0])
    assert resolve_module(model, "/block/conv1/conv1.0/Conv")[0] == "block.conv1.0"
    assert resolve_module(model, "/block/add_1/Add") == ("block.add", model.block.add)
    assert resolve_module(model, "/nothing/here/Op")[1] is None


def _conv_pair_near_full_scale() -> tuple[nn.Module, torch.Tensor]:
    """conv -> conv whose first conv (a QLinearConv in ONNX Runtime) sees activation codes near
    255 (uint8, zero point 128) and weight codes near 127: u8 x s8 pair sums above int16."""
    torch.manual_seed(0)
    first, second = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
    with torch.no_grad():
        first.weight.uniform_(0.9, 1.0)
        first.bias.zero_()
    model = quantize_model(nn.Sequential(first, second), QuantConfig())
    x = torch.rand(1, 16, 8, 8) * 0.2 + 0.8
    calibrate(model, [(x,)], progress=False)
    return model, x


def test_uint8_weight_codes_run_exact_u8u8_kernels(tmp_path: Path) -> None:
    model, x = _conv_pair_near_full_scale()
    path = export_qdq(model, (x,), tmp_path / "u8.onnx", layout="onnxruntime", weight_codes="uint8",
                      input_names=["x"], output_names=["y"])
    check_qdq_scales(path, model)
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weight_dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dqs and all(inits[n.input[0]].dtype == np.uint8 and (inits[n.input[2]] == 128).all() for n in weight_dqs)
    report = int8_report(optimize_with_onnxruntime(path, tmp_path / "u8.opt.onnx"))
    assert report.count("QLinearConv") == 1 and report.count("ConvInteger") == 1 and not report.float_convs
    with torch.no_grad():
        fake = model(x).numpy()
    assert np.abs(_run(path, x) - fake).max() < 1e-3 * np.abs(fake).max()


@pytest.mark.skipif(not int8_gemm_saturates(), reason="this CPU has VNNI (or is not x86-64): its U8S8 kernels do not saturate")
def test_int8_weight_codes_saturate_on_x86_without_vnni(tmp_path: Path) -> None:
    """The hazard `weight_codes="auto"` avoids: ONNX Runtime's U8S8 QLinearConv overflows int16 here."""
    model, x = _conv_pair_near_full_scale()
    path = export_qdq(model, (x,), tmp_path / "s8.onnx", layout="onnxruntime", weight_codes="int8",
                      input_names=["x"], output_names=["y"])
    with torch.no_grad():
        fake = model(x).numpy()
    assert np.abs(_run(path, x) - fake).max() > 0.1 * np.abs(fake).max()
    auto = export_qdq(model, (x,), tmp_path / "auto.onnx", layout="onnxruntime", input_names=["x"], output_names=["y"])
    assert np.abs(_run(auto, x) - fake).max() < 1e-3 * np.abs(fake).max()


def test_weight_codes_are_validated(tmp_path: Path) -> None:
    model, x = _conv_pair_near_full_scale()
    with pytest.raises(ExportError, match="unknown weight codes 'int4'"):
        export_qdq(model, (x,), tmp_path / "m.onnx", weight_codes="int4")  # type: ignore[arg-type]
    assert resolve_weight_codes("int8") == "int8" and resolve_weight_codes("uint8") == "uint8"
    assert resolve_weight_codes("auto") == ("uint8" if int8_gemm_saturates() else "int8")
