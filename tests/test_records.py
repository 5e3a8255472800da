"""Tests for harness/records.py: the Record round trip."""

from __future__ import annotations

import json

from harness.records import SCHEMA_VERSION, Record


def test_defaults() -> None:
    r = Record(case="c", backend="torch-fp32", item="golden")
    assert (r.profile, r.stage, r.verdict, r.reason) == ("default", None, "passed", "")
    assert r.compare == {} and r.metric is None and r.timing is None and r.info == {} and r.artifacts == {}
    assert isinstance(SCHEMA_VERSION, int)


def test_round_trip_through_json() -> None:
    r = Record(case="c", backend="ort-int8", item="metric", profile="fast", stage="head", verdict="failed",
               reason="gate failed", compare={"y": {"stats": {"cosine": 0.5}}},
               metric={"metric": "miou", "value": 0.5, "float_value": 0.6, "ratio": 0.8333},
               timing={"median_ms": 1.5}, info={"provider": "CPUExecutionProvider"},
               artifacts={"onnx": "/x.onnx"}, duration_s=2.5, nodeid="cases/c.yaml::c[ort-int8]::metric")
    data = json.loads(json.dumps(r.to_dict()))
    assert Record.from_dict(data) == r
    assert set(data) == set(Record.__dataclass_fields__)


def test_from_dict_ignores_unknown_keys() -> None:
    data = {"case": "c", "backend": "b", "item": "golden", "verdict": "skipped", "reason": "no GPU",
            "added_in_schema_2": [1, 2]}
    r = Record.from_dict(data)
    assert (r.case, r.backend, r.item, r.verdict, r.reason) == ("c", "b", "golden", "skipped", "no GPU")


def test_to_dict_copies() -> None:
    r = Record(case="c", backend="b", item="golden", compare={"y": {"cosine": 1.0}})
    d = r.to_dict()
    d["compare"]["y"]["cosine"] = 0.0
    assert r.compare["y"]["cosine"] == 1.0
