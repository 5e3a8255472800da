"""docs/own-project.md works: its files, copied into a folder outside the harness, make a project
whose own model package, dataset and case folder (named through `qharness_case_dirs`) pytest runs
from there; without `pythonpath` the collection error says what to add."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-project.md"
FILE_BLOCK = re.compile(r"```\w*\n# file: (\S+)\n(.*?)```", re.DOTALL)


def doc_files() -> dict[str, str]:
    """The files of docs/own-project.md: fenced blocks whose first line is `# file: <path>`."""
    return {m.group(1): m.group(2) for m in FILE_BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def run(project: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    """`python *args` in `project` with this checkout's harness importable (as if installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), pythonpath) if p),
           "QHARNESS_CACHE": str(project / ".cache")}
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The walk-through's project in a temporary folder (no conftest, no harness files)."""
    files = doc_files()
    assert {"pyproject.toml", "src/mymodels/nets.py", "src/mymodels/data.py", "qcases/tinyseg.yaml"} <= set(files)
    root = tmp_path / "myproject"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    made = run(root, "tools/make_weights.py", pythonpath=str(root / "src"))
    assert made.returncode == 0, made.stderr
    return root


def outcome(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """Counts of pytest's final summary line ({'passed': 4, 'skipped': 1, ...})."""
    line = proc.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line)}


def test_the_walk_through_project_runs_from_its_own_folder(project: Path) -> None:
    update = run(project, "-m", "pytest", "qcases/", "--update-golden", "-m", "golden", "-p", "no:cacheprovider")
    # tinyseg: 4 backends; tinyseg-onnx: ort-fp32 and ort-int8 pass, torch-fp32 and trt-int8 skip
    assert outcome(update) == {"passed": 6, "skipped": 2}, update.stdout[-3000:] + update.stderr[-2000:]
    onnx_meta = json.loads((project / "golden/tinyseg-onnx/meta.json").read_text())
    assert onnx_meta["reference"] == "ort-fp32" and onnx_meta["stages"] == {"model": {"inputs": ["img"],
                                                                                      "outputs": ["out"]}}
    meta = (project / "golden/tinyseg/meta.json").read_text()
    assert '"img"' in meta and '"out"' in meta  # the task_args names are the stage's tensor names
    checked = run(project, "-m", "pytest", "qcases/", "-m", "golden or metric", "-p", "no:cacheprovider", "-v")
    counts = outcome(checked)
    assert checked.returncode == 0 and counts.get("passed", 0) >= 8 and "failed" not in counts, checked.stdout[-4000:]
    assert "tinyseg[ort-int8]::metric PASSED" in checked.stdout
    assert "tinyseg-onnx[ort-int8]::metric PASSED" in checked.stdout
    # the ONNX case's float metric is ort-fp32's, the same model's as the factory case's
    figures = dict(re.findall(r"^(tinyseg(?:-onnx)?) +ort-fp32 .*?miou=(\d\.\d+)", checked.stdout, re.MULTILINE))
    assert len(figures) == 2 and figures["tinyseg"] == figures["tinyseg-onnx"], checked.stdout[-3000:]
    # a changed checkpoint (relative path, resolved against the project) makes the goldens stale
    run(project, "-c", "import torch; s = torch.load('weights/tinyseg.pt'); s['body.4.bias'] += 1; "
                       "torch.save(s, 'weights/tinyseg.pt')")
    stale = run(project, "-m", "pytest", "qcases/tinyseg.yaml", "-m", "golden", "--backend", "torch-fp32",
                "-p", "no:cacheprovider")
    assert outcome(stale) == {"failed": 1} and "stale" in stale.stdout


def test_without_pythonpath_collection_says_what_to_add(project: Path) -> None:
    config = project / "pyproject.toml"
    config.write_text(config.read_text().replace('pythonpath = ["src"]', ""))
    proc = run(project, "-m", "pytest", "qcases/", "--collect-only", "-p", "no:cacheprovider")
    assert proc.returncode != 0
    assert "cannot import module 'mymodels.nets'" in proc.stdout and "`pythonpath` in your pytest" in proc.stdout
    assert "qcases/tinyseg.yaml" in proc.stdout
