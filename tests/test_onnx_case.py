"""Cases whose model is an ONNX file: ONNX backends only, golden files imported from elsewhere
(`qharness golden import`) or made by ort-fp32, identity = the file's sha256, ORT static int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import harness.backends.onnxruntime
import harness.export.onnx  # noqa: F401 - see tests/test_plugin.py: import before pytester runs
from harness import tensorfile
from harness.cases import load_case
from harness.cli import main
from harness.errors import CaseError
from harness.export.ort_quant import quantize_onnx

pytest_plugins = ["pytester"]

DATA_MODULE = '''
import numpy as np


class Data:
    def __init__(self, size=4, seed=0):
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        return {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
'''

CASE = """\
name: onnxcase
task: tensors
model: {onnx: model.onnx}
data: {factory: "qh_onnxdata:Data", args: {size: 4}, calibration: {args: {seed: 1}}}
golden: {dir: golden/onnxcase, samples: 2}
quant: {activations: {calibrator: max}, calibration_batches: 2, calibration_batch_size: 2}
backends:
  torch-fp32: {compare: {atol: 1.0e-5}}
  fakequant-int8: {compare: {cosine_min: 0.9}}
  ort-fp32: {compare: {atol: 1.0e-4, rtol: 1.0e-3}}
  ort-int8: {compare: {cosine_min: 0.98}}
