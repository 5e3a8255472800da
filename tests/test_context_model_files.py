"""CaseContext.write_golden saves a model's `golden_files()` next to meta.json, with their hashes."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from harness import tensorfile
from harness.cases import load_case
from harness.context import CaseContext, RunOptions
from harness.errors import GoldenError

MODULE = '''
import numpy as np
import torch
from torch import nn


class WithFiles(nn.Module):
    def __init__(self, name="table"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.name = name

    def forward(self, x):
        return self.conv(x)

    def golden_files(self):
        return {self.name: np.arange(12, dtype=np.int64).reshape(3, 4), "scale": np.float32([0.5, 2.0])}


class Plain(WithFiles):
    golden_files = None


class Data:
    def __init__(self, size=2):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"input": np.random.default_rng(i).standard_normal((1, 3, 4, 4)).astype(np.float32)}
'''

CASE = """\
name: files
task: tensors
model: {{factory: "filesmod:{factory}", args: {args}}}
data: {{factory: "filesmod:Data"}}
golden: golden/files
backends:
  torch-fp32: {{compare: none}}
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "filesmod.py").write_text(MODULE)
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "cases").mkdir()
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("filesmod", None)


def _run(project: Path, factory: str = "WithFiles", args: str = "{}") -> CaseContext:
    path = project / "cases" / "files.yaml"
    path.write_text(CASE.format(factory=factory, args=args))
    options = RunOptions.default(project)
    return CaseContext(load_case(path), RunOptions(options.device, project / ".cache", update_golden=True))


def test_model_files_are_written_and_hashed(project: Path) -> None:
    run = _run(project)
    run.write_golden()
    golden = project / "golden" / "files"
    np.testing.assert_array_equal(tensorfile.load(golden / "table.tensor"), np.arange(12).reshape(3, 4))
    assert tensorfile.load(golden / "scale.tensor").dtype == np.float32
    files = run.golden.meta()["files"]
    for name in ("table.tensor", "scale.tensor"):
        assert files[name] == hashlib.sha256((golden / name).read_bytes()).hexdigest()
    assert "inputs/input.tensor" in files and "outputs/output.tensor" in files
    run.golden_record()  # still fresh and readable with the extra entries


def test_models_without_golden_files_write_none(project: Path) -> None:
    run = _run(project, "Plain")
    run.write_golden()
    assert sorted(p.name for p in (project / "golden" / "files").glob("*.tensor")) == []


def test_unsafe_file_names_are_refused(project: Path) -> None:
    run = _run(project, args='{name: "../escape"}')
    with pytest.raises(GoldenError, match=r"'\.\./escape' is not a plain file name"):
        run.write_golden()
    assert not (project / "golden" / "escape.tensor").exists()
