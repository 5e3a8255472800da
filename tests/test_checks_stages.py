"""The stage table (float -> PTQ -> QAT -> integer kernels) of report.md and report.json."""

from __future__ import annotations

import json
from pathlib import Path

from harness.checks.stages import stage_of, stage_rows, stage_table_markdown
from harness.records import Record
from harness.report import write_reports


def metric_record(backend: str, value: float, ratio: float, verdict: str = "passed", **info: str) -> Record:
    section = {"key": "miou", "value": value, "ratio": ratio, "float_value": 0.8}
    return Record(case="seg", backend=backend, item="metric", verdict=verdict, sections={"metric": section},
                  info=dict(info), reason="metric gate failed\nmore" if verdict == "failed" else "")


RECORDS = [
    metric_record("ort-int8", 0.795, 0.9938, int8_model="QAT (golden/seg/qat.pt)"),
    metric_record("torch-fp32", 0.8, 1.0),
    metric_record("qat-int8", 0.797, 0.9963),
    metric_record("fakequant-int8", 0.77, 0.9625, verdict="failed"),
    metric_record("torch-fp16", 0.8, 1.0),
    Record(case="seg", backend="trt-int8", item="metric", verdict="skipped", reason="trt-int8 needs TensorRT"),
    Record(case="seg", backend="ort-int8", item="golden", sections={"compare": {}}),
]


def test_stages_come_from_the_registry_roles() -> None:
    assert [stage_of(b) for b in ("torch-fp32", "fakequant-int8", "qat-int8", "ort-int8", "trt-int8",
                                  "scn-ref-int8", "torch-fp16", "ort-fp32", "nonsense")] == [
        "float", "PTQ", "QAT", "integer kernels", "integer kernels", "integer kernels", None, None, None]


def test_rows_follow_the_stages_in_report_order_with_what_each_runs() -> None:
    rows = stage_rows(RECORDS)
    assert [(r["stage"], r["backend"]) for r in rows] == [
        ("float", "torch-fp32"), ("PTQ", "fakequant-int8"), ("QAT", "qat-int8"),
        ("integer kernels", "ort-int8"), ("integer kernels", "trt-int8")]
    ort = rows[3]
    assert ort["runs"] == "QAT (golden/seg/qat.pt)" and ort["ratio"] == 0.9938 and ort["value"] == 0.795
    assert rows[1]["verdict"] == "failed" and rows[1]["reason"] == "metric gate failed"
    assert rows[4]["verdict"] == "skipped" and rows[4]["value"] is None


def test_no_table_without_a_quantized_stage() -> None:
    assert stage_rows([metric_record("torch-fp32", 0.8, 1.0), metric_record("torch-fp16", 0.8, 1.0)]) == []
    assert stage_table_markdown([metric_record("torch-fp32", 0.8, 1.0)]) == []


def test_report_md_and_json_carry_the_table(tmp_path: Path) -> None:
    write_reports(RECORDS, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "### Stages: float -> PTQ -> QAT -> integer kernels" in md
    assert "| QAT     | qat-int8" in md or "| QAT " in md
    assert "miou=0.7970" in md and "skipped: trt-int8 needs TensorRT" in md
    data = json.loads((tmp_path / "report.json").read_text())
    stages = data["cases"]["seg"]["stages"]
    assert [s["backend"] for s in stages] == ["torch-fp32", "fakequant-int8", "qat-int8", "ort-int8", "trt-int8"]
