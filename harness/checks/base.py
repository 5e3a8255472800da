"""The check protocol: one module per item kind, and the plugin iterates a tuple of them.

A check says which items it contributes for a (case, backend) - none, one, or one per stage -
runs one item on the lazy case context and returns its record (raising `ItemFailure` with the
record when the verdict is "failed"), and renders its share of the summary table and of each
case's section in report.md. Adding a kind of item means one new module here and one entry in
`harness.checks.CHECKS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext
    from harness.records import Record


@dataclass(frozen=True)
class ItemSpec:
    """One item a check contributes: its name in the node id and the stage it is about."""

    name: str
    stage: str | None = None


def per_stage(kind: str, stages: Sequence[str]) -> list[ItemSpec]:
    """`kind` once for a single-stage case, `kind[<stage>]` per stage otherwise."""
    if tuple(stages) == ("model",):
        return [ItemSpec(kind, "model")]
    return [ItemSpec(f"{kind}[{s}]", s) for s in stages]


class Check:
    """Base of item kinds. Subclasses set `kind` (also the pytest marker and the records' `item`)
    and implement `items` and `run`; `fixtures` names pytest fixtures the item needs (the
    benchmark's `benchmark`), `summary_columns` the summary-table columns it fills."""

    kind: ClassVar[str]
    fixtures: ClassVar[tuple[str, ...]] = ()
    summary_columns: ClassVar[tuple[str, ...]] = ()

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """The items of this kind for `case` on `backend` (stages as declared by the case)."""
        raise NotImplementedError

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Run one item; return the passed record, or raise ItemFailure (carrying the failed
        record) / HarnessError / BackendUnavailable (a skip)."""
        raise NotImplementedError

    def summary_cells(self, row: Sequence[Record], case: Sequence[Record]) -> dict[str, str]:
        """Cells of `summary_columns` for one case x backend row (`row`: its records of every
        kind; `case`: all records of the case)."""
        return {}

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """Markdown lines of this check in one case's section of report.md (`records`: the
        case's records of every kind)."""
        return []

    def report_data(self, records: Sequence[Record]) -> dict[str, Any]:
        """Case-level entries of this check in report.json's `cases.<case>` (`records`: the
        case's records of every kind); empty by default."""
        return {}
