"""Result records -> the terminal summary table, report.md and report.json.

report.json (schema documented in docs/report-schema.md) is the CI artefact:
    {"schema_version": 2, "generated_at": ..., "environment": {...}, "records": [Record, ...],
     "cases": {case: {"stages": [...]}}}
Every record carries at least case, backend, item and verdict (passed / failed / skipped with
the reason); golden records their compare statistics per output; metric records metric, value,
float_value, ratio; benchmark records timing.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness import checks
from harness.atomic import write_json_atomic, write_text_atomic
from harness.environment import cpu_flags, cpu_name, library_versions
from harness.records import SCHEMA_VERSION, Record


def _status(records: Sequence[Record]) -> str:
    verdicts = {r.verdict for r in records}
    if "failed" in verdicts:
        return "FAILED"
    if verdicts == {"skipped"}:
        reason = next((r.reason for r in records if r.reason), "")
        return f"skipped: {reason[:60]}" if reason else "skipped"
    return "passed"


def headers() -> list[str]:
    """Summary-table columns: case, backend, status, then each check's columns in CHECKS order."""
    return ["case", "backend", "status", *(c for check in checks.CHECKS for c in check.summary_columns)]


def summary_rows(records: Iterable[Record]) -> list[list[str]]:
    """One row per case x backend, in first-seen order; the checks fill their columns."""
    grouped: dict[tuple[str, str], list[Record]] = defaultdict(list)
    by_case: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        grouped[(r.case, r.backend)].append(r)
        by_case[r.case].append(r)
    rows = []
    for (case, backend), rs in grouped.items():
        cells: dict[str, str] = {}
        for check in checks.CHECKS:
            cells.update(check.summary_cells(rs, by_case[case]))
        rows.append([case, backend, _status(rs), *(cells.get(c, "-") for c in headers()[3:])])
    return rows


def summary_table(records: Iterable[Record], tablefmt: str = "simple") -> str:
    """The end-of-run table: one row per case x backend."""
    rows, names = summary_rows(records), headers()
    if tablefmt == "github":  # a bare "|" inside a cell would split it into two columns
        rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        names = [h.replace("|", "\\|") for h in names]
    return tabulate(rows, headers=names, tablefmt=tablefmt, disable_numparse=True)


def environment() -> dict[str, Any]:
    """Machine and library facts recorded with every report."""
    return {"versions": library_versions(), "cpu": cpu_name(), "cpu_flags": list(cpu_flags())}


def write_reports(records: Sequence[Record], out_dir: Path) -> list[Path]:
    """Write report.json and report.md into `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "records": [_json_safe(r.to_dict()) for r in records],
    }
    cases = case_data(records)
    if cases:
        data["cases"] = _json_safe(cases)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json_atomic(json_path, data)
    chart = latency_chart(records, out_dir / "latency.png")
    write_text_atomic(md_path, markdown(records, out_dir, chart))
    return [md_path, json_path, *([chart] if chart else [])]


def case_data(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """report.json's `cases`: per case, what the checks report about the case as a whole (the
    metric check's stage table under `stages`); cases with nothing are left out."""
    by_case: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_case[r.case].append(r)
    out = {}
    for case, rs in by_case.items():
        merged: dict[str, Any] = {}
        for check in checks.CHECKS:
            merged.update(check.report_data(rs))
        if merged:
            out[case] = merged
    return out


def latency_chart(records: Sequence[Record], path: Path) -> Path | None:
    """A bar chart of median latency per backend (whiskers to p90 and p99), one panel per case
    and stage; None when no record has timings."""
    timed = [r for r in records if r.section("timing") and "median_ms" in r.section("timing")]
    if not timed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Record]] = defaultdict(list)
    for r in timed:
        panels[f"{r.case} [{r.stage}]" if r.stage and r.stage != "model" else r.case].append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.45 * max(len(v) for v in panels.values()) * len(panels)),
                             squeeze=False)
    for ax, (title, rs) in zip(axes[:, 0], panels.items(), strict=True):
        names = [r.backend for r in rs]
        timings = [r.section("timing") for r in rs]
        medians = [float(t["median_ms"]) for t in timings]
        p90 = [float(t.get("p90_ms", m)) for t, m in zip(timings, medians, strict=True)]
        p99 = [float(t.get("p99_ms", m)) for t, m in zip(timings, medians, strict=True)]
        ys = range(len(rs))
        ax.barh(ys, medians, color="#4C72B0")
        ax.errorbar(p90, ys, fmt="|", color="black", label="p90")
        ax.errorbar(p99, ys, fmt="x", color="#C44E52", label="p99")
        ax.set_yticks(list(ys), names)
        ax.invert_yaxis()
        ax.set_xlabel("latency (ms): bar = median")
        ax.set_title(title)
        for y, m in zip(ys, medians, strict=True):
            ax.annotate(f"{m:.2f}", (m, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _json_safe(value: Any) -> Any:
    """`value` with NaN / Inf floats as the strings "nan" / "inf" / "-inf" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def markdown(records: Sequence[Record], out_dir: Path, chart: Path | None = None) -> str:
    """report.md: summary, latency chart, then per case the backends' info and each check's
    section (rules, per-class tables, pictures, fidelity, ...) and the failures."""
    env = environment()
    parts = [
        "# qharness report",
        "",
        f"CPU: {env['cpu']} ({', '.join(env['cpu_flags']) or 'no SIMD flags read'}); "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        summary_table(records, tablefmt="github"),
    ]
    if chart is not None:
        parts += ["", f"![latency]({chart.name})"]
    by_case: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_case[r.case].append(r)
    for case, rs in by_case.items():
        parts += ["", f"## {case}"]
        parts += _info_table(rs)
        for check in checks.CHECKS:
            parts += check.report_section(rs, out_dir)
        failures = [r for r in rs if r.verdict == "failed"]
        if failures:
            parts += ["", "### Failures"]
            for r in failures:
                parts += ["", f"`{r.nodeid or r.backend + '::' + r.item}`", "", "```", r.reason.strip(), "```"]
    return "\n".join(parts) + "\n"


def _info_table(records: Sequence[Record]) -> list[str]:
    rows = {}
    for r in records:
        if r.info and r.backend not in rows:
            rows[r.backend] = [r.backend, r.info.get("provider", "-"), r.info.get("device", "-"),
                               r.info.get("precision", "-")]
    if not rows:
        return []
    return ["", tabulate(list(rows.values()), headers=["backend", "provider", "device", "precision"],
                         tablefmt="github")]


