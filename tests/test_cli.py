"""Tests for harness/cli.py: `qharness compare`, `qharness schema` and `python -m harness`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import tensorfile
from harness.backends.registry import known_backends
from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ref = np.ones((2, 4), np.float32)
    close = ref.copy()
    close[1, 2] = 1.25
    paths = {"ref": tmp_path / "ref.tensor", "close": tmp_path / "close.tensor", "close_npy": tmp_path / "close.npy",
             "flat": tmp_path / "flat.tensor", "short": tmp_path / "short.npy"}
    tensorfile.save(paths["ref"], ref)
    tensorfile.save(paths["close"], close)
    np.save(paths["close_npy"], close)
    tensorfile.save(paths["flat"], close.reshape(8))
    np.save(paths["short"], np.ones(7, np.float32))
    return paths


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_compare_without_tolerances_passes(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["compare", str(files["close"]), str(files["ref"])], capsys)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "[absdiff] max=0.250000, sum=0.250000, std=0.082680, mean=0.031250"
    assert lines[1].startswith("[qharness] max_rel=0.25, snr=")
    assert lines[2] == "[worst] index=[1, 2] actual=1.25 reference=1 abs_err=0.25"
    assert lines[-1] == ("[verdict] PASSED (default bound cosine >= 0.99; choose with "
                         "--atol/--rtol/--cosine-min/--snr-min-db)")


def test_compare_passing_tolerances_exit_0(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["compare", str(files["close_npy"]), str(files["ref"]), "--atol", "0.25",
                          "--cosine-min", "0.99"], capsys)
    assert status == 0
    assert out.splitlines()[-1] == "[verdict] PASSED"


@pytest.mark.parametrize(
    "options",
    [["--atol", "0.1"], ["--rtol", "0.2"], ["--cosine-min", "0.9999"], ["--snr-min-db", "40"],
     ["--atol", "0.1", "--max-mismatch", "0.1"]],
)
def test_compare_failing_tolerances_exit_1(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                           options: list[str]) -> None:
    status, out, _ = run(["compare", str(files["close"]), str(files["ref"]), *options], capsys)
    assert status == 1
    assert out.splitlines()[-1] == "[verdict] FAILED"
    assert "[check]" in out and "FAILED (missed by" in out


def test_compare_max_mismatch_allows_some(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, _, _ = run(["compare", str(files["close"]), str(files["ref"]), "--atol", "0.1",
                        "--max-mismatch", "0.125"], capsys)
    assert status == 0


def test_compare_reshapes_equal_numel(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["compare", str(files["flat"]), str(files["ref"]), "--atol", "0.25"], capsys)
    assert status == 1
    assert "[problem]" in out and "shape (8,) differs from reference (2, 4)" in out
    assert out.splitlines()[-1] == "[verdict] FAILED (shapes differ; --allow-reshape compares the flattened tensors)"
    status, out, _ = run(["compare", str(files["flat"]), str(files["ref"]), "--atol", "0.25", "--detail",
                          "--allow-reshape"], capsys)
    assert status == 0
    assert f"[actual] shape=[8], dtype=float32, path={files['flat']}" in out
    assert f"[reference] shape=[2, 4], dtype=float32, path={files['ref']}" in out


def test_compare_different_numel_exit_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["compare", str(files["short"]), str(files["ref"])], capsys)
    assert status == 2 and out == ""
    assert "element counts differ" in err and str(files["short"]) in err


def test_compare_detail(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["compare", str(files["close"]), str(files["ref"]), "--detail"], capsys)
    assert status == 0
    for line in ("[actual] absmax=1.250000, min=1.000000, std=0.082680, mean=1.031250",
                 "[reference] absmax=1.000000, min=1.000000, std=0.000000, mean=1.000000",
                 "[absdiff > 75% max] 12.500 %, 1 elements",
                 "[absdiff > 0] 12.500 %, 1 elements",
                 "[absdiff = 0] 87.500 %, 7 elements"):
        assert line in out.splitlines()
    assert any(line.startswith("[cosine] 99.") and line.endswith(" %") for line in out.splitlines())


@pytest.mark.parametrize("which", ["actual", "reference"])
def test_missing_file_exit_2_names_path(files: dict[str, Path], tmp_path: Path, which: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "absent.tensor"
    argv = [str(absent), str(files["ref"])] if which == "actual" else [str(files["ref"]), str(absent)]
    status, out, err = run(["compare", *argv], capsys)
    assert status == 2 and out == ""
    assert err.startswith("qharness compare: ") and str(absent) in err


def test_corrupt_file_exit_2_names_path_and_field(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    files["close"].write_bytes(b"\0\0\0\0" + files["close"].read_bytes()[4:])
    status, _, err = run(["compare", str(files["close"]), str(files["ref"])], capsys)
    assert status == 2
    assert str(files["close"]) in err and "[magic]" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["nonsense"], ["compare", "only-one.tensor"], ["compare", "a", "b", "--atol", "x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_schema_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["schema"], capsys)
    assert status == 0
    schema = json.loads(out)
    assert schema["title"] == "qharness case"
    assert schema["properties"]["backends"]["propertyNames"]["enum"] == list(known_backends())


def python_m_harness(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, check=False)


def test_python_m_harness(files: dict[str, Path]) -> None:
    schema = python_m_harness("schema")
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout)["title"] == "qharness case"
    fail = python_m_harness("compare", str(files["close"]), str(files["ref"]), "--atol", "0")
    assert fail.returncode == 1 and "[verdict] FAILED" in fail.stdout
    missing = python_m_harness("compare", str(files["close"]), str(files["ref"].with_name("nope.tensor")))
    assert missing.returncode == 2 and "nope.tensor" in missing.stderr
