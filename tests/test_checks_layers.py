"""The layers item: every layer with its quantization, why float, SNR alone and accumulated, plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cases import load_case
from harness.checks import CHECKS, run_check
from harness.checks.layers import LayersCheck
from harness.context import CaseContext, RunOptions

TESTS = Path(__file__).parent


class Upsampler(nn.Module):
    """conv, a ConvTranspose (no int8 kernel in ONNX Runtime) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, 2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.up(torch.relu(self.conv(x)))))
        return out


def upsampler() -> Upsampler:
    """Factory for the test case."""
    torch.manual_seed(0)
    return Upsampler()


def make_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str, keep_float: str,
             report_dir: Path | None = None) -> CaseContext:
    from tiny import CASE

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    text = CASE.replace('factory: "tiny:make", args: {width: 8}', f'factory: "{factory}"').replace(
        "quant: {calibration_batches: 2, calibration_batch_size: 1}",
        f"quant: {{calibration_batches: 2, calibration_batch_size: 1, keep_float: [{keep_float}]}}")
    (tmp_path / "cases/tiny.yaml").write_text(text)
    return CaseContext(load_case(tmp_path / "cases/tiny.yaml"),
                       RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".c", report_dir=report_dir))


def test_layers_item_reports_every_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report"
    run = make_run(tmp_path, monkeypatch, "tiny:make", "head", report)
    record = run_check(run, "layers", "fakequant-int8")
    assert record.verdict == "passed"
    rows = {r["name"]: r for r in record.sections["layers"]["layers"]}
    assert rows["head"]["quantized"] is False and rows["head"]["reason"] == "keep_float 'head'"
    assert rows["body.0"]["quantized"] and rows["body.0"]["input_calibrator"] == "histogram/percentile"
    for name in ("stem.0", "body.0", "add"):
        assert 10 < float(rows[name]["alone_snr_db"]) < 80, rows[name]
        assert rows[name]["order"] is not None
    assert rows["stem.0"]["alone_snr_db"] == rows["stem.0"]["accumulated_snr_db"]
    assert Path(record.artifacts["picture:layers-snr.png"]).read_bytes()[:4] == b"\x89PNG"
    lines = LayersCheck().report_section([record], report)
    assert any("Per-layer quantization error" in line for line in lines)
    table = "\n".join(lines)
    assert table.index("keep_float 'head'") > table.index("body.0")
    worst = min(("stem.0", "body.0", "add"), key=lambda n: float(rows[n]["alone_snr_db"]))
    assert table.index(f"| {worst} ") < min(table.index(f"| {n} ") for n in ("stem.0", "body.0", "add") if n != worst)
    # A second run reads the cached figures.
    again = run_check(make_run_again(run), "layers", "fakequant-int8")
    assert again.sections["layers"]["layers"] == record.sections["layers"]["layers"]


def make_run_again(run: CaseContext) -> CaseContext:
    return CaseContext(run.case, run.options)


def test_conv_transpose_is_named_as_float_in_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, monkeypatch, "test_checks_layers:upsampler", "head")
    record = run_check(run, "layers", "fakequant-int8")
    rows = {r["name"]: r for r in record.sections["layers"]["layers"]}
    assert "ConvTranspose" in rows["up"]["ort"] and "ort" not in rows["conv"]
    assert rows["up"]["quantized"] is True


def test_layers_is_a_registered_kind() -> None:
    assert "layers" in [c.kind for c in CHECKS]


def test_metric_failures_name_the_worst_layers_and_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.checks.metric import _where_int8_loses

    run = make_run(tmp_path, monkeypatch, "tiny:make", "head")
    text = _where_int8_loses(run, "fakequant-int8")
    lines = text.splitlines()
    assert lines[0].startswith("worst 3 layers by SNR")
    assert {line.split()[0] for line in lines[1:4]} == {"stem.0", "body.0", "add"}
    snrs = [float(line.split("alone")[1].split()[0]) for line in lines[1:4]]
    assert snrs == sorted(snrs)
    assert lines[-1] == "rank layers by the metric: qharness sensitivity cases/tiny.yaml --backend fakequant-int8"