"""


def conv_net(path: Path, seed: int = 0) -> None:
    """A small Conv-Relu-Conv ONNX graph, input x [N, 3, 16, 16], output y [N, 4, 16, 16]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], [w1, b1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    out: np.ndarray = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A throw-away project with an ONNX-only case and tensors "dumped by another tool" in dump/."""
    pytester.makepyfile(qh_onnxdata=DATA_MODULE)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nfilterwarnings = ["ignore::pytest.PytestAssertRewriteWarning"]\n')
    (pytester.path / "cases").mkdir()
    (pytester.path / "cases" / "onnxcase.yaml").write_text(CASE)
    conv_net(pytester.path / "model.onnx")
    pytester.syspathinsert()
    monkeypatch.setenv("QHARNESS_CACHE", str(pytester.path / ".cache"))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    for kind in ("in", "out"):
        (pytester.path / "dump" / kind).mkdir(parents=True)
    tensorfile.save(pytester.path / "dump/in/x.tensor", x)
    np.save(pytester.path / "dump/out/y.npy", run_onnx(pytester.path / "model.onnx", x))
    return pytester


def import_golden(project: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["golden", "import", "--case", str(project.path / "cases/onnxcase.yaml"),
                   "--inputs", str(project.path / "dump/in"), "--outputs", str(project.path / "dump/out")])
    return status, capsys.readouterr().err


def test_imported_goldens_pass_torch_backends_skip(project: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    assert import_golden(project, capsys) == (0, "")
    meta = json.loads((project.path / "golden/onnxcase/meta.json").read_text())
    assert meta["provenance"] == "imported" and meta["stages"] == {"model": {"inputs": ["x"], "outputs": ["y"]}}
    assert meta["onnx_sha256"] == __import__("hashlib").sha256((project.path / "model.onnx").read_bytes()).hexdigest()
    assert (project.path / "golden/onnxcase/outputs/y.tensor").is_file()
    result = project.runpytest("cases/", "-m", "golden", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*the case's model is an ONNX file; torch-fp32 runs the PyTorch model*",
                                 "*the case's model is an ONNX file; fakequant-int8 runs the PyTorch model*"])


def test_perturbed_imported_outputs_fail(project: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    y = np.load(project.path / "dump/out/y.npy")
    np.save(project.path / "dump/out/y.npy", y + 0.01 * np.abs(y).max())
    assert import_golden(project, capsys)[0] == 0
    result = project.runpytest("cases/", "-m", "golden", "--backend", "ort-fp32", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tensor 'y'*", "*outside atol=0.0001*FAILED by*"])


def test_a_changed_onnx_file_makes_goldens_stale(project: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    assert import_golden(project, capsys)[0] == 0
    conv_net(project.path / "model.onnx", seed=1)
    result = project.runpytest("cases/", "-m", "golden", "--backend", "ort-fp32", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stale: ONNX file*model.onnx sha256*"])
    # without imported files, --update-golden makes them with ort-fp32 as the reference
    result = project.runpytest("cases/", "-m", "golden", "--update-golden", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=2)
    meta = json.loads((project.path / "golden/onnxcase/meta.json").read_text())
    assert meta["provenance"] == "generated" and meta["reference"] == "ort-fp32"


def test_cli_errors_name_the_file(project: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    (project.path / "dump/out/y.npy").rename(project.path / "dump/out/logits.npy")
    status, err = import_golden(project, capsys)
    assert status == 2 and "output 'y' of stage 'model'" in err and str(project.path / "dump/out") in err
    assert "logits.npy" in err
    (project.path / "model.onnx").unlink()
    status, err = import_golden(project, capsys)
    assert status == 2 and "onnxcase.yaml:3" in err and "model.onnx" in err and "does not exist" in err


def test_factory_and_onnx_together_is_an_error_naming_model(tmp_path: Path) -> None:
    conv_net(tmp_path / "model.onnx")
    path = tmp_path / "c.yaml"
    path.write_text(CASE.replace("model: {onnx: model.onnx}",
                                 'model: {onnx: model.onnx, factory: "harness.zoo.pidnet:pidnet_s"}'))
    with pytest.raises(CaseError) as info:
        load_case(path, root=tmp_path)
    assert info.value.key == "model" and "exactly one of model.factory" in str(info.value)


def test_ort_int8_quantization_runs_integer_kernels(tmp_path: Path) -> None:
    import onnxruntime as ort

    conv_net(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    quantize_onnx(tmp_path / "model.onnx", tmp_path / "q.onnx", feeds, "onnxruntime")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert fused & {"QLinearConv", "ConvInteger"} and "Conv" not in fused
    x = feeds[0]["x"]
    q, f = session.run(None, {"x": x})[0], run_onnx(tmp_path / "model.onnx", x)
    assert float(np.dot(q.ravel(), f.ravel()) / np.linalg.norm(q) / np.linalg.norm(f)) > 0.99
    quantize_onnx(tmp_path / "model.onnx", tmp_path / "t.onnx", feeds, "tensorrt")
    zero_points = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "t.onnx")).graph.initializer
                   if i.name.endswith("zero_point")]
    assert zero_points and not any(z.any() for z in zero_points)  # symmetric: every zero point 0
    assert {z.dtype for z in zero_points} <= {np.dtype(np.int8), np.dtype(np.int32)}  # int8 codes, int32 biases


def test_onnx_case_context_gives_backends_the_users_file_and_ort_quantization(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from harness.context import CaseContext, RunOptions

    (tmp_path / "qh_onnxdata_ctx.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    conv_net(tmp_path / "model.onnx")
    (tmp_path / "c.yaml").write_text(CASE.replace("qh_onnxdata:Data", "qh_onnxdata_ctx:Data"))
    ctx = CaseContext(load_case(tmp_path / "c.yaml", root=tmp_path),
                      RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / "cache"))
    assert ctx.stage_names == ("model",) and ctx.float_reference == "ort-fp32"
    assert ctx.float_onnx() == {"model": tmp_path / "model.onnx"}
    trt = ctx.qdq_onnx("tensorrt")["model"]
    assert trt.is_file() and trt != ctx.qdq_onnx("onnxruntime")["model"]
    assert ctx.qdq_onnx("tensorrt")["model"] == trt  # cached
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(trt)).graph.node}
    before = ctx.model_key
    conv_net(tmp_path / "model.onnx", seed=3)
    fresh = CaseContext(ctx.case, ctx.options)
    assert fresh.model_key != before and fresh.qdq_onnx("tensorrt")["model"] != trt
    assert ctx.unavailable_reason("torch-fp32") == "the case's model is an ONNX file; torch-fp32 runs the PyTorch model"
    assert ctx.unavailable_reason("scn-ref") == "the case's model is an ONNX file; scn-ref runs the PyTorch model"
    assert "ONNX file" not in (ctx.unavailable_reason("trt-int8") or "")


def test_quant_settings_of_an_onnx_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from harness.context import CaseContext, RunOptions

    (tmp_path / "qh_onnxdata_q.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    conv_net(tmp_path / "model.onnx")

    def context(quant: str) -> CaseContext:
        text = CASE.replace("qh_onnxdata:Data", "qh_onnxdata_q:Data").replace(
            "quant: {activations: {calibrator: max}, ", f"quant: {{activations: {{calibrator: max}}, {quant}")
        (tmp_path / "c.yaml").write_text(text)
        ctx = CaseContext(load_case(tmp_path / "c.yaml", root=tmp_path),
                          RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / "cache"))
        ctx.validate()
        return ctx

    for quant, key in (("keep_float: [conv1, conv3], ", "quant.keep_float.1"), ("rules: [shared_input], ", "quant.rules")):
        with pytest.raises(CaseError) as info:
            context(quant)
        assert info.value.key == key
    path = context("keep_float: [conv2], ").qdq_onnx("onnxruntime")["model"]
    graph = onnx.load(str(path)).graph
    conv2 = next(n for n in graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"  # the float weight itself, no DequantizeLinear in front
    conv1 = next(n for n in graph.node if n.name == "conv1")
    assert conv1.input[1] != "w1"
