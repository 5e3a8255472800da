"""End-to-end tests of the pytest plugin through pytester: collection, options, verdicts, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# pytester's in-process runs drop modules first imported inside them; onnx's extension module
# aborts when imported twice, so import everything the inner runs use up front.
import harness.backends.onnxruntime
import harness.backends.torch_eager
import harness.export.onnx  # noqa: F401

pytest_plugins = ["pytester"]

TINY_MODULE = '''
import os
import numpy as np
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, 4, 3, padding=1))

    def forward(self, x):
        y = self.body(x)
        if os.environ.get("TINY_POISON") == "nan":
            y = y.clone()
            y[0, 1, 2, 3] = float("nan")
        if os.environ.get("TINY_POISON") == "shift":
            y = y + 0.5
        return y


def make(width=8):
    return Tiny(width)


class Data:
    def __init__(self, size=4, seed=0):
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        return {"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
'''

CASE = """\
name: tiny
task: tensors
model: {factory: "tinymod:make", args: {width: 8}}
data: {factory: "tinymod:Data", args: {size: 4}}
golden: {dir: golden/tiny, samples: 2}
backends:
  torch-fp32: {compare: {atol: 1.0e-5, rtol: 1.0e-4}}
  torch-fp16: {compare: {cosine_min: 0.999}}
  ort-fp32: {compare: {atol: 1.0e-4, rtol: 1.0e-3}}
  trt-int8: {compare: {cosine_min: 0.99}}
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A throw-away project with one case file and its tiny model module."""
    pytester.makepyfile(tinymod=TINY_MODULE)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nfilterwarnings = ["ignore::pytest.PytestAssertRewriteWarning"]\n')
    (pytester.path / "cases").mkdir()
    (pytester.path / "cases" / "tiny.yaml").write_text(CASE)
    pytester.syspathinsert()
    monkeypatch.setenv("QHARNESS_CACHE", str(pytester.path / ".cache"))
    monkeypatch.delenv("TINY_POISON", raising=False)
    return pytester


def test_items_are_collected_per_case_backend_and_kind(project: pytest.Pytester) -> None:
    result = project.runpytest("cases/", "--collect-only", "-q")
    result.stdout.fnmatch_lines([
        "cases/tiny.yaml::tiny[[]torch-fp32[]]::golden",
        "cases/tiny.yaml::tiny[[]torch-fp16[]]::golden",
        "cases/tiny.yaml::tiny[[]ort-fp32[]]::golden",
        "cases/tiny.yaml::tiny[[]trt-int8[]]::golden",
    ])


def test_backend_option_filters_and_accepts_comma_lists(project: pytest.Pytester) -> None:
    result = project.runpytest("cases/", "--collect-only", "-q", "--backend", "ort-fp32,trt-int8",
                               "--backend", "torch-fp32")
    out = result.stdout.str()
    assert "tiny[ort-fp32]::golden" in out and "tiny[trt-int8]::golden" in out and "tiny[torch-fp32]" in out
    assert "torch-fp16" not in out


def test_unknown_backend_is_a_usage_error_listing_known_ones(project: pytest.Pytester) -> None:
    result = project.runpytest("cases/", "--backend", "trt-int4")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown backend(s) trt-int4*known backends: torch-fp32, torch-fp16*"])


def test_missing_golden_fails_with_the_regeneration_command(project: pytest.Pytester) -> None:
    result = project.runpytest("cases/", "--backend", "torch-fp32", "-m", "golden")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*golden files are missing*", "*Generate them with: pytest cases/tiny.yaml --update-golden*"])
    assert not (project.path / "golden").exists()


def test_update_golden_then_compare_passes_and_skips_say_why(project: pytest.Pytester) -> None:
    result = project.runpytest("cases/", "--update-golden", "-m", "golden")
    result.assert_outcomes(passed=2, skipped=2)
    meta = json.loads((project.path / "golden/tiny/meta.json").read_text())
    assert meta["created_by"] == "pytest cases/tiny.yaml --update-golden"
    assert set(meta["files"]) == {"inputs/input.tensor", "outputs/output.tensor"}
    assert sorted(p.name for p in (project.path / "golden/tiny").iterdir()) == ["inputs", "meta.json", "outputs"]

    result = project.runpytest("cases/", "-rs", "-m", "golden")
    result.assert_outcomes(passed=2, skipped=2)
    if not torch.cuda.is_available():
        result.stdout.fnmatch_lines(["*SKIPPED*torch-fp16 needs a CUDA device: no CUDA device*"])
    result.stdout.fnmatch_lines(["*qharness summary*", "*tiny*ort-fp32*passed*", "*SKIPPED*cases/tiny.yaml:10*trt-int8*"])


def test_runs_never_write_golden_files_without_the_flag(project: pytest.Pytester) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32")
    output = project.path / "golden/tiny/outputs/output.tensor"
    before = output.stat().st_mtime_ns, output.read_bytes()
    project.runpytest("cases/", "--backend", "torch-fp32,ort-fp32")
    assert (output.stat().st_mtime_ns, output.read_bytes()) == before


def test_stale_golden_is_reported_with_the_command(project: pytest.Pytester) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32")
    case = project.path / "cases/tiny.yaml"
    case.write_text(case.read_text().replace("width: 8", "width: 6"))
    result = project.runpytest("cases/", "--backend", "torch-fp32", "-m", "golden")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*golden files in*are stale*case config hash*", "*Regenerate with: pytest cases/tiny.yaml --update-golden*"])


def test_nan_output_fails_naming_the_tensor(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32")
    monkeypatch.setenv("TINY_POISON", "nan")
    result = project.runpytest("cases/", "--backend", "torch-fp32,ort-fp32", "-m", "golden")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*output: actual has 1 NaN and 0 Inf values*"])


def test_tolerance_failure_shows_a_compact_table(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32")
    monkeypatch.setenv("TINY_POISON", "shift")
    result = project.runpytest("cases/", "--backend", "torch-fp32", "-m", "golden")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*tiny[[]torch-fp32[]] stage 'model': 1 of 1 outputs outside tolerance*",
        "*outside atol=1e-05+rtol=0.0001*|ref|*FAILED by*",
        "*worst index*actual*reference*abs err*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_report_dir_writes_markdown_and_json(project: pytest.Pytester) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32")
    result = project.runpytest("cases/", "--report-dir", "reports", "--benchmark-disable")
    result.assert_outcomes(passed=4, skipped=4)
    data = json.loads((project.path / "reports/report.json").read_text())
    assert data["schema_version"] == 2
    records = data["records"]
    assert {(r["backend"], r["verdict"]) for r in records} >= {("torch-fp32", "passed"), ("trt-int8", "skipped")}
    for r in records:
        assert {"case", "backend", "item", "verdict"} <= set(r)
        if r["verdict"] == "skipped":
            assert r["reason"]
        if r["backend"] == "ort-fp32" and r["item"] == "golden":
            stats = r["compare"]["output"]["stats"]
            assert stats["cosine"] > 0.9999 and "onnx:model" in r["artifacts"]
    assert "# qharness report" in (project.path / "reports/report.md").read_text()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("task: tensors", "task: tensors\nbogus: 1"), "*tiny.yaml:3: key 'bogus': unknown key*"),
        (lambda t: t.replace("size: 4", "size: [4"), "*tiny.yaml:4*malformed YAML*"),
        (lambda t: t.replace("samples: 2", "samples: two"), "*tiny.yaml:5: key 'golden.samples'*integer*"),
        (lambda t: t.replace("tinymod:make", "tinymod:nope"), "*tiny.yaml:3: key 'model.factory'*no attribute 'nope'*"),
        (lambda t: t.replace("trt-int8:", "trt-int9:"), "*tiny.yaml:10: key 'backends.trt-int9': unknown backend 'trt-int9'; known backends: torch-fp32*"),
        (lambda t: t.replace("args: {width: 8}", "args: {width: 8}, checkpoint: nowhere.pt"),
         "*tiny.yaml:3: key 'model.checkpoint'*does not exist*"),
    ],
    ids=["unknown-key", "malformed", "wrong-type", "unknown-factory", "unknown-backend", "missing-checkpoint"],
)
def test_invalid_case_is_a_collection_error_naming_file_line_and_key(project: pytest.Pytester, edit, expected) -> None:  # type: ignore[no-untyped-def]
    case = project.path / "cases/tiny.yaml"
    case.write_text(edit(case.read_text()))
    result = project.runpytest("cases/")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["invalid case file: cases/" + expected.lstrip("*")])


def test_yaml_files_outside_case_folders_are_ignored(project: pytest.Pytester) -> None:
    (project.path / "config.yaml").write_text("not: a case\n")
    result = project.runpytest("--collect-only", "-q", "cases/", "config.yaml")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # named explicitly: collected as a case, and invalid
    result = project.runpytest("--collect-only", "-q", ".")
    assert "config.yaml" not in result.stdout.str()


@pytest.mark.slow
def test_xdist_workers_report_to_the_controller(project: pytest.Pytester) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32")
    result = project.runpytest_subprocess("cases/", "-n", "2", "--report-dir", "reports", "-p", "xdist")
    result.assert_outcomes(passed=2, skipped=6)  # golden items pass; benchmarks wait for a serial run
    result.stdout.fnmatch_lines(["*qharness summary*"])
    records = json.loads(Path(project.path / "reports/report.json").read_text())["records"]
    assert len(records) == 8
    benchmark_reasons = {r["reason"] for r in records if r["item"] == "benchmark" and r["backend"] == "torch-fp32"}
    assert benchmark_reasons == {"benchmarks run serially: timings are unreliable under xdist (pytest-benchmark "
                                 "disables them); run `pytest cases/ -m benchmark` without -n"}


def test_case_file_help_mentions_options(project: pytest.Pytester) -> None:
    result = project.runpytest("--help")
    result.stdout.fnmatch_lines(["*--backend=NAME*", "*--update-golden*", "*--report-dir=DIR*", "*--qharness-cache=DIR*"])




def test_benchmark_items_time_each_backend_through_pytest_benchmark(project: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Under pytest-xdist the inner run inherits PYTEST_XDIST_WORKER, and pytest-benchmark then
    # disables itself (no bench.json); the inner run is a plain session.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32", "-m", "golden")
    result = project.runpytest("cases/", "-m", "benchmark", "--backend", "torch-fp32,ort-fp32",
                               "--benchmark-json", "bench.json", "--report-dir", "reports")
    result.assert_outcomes(passed=2)
    bench = json.loads((project.path / "bench.json").read_text())["benchmarks"]
    assert sorted(b["name"] for b in bench) == ["tiny[ort-fp32]::model", "tiny[torch-fp32]::model"]
    for b in bench:
        extra = b["extra_info"]
        assert extra["backend"] in ("torch-fp32", "ort-fp32") and extra["cpu_flags"] is not None
        assert extra["p99_ms"] >= extra["p90_ms"] > 0 and "torch" in extra["versions"]
    records = json.loads((project.path / "reports/report.json").read_text())["records"]
    timing = {r["backend"]: r["timing"] for r in records}
    assert timing["ort-fp32"]["rounds"] == 50 and timing["ort-fp32"]["median_ms"] > 0
    result.stdout.fnmatch_lines(["*tiny*torch-fp32*passed*1.00x*"])


def test_collecting_never_calls_factories(project: pytest.Pytester) -> None:
    """A staged case whose model and data factories would fail collects all its items: stage
    names come from the case file, nothing is built before an item runs."""
    project.makepyfile(boom_collect='''
def model(**kwargs):
    raise RuntimeError("the model factory ran")


class Data:
    def __init__(self, **kwargs):
        raise RuntimeError("the data factory ran")
''')
    (project.path / "cases" / "tiny.yaml").write_text("""\
