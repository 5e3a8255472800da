"""layers: the per-layer quantization report of the calibrated model (reports, never gates).

One item on the backend holding the quantization-reference role of a case with a quant
section. For every layer of every stage: quantized or float and why (keep_float / exclude /
include pattern, not a quantizable type, or quantized but without an integer kernel in ONNX
Runtime), its input / weight amax and calibrator, and the SNR / cosine of its output against
float on the golden inputs, alone and accumulated (`harness.quant.analysis`, computed and
cached by `harness.layerwise`). The item fails only when something is broken (an error).
Under --report-dir a PNG plots the SNR along the network depth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from harness.backends.registry import QUANT_REFERENCE
from harness.checks.base import Check, ItemSpec
from harness.errors import BackendUnavailable
from harness.fmt import fixed
from harness.records import Record

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext

TABLE_ROWS = 40


class LayersCheck(Check):
    """Per-layer quantization report; the record's `layers` section holds every layer."""

    kind = "layers"

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """One item on the quantization reference (every case with int8 has a quant section)."""
        return [ItemSpec(self.kind)] if QUANT_REFERENCE in backend.roles else []

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Compute (or read from the cache) the per-layer errors, mark layers ONNX Runtime runs
        in float, and write the plot under --report-dir."""
        from harness.layerwise import case_layers, ort_float_layers

        started = time.perf_counter()
        reason = ctx.unavailable_reason(backend)
        if reason:
            raise BackendUnavailable(reason)
        stages = case_layers(ctx)
        ort = ort_float_layers(ctx)
        rows = []
        for stage in stages.values():
            for e in stage.errors:
                row = {"stage": stage.stage, **e.to_dict()}
                if isinstance(ort, dict) and e.name in ort:
                    row["ort"] = f"no int8 kernel in ONNX Runtime (runs as {ort[e.name]})"
                rows.append(row)
        record = ctx.new_record(backend, self.kind, None, started)
        record.sections["layers"] = {"layers": rows, "ort": ort if isinstance(ort, str) else "checked"}
        if ctx.options.report_dir is not None:
            path = ctx.options.report_dir / "pictures" / ctx.case.name / "layers-snr.png"
            record.artifacts["picture:layers-snr.png"] = str(snr_plot(rows, path, ctx.case.name))
        return record

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """Quantized layers worst SNR first (the first TABLE_ROWS), then the float layers and why."""
        out: list[str] = []
        for r in records:
            if r.item != self.kind or not r.section("layers"):
                continue
            rows = r.section("layers")["layers"]
            ranked = _ranked(rows)
            table = [[e["name"], e["type"], _db(e["alone_snr_db"]), fixed(e["alone_cosine"], 5),
                      _db(e["accumulated_snr_db"]), fixed(e["accumulated_cosine"], 5), fixed(e["input_amax"]),
                      fixed(e["weight_amax"]), e["input_calibrator"] or "-", e.get("ort", "")]
                     for e in ranked[:TABLE_ROWS]]
            out += ["", f"### Per-layer quantization error ({r.backend}, worst SNR first)", "",
                    tabulate(table, headers=["layer", "type", "alone dB", "alone cos", "accum dB", "accum cos",
                                             "input amax", "weight amax", "calibrator", "ONNX Runtime"],
                             tablefmt="github", disable_numparse=True)]
            if len(ranked) > TABLE_ROWS:
                out.append(f"\n({len(ranked) - TABLE_ROWS} more quantized layers in report.json)")
            floats = [[e["name"], e["type"], e["reason"]] for e in rows if not e["quantized"]]
            if floats:
                out += ["", "Float layers:", "", tabulate(floats, headers=["layer", "type", "why float"],
                                                         tablefmt="github", disable_numparse=True)]
            ort = r.section("layers").get("ort")
            if isinstance(ort, str) and ort != "checked":
                out.append(f"\nONNX Runtime kernels: {ort}")
        return out


def _value(x: Any) -> float:
    return math.inf if x == "inf" else float(x)


def _ranked(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((e for e in rows if e["alone_snr_db"] is not None), key=lambda e: _value(e["alone_snr_db"]))


def _db(x: Any) -> str:
    return "-" if x is None else ("inf" if x == "inf" else f"{float(x):.2f}")


def snr_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """PNG of alone and accumulated SNR (dB) against execution order, worst layers labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [e for e in rows if e["alone_snr_db"] is not None and e["order"] is not None]
    measured.sort(key=lambda e: (e.get("stage", ""), e["order"]))
    fig = Figure(figsize=(max(6.0, 0.12 * len(measured)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(measured)))
    cap = 80.0
    alone = [min(_value(e["alone_snr_db"]), cap) for e in measured]
    accumulated = [min(_value(e["accumulated_snr_db"]), cap) for e in measured]
    ax.plot(xs, alone, marker="o", markersize=3, linewidth=1, label="only this layer int8")
    ax.plot(xs, accumulated, marker=".", markersize=3, linewidth=1, label="this and every earlier layer int8")
    for e in _ranked(measured)[:5]:
        i = measured.index(e)
        ax.annotate(str(e["name"]), (i, alone[i]), fontsize=6, rotation=30, xytext=(3, -10),
                    textcoords="offset points")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel(f"SNR vs float (dB, capped at {cap:.0f})")
    ax.set_title(f"{title}: per-layer int8 error", fontsize=9)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110, bbox_inches="tight")
    return path
