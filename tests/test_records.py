"""Tests for harness/records.py: the Record round trip."""

from __future__ import annotations

import json

import pytest

from harness.records import SCHEMA_VERSION, Record


def test_defaults() -> None:
    r = Record(case="c", backend="torch-fp32", item="golden")
    assert (r.profile, r.stage, r.verdict, r.reason) == ("default", None, "passed", "")
    assert r.sections == {} and r.section("metric") is None and r.info == {} and r.artifacts == {}
    assert isinstance(SCHEMA_VERSION, int)


def test_round_trip_through_json() -> None:
    r = Record(case="c", backend="ort-int8", item="metric", profile="fast", stage="head", verdict="failed",
               reason="gate failed", sections={"compare": {"y": {"stats": {"cosine": 0.5}}},
                                               "metric": {"metric": "miou", "value": 0.5, "float_value": 0.6,
                                                          "ratio": 0.8333},
                                               "timing": {"median_ms": 1.5}}, info={"provider": "CPUExecutionProvider"},
               artifacts={"onnx": "/x.onnx"}, duration_s=2.5, nodeid="cases/c.yaml::c[ort-int8]::metric")
    data = json.loads(json.dumps(r.to_dict()))
    assert Record.from_dict(data) == r
    assert set(data) == (set(Record.__dataclass_fields__) - {"sections"}) | {"compare", "metric", "timing"}


def test_a_section_named_like_a_field_is_refused() -> None:
    with pytest.raises(ValueError, match="clash"):
        Record(case="c", backend="b", item="x", sections={"verdict": 1}).to_dict()


def test_from_dict_reads_other_keys_as_sections() -> None:
    data = {"case": "c", "backend": "b", "item": "golden", "verdict": "skipped", "reason": "no GPU",
            "added_by_a_new_check": [1, 2], "metric": None}
    r = Record.from_dict(data)
    assert (r.case, r.backend, r.item, r.verdict, r.reason) == ("c", "b", "golden", "skipped", "no GPU")
    assert r.sections == {"added_by_a_new_check": [1, 2]}


def test_to_dict_copies() -> None:
    r = Record(case="c", backend="b", item="golden", sections={"compare": {"y": {"cosine": 1.0}}})
    d = r.to_dict()
    d["compare"]["y"]["cosine"] = 0.0
    assert r.sections["compare"]["y"]["cosine"] == 1.0
