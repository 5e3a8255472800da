"""torch-fp32/fp16, fakequant-int8, ort-fp32/int8 backends: availability, numerics, int8 kernels."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from harness.backends.onnxruntime import providers_for
from harness.backends.torch_eager import EagerRunner, TorchFP16
from harness.cases import load_case
from harness.context import CaseContext, RunOptions
from harness.export.qdq import int8_report, optimize_with_onnxruntime
from harness.program import Program

TESTS = Path(__file__).parent


def test_torch_fp16_needs_cuda() -> None:
    reason = TorchFP16().unavailable_reason(torch.device("cpu"))
    assert reason is not None and "needs a CUDA device" in reason


def test_eager_runner_casts_inputs_and_returns_float32() -> None:
    model = torch.nn.Conv2d(3, 2, 1).eval()
    runner = EagerRunner(program=Program.single(model, ("x",), ("y",)), dtype=torch.float64)
    model.double()
    out = runner.run_stage("model", {"x": torch.ones(1, 3, 2, 2)})
    assert out["y"].dtype == torch.float32
    runner.timed_call("model", {"x": torch.ones(1, 3, 2, 2)})()


def test_cpu_provider_without_cuda() -> None:
    assert providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CaseContext:
    from tiny import CASE

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases/tiny.yaml").write_text(CASE)
    case = load_case(tmp_path / "cases/tiny.yaml")
    return CaseContext(case, RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".cache"))


def test_ort_fp32_matches_torch_and_reuses_its_export(run: CaseContext) -> None:
    feeds = run.stage_feeds()["model"]
    expected = run.runner("torch-fp32").run_stage("model", feeds)["output"]
    actual = run.runner("ort-fp32").run_stage("model", feeds)["output"]
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-5, rtol=1e-4)
    path = Path(run.runner("ort-fp32").artifacts["onnx:model"])
    mtime = path.stat().st_mtime_ns
    run.release("ort-fp32")
    assert Path(run.runner("ort-fp32").artifacts["onnx:model"]).stat().st_mtime_ns == mtime


def test_ort_int8_runs_integer_kernels_for_every_quantized_conv(run: CaseContext, tmp_path: Path) -> None:
    path = Path(run.runner("ort-int8").artifacts["onnx:model"])
    optimized = optimize_with_onnxruntime(path, tmp_path / "optimized.onnx")
    report = int8_report(optimized)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert not report.float_convs, f"float convs left between Q/DQ: {report.float_convs}"
    assert ops["QLinearConv"] + ops["ConvInteger"] == 3, ops


def test_fakequant_and_ort_int8_agree(run: CaseContext) -> None:
    feeds = run.stage_feeds()["model"]
    fq = run.runner("fakequant-int8").run_stage("model", feeds)["output"].numpy().ravel()
    ort = run.runner("ort-int8").run_stage("model", feeds)["output"].numpy().ravel()
    cosine = float(fq @ ort / np.linalg.norm(fq) / np.linalg.norm(ort))
    assert cosine > 0.999
