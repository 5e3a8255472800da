"""pytest hooks: options, collection of case YAML files, items, failure text, summary, reports.

Items are `<case file>::<case>[<backend>]::<kind>`; the kinds and which items each contributes
come from the check modules in `harness.checks.CHECKS` (golden per stage, rules, metric,
fidelity, benchmark per stage). The work is done by the checks on a lazy
`harness.context.CaseContext`; this module only adapts them to pytest. Collecting a case
validates it and builds nothing (no model, no data).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import checks
from harness.backends.registry import backend_info, known_backends
from harness.cases import DEFAULT_PROFILE, Case, load_case
from harness.checks.base import Check, ItemSpec
from harness.context import CaseContext, ItemFailure, RunOptions
from harness.environment import gpu_count
from harness.errors import BackendUnavailable, CaseError, HarnessError
from harness.records import Record

_STATE = pytest.StashKey["HarnessState"]()
_RECORD_KEY = "qharness_record"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register qharness's command-line options and ini settings."""
    group = parser.getgroup("qharness", "qharness accuracy and regression harness")
    group.addoption("--backend", action="append", default=[], metavar="NAME[,NAME]",
                    help="run only these backends (repeatable, comma lists); known: " + ", ".join(known_backends()))
    group.addoption("--update-golden", action="store_true", default=False,
                    help="regenerate golden files and metric baselines (written atomically)")
    group.addoption("--overwrite-golden", action="store_true", default=False,
                    help="with --update-golden: replace a golden folder whose meta.json names another case")
    group.addoption("--allow-outside-root", action="store_true", default=False,
                    help="let case files name paths outside the project root (golden dirs, checkpoints, data); "
                         "also the ini option qharness_allow_outside_root")
    group.addoption("--report-dir", default=None, metavar="DIR",
                    help="write report.md, report.json and pictures to DIR")
    group.addoption("--qharness-cache", default=None, metavar="DIR",
                    help="cache folder for exports, engines, calibration and float metrics "
                         "(default: $QHARNESS_CACHE or <rootdir>/.qharness_cache)")
    group.addoption("--profile", default=DEFAULT_PROFILE, metavar="NAME",
                    help="case profile to run (e.g. 'full' for full-resolution GPU runs)")
    group.addoption("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="device for PyTorch backends and ONNX Runtime's provider choice (default: auto)")
    parser.addini("qharness_case_dirs", "folder names whose YAML files are cases", type="args", default=["cases"])
    parser.addini("qharness_allow_outside_root", "let case files name paths outside the project root", type="bool",
                  default=False)


def selected_backends(values: list[str]) -> tuple[str, ...] | None:
    """Parse repeated / comma-separated --backend values; None means "all".

    Raises pytest.UsageError listing the known names for an unknown one.
    """
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in known_backends()]
    if unknown:
        raise pytest.UsageError(
            f"unknown backend(s) {', '.join(unknown)} for --backend; known backends: {', '.join(known_backends())}"
        )
    return tuple(dict.fromkeys(names)) or None


class HarnessState:
    """Per-run state kept in the pytest config stash."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.backends = selected_backends(config.getoption("--backend"))
        self.profile: str = config.getoption("--profile")
        cache = config.getoption("--qharness-cache") or os.environ.get("QHARNESS_CACHE")
        report_dir = config.getoption("--report-dir")
        if report_dir and Path(report_dir).exists() and not Path(report_dir).is_dir():
            raise pytest.UsageError(f"--report-dir {report_dir} is a file; name a folder (it is created if missing)")
        self.options = RunOptions(
            device=_device(config.getoption("--device")),
            cache_dir=Path(cache) if cache else config.rootpath / ".qharness_cache",
            update_golden=bool(config.getoption("--update-golden")),
            report_dir=Path(report_dir) if report_dir else None,
            overwrite_golden=bool(config.getoption("--overwrite-golden")),
            allow_outside_root=bool(config.getoption("--allow-outside-root") or config.getini("qharness_allow_outside_root")),
        )
        self.runs: dict[Path, CaseContext] = {}
        self.records: list[Record] = []

    def run_for(self, case: Case) -> CaseContext:
        """The CaseContext of a case (one per case file per pytest run)."""
        if case.path not in self.runs:
            self.runs[case.path] = CaseContext(case, self.options)
        return self.runs[case.path]


def _xdist_benchmark_reason(config: pytest.Config) -> str | None:
    """Benchmarks need a quiet machine: under xdist they are skipped with this reason."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") != "no":
        return ("benchmarks run serially: timings are unreliable under xdist (pytest-benchmark disables "
                "them); run `pytest cases/ -m benchmark` without -n")
    return None


