"""Extending qharness: a new item kind and a new metric each take one file (tests/toy_check.py,
tests/toy_metric.py); gates read a metric's figure directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness.backends.onnxruntime
import harness.backends.torch_eager
import harness.export.onnx  # noqa: F401 - see tests/test_plugin.py: import before pytester runs
from harness import checks

pytest_plugins = ["pytester"]
HERE = Path(__file__).parent

SEG_MODULE = '''
import numpy as np
import torch
from torch import nn


class Seg(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.body(x)


def make():
    torch.manual_seed(0)
    return Seg()


class Sample:
    def __init__(self, index, image, label):
        self.index, self.image, self.label = index, image, label


class Data:
    def __init__(self, size=4, seed=0):
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        return Sample(i, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.integers(0, 4, (16, 16)))
'''

CASE = """\
name: seg
task: segmentation
model: {{factory: "segmod:make"}}
data: {{factory: "segmod:Data", args: {{size: 4}}, batch_size: 2}}
golden: {{dir: golden/seg, samples: 2}}
metric:
  name: "toy_metric:ErrorRate"
  keys: [{keys}]
  float_min: {float_min}
backends:
  torch-fp32: {{compare: {{atol: 1.0e-5, rtol: 1.0e-4}}}}
  ort-fp32: {{compare: {{atol: 1.0e-4, rtol: 1.0e-3}}, metric: {{max_drop: 0.0}}}}
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A throw-away project with a segmentation case scored by the toy metric."""
    pytester.makepyfile(segmod=SEG_MODULE, toy_metric=(HERE / "toy_metric.py").read_text(),
                        toy_check=(HERE / "toy_check.py").read_text())
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nfilterwarnings = ["ignore::pytest.PytestAssertRewriteWarning"]\n')
    (pytester.path / "cases").mkdir()
    pytester.syspathinsert()
    monkeypatch.setenv("QHARNESS_CACHE", str(pytester.path / ".cache"))
    return pytester


def write_case(project: pytest.Pytester, keys: str = "error_rate, accuracy", float_min: str = "{error_rate: 1.0}") -> None:
    (project.path / "cases" / "seg.yaml").write_text(CASE.format(keys=keys, float_min=float_min))


def test_a_lower_is_better_metric_is_gated_in_its_direction(project: pytest.Pytester) -> None:
    write_case(project)
    project.runpytest("cases/", "--update-golden", "-m", "golden")
    result = project.runpytest("cases/", "-m", "metric", "--report-dir", "reports")
    result.assert_outcomes(passed=2)
    records = json.loads((project.path / "reports/report.json").read_text())["records"]
    metric = next(r["metric"] for r in records if r["backend"] == "ort-fp32")
    assert metric["directions"] == {"error_rate": "lower", "accuracy": "higher"}
    assert 0.3 < metric["value"] < 1.0 and metric["key"] == "error_rate"
    # the float model's error rate must be <= the floor: a floor of 0.1 fails, read as "<="
    write_case(project, float_min="{error_rate: 0.1}")
    result = project.runpytest("cases/", "-m", "metric", "--backend", "torch-fp32")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*error_rate*float_min*<= 0.1000*FAILED by*"])


def test_a_misspelled_metric_key_is_a_collection_error(project: pytest.Pytester) -> None:
    write_case(project, keys="error_rate, acuracy")
    result = project.runpytest("cases/", "--collect-only")
    result.stdout.fnmatch_lines(["*cases/seg.yaml:8: key 'metric.keys.1': metric 'error_rate' has no figure 'acuracy'; "
                                 "it has: error_rate, accuracy*"])


def test_a_new_check_kind_takes_one_module(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    import toy_check

    write_case(project)
    monkeypatch.setattr(checks, "CHECKS", (*checks.CHECKS, toy_check.ShapeCheck()))
    project.runpytest("cases/", "--update-golden", "-m", "golden")
    result = project.runpytest("cases/", "-m", "shapes", "--report-dir", "reports", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*seg[[]torch-fp32[]]::shapes PASSED*", "*shapes*", "*logits [[]2, 4, 16, 16[]]*"])
    report = (project.path / "reports/report.md").read_text()
    assert "### Output shapes" in report and "- ort-fp32: {'logits': [2, 4, 16, 16]}" in report
    records = json.loads((project.path / "reports/report.json").read_text())["records"]
    assert {r["backend"]: r["shapes"] for r in records} == {"torch-fp32": {"logits": [2, 4, 16, 16]},
                                                            "ort-fp32": {"logits": [2, 4, 16, 16]}}
