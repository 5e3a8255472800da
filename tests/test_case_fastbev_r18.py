"""End to end: `pytest cases/fastbev_r18.yaml` on the CPU backends passes against the committed
golden files, per stage, with NDS metric items, the report's per-class table and pictures."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import tensorfile
from harness.cases import load_case
from harness.context import regenerate_command
from harness.golden import GoldenStore
from harness.training.detection3d import train_detection3d
from harness.zoo.fastbev import TABLE_NAMES

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "cases" / "fastbev_r18.yaml"
BACKENDS = "torch-fp32,fakequant-int8,ort-fp32,ort-int8"


def test_golden_folder_holds_the_lookup_tables_with_hashes() -> None:
    case = load_case(CASE)
    store = GoldenStore(case.golden_dir, regenerate_command(case))
    meta = store.meta()
    for name in TABLE_NAMES:
        assert f"{name}.tensor" in meta["files"], name
    assert tensorfile.load(case.golden_dir / "x.tensor").shape == (6, 48 * 48 * 4)
    assert tensorfile.load(case.golden_dir / "anchors.tensor").shape == (24 * 24 * 8, 9)
    assert meta["stages"] == {
        "pre": {"inputs": ["image"], "outputs": ["mlvl_feat"]},
        "post": {"inputs": ["mlvl_volume"], "outputs": ["anchor_scores", "anchor_deltas", "anchor_dir_logits"]},
    }


def test_training_recipe_fits_the_trainer() -> None:
    """`qharness train` passes the case's `training:` section plus these keywords."""
    case = load_case(CASE)
    assert case.spec.task == "detection3d"
    inspect.signature(train_detection3d).bind(
        object(), object(), val_dataset=object(), device="cuda", out_dir="runs", command="qharness train",
        **case.spec.training,
    )


@pytest.mark.slow
def test_case_passes_on_the_cpu_backends(tmp_path: Path) -> None:
    report = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASE.relative_to(ROOT)), "--backend", BACKENDS, "-q",
         "-p", "no:cacheprovider", "--report-dir", str(report), "-W", "ignore::DeprecationWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    records = json.loads((report / "report.json").read_text())["records"]
    items = {(r["backend"], r["item"], r.get("stage")) for r in records if r["verdict"] == "passed"}
    for backend in BACKENDS.split(","):
        assert {(backend, "golden", "pre"), (backend, "golden", "post"), (backend, "metric", None)} <= items
    metric = next(r["metric"] for r in records if r["backend"] == "ort-int8" and r["item"] == "metric")
    assert metric["primary"] == "NDS" and {"NDS", "mAP", "mATE", "mAOE"} <= set(metric["values"])
    assert [g["key"] for g in metric["gates"] if g["gate"] == "baseline"] == ["NDS", "mAP"]
    markdown = (report / "report.md").read_text()
    assert "AP per class" in markdown and "-bev.png" in markdown and "-cameras.png" in markdown
    assert any((report / "pictures" / "fastbev-r18").glob("ort-int8-*-bev.png"))
