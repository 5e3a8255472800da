"""rules: the exported Q/DQ graph of the calibrated model obeys the case's quantization rules.

The item belongs to the backend holding the quantization-reference role (the fake-quant model)
of a case whose quant section names rules; it exports in TensorRT's Q/DQ layout (cached, shared
with TensorRT's int8 backend; TensorRT itself is not needed) and checks the graphs
(`harness.export.inspect`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.backends.registry import QUANT_REFERENCE
from harness.checks.base import Check, ItemSpec
from harness.context import ItemFailure
from harness.records import Record

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext


class RulesCheck(Check):
    """The rule report of the Q/DQ graph; any violation fails with the violating nodes."""

    kind = "rules"

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """One item on the quantization reference when the case names rules."""
        return [ItemSpec(self.kind)] if QUANT_REFERENCE in backend.roles and case.spec.quant.rules else []

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Export (cached) and check every stage's graph; the record carries the rule report."""
        from harness.export.inspect import rule_report
        from harness.quant.transform import summarize

        started = time.perf_counter()
        paths = ctx.qdq_onnx("tensorrt")
        model = ctx.quantized_model()
        program = ctx.program(model)
        report = rule_report({s: (paths[s], program.model) for s in program.stages}, ctx.case.spec.quant.rules,
                             summarize(model))
        record = ctx.new_record(backend, self.kind, None, started)
        record.artifacts.update({f"onnx-qdq-tensorrt:{s}": str(p) for s, p in paths.items()})
        record.sections["rules"] = report.to_dict()
        if not report.passed:
            record.verdict = "failed"
            raise ItemFailure(f"{ctx.case.name}[{backend}] rules: {report.failure_text()}", record)
        return record

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """The rule report of each rules record."""
        from harness.export.inspect import RuleReport

        out = []
        for r in records:
            if r.item == self.kind and r.section("rules"):
                out += ["", f"### Quantization rules ({r.backend}, {r.verdict})", "",
                        *RuleReport.from_dict(r.section("rules")).markdown()]
        return out