name: staged
task: tensors
model: {factory: "boom_collect:model"}
data: {factory: "boom_collect:Data"}
golden: {dir: golden/staged, samples: 1}
stages:
  first: {inputs: [x], outputs: [y]}
  second: {inputs: [y], outputs: [z]}
backends:
  torch-fp32: {compare: {atol: 1.0e-5}}
  ort-fp32: {compare: {atol: 1.0e-4}}
""")
    result = project.runpytest("cases/", "--collect-only", "-q")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*staged[[]torch-fp32[]]::golden[[]first[]]", "*staged[[]ort-fp32[]]::benchmark[[]second[]]"])
    assert "factory ran" not in result.stdout.str()


def test_a_report_dir_that_is_a_file_is_a_usage_error_before_anything_runs(project: pytest.Pytester) -> None:
    (project.path / "report.md").write_text("mine")
    result = project.runpytest("cases/", "--report-dir", "report.md")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--report-dir report.md is a file; name a folder*"])
    assert (project.path / "report.md").read_text() == "mine"


def test_update_golden_refuses_another_cases_folder_unless_told(project: pytest.Pytester) -> None:
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32", "-m", "golden")
    other = CASE.replace("name: tiny", "name: other")
    (project.path / "cases" / "other.yaml").write_text(other)
    result = project.runpytest("cases/other.yaml", "--update-golden", "--backend", "torch-fp32", "-m", "golden")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*its meta.json belongs to case 'tiny', not 'other'*(or force the overwrite: --overwrite-golden)*"])
    assert json.loads((project.path / "golden/tiny/meta.json").read_text())["case"] == "tiny"
    result = project.runpytest("cases/other.yaml", "--update-golden", "--overwrite-golden", "--backend", "torch-fp32",
                               "-m", "golden")
    result.assert_outcomes(passed=1)
    assert json.loads((project.path / "golden/tiny/meta.json").read_text())["case"] == "other"


def test_compare_none_is_a_skip_that_says_so(project: pytest.Pytester) -> None:
    text = CASE.replace("ort-fp32: {compare: {atol: 1.0e-4, rtol: 1.0e-3}}", "ort-fp32: {compare: none}")
    (project.path / "cases" / "tiny.yaml").write_text(text)
    project.runpytest("cases/", "--update-golden", "--backend", "torch-fp32", "-m", "golden")
    result = project.runpytest("cases/", "--backend", "ort-fp32", "-m", "golden", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*ort-fp32: not compared (the case says compare: none)*"])


def test_paths_outside_the_project_need_the_option(project: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    text = CASE.replace("golden: {dir: golden/tiny, samples: 2}", f"golden: {{dir: {outside}/golden, samples: 2}}")
    (project.path / "cases" / "tiny.yaml").write_text(text)
    result = project.runpytest("cases/", "--collect-only")
    result.stdout.fnmatch_lines(["*key 'golden.dir'*"])
    assert result.ret != 0
    result = project.runpytest("cases/", "--collect-only", "--allow-outside-root")
    assert result.ret == 0
