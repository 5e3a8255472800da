"""The stage table of a case: float -> PTQ -> QAT -> integer kernels, from its metric records.

Horizon's float / calibration / QAT / integer validation, automated: each stage's backend, the
model it runs, its gated figure, the ratio to float and the gate verdict, so a user sees at which
step accuracy goes. Stages come from the backend registry's roles: the float reference, the
quantization reference (PTQ fake quant), the QAT reference (QAT fake quant) and every backend
with integer kernels (ort-int8, trt-int8, scn-ref-int8), which runs the PTQ or the QAT model's
export (`quant.qat.deploy`; their records' info says which).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from harness.backends.registry import (
    FLOAT_REFERENCE,
    QAT_REFERENCE,
    QUANT_REFERENCE,
    backend_info,
    known_backends,
)
from harness.fmt import fixed
from harness.records import Record

METRIC_ITEM = "metric"


def stage_of(backend: str) -> str | None:
    """The stage `backend` stands for in the table (None for backends outside it, e.g. fp16)."""
    if backend not in known_backends():
        return None
    info = backend_info(backend)
    if FLOAT_REFERENCE in info.roles:
        return "float"
    if QUANT_REFERENCE in info.roles:
        return "PTQ"
    if QAT_REFERENCE in info.roles:
        return "QAT"
    if info.integer_kernels:
        return "integer kernels"
    return None


def _runs(backend: str, record: Record) -> str:
    """What model the stage's backend runs."""
    stage = stage_of(backend)
    if stage == "float":
        return "float model"
    if stage == "PTQ":
        return "PTQ (calibrated), fake quant"
    if stage == "QAT":
        return "QAT checkpoint, fake quant"
    return record.info.get("int8_model", "-")


def stage_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per stage backend with a metric item among one case's `records`, in report order:
    stage, backend, runs (the model), key, value, ratio to float, verdict (passed / failed /
    skipped) and the skip reason. Empty unless some quantized stage has a metric item."""
    by_backend = {r.backend: r for r in records if r.item == METRIC_ITEM}
    rows = []
    for backend in known_backends():
        record = by_backend.get(backend)
        stage = stage_of(backend)
        if record is None or stage is None:
            continue
        metric = record.section("metric") or {}
        ratio = metric.get("ratio")
        rows.append({
            "stage": stage, "backend": backend, "runs": _runs(backend, record),
            "key": metric.get("key"), "value": metric.get("value"),
            "ratio": ratio if isinstance(ratio, (int, float)) and math.isfinite(ratio) else None,
            "verdict": record.verdict, "reason": record.reason.splitlines()[0] if record.reason else "",
        })
    if not any(row["stage"] != "float" for row in rows):
        return []
    return rows


def stage_table_markdown(records: Sequence[Record]) -> list[str]:
    """The '### Stages' section of report.md (nothing when `stage_rows` is empty)."""
    rows = stage_rows(records)
    if not rows:
        return []
    cells = []
    for row in rows:
        value = "-" if row["value"] is None else f"{row['key']}={fixed(row['value'], 4)}"
        ratio = "-" if row["ratio"] is None else fixed(row["ratio"], 4)
        verdict = row["verdict"] if row["verdict"] != "skipped" else f"skipped: {row['reason'][:60]}"
        cells.append([row["stage"], row["backend"], row["runs"], value, ratio, verdict])
    table = tabulate(cells, headers=["stage", "backend", "runs", "metric", "ratio to float", "gate"],
                     tablefmt="github", disable_numparse=True)
    return ["", "### Stages: float -> PTQ -> QAT -> integer kernels", "", table]
