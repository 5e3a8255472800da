"""golden: run a stage of the backend on the golden inputs and compare with the golden outputs."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.checks.base import Check, ItemSpec, per_stage
from harness.compare import CompareResult, compare, failure_table
from harness.context import ItemFailure
from harness.errors import BackendUnavailable, HarnessError
from harness.records import Record

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext


class GoldenCheck(Check):
    """One item per stage: every output within the backend's tolerance of the golden output."""

    kind = "golden"
    summary_columns = ("golden cos / max|err|",)

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """golden (single stage) or golden[<stage>] per stage."""
        return per_stage(self.kind, stages)

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Compare every golden output of the stage; ItemFailure with a table per failing output,
        GoldenError when golden files are missing or stale."""
        started = time.perf_counter()
        stage = item.stage or "model"
        if ctx.case.spec.backends[backend].compare.disabled:
            raise BackendUnavailable(f"{backend}: not compared (the case says compare: none)")
        golden = ctx.golden_record()[stage]
        runner = ctx.runner(backend)
        feeds = {n: torch.from_numpy(a) for n, a in golden.inputs.items()}
        actual = runner.run_stage(stage, feeds)
        results: list[CompareResult] = []
        for name, reference in golden.outputs.items():
            if name not in actual:
                raise HarnessError(f"{backend} stage '{stage}' produced no output '{name}' (got {sorted(actual)})")
            results.append(compare(actual[name].detach().cpu().numpy(), reference,
                                   ctx.tolerance(backend, name), name=name))
        record = ctx.new_record(backend, self.kind, stage, started, runner)
        record.sections["compare"] = {r.name: r.to_dict() for r in results}
        failed = [r for r in results if not r.passed]
        if failed:
            record.verdict = "failed"
            text = f"{ctx.case.name}[{backend}] stage '{stage}': {len(failed)} of {len(results)} outputs " \
                   f"outside tolerance\n" + "\n\n".join(failure_table(r) for r in failed)
            raise ItemFailure(text, record)
        return record

    def summary_cells(self, row: Sequence[Record], case: Sequence[Record]) -> dict[str, str]:
        """Worst cosine / largest max abs error over the row's golden outputs."""
        cosines, errors = [], []
        for r in row:
            for stats in (r.section("compare") or {}).values():
                s = stats.get("stats", {})
                cos, err = s.get("cosine"), s.get("max_abs")
                if isinstance(cos, (int, float)):
                    cosines.append(float(cos))
                if isinstance(err, (int, float)):
                    errors.append(float(err))
        cell = f"{min(cosines):.6f} / {max(errors):.3g}" if cosines else "-"
        return {self.summary_columns[0]: cell}

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """Nothing beyond the summary table (failures are listed with their tables)."""
        return []
