"""Item kinds: each check is one module; the plugin and the report iterate `CHECKS` in order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.checks.base import Check, ItemSpec
from harness.checks.benchmark import BenchmarkCheck
from harness.checks.fidelity import FidelityCheck
from harness.checks.golden import GoldenCheck
from harness.checks.layers import LayersCheck
from harness.checks.metric import MetricCheck
from harness.checks.rules import RulesCheck
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.context import CaseContext
    from harness.records import Record

CHECKS: tuple[Check, ...] = (GoldenCheck(), RulesCheck(), MetricCheck(), FidelityCheck(), LayersCheck(),
                             BenchmarkCheck())
"""Every item kind, in the order of items within a case x backend and of report sections."""



def run_check(ctx: CaseContext, kind: str, backend: str, stage: str | None = None) -> Record:
    """Run the check of `kind` ("golden", "metric", ...) for `backend` (and `stage`) on `ctx`,
    as its pytest item would, without pytest; returns its record, raises ItemFailure or
    HarnessError. Checks that need pytest fixtures (benchmark) cannot run this way."""
    for check in CHECKS:
        if check.kind == kind:
            if check.fixtures:
                raise HarnessError(f"the {kind} check needs pytest fixtures {list(check.fixtures)}")
            return check.run(ctx, backend, ItemSpec(kind, stage), {})
    raise HarnessError(f"unknown check kind '{kind}'; known: {', '.join(c.kind for c in CHECKS)}")


__all__ = ["CHECKS", "Check", "ItemSpec", "run_check"]
