"""Tests for harness/gates.py: float floor, ratio / drop bounds, baselines and failure text."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from harness.cases import GateSpec
from harness.gates import GateCheck, GateOutcome, evaluate_gates
from harness.metrics.base import Figure


def below(x: float) -> float:
    return float(np.nextafter(x, -math.inf))


def gates(**kwargs: Any) -> GateOutcome:
    args: dict[str, Any] = {
        "backend": "ort-int8", "keys": ["miou"], "values": {"miou": 0.5}, "float_values": {"miou": 0.75},
        "float_min": None, "gate": None, "baselines": {}, "baseline_tolerance": 0.0,
    }
    args.update(kwargs)
    return evaluate_gates(**args)


def only(outcome: GateOutcome) -> GateCheck:
    assert len(outcome.checks) == 1
    return outcome.checks[0]


def test_no_gates_no_checks() -> None:
    outcome = gates()
    assert outcome.checks == () and outcome.passed


def test_float_min_boundary() -> None:
    check = only(gates(float_min=0.75))
    assert (check.key, check.gate, check.measured, check.bound, check.passed) == ("miou", "float_min", 0.75, 0.75, True)
    assert not only(gates(float_min=float(np.nextafter(0.75, 1)))).passed


def test_float_min_scalar_gates_only_the_first_key() -> None:
    outcome = gates(keys=["nds", "map"], values={"nds": 0.5, "map": 0.4}, float_values={"nds": 0.6, "map": 0.1},
                    float_min=0.55)
    assert [(c.key, c.gate, c.passed) for c in outcome.checks] == [("nds", "float_min", True)]


def test_float_min_per_key() -> None:
    outcome = gates(keys=["nds", "map"], values={"nds": 0.5, "map": 0.4}, float_values={"nds": 0.6, "map": 0.1},
                    float_min={"nds": 0.55, "map": 0.2})
    assert [(c.key, c.gate, c.passed) for c in outcome.checks] == [("nds", "float_min", True),
                                                                  ("map", "float_min", False)]
    assert not outcome.passed
    partial = gates(keys=["nds", "map"], values={"nds": 0.5, "map": 0.4}, float_values={"nds": 0.6, "map": 0.1},
                    float_min={"map": 0.05})
    assert [(c.key, c.gate) for c in partial.checks] == [("map", "float_min")]


def test_min_ratio_boundary() -> None:
    check = only(gates(values={"miou": 0.375}, gate=GateSpec(min_ratio=0.5)))
    assert (check.gate, check.measured, check.bound, check.passed) == ("min_ratio", 0.375, 0.375, True)
    assert not only(gates(values={"miou": below(0.375)}, gate=GateSpec(min_ratio=0.5))).passed


def test_max_drop_boundary() -> None:
    check = only(gates(gate=GateSpec(max_drop=0.25)))
    assert (check.gate, check.measured, check.bound, check.passed) == ("max_drop", 0.25, 0.25, True)
    assert not only(gates(gate=GateSpec(max_drop=below(0.25)))).passed
    assert only(gates(values={"miou": 0.9}, gate=GateSpec(max_drop=0.0))).passed  # better than float


def test_baseline_boundary() -> None:
    check = only(gates(baselines={"miou": 0.75}, baseline_tolerance=0.25))
    assert (check.gate, check.measured, check.bound, check.passed) == ("baseline", 0.5, 0.5, True)
    assert not only(gates(values={"miou": below(0.5)}, baselines={"miou": 0.75}, baseline_tolerance=0.25)).passed
    assert not only(gates(baselines={"miou": 0.75}, baseline_tolerance=0.125)).passed
    assert gates(baselines={"other": 0.1}).checks == ()  # baselines of other figures are not used


def test_baseline_regression_fails() -> None:
    outcome = gates(values={"miou": 0.69}, baselines={"miou": 0.70}, baseline_tolerance=0.002)
    assert not outcome.passed
    assert outcome.baselines == {"miou": 0.70}


def test_all_gates_in_order() -> None:
    outcome = gates(float_min=0.7, gate=GateSpec(min_ratio=0.9, max_drop=0.1), baselines={"miou": 0.6},
                    baseline_tolerance=0.01)
    assert [c.gate for c in outcome.checks] == ["float_min", "min_ratio", "max_drop", "baseline"]
    assert [c.passed for c in outcome.checks] == [True, False, False, False]


def test_missing_float_value_fails_ratio_gates() -> None:
    outcome = gates(float_values={}, float_min=0.1, gate=GateSpec(min_ratio=0.5, max_drop=0.5))
    assert [c.passed for c in outcome.checks] == [False, False, False]
    assert math.isnan(outcome.ratio("miou"))


def test_unknown_key_error_lists_figures() -> None:
    with pytest.raises(KeyError, match="metric has no figure 'mIoU'; it has: acc, miou"):
        gates(keys=["mIoU"], values={"miou": 0.5, "acc": 0.9})


def test_ratio() -> None:
    assert gates().ratio("miou") == pytest.approx(2 / 3)
    assert math.isnan(gates(float_values={"miou": 0.0}).ratio("miou"))
    assert math.isnan(gates(float_values={"miou": math.nan}).ratio("miou"))


def test_describe() -> None:
    outcome = gates(values={"miou": 0.7}, float_values={"miou": 0.8}, gate=GateSpec(min_ratio=0.99, max_drop=0.2))
    ratio, drop = outcome.checks
    assert ratio.describe() == "miou min_ratio 0.7000 >= 0.7920 FAILED by 0.092"
    assert drop.describe() == "miou max_drop 0.1000 <= 0.2000 ok"


def test_failure_text_lists_float_backend_ratio_bound_baseline() -> None:
    outcome = gates(values={"miou": 0.6}, float_values={"miou": 0.8}, gate=GateSpec(min_ratio=0.99),
                    baselines={"miou": 0.65}, baseline_tolerance=0.01)
    text = outcome.failure_text("tiny")
    lines = text.splitlines()
    assert lines[0] == "tiny[ort-int8]: 2 metric gate(s) failed"
    header = lines[1].split()
    assert header == ["figure", "gate", "float", "ort-int8", "ratio", "bound", "measured", "baseline", "verdict"]
    ratio_row = next(line for line in lines if "min_ratio" in line).split()
    assert ratio_row == ["miou", "min_ratio", "0.8000", "0.6000", "0.7500", ">=", "0.7920", "0.6000", "0.6500",
                         "FAILED", "by", "0.192"]
    baseline_row = next(line for line in lines if " baseline " in f" {line} " and "miou" in line).split()
    assert baseline_row[1] == "baseline" and baseline_row[5:7] == [">=", "0.6400"] and baseline_row[-3] == "FAILED"


def test_failure_text_shows_dash_for_missing_values() -> None:
    text = gates(float_values={}, float_min=0.5).failure_text("tiny")
    row = next(line for line in text.splitlines() if "float_min" in line).split()
    assert row == ["miou", "float_min", "-", "0.5000", "nan", ">=", "0.5000", "nan", "-", "FAILED", "by", "nan"]


def test_to_dict() -> None:
    outcome = gates(keys=["nds", "map"], values={"nds": 0.5, "map": 0.4}, float_values={"nds": 0.625, "map": 0.5},
                    gate=GateSpec(min_ratio=0.5), baselines={"nds": 0.5}, baseline_tolerance=0.0)
    data = outcome.to_dict("nds", "nds", {"per_class": {"car": 0.1}}, None)
    assert data["metric"] == "nds" and data["key"] == "nds"
    assert (data["value"], data["float_value"], data["ratio"], data["baseline"]) == (0.5, 0.625, 0.8, 0.5)
    assert data["values"] == {"nds": 0.5, "map": 0.4}
    assert [g["gate"] for g in data["gates"]] == ["min_ratio", "baseline", "min_ratio"]
    assert set(data["gates"][0]) == {"key", "gate", "measured", "bound", "passed", "relation"}
    json.dumps(data)


LOWER = {"mATE": Figure("mATE", "lower")}


def test_lower_is_better_figures_gate_in_their_direction() -> None:
    # float mATE 0.50, backend 0.55: 10 % worse
    kw: dict[str, Any] = {"keys": ["mATE"], "values": {"mATE": 0.55}, "float_values": {"mATE": 0.5}, "figures": LOWER}
    assert not only(gates(gate=GateSpec(min_ratio=0.95), **kw)).passed          # bound 0.5 / 0.95 = 0.526
    ratio = only(gates(gate=GateSpec(min_ratio=0.9), **kw))                      # bound 0.5556
    assert ratio.passed and ratio.relation == "<=" and ratio.bound == pytest.approx(0.5 / 0.9)
    drop = only(gates(gate=GateSpec(max_drop=0.04), **kw))
    assert drop.measured == pytest.approx(0.05) and not drop.passed
    assert only(gates(gate=GateSpec(max_drop=0.06), **kw)).passed
    assert only(gates(float_min=0.5, **kw)).passed and not only(gates(float_min=0.49, **kw)).passed
    base = only(gates(baselines={"mATE": 0.54}, baseline_tolerance=0.005, **kw))
    assert base.bound == pytest.approx(0.545) and not base.passed
    assert only(gates(baselines={"mATE": 0.54}, baseline_tolerance=0.02, **kw)).passed


def test_an_improvement_of_a_lower_figure_passes_every_gate() -> None:
    kw: dict[str, Any] = {"keys": ["mATE"], "values": {"mATE": 0.3}, "float_values": {"mATE": 0.5}, "figures": LOWER}
    outcome = gates(gate=GateSpec(min_ratio=0.99, max_drop=0.0), baselines={"mATE": 0.31}, float_min=0.6, **kw)
    assert outcome.passed and len(outcome.checks) == 4