def pin_worker_gpu(config: pytest.Config) -> str | None:
    """Under xdist, give worker gwN the N-th visible GPU (round robin) through
    CUDA_VISIBLE_DEVICES, before anything initialises CUDA. Returns the device chosen."""
    worker = getattr(config, "workerinput", {}).get("workerid")
    if not worker:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpu_count())]
    if not devices:
        return None
    chosen = devices[int(worker.removeprefix("gw")) % len(devices)]
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda given but torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def pytest_configure(config: pytest.Config) -> None:
    """Validate options, create the run state and register item-kind markers."""
    for marker in ("qharness", *(check.kind for check in checks.CHECKS)):
        config.addinivalue_line("markers", f"{marker}: qharness {marker} items")
    pin_worker_gpu(config)
    state = HarnessState(config)
    config.stash[_STATE] = state
    config.pluginmanager.register(ReportingPlugin(state), "qharness-reporting")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect YAML files under a case folder (or named on the command line) as cases."""
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    dirs = set(parent.config.getini("qharness_case_dirs"))
    try:
        rel_parts = file_path.resolve().relative_to(parent.config.rootpath.resolve()).parts[:-1]
    except ValueError:
        rel_parts = file_path.parts[:-1]
    if not (dirs & set(rel_parts)) and not parent.session.isinitpath(file_path):
        return None
    collector: CaseFile = CaseFile.from_parent(parent, path=file_path)
    return collector


class CaseFile(pytest.File):
    """One case YAML file; collects a node per selected backend."""

    def collect(self) -> Iterator[pytest.Item | pytest.Collector]:
        """Validate the case and yield `<case>[<backend>]` collectors in report order."""
        state = self.config.stash[_STATE]
        case = load_case(self.path, root=self.config.rootpath, profile=state.profile,
                         allow_outside_root=state.options.allow_outside_root)
        run = state.run_for(case)
        run.validate()
        for backend in known_backends():
            if backend not in case.spec.backends or (state.backends and backend not in state.backends):
                continue
            yield BackendNode.from_parent(self, name=f"{case.name}[{backend}]", case=case, backend=backend, run=run)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        """Case errors are shown as their message (file, line, key), without a traceback."""
        if isinstance(excinfo.value, CaseError):
            shown = self.config.rootpath / excinfo.value.path
            with contextlib.suppress(ValueError):
                shown = shown.resolve().relative_to(self.config.rootpath.resolve())
            return f"invalid case file: {excinfo.value.render(shown)}"
        return str(super().repr_failure(excinfo))


class BackendNode(pytest.Collector):
    """One case on one backend; its items share the prepared runner, released at teardown."""

    def __init__(self, *, case: Case, backend: str, run: CaseContext, **kwargs: Any):
        super().__init__(**kwargs)
        self.case = case
        self.backend = backend
        self.run = run

    def collect(self) -> Iterator[pytest.Item]:
        """The items every check contributes for this case and backend, in `CHECKS` order."""
        info = backend_info(self.backend)
        for check in checks.CHECKS:
            for spec in check.items(self.case, info, self.run.stage_names):
                if check.fixtures:
                    yield self._function_item(check, spec)
                else:
                    yield CaseItem.from_parent(self, name=spec.name, check=check, spec=spec)

    def _function_item(self, check: Check, spec: ItemSpec) -> FixtureItem:
        """A Function item, so that the fixtures the check needs (pytest-benchmark's `benchmark`
        and its options) are provided by pytest."""
        run, backend = self.run, self.backend

        def check_item(**fixtures: Any) -> None:
            item.qharness_record = Record(case=run.case.name, profile=run.case.profile, backend=backend,
                                          item=check.kind, stage=spec.stage)
            reason = run.unavailable_reason(backend)
            if reason is None and "benchmark" in check.fixtures:
                reason = _xdist_benchmark_reason(item.config)
            if reason:
                item.qharness_record.verdict = "skipped"
                item.qharness_record.reason = reason
                raise pytest.skip.Exception(reason, _use_item_location=True)
            item.qharness_record = check.run(run, backend, spec, fixtures)

        check_item.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY) for f in check.fixtures])
        item: FixtureItem = FixtureItem.from_parent(self, name=spec.name, callobj=check_item)
        item.add_marker(pytest.mark.qharness)
        item.add_marker(getattr(pytest.mark, check.kind))
        return item

    def teardown(self) -> None:
        """Free the backend's sessions / engines once its items are done."""
        self.run.release(self.backend)


