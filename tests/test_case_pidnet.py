"""The built-in pidnet-s case end to end (tiny profile) and the proof that ort-int8 runs int8 kernels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import harness.backends.fakequant
import harness.backends.onnxruntime
import harness.backends.torch_eager
import harness.export.onnx
import harness.tasks.segmentation  # noqa: F401  (imported up front: pytester drops modules first imported inside it)
from harness.cases import load_case
from harness.context import CaseContext, RunOptions
from harness.export.qdq import int8_report, optimize_with_onnxruntime

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "cases" / "pidnet_s.yaml"


@pytest.mark.slow
def test_every_quantized_conv_runs_as_an_int8_kernel_in_onnxruntime(tmp_path: Path) -> None:
    run = CaseContext(load_case(CASE, profile="tiny"), RunOptions(device=torch.device("cpu"), cache_dir=tmp_path))
    path = run.runner("ort-int8").artifacts["onnx:model"]
    report = int8_report(optimize_with_onnxruntime(path, tmp_path / "optimized.onnx"))
    # ONNX Runtime turns the standalone BatchNorms of PAPPM into float 1x1 convs, and
    # final_layer.conv2 (producing `logits`) is kept float on purpose (keep_float).
    unexpected = [name for name, _ in report.float_convs
                  if "BatchNormalization" not in name and not name.startswith("logits")]
    assert not unexpected, f"quantized convs left in float: {unexpected}"
    assert report.count("QLinearConv") >= 60


@pytest.mark.slow
def test_pidnet_case_end_to_end(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Golden, metric, fidelity and benchmark items of the real case file on a tiny profile."""
    (pytester.path / "cases").mkdir()
    (pytester.path / "golden" / "pidnet-s").mkdir(parents=True)  # case paths stay inside the project:
    (pytester.path / "golden" / "pidnet-s" / "model_fp16.pt").symlink_to(ROOT / "golden/pidnet-s/model_fp16.pt")
    (pytester.path / "cases" / "pidnet_s.yaml").write_text(CASE.read_text())
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nfilterwarnings = ["ignore"]\n')
    monkeypatch.setenv("QHARNESS_CACHE", str(pytester.path / ".cache"))
    args = ["cases/", "--profile", "tiny", "--backend", "torch-fp32,fakequant-int8,ort-fp32,ort-int8"]
    first = pytester.runpytest(*args, "--update-golden", "-p", "no:randomly")
    first.assert_outcomes(passed=15)  # golden, rules, layers, metric, fidelity, benchmark items
    meta = json.loads((pytester.path / "golden/pidnet-s/profile-tiny/meta.json").read_text())
    assert set(meta["baselines"]) == {"torch-fp32", "fakequant-int8", "ort-fp32", "ort-int8"}
    second = pytester.runpytest(*args, "--report-dir", "reports")
    second.assert_outcomes(passed=15)  # golden, rules, layers, metric, fidelity, benchmark items
    second.stdout.fnmatch_lines(["*pidnet-s*ort-int8*passed*miou=*"])
    report = (pytester.path / "reports" / "report.md").read_text()
    assert "IoU per class" in report and "ort-int8-sample0.png" in report
    records = json.loads((pytester.path / "reports" / "report.json").read_text())["records"]
    fidelity = next(r["fidelity"] for r in records if r["item"] == "fidelity")
    assert fidelity["agreement"] >= 0.98
    shutil.rmtree(pytester.path / "golden")
