"""Result records: one per case x backend x item, the unit of reports and report.json."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 2


@dataclass
class Record:
    """What one item measured and decided.

    `verdict` is "passed", "failed" or "skipped" (with `reason`); `sections` holds what each
    check measured under its own key (the golden check's "compare", the metric check's "metric",
    the benchmark's "timing", "fidelity", "rules", ...), `info` the provider/device/precision,
    `artifacts` file paths. In report.json every section is a top-level key of the record, so a
    new check adds a key without changing the schema of the others.
    """

    case: str
    backend: str
    item: str
    profile: str = "default"
    stage: str | None = None
    verdict: str = "passed"
    reason: str = ""
    sections: dict[str, Any] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    nodeid: str = ""

    def section(self, name: str) -> Any:
        """The section `name` (None when this record has none)."""
        return self.sections.get(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (a deep copy) with the sections as top-level keys."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "sections"}
        clash = set(self.sections) & set(out)
        if clash:
            raise ValueError(f"record sections {sorted(clash)} clash with record fields")
        out.update(copy.deepcopy(self.sections))
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Record:
        """Inverse of to_dict: known fields, and every other non-null key as a section."""
        names = {f.name for f in fields(Record)} - {"sections"}
        known = {k: v for k, v in data.items() if k in names}
        sections = {k: v for k, v in data.items() if k not in names and v is not None}
        return Record(**known, sections=sections)
