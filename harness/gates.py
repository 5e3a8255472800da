"""Metric gates: the float floor, ratio / drop bounds against float, and stored baselines.

Every gated figure has a direction (`harness.metrics.base.Figure`): NDS and mIoU are better
higher, mATE lower. For each gated key, with "worse" read in the figure's direction:
  float_min          the float model itself must reach the bound (>= it; <= it for lower-better)
  min_ratio          higher: backend >= min_ratio * float; lower: backend <= float / min_ratio
  max_drop           the backend is at most max_drop worse than float
  baseline           the backend is at most `tolerance` worse than the last accepted run (meta.json)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from harness.cases import GateSpec
from harness.fmt import fixed
from harness.metrics.base import Figure


@dataclass(frozen=True)
class GateCheck:
    """One bound on one figure."""

    key: str
    gate: str
    measured: float
    bound: float
    passed: bool
    relation: str = ">="

    def describe(self) -> str:
        """e.g. "miou min_ratio 0.981 >= 0.99 FAILED by 0.009"."""
        verdict = "ok" if self.passed else f"FAILED by {abs(self.measured - self.bound):.4g}"
        return f"{self.key} {self.gate} {self.measured:.4f} {self.relation} {self.bound:.4f} {verdict}"


@dataclass(frozen=True)
class GateOutcome:
    """Every check of one backend's metric item, with the figures they used."""

    backend: str
    keys: tuple[str, ...]
    values: dict[str, float]
    float_values: dict[str, float]
    baselines: dict[str, float]
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        """True when every check held."""
        return all(c.passed for c in self.checks)

    def ratio(self, key: str) -> float:
        """backend / float for `key` (NaN when float is 0 or NaN)."""
        f = self.float_values.get(key, math.nan)
        return self.values[key] / f if f and not math.isnan(f) else math.nan

    def to_dict(self, metric: str, primary: str, details: Any, float_details: Any) -> dict[str, Any]:
        """The record's `metric` section (value/float_value/ratio of the first gated key)."""
        key = self.keys[0]
        return {
            "metric": metric,
            "key": key,
            "primary": primary,
            "value": self.values[key],
            "float_value": self.float_values.get(key),
            "ratio": self.ratio(key),
            "baseline": self.baselines.get(key),
            "values": self.values,
            "float_values": self.float_values,
            "gates": [c.__dict__ for c in self.checks],
            "details": details,
            "float_details": float_details,
        }

    def failure_text(self, case: str) -> str:
        """A table of float, backend, ratio, bound and baseline for every check."""
        rows = []
        for c in self.checks:
            rows.append([
                c.key, c.gate, fixed(self.float_values.get(c.key)), fixed(self.values.get(c.key)),
                fixed(self.ratio(c.key)), f"{c.relation} {fixed(c.bound)}",
                fixed(c.measured), fixed(self.baselines.get(c.key)),
                "ok" if c.passed else f"FAILED by {abs(c.measured - c.bound):.4g}",
            ])
        headers = ["figure", "gate", "float", self.backend, "ratio", "bound", "measured", "baseline", "verdict"]
        failed = sum(not c.passed for c in self.checks)
        return f"{case}[{self.backend}]: {failed} metric gate(s) failed\n" + tabulate(rows, headers=headers, disable_numparse=True)


def evaluate_gates(
    *,
    backend: str,
    keys: list[str],
    values: Mapping[str, float],
    float_values: Mapping[str, float],
    float_min: float | Mapping[str, float] | None,
    gate: GateSpec | None,
    baselines: Mapping[str, float],
    baseline_tolerance: float,
    figures: Mapping[str, Figure] | None = None,
) -> GateOutcome:
    """Apply every configured bound to every gated key, in each figure's direction (`figures`;
    a key without one is higher-is-better).

    A gated key missing from the metric's values is a KeyError naming it.
    """
    checks: list[GateCheck] = []
    for i, key in enumerate(keys):
        if key not in values:
            raise KeyError(f"metric has no figure '{key}'; it has: {', '.join(sorted(values))}")
        fig = (figures or {}).get(key) or Figure(key)
        v, f = float(values[key]), float(float_values.get(key, math.nan))
        floor = float_min.get(key) if isinstance(float_min, Mapping) else (float_min if i == 0 else None)
        if floor is not None:
            checks.append(GateCheck(key, "float_min", f, floor, fig.at_least_as_good(f, floor), fig.relation))
        if gate is not None and gate.min_ratio is not None:
            bound = gate.min_ratio * f if fig.direction == "higher" else f / gate.min_ratio
            checks.append(GateCheck(key, "min_ratio", v, bound, fig.at_least_as_good(v, bound), fig.relation))
        if gate is not None and gate.max_drop is not None:
            worse = fig.worse_by(f, v)
            checks.append(GateCheck(key, "max_drop", worse, gate.max_drop,
                                    not math.isnan(worse) and worse <= gate.max_drop, "<="))
        if key in baselines:
            base = float(baselines[key])
            bound = base - baseline_tolerance if fig.direction == "higher" else base + baseline_tolerance
            checks.append(GateCheck(key, "baseline", v, bound, fig.at_least_as_good(v, bound), fig.relation))
    return GateOutcome(backend, tuple(keys), {k: float(x) for k, x in values.items()},
                       {k: float(x) for k, x in float_values.items()}, dict(baselines), tuple(checks))