class FixtureItem(pytest.Function):
    """An item of a check that needs pytest fixtures (e.g. a benchmark of one stage)."""

    qharness_record: Record | None = None


class CaseItem(pytest.Item):
    """An item of a check that needs no fixtures (golden, rules, metric, fidelity, ...)."""

    def __init__(self, *, check: Check, spec: ItemSpec, **kwargs: Any):
        super().__init__(**kwargs)
        self.check = check
        self.spec = spec
        self.kind = check.kind
        self.stage = spec.stage
        parent = self.parent
        assert isinstance(parent, BackendNode)
        self.node: BackendNode = parent
        self.qharness_record: Record | None = None
        self.add_marker(pytest.mark.qharness)
        self.add_marker(getattr(pytest.mark, check.kind))

    def runtest(self) -> None:
        """Skip when the backend cannot run here; otherwise run the check."""
        run, backend = self.node.run, self.node.backend
        self.qharness_record = Record(case=run.case.name, profile=run.case.profile, backend=backend,
                                      item=self.kind, stage=self.stage, nodeid=self.nodeid)
        reason = run.unavailable_reason(backend)
        if reason:
            self._skip(reason)
        try:
            self.qharness_record = self.check.run(run, backend, self.spec, {})
        except BackendUnavailable as exc:
            self._skip(str(exc))
        except ItemFailure as exc:
            self.qharness_record = exc.record
            self.qharness_record.reason = exc.text
            raise
        except HarnessError as exc:
            self.qharness_record.verdict, self.qharness_record.reason = "failed", str(exc)
            raise
        self.qharness_record.nodeid = self.nodeid

    def _skip(self, reason: str) -> None:
        """Skip, reported at the backend's line in the case file rather than in this module."""
        assert self.qharness_record is not None
        self.qharness_record.verdict, self.qharness_record.reason = "skipped", reason
        raise pytest.skip.Exception(reason, _use_item_location=True)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        """Our failures are their table or message; anything else gets pytest's traceback."""
        if isinstance(excinfo.value, (ItemFailure, HarnessError)):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        """Location shown in reports: the case file at the backend's line, and the item name."""
        line = self.node.case.line_of("backends", self.node.backend) or 1
        return self.path, line - 1, f"{self.node.name}::{self.name}"


class ReportingPlugin:
    """Hooks that need the run state: records from reports, summary table, report files."""

    def __init__(self, state: HarnessState):
        self.state = state

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """Attach the item's record to the report (so it also travels from xdist workers)."""
        report = yield
        record = getattr(item, "qharness_record", None)
        if call.when == "call" and record is not None:
            record.nodeid = item.nodeid
            if report.failed and record.verdict == "passed":
                record.verdict = "failed"
                record.reason = record.reason or str(call.excinfo.value if call.excinfo else "")
            if report.skipped:
                record.verdict = "skipped"
            report.user_properties.append((_RECORD_KEY, json.dumps(record.to_dict(), default=str)))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect records (in the controller process when running under xdist)."""
        for key, value in report.user_properties:
            if key == _RECORD_KEY:
                self.state.records.append(Record.from_dict(json.loads(str(value))))

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        """Print the summary table and write report files (controller only)."""
        from harness.report import summary_table, write_reports

        if hasattr(config, "workerinput") or not self.state.records:
            return
        terminalreporter.write_sep("=", "qharness summary")
        terminalreporter.write_line(summary_table(self.state.records))
        if self.state.options.report_dir is not None:
            written = write_reports(self.state.records, self.state.options.report_dir)
            terminalreporter.write_line(f"qharness reports: {', '.join(str(p) for p in written)}")
