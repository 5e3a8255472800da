"""Tests for harness/report.py: the summary table, report.json and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.compare import Tolerance, compare
from harness.records import SCHEMA_VERSION, Record
from harness.report import headers, markdown, summary_rows, summary_table, write_reports


def golden_record(case: str, backend: str, verdict: str, cosines: dict[str, float], max_abs: float,
                  reason: str = "") -> Record:
    outputs = {}
    for name, cos in cosines.items():
        outputs[name] = {"name": name, "passed": verdict == "passed",
                         "stats": {"cosine": cos, "max_abs": max_abs, "snr_db": "inf"}}
    return Record(case=case, backend=backend, item="golden", verdict=verdict, reason=reason, sections={"compare": outputs},
                  nodeid=f"cases/{case}.yaml::{case}[{backend}]::golden")


def bench_record(case: str, backend: str, median_ms: float) -> Record:
    return Record(case=case, backend=backend, item="benchmark", sections={"timing": {"median_ms": median_ms, "rounds": 5}})


def metric_record(case: str, backend: str, verdict: str, value: float, ratio: float) -> Record:
    return Record(case=case, backend=backend, item="metric", verdict=verdict,
                  sections={"metric": {"metric": "miou", "key": "miou", "value": value, "float_value": 0.8,
                                       "ratio": ratio, "details": {"per_class": {"road": value, "car": math.nan},
                                                                   "per_class_title": "IoU per class"},
                                       "float_details": {"per_class": {"road": 0.9, "car": 0.7}}}},
                  reason="" if verdict == "passed" else "tiny[ort-int8]: 1 metric gate(s) failed\nmiou min_ratio ...")


SKIP_REASON = "TensorRT is not installed (pip install tensorrt); this reason is long enough to be cut off here"


@pytest.fixture
def records() -> list[Record]:
    return [
        golden_record("tiny", "torch-fp32", "passed", {"logits": 1.0, "aux": 0.9999991}, 2.5e-7),
        bench_record("tiny", "torch-fp32", 10.0),
        golden_record("tiny", "ort-fp32", "failed", {"logits": 0.95}, 0.125,
                      reason="tensor 'logits' [1, 19] float32\ncosine 0.95 >= 0.99 FAILED"),
        bench_record("tiny", "ort-fp32", 4.0),
        metric_record("tiny", "ort-fp32", "passed", 0.79, 0.9875),
        metric_record("tiny", "ort-int8", "failed", 0.6, math.nan),
        Record(case="tiny", backend="trt-int8", item="golden", verdict="skipped", reason=SKIP_REASON),
        Record(case="tiny", backend="trt-int8", item="metric", verdict="skipped", reason=SKIP_REASON),
        golden_record("other", "torch-fp32", "passed", {"y": 1.0}, 0.0),
    ]


def row_dict(row: list[str]) -> dict[str, str]:
    return dict(zip(headers(), row, strict=True))


def test_summary_rows(records: list[Record]) -> None:
    rows = [row_dict(r) for r in summary_rows(records)]
    assert [(r["case"], r["backend"]) for r in rows] == [
        ("tiny", "torch-fp32"), ("tiny", "ort-fp32"), ("tiny", "ort-int8"), ("tiny", "trt-int8"),
        ("other", "torch-fp32")]
    fp32, ort, int8, trt, other = rows
    assert fp32 == {"case": "tiny", "backend": "torch-fp32", "status": "passed",
                    "golden cos / max|err|": "0.999999 / 2.5e-07", "metric": "-", "ratio": "-", "gate": "-",
                    "median ms": "10.000", "speedup": "1.00x"}
    assert ort["status"] == "FAILED"
    assert ort["golden cos / max|err|"] == "0.950000 / 0.125"
    assert (ort["metric"], ort["ratio"], ort["gate"]) == ("miou=0.7900", "0.9875", "passed")
    assert (ort["median ms"], ort["speedup"]) == ("4.000", "2.50x")
    assert int8["status"] == "FAILED" and int8["gate"] == "FAILED"
    assert int8["ratio"] == "-"  # NaN ratio
    assert int8["golden cos / max|err|"] == "-" and int8["speedup"] == "-"
    assert trt["status"] == f"skipped: {SKIP_REASON[:60]}"
    assert trt["gate"] == "skipped"
    assert other["speedup"] == "-" and other["golden cos / max|err|"] == "1.000000 / 0"


def test_summary_table(records: list[Record]) -> None:
    table = summary_table(records)
    lines = table.splitlines()
    assert lines[0].split() == ["case", "backend", "status", "golden", "cos", "/", "max|err|", "metric", "ratio",
                                "gate", "median", "ms", "speedup"]
    assert len(lines) == 2 + 5
    assert "2.50x" in table and "0.9875" in table


def test_write_reports(tmp_path: Path, records: list[Record]) -> None:
    out = tmp_path / "out" / "report"
    paths = write_reports(records, out)
    assert sorted(p.name for p in paths) == ["latency.png", "report.json", "report.md"]  # records have timings
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "report.json", "report.md"]

    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    data = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert set(data) >= {"schema_version", "generated_at", "environment", "records"}
    assert "python" in data["environment"]["versions"]
    assert len(data["records"]) == len(records)
    for rec in data["records"]:
        assert {"case", "backend", "item", "verdict"} <= set(rec)
        assert rec["verdict"] in ("passed", "failed", "skipped")
        if rec["verdict"] == "skipped":
            assert rec["reason"]
    int8 = next(r for r in data["records"] if r["backend"] == "ort-int8")
    assert int8["metric"]["ratio"] == "nan"
    assert int8["metric"]["details"]["per_class"]["car"] == "nan"
    assert Record.from_dict(data["records"][0]) == records[0]


def test_write_reports_with_real_compare_statistics(tmp_path: Path) -> None:
    result = compare(np.array([1.0, np.inf]), np.array([1.0, 2.0]), Tolerance(snr_min_db=math.inf), name="y")
    record = Record(case="c", backend="ort-fp32", item="golden", verdict="failed", sections={"compare": {"y": result.to_dict()}})
    write_reports([record], tmp_path)
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda t: pytest.fail(t))
    assert data["records"][0]["compare"]["y"]["passed"] is False


def test_markdown(tmp_path: Path, records: list[Record]) -> None:
    picture = tmp_path / "pictures" / "seg.png"
    records.append(Record(case="tiny", backend="ort-int8", item="pictures",
                          artifacts={"picture:segmentation": str(picture), "onnx": "/x/model.onnx"},
                          info={"provider": "CPUExecutionProvider", "device": "cpu", "precision": "int8"}))
    records.append(Record(case="other", backend="ort-fp32", item="pictures",
                          artifacts={"picture:errors": "/elsewhere/err.png"}))
    text = markdown(records, tmp_path)
    assert text.startswith("# qharness report\n")
    assert "| case " in text and "| tiny " in text and "| other " in text  # github table
    assert "## tiny" in text and "## other" in text
    assert "### Failures" in text
    assert "`cases/tiny.yaml::tiny[ort-fp32]::golden`" in text
    assert "cosine 0.95 >= 0.99 FAILED" in text
    assert "`ort-int8::metric`" in text  # records without nodeid fall back to backend::item
    info = next(line for line in text.splitlines() if "CPUExecutionProvider" in line)
    assert [c.strip() for c in info.strip("|").split("|")] == ["ort-int8", "CPUExecutionProvider", "cpu", "int8"]
    assert "### IoU per class" in text
    road = next(line for line in text.splitlines() if line.startswith("| road"))
    assert [c.strip() for c in road.strip("|").split("|")] == ["road", "0.9000", "0.7900", "0.6000"]
    car = next(line for line in text.splitlines() if line.startswith("| car"))
    assert "nan" in car
    assert "![ort-int8 segmentation](pictures/seg.png)" in text
    assert "![ort-fp32 errors](/elsewhere/err.png)" in text
    written = write_reports(records, tmp_path)
    assert written[0].read_text() == markdown(records, tmp_path, chart=tmp_path / "latency.png")
    assert "![latency](latency.png)" in written[0].read_text() and "![latency]" not in text


def test_skipped_only_and_empty() -> None:
    rows = summary_rows([Record(case="c", backend="trt-fp16", item="golden", verdict="skipped", reason="no GPU")])
    assert row_dict(rows[0])["status"] == "skipped: no GPU"
    no_reason = summary_rows([Record(case="c", backend="trt-fp16", item="golden", verdict="skipped")])
    assert row_dict(no_reason[0])["status"] == "skipped"
    assert summary_rows([]) == []
    assert summary_table([]).splitlines()[0].split() == [h for header in headers() for h in header.split()]


def test_markdown_tables_keep_their_columns(tmp_path: Path) -> None:
    # "max|err|" in the header and a "|" in a skip reason must not split GitHub table cells.
    records = [Record(case="c", backend="trt-fp16", item="golden", verdict="skipped", reason="needs a | b")]
    table = next(part for part in markdown(records, tmp_path).split("\n\n") if part.startswith("| case"))
    for line in table.splitlines():
        cells = [c for c in line.replace("\\|", "").strip().strip("|").split("|")]
        assert len(cells) == len(headers()), line
    assert "max\\|err\\|" in table and "needs a \\| b" in table


def test_markdown_shows_the_rule_report_and_per_stage_fidelity(tmp_path: Path) -> None:
    from harness.export.inspect import RuleReport, StageSummary, Violation

    report = RuleReport(
        rules=("bottleneck_residual", "shared_concat"),
        stages=(StageSummary("camera", 85, 63, 63, (), 16, 0, 3, (), (("/b/add/Add", "residual_add", "ok"),)),
                StageSummary("fuser", 18, 14, 14, (("/neck/ConvTranspose", "decoder.neck.deblocks.1.0"),), 0, 0, 2,
                             (), (("/neck/concat/Concat", "concat", "violation"),))),
        violations=(Violation("fuser", "/neck/concat/Concat", "decoder.neck.concat", "concat", "scales differ"),),
        quantized=("a", "b"), kept_float=("decoder.neck.deblocks.1.0",), shared={"a.input_quantizer": ("a:0", "b:0")},
    )
    records = [
        Record(case="bev", backend="fakequant-int8", item="rules", verdict="failed", sections={"rules": report.to_dict()}),
        Record(case="bev", backend="ort-int8", item="fidelity",
               sections={"fidelity": {"reference": "fakequant-int8", "cosine": {"middle": 0.9992},
                                      "stages": {"camera": {"feature": 0.99985}, "fuser": {"middle": 1.0}}}}),
    ]
    text = markdown(records, tmp_path)
    assert "### Quantization rules (fakequant-int8, failed)" in text
    assert "**1 violation(s)**, 103 activation Q/DQ pairs, 77 quantized / 1 unquantized convs" in text
    assert "| camera | 85 | 63 | 63 | 0 | 16 | 0 | 3 | 0 |" in text and "| fuser | 18 | 14 | 14 | 1 | 0 | 0 | 2 | 1 |" in text
    assert "- `[fuser] /neck/concat/Concat` (decoder.neck.concat, concat): scales differ" in text
    assert "`decoder.neck.deblocks.1.0` (fuser)" in text and "- `a.input_quantizer`: a:0, b:0" in text
    stages = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
              if line.startswith("| ort-int8  | fakequant-int8")]
    assert stages == [["ort-int8", "fakequant-int8", "camera", "feature", "0.999850"],
                      ["ort-int8", "fakequant-int8", "fuser", "middle", "1.000000"],
                      ["ort-int8", "fakequant-int8", "end to end", "middle", "0.999200"]]
    assert json.loads(json.dumps(records[0].to_dict()))["rules"]["totals"]["violations"] == 1
