"""A toy item kind in one file: `shapes` records the output shapes of a backend on the golden
inputs and fills a summary column and a report section (used by tests/test_extending.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.backends.registry import BackendInfo
from harness.cases import Case
from harness.checks.base import Check, ItemSpec
from harness.context import CaseContext, ItemFailure
from harness.records import Record


class ShapeCheck(Check):
    """One item per backend: every stage's outputs on the golden inputs have the golden shapes."""

    kind = "shapes"
    summary_columns = ("shapes",)

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        return [ItemSpec(self.kind)]

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        started = time.perf_counter()
        runner = ctx.runner(backend)
        shapes: dict[str, list[int]] = {}
        wrong = []
        for stage, golden in ctx.golden_record().items():
            actual = runner.run_stage(stage, {n: torch.from_numpy(a) for n, a in golden.inputs.items()})
            for name, reference in golden.outputs.items():
                shapes[name] = list(actual[name].shape)
                if tuple(actual[name].shape) != reference.shape:
                    wrong.append(name)
        record = ctx.new_record(backend, self.kind, None, started, runner)
        record.sections["shapes"] = shapes
        if wrong:
            record.verdict = "failed"
            raise ItemFailure(f"outputs with other shapes than the golden ones: {wrong}", record)
        return record

    def summary_cells(self, row: Sequence[Record], case: Sequence[Record]) -> dict[str, str]:
        found = next((r.section("shapes") for r in row if r.section("shapes")), None)
        return {"shapes": ", ".join(f"{n} {s}" for n, s in found.items()) if found else "-"}

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        rows = [f"- {r.backend}: {r.section('shapes')}" for r in records if r.section("shapes")]
        return ["", "### Output shapes", "", *rows] if rows else []
