"""Result records -> the terminal summary table, report.md and report.json.

report.json (schema documented in docs/report-schema.md) is the CI artefact:
    {"schema_version": 1, "generated_at": ..., "environment": {...}, "records": [Record, ...]}
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

from harness.atomic import write_json_atomic, write_text_atomic
from harness.environment import cpu_flags, cpu_name, library_versions
from harness.records import SCHEMA_VERSION, Record

HEADERS = ["case", "backend", "status", "golden cos / max|err|", "metric", "ratio", "gate", "median ms", "speedup"]


def _row_key(record: Record) -> tuple[str, str]:
    return record.case, record.backend


def _status(records: Sequence[Record]) -> str:
    verdicts = {r.verdict for r in records}
    if "failed" in verdicts:
        return "FAILED"
    if verdicts == {"skipped"}:
        reason = next((r.reason for r in records if r.reason), "")
        return f"skipped: {reason[:60]}" if reason else "skipped"
    return "passed"


def _golden_cell(records: Sequence[Record]) -> str:
    cosines, errors = [], []
    for r in records:
        for stats in r.compare.values():
            s = stats.get("stats", {})
            cos, err = s.get("cosine"), s.get("max_abs")
            if isinstance(cos, (int, float)):
                cosines.append(float(cos))
            if isinstance(err, (int, float)):
                errors.append(float(err))
    if not cosines:
        return "-"
    return f"{min(cosines):.6f} / {max(errors):.3g}"


def _metric(records: Sequence[Record]) -> dict[str, Any] | None:
    return next((r.metric for r in records if r.metric), None)


def _median_ms(records: Sequence[Record]) -> float | None:
    medians = [float(r.timing["median_ms"]) for r in records if r.timing and "median_ms" in r.timing]
    return sum(medians) if medians else None


def summary_rows(records: Iterable[Record]) -> list[list[str]]:
    """One row per case x backend, in first-seen order."""
    grouped: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        grouped[_row_key(r)].append(r)
    baseline_ms = {case: _median_ms(rs) for (case, backend), rs in grouped.items() if backend == "torch-fp32"}
    rows = []
    for (case, backend), rs in grouped.items():
        metric = _metric(rs)
        median = _median_ms(rs)
        base = baseline_ms.get(case)
        rows.append([
            case,
            backend,
            _status(rs),
            _golden_cell([r for r in rs if r.item == "golden"]),
            f"{metric['key']}={metric['value']:.4f}" if metric else "-",
            f"{metric['ratio']:.4f}" if metric and _finite(metric.get("ratio")) else "-",
            _gate_cell(rs),
            f"{median:.3f}" if median is not None else "-",
            f"{base / median:.2f}x" if median and base else "-",
        ])
    return rows


def _gate_cell(records: Sequence[Record]) -> str:
    metric = [r for r in records if r.item == "metric"]
    if not metric:
        return "-"
    return "FAILED" if any(r.verdict == "failed" for r in metric) else metric[0].verdict


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary_table(records: Iterable[Record], tablefmt: str = "simple") -> str:
    """The end-of-run table: one row per case x backend."""
    rows, headers = summary_rows(records), HEADERS
    if tablefmt == "github":  # a bare "|" inside a cell would split it into two columns
        rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        headers = [h.replace("|", "\\|") for h in headers]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


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
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json_atomic(json_path, data)
    chart = latency_chart(records, out_dir / "latency.png")
    write_text_atomic(md_path, markdown(records, out_dir, chart))
    return [md_path, json_path, *([chart] if chart else [])]


def latency_chart(records: Sequence[Record], path: Path) -> Path | None:
    """A bar chart of median latency per backend (whiskers to p90 and p99), one panel per case
    and stage; None when no record has timings."""
    timed = [r for r in records if r.timing and "median_ms" in r.timing]
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
        assert all(r.timing for r in rs)
        medians = [float(r.timing["median_ms"]) for r in rs if r.timing]
        p90 = [float(r.timing.get("p90_ms", m)) for r, m in zip(rs, medians, strict=True) if r.timing is not None]
        p99 = [float(r.timing.get("p99_ms", m)) for r, m in zip(rs, medians, strict=True) if r.timing is not None]
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
    """report.md: summary, latency chart, per-case metric tables, pictures, failures."""
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
        parts += _fidelity_table(rs)
        parts += _rules_section(rs)
        parts += _per_class_table(rs)
        parts += _pictures(rs, out_dir)
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


def _fidelity_table(records: Sequence[Record]) -> list[str]:
    rows = []
    for r in records:
        if r.item != "fidelity" or not r.fidelity:
            continue
        ref = r.fidelity.get("reference", "-")
        for stage, outputs in (r.fidelity.get("stages") or {"end to end": r.fidelity.get("cosine", {})}).items():
            rows += [[r.backend, ref, stage, name, _cosine_cell(c)] for name, c in outputs.items()]
        if r.fidelity.get("stages"):
            rows += [[r.backend, ref, "end to end", name, _cosine_cell(c)] for name, c in r.fidelity.get("cosine", {}).items()]
    if not rows:
        return []
    return ["", "### Fidelity", "", tabulate(rows, headers=["backend", "reference", "stage", "output", "cosine"],
                                             tablefmt="github", disable_numparse=True)]


def _cosine_cell(x: Any) -> str:
    return f"{x:.6f}" if isinstance(x, (int, float)) else str(x)


def _rules_section(records: Sequence[Record]) -> list[str]:
    from harness.export.inspect import RuleReport

    out = []
    for r in records:
        if r.item == "rules" and r.rules:
            out += ["", f"### Quantization rules ({r.backend}, {r.verdict})", "", *RuleReport.from_dict(r.rules).markdown()]
    return out


def _per_class_table(records: Sequence[Record]) -> list[str]:
    metric_records = [r for r in records if r.metric and isinstance(r.metric.get("details"), dict)]
    if not metric_records:
        return []
    first = metric_records[0].metric
    assert first is not None
    float_classes = (first.get("float_details") or {}).get("per_class")
    if not isinstance(float_classes, dict):
        return []
    backends = [(r.backend, r.metric["details"].get("per_class", {})) for r in metric_records if r.metric]
    # The float figures come from a JSON cache with sorted keys; a backend's keep the metric's order.
    order = next((list(per) for _, per in backends if per), list(float_classes))
    rows = [[cls, _cell(float_classes.get(cls)), *[_cell(per.get(cls)) for _, per in backends]] for cls in order]
    title = first["details"].get("per_class_title", "per class")
    return ["", f"### {title}", "", tabulate(rows, headers=["class", "float", *[b for b, _ in backends]],
                                            tablefmt="github", disable_numparse=True)]


def _pictures(records: Sequence[Record], out_dir: Path) -> list[str]:
    out = []
    for r in records:
        for name, path in r.artifacts.items():
            if name.startswith("picture:"):
                try:
                    rel = Path(path).resolve().relative_to(out_dir.resolve())
                except ValueError:
                    rel = Path(path)
                out.append(f"![{r.backend} {name[8:]}]({rel.as_posix()})")
    return ["", "### Pictures", "", *out] if out else []


def _cell(x: Any) -> str:
    if isinstance(x, (int, float)):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return "-" if x is None else str(x)
