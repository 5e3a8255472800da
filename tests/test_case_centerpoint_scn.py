"""End-to-end tests of cases/centerpoint_scn.yaml: the pytest run, its golden files, and
`qharness compare` on them against NVIDIA's tool/compare.py statistics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import tensorfile
from harness.cases import load_case
from harness.cli import main
from harness.context import CaseContext, RunOptions
from harness.export import scn_golden

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "cases" / "centerpoint_scn.yaml"
GOLDEN = ROOT / "golden" / "centerpoint-scn"

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


def test_golden_files_are_nvidia_named_and_small() -> None:
    names = sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file())
    assert names == ["inputs/in_features.torch.fp16.tensor", "inputs/in_indices_zyx.torch.int32.tensor",
                     "meta.json", "outputs/out_dense.torch.fp16.tensor"]
    assert sum(p.stat().st_size for p in GOLDEN.rglob("*")) < 400_000
    features, indices = scn_golden.load_inputs(GOLDEN / "inputs", "zyx")
    dense = scn_golden.load_output(GOLDEN / "outputs")
    assert features.dtype == np.float16 and features.shape[1] == 5 and indices.dtype == np.int32
    assert dense.dtype == np.float16 and dense.shape == (1, 256, 23, 23)
    meta = json.loads((GOLDEN / "meta.json").read_text())
    assert meta["config_hash"] == load_case(CASE).config_hash()


def compare_py_statistics(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """What NVIDIA's tool/compare.py reports, computed here independently in float32 as it does."""
    a = actual.reshape(-1).astype(np.float32)
    r = reference.reshape(-1).astype(np.float32)
    diff = np.abs(a - r)
    top = float(diff.max())
    stats = {"max": top, "sum": float(diff.sum()), "std": float(diff.std()), "mean": float(diff.mean()),
             "cosine": float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r))) * 100,
             "> 0": int((diff > 0).sum()), "= 0": int((diff == 0).sum())}
    for label, frac in (("> 75% max", 0.75), ("> 50% max", 0.5), ("> 25% max", 0.25)):
        stats[label] = int((diff > top * frac).sum())
    for name, x in (("actual", a), ("reference", r)):
        stats[f"{name} absmax"] = float(np.abs(x).max())
        stats[f"{name} min"] = float(x.min())
        stats[f"{name} std"] = float(x.std())
        stats[f"{name} mean"] = float(x.mean())
    return stats


def parse_report(text: str) -> dict[str, float]:
    """The figures of `qharness compare --detail` output."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if m := re.match(r"\[absdiff\] max=(\S+), sum=(\S+), std=(\S+), mean=(\S+)$", line):
            out.update(zip(("max", "sum", "std", "mean"), map(float, m.groups()), strict=True))
        elif m := re.match(r"\[absdiff ([>=] (?:\d+% max|0))\] \S+ %, (\d+) elements$", line):
            out[m.group(1)] = int(m.group(2))
        elif m := re.match(r"\[cosine\] (\S+) %$", line):
            out["cosine"] = float(m.group(1))
        elif m := re.match(r"\[(actual|reference)\] absmax=(\S+), min=(\S+), std=(\S+), mean=(\S+)$", line):
            for key, value in zip(("absmax", "min", "std", "mean"), m.groups()[1:], strict=True):
                out[f"{m.group(1)} {key}"] = float(value)
    return out


@pytest.mark.slow
def test_compare_cli_matches_nvidia_statistics_on_scn_ref_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = CaseContext(load_case(CASE), RunOptions(torch.device("cpu"), tmp_path / "cache"))
    feeds = {n: torch.from_numpy(a) for n, a in run.golden_record()["model"].inputs.items()}
    dense = run.runner("scn-ref").run_stage("model", feeds)["dense"]
    actual = tmp_path / "out_dense.scn-ref.fp16.tensor"
    tensorfile.save(actual, dense.numpy().astype(np.float16))
    golden = GOLDEN / "outputs" / "out_dense.torch.fp16.tensor"
    status = main(["compare", str(actual), str(golden), "--detail", "--cosine-min", "0.9999"])
    text = capsys.readouterr().out
    assert status == 0 and "[verdict] PASSED" in text
    shown = parse_report(text)
    expected = compare_py_statistics(tensorfile.load(actual), tensorfile.load(golden))
    assert set(shown) == set(expected)
    for key, value in expected.items():
        assert shown[key] == pytest.approx(value, rel=1e-5, abs=1.5e-6 if key != "cosine" else 1e-3), key
    assert 0 < expected["max"] < 0.05 and expected["cosine"] > 99.99


@pytest.mark.slow
def test_pytest_runs_the_case_end_to_end(tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in GOLDEN.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASE.relative_to(ROOT)), "-p", "no:cacheprovider", "-q", "-rs",
         "--qharness-cache", str(tmp_path / "cache"), "--report-dir", str(tmp_path / "reports"),
         "--benchmark-disable"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b11 passed, 4 skipped\b", proc.stdout), proc.stdout[-2000:]  # layers item included
    assert "custom SparseConvolution/ScatterDense ops: ort-fp32 has no kernels for them" in proc.stdout
    assert "custom SparseConvolution/ScatterDense ops: trt-int8 has no kernels for them" in proc.stdout
    records = json.loads((tmp_path / "reports" / "report.json").read_text())["records"]
    verdicts = {(r["backend"], r["item"]): r["verdict"] for r in records}
    for backend in ("torch-fp32", "fakequant-int8", "scn-ref", "scn-ref-int8"):
        assert verdicts[(backend, "golden")] == "passed"
    assert verdicts[("scn-ref", "fidelity")] == verdicts[("scn-ref-int8", "fidelity")] == "passed"
    assert verdicts[("ort-fp32", "golden")] == verdicts[("trt-int8", "golden")] == "skipped"
    scn = next(r for r in records if r["backend"] == "scn-ref" and r["item"] == "golden")
    assert scn["info"]["schema"] == "0 violations" and Path(scn["artifacts"]["onnx:model"]).is_file()
    assert scn["compare"]["dense"]["stats"]["cosine"] >= 0.9999
    int8 = next(r for r in records if r["backend"] == "scn-ref-int8" and r["item"] == "fidelity")
    assert int8["fidelity"]["cosine"]["dense"] >= 0.99999
    assert {p: p.read_bytes() for p in GOLDEN.rglob("*") if p.is_file()} == before
