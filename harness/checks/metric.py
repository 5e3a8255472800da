"""metric: the backend's metric over the evaluation set, gated against float and the baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tabulate import tabulate

from harness.checks.base import Check, ItemSpec
from harness.checks.stages import stage_rows, stage_table_markdown
from harness.context import ItemFailure
from harness.fmt import fixed
from harness.gates import evaluate_gates
from harness.records import Record
from harness.tasks.base import Batch

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext


class MetricCheck(Check):
    """float_min, min_ratio / max_drop against the float metric and the stored baseline, each
    in the direction of its figure."""

    kind = "metric"
    summary_columns = ("metric", "ratio", "gate")

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """One item when the case has a metric."""
        return [ItemSpec(self.kind)] if case.spec.metric is not None else []

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Gate the backend's figures (its shared evaluation pass); pictures under --report-dir;
        under --update-golden the figures become the new baseline."""
        started = time.perf_counter()
        spec, cls = ctx.case.spec.metric, ctx.metric_class
        if spec is None or cls is None:
            raise ctx.case.error("the case has no metric section", "metric")
        float_result = ctx.float_metric()
        values = ctx.evaluation(backend).metric
        assert values is not None
        # Under --update-golden this run's figures become the new baseline, so the old one is not a gate.
        baselines = {} if ctx.options.update_golden else stored_baselines(ctx).get(backend, {})
        gate = ctx.case.spec.backends[backend].metric
        keys = gated_keys(ctx)
        outcome = evaluate_gates(
            backend=backend, keys=keys, figures={k: cls.figure(k) for k in keys}, values=values.values,
            float_values=float_result["values"], float_min=spec.float_min, gate=gate, baselines=baselines,
            baseline_tolerance=(gate.baseline_tolerance if gate and gate.baseline_tolerance is not None
                                else spec.baseline_tolerance),
        )
        record = ctx.new_record(backend, self.kind, None, started, ctx.runner(backend))
        section = outcome.to_dict(spec.name, values.primary, values.details, float_result["details"])
        section["directions"] = {k: cls.figure(k).direction for k in keys}
        record.sections["metric"] = section
        if ctx.options.report_dir is not None:
            record.artifacts.update(pictures(ctx, backend))
        if ctx.options.update_golden:
            store_baseline(ctx, backend, values.values, float_result["values"])
        if not outcome.passed:
            record.verdict = "failed"
            text = outcome.failure_text(ctx.case.name)
            if ctx.info(backend).quantized:
                text += "\n" + _where_int8_loses(ctx, backend)
            raise ItemFailure(text, record)
        return record

    def summary_cells(self, row: Sequence[Record], case: Sequence[Record]) -> dict[str, str]:
        """The first gated figure, its ratio to float and the gate verdict."""
        metric_records = [r for r in row if r.item == self.kind]
        metric = next((r.section("metric") for r in metric_records if r.section("metric")), None)
        ratio = metric.get("ratio") if metric else None
        gate = "-"
        if metric_records:
            gate = "FAILED" if any(r.verdict == "failed" for r in metric_records) else metric_records[0].verdict
        return {
            "metric": f"{metric['key']}={metric['value']:.4f}" if metric else "-",
            "ratio": f"{ratio:.4f}" if isinstance(ratio, (int, float)) and math.isfinite(ratio) else "-",
            "gate": gate,
        }

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """The stage table (float -> PTQ -> QAT -> integer kernels), the per-class table (float and
        every backend) and the comparison pictures."""
        return stage_table_markdown(records) + _per_class_table(records) + _pictures(records, out_dir)

    def report_data(self, records: Sequence[Record]) -> dict[str, Any]:
        """`stages`: the stage table's rows (`harness.checks.stages.stage_rows`), when there is one."""
        rows = stage_rows(records)
        return {"stages": rows} if rows else {}


def _where_int8_loses(ctx: CaseContext, backend: str) -> str:
    """The worst five layers of the per-layer report (computed now, cached) and the command that
    ranks layers by the metric."""
    from harness.cases import DEFAULT_PROFILE
    from harness.layerwise import worst_layers_text

    try:
        path = ctx.case.path.resolve().relative_to(ctx.case.root.resolve())
    except ValueError:
        path = ctx.case.path
    profile = "" if ctx.case.profile == DEFAULT_PROFILE else f" --profile {ctx.case.profile}"
    return (f"{worst_layers_text(ctx, 5)}\nrank layers by the metric: qharness sensitivity {path.as_posix()} "
            f"--backend {backend}{profile}")


def gated_keys(ctx: CaseContext) -> list[str]:
    """The metric figures the gates apply to (`metric.keys`, default the metric's primary)."""
    spec, cls = ctx.case.spec.metric, ctx.metric_class
    assert spec is not None and cls is not None
    return list(spec.keys) or [cls.primary]


def stored_baselines(ctx: CaseContext) -> dict[str, dict[str, float]]:
    """Per-backend baseline figures stored in golden meta.json (empty without golden files)."""
    if not ctx.golden.exists():
        return {}
    baselines: dict[str, dict[str, float]] = ctx.golden.meta().get("baselines", {})
    return baselines


def store_baseline(ctx: CaseContext, backend: str, values: Mapping[str, float],
                   float_values: Mapping[str, float]) -> None:
    """Record `backend`'s gated figures (and the float ones) as the accepted baseline."""
    keys = gated_keys(ctx)

    def change(meta: dict[str, Any]) -> None:
        meta.setdefault("baselines", {})[backend] = {k: values[k] for k in keys}
        meta["float_metric"] = {k: float_values[k] for k in keys if not math.isnan(float_values[k])}

    if not ctx.golden.exists():
        ctx.write_golden()
    ctx.golden.update_meta(change)


def _run_outputs(ctx: CaseContext, backend: str, batch: Batch) -> dict[str, torch.Tensor]:
    program = ctx.program(ctx._float_model)
    runner = ctx.runner(backend)
    with torch.inference_mode():
        return {k: v.detach().cpu() for k, v in program.run(batch.inputs, runner.run_stage).items()}


def pictures(ctx: CaseContext, backend: str) -> dict[str, str]:
    """Comparison pictures (float vs `backend`) of the first two evaluation samples in the report
    folder; returns record artifacts `picture:<file>` -> path."""
    assert ctx.options.report_dir is not None
    batch = next(iter(ctx.adapter.batches(ctx.dataset(), 2)))
    outputs = {"float": _run_outputs(ctx, ctx.float_reference, batch)}
    if backend != ctx.float_reference:
        outputs[backend] = _run_outputs(ctx, backend, batch)
    out_dir = ctx.options.report_dir / "pictures" / ctx.case.name
    paths = ctx.adapter.pictures(batch, outputs, out_dir, backend)
    return {f"picture:{p.name}": str(p) for p in paths}


def _per_class_table(records: Sequence[Record]) -> list[str]:
    metric_records = [r for r in records if isinstance((r.section("metric") or {}).get("details"), dict)]
    if not metric_records:
        return []
    first = metric_records[0].section("metric")
    float_classes = (first.get("float_details") or {}).get("per_class")
    if not isinstance(float_classes, dict):
        return []
    backends = [(r.backend, r.section("metric")["details"].get("per_class", {})) for r in metric_records]
    # The float figures come from a JSON cache with sorted keys; a backend's keep the metric's order.
    order = next((list(per) for _, per in backends if per), list(float_classes))
    rows = [[cls, fixed(float_classes.get(cls)), *[fixed(per.get(cls)) for _, per in backends]] for cls in order]
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
