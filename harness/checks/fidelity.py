"""fidelity: agreement of the backend with another (real int8 kernels vs fake quantization).

Measured in the backend's shared evaluation pass (`harness.evaluation`): the cosine of every
output accumulated over the evaluation set, per stage of a staged program with each stage fed
its reference's inputs (so a stage is judged on its own), and the task's prediction agreement.
The bounds are compare's checks (`cosine_min`, `agreement_min`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from harness.checks.base import Check, ItemSpec
from harness.compare import Check as BoundCheck
from harness.compare import at_least
from harness.context import ItemFailure
from harness.fmt import fixed
from harness.records import Record

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext


class FidelityCheck(Check):
    """Cosine and agreement bounds against the backend's fidelity reference."""

    kind = "fidelity"

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """One item when the backend has a fidelity section."""
        return [ItemSpec(self.kind)] if case.spec.backends[backend.name].fidelity is not None else []

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Judge the measures of the shared pass; ItemFailure listing every bound missed."""
        started = time.perf_counter()
        spec = ctx.case.spec.backends[backend].fidelity
        assert spec is not None
        measured = ctx.evaluation(backend).fidelity
        assert measured is not None
        checks: list[BoundCheck] = []
        if spec.cosine_min is not None:
            checks += [at_least(f"cosine of '{n}' vs {spec.reference}", c, spec.cosine_min)
                       for n, c in measured.cosine.items()]
            checks += [at_least(f"stage '{s}': cosine of '{n}' vs {spec.reference}", c, spec.cosine_min)
                       for s, outs in (measured.stages or {}).items() for n, c in outs.items()]
        if spec.agreement_min is not None:
            agreement = measured.agreement
            name = f"prediction agreement with {spec.reference}"
            if agreement is None:
                name += " (n/a: the task has no agreement measure)"
            checks.append(at_least(name, float("nan") if agreement is None else agreement, spec.agreement_min))
        record = ctx.new_record(backend, self.kind, None, started, ctx.runner(backend))
        section: dict[str, Any] = {"reference": spec.reference, "cosine": measured.cosine,
                                   "agreement": measured.agreement, "agreeing": measured.agreeing,
                                   "compared": measured.compared}
        if measured.stages is not None:
            section["stages"] = measured.stages
        record.sections["fidelity"] = section
        failed = [c for c in checks if not c.passed]
        if failed:
            record.verdict = "failed"
            raise ItemFailure(f"{ctx.case.name}[{backend}] fidelity:\n  " + "\n  ".join(c.describe() for c in failed),
                              record)
        return record

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """A table of cosines per backend, reference, stage and output."""
        rows = []
        for r in records:
            fid = r.section("fidelity") if r.item == self.kind else None
            if not fid:
                continue
            ref = fid.get("reference", "-")
            for stage, outputs in (fid.get("stages") or {"end to end": fid.get("cosine", {})}).items():
                rows += [[r.backend, ref, stage, name, fixed(c, 6)] for name, c in outputs.items()]
            if fid.get("stages"):
                rows += [[r.backend, ref, "end to end", name, fixed(c, 6)] for name, c in fid.get("cosine", {}).items()]
        if not rows:
            return []
        return ["", "### Fidelity", "", tabulate(rows, headers=["backend", "reference", "stage", "output", "cosine"],
                                                 tablefmt="github", disable_numparse=True)]
