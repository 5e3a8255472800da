"""Result records: one per case x backend x item, the unit of reports and report.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Record:
    """What one item measured and decided.

    `verdict` is "passed", "failed" or "skipped" (with `reason`); `compare` maps output names to
    compare statistics, `metric` holds metric, value, float_value, ratio and gate details,
    `timing` benchmark figures, `fidelity` the agreement with another backend, `rules` the
    quantization rule report (`harness.export.inspect.RuleReport.to_dict`), `info` the
    provider/device/precision, `artifacts` file paths.
    """

    case: str
    backend: str
    item: str
    profile: str = "default"
    stage: str | None = None
    verdict: str = "passed"
    reason: str = ""
    compare: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    rules: dict[str, Any] | None = None
    info: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    nodeid: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Record:
        """Inverse of to_dict (unknown keys are ignored, so older readers accept newer files)."""
        known = {k: v for k, v in data.items() if k in Record.__dataclass_fields__}
        return Record(**known)
