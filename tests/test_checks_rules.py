"""The rules item of CaseContext: TensorRT-layout export of the calibrated model, rule report, violations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cases import load_case
from harness.checks import run_check
from harness.context import CaseContext, ItemFailure, RunOptions
from harness.quant import rules
from harness.quant.modules import QuantAdd
from harness.quant.rules import TraceGraph

TESTS = Path(__file__).parent


def make_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule_names: str) -> CaseContext:
    from tiny import CASE

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    text = CASE.replace("quant: {calibration_batches: 2, calibration_batch_size: 1}",
                        f"quant: {{calibration_batches: 2, calibration_batch_size: 1, rules: [{rule_names}]}}")
    (tmp_path / "cases/tiny.yaml").write_text(text)
    return CaseContext(load_case(tmp_path / "cases/tiny.yaml"), RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".c"))


@dataclass(frozen=True)
class FloatIdentity:
    """A rule that leaves the add's second input unquantized: not a conv output, so a reformat."""

    name: str = "float_identity"
    needs_trace: bool = False

    def apply(self, model: nn.Module, graph: TraceGraph | None) -> int:
        add = model.get_submodule("add")
        assert isinstance(add, QuantAdd)
        add.set_input_quantizer(1, None)
        return 1


def test_rules_item_reports_the_exported_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, monkeypatch, "shared_input, shared_add")
    record = run_check(run, "rules", "fakequant-int8")
    assert record.verdict == "passed" and record.item == "rules" and record.sections["rules"] is not None
    assert record.sections["rules"]["rules"] == ["shared_input", "shared_add"]
    (stage,) = record.sections["rules"]["stages"]
    assert stage["stage"] == "model" and stage["shared_adds"] == 1 and stage["quantized_convs"] == 3
    assert record.sections["rules"]["totals"]["violations"] == 0 and record.sections["rules"]["totals"]["qdq_pairs"] >= 4
    assert Path(record.artifacts["onnx-qdq-tensorrt:model"]).is_file()
    assert record.sections["rules"]["shared"] == {"body.0.input_quantizer": ["body.0:0", "add:0", "add:1"]}


def test_rules_item_fails_listing_the_violating_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rules.RULES._entries, "float_identity", FloatIdentity)
    run = make_run(tmp_path, monkeypatch, "float_identity")
    with pytest.raises(ItemFailure, match=r"tiny\[fakequant-int8\] rules: 1 quantization rule violation") as err:
        run_check(run, "rules", "fakequant-int8")
    assert "mixed_add '/add/Add' (add): input 1" in err.value.text
    assert err.value.record.verdict == "failed"
    assert err.value.record.sections["rules"] is not None and err.value.record.sections["rules"]["violations"][0]["module"] == "add"


def test_single_stage_fidelity_has_no_stage_breakdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = run_check(make_run(tmp_path, monkeypatch, "shared_input"), "fidelity", "ort-int8")
    assert record.sections["fidelity"] is not None and "stages" not in record.sections["fidelity"]
