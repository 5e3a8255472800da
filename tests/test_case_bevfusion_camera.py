"""End to end: `pytest cases/bevfusion_camera.yaml` passes against the committed golden files, per
stage, with the rules item (0 violations in the exported TensorRT-layout graphs) and per-stage fidelity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cases import load_case

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "cases" / "bevfusion_camera.yaml"
STAGES = ("camera_backbone", "camera_vtransform", "fuser_decoder")


def test_case_declares_the_guide_rules_and_both_profiles() -> None:
    case = load_case(CASE)
    assert list(case.spec.stages) == list(STAGES)
    assert case.spec.quant.rules == ["bottleneck_residual", "shared_concat", "shared_input"]
    assert case.spec.quant.keep_float == ["decoder.neck.deblocks.1.0", "encoders.camera.vtransform.downsample"]
    full = load_case(CASE, profile="full")
    assert full.spec.model.args["profile"] == "full" and full.spec.data.args["bev_cells"] == 180
    meta = json.loads((case.golden_dir / "meta.json").read_text())
    assert list(meta["stages"]) == list(STAGES)


@pytest.mark.slow
def test_case_passes_with_the_rules_item_and_per_stage_fidelity(tmp_path: Path) -> None:
    report = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QHARNESS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASE.relative_to(ROOT)), "-q", "-p", "no:cacheprovider",
         "--report-dir", str(report), "-W", "ignore::DeprecationWarning", "--benchmark-disable"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    records = json.loads((report / "report.json").read_text())["records"]
    passed = {(r["backend"], r["item"], r.get("stage")) for r in records if r["verdict"] == "passed"}
    for backend in ("torch-fp32", "fakequant-int8", "ort-fp32", "ort-int8"):
        assert {(backend, "golden", stage) for stage in STAGES} <= passed
    rules = next(r["rules"] for r in records if r["item"] == "rules")
    assert rules["totals"]["violations"] == 0
    camera = next(s for s in rules["stages"] if s["stage"] == "camera_backbone")
    assert camera["residual_adds"] == 16 and camera["concats"] == 3 and camera["unquantized_convs"] == []
    fidelity = next(r["fidelity"] for r in records if r["item"] == "fidelity")
    assert set(fidelity["stages"]) == set(STAGES)
    # the case's gate (0.998): measured 0.99922 on an AVX512-VNNI Xeon, 0.99898 on an AVX2 EPYC
    assert min(c for outputs in fidelity["stages"].values() for c in outputs.values()) >= 0.998
    markdown = (report / "report.md").read_text()
    assert "### Quantization rules (fakequant-int8, passed)" in markdown and "**0 violation(s)**" in markdown
    assert "| ort-int8  | fakequant-int8 | camera_backbone" in markdown
