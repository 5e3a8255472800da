"""Quant pipeline: a case's quant section -> calibrated model; bad settings are case errors naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.cases import load_case
from harness.context import CaseContext, RunOptions
from harness.errors import CaseError
from harness.quant.modules import QuantAdd

TESTS = Path(__file__).parent


def make_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str) -> CaseContext:
    from tiny import CASE

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    text = CASE.replace("quant: {calibration_batches: 2, calibration_batch_size: 1}",
                        "quant:\n  calibration_batches: 2\n  calibration_batch_size: 1\n" + quant)
    (tmp_path / "cases/tiny.yaml").write_text(text)
    case = load_case(tmp_path / "cases/tiny.yaml")
    return CaseContext(case, RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".cache"))


def _line(run: CaseContext, text: str) -> int:
    return next(i for i, line in enumerate(run.case.path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("quant, key, text, message", [
    ("  keep_float:\n    - head\n    - headz\n", "quant.keep_float.1", "- headz",
     "keep_float pattern 'headz' matches no module"),
    ("  rules:\n    - shared_add\n    - residual\n", "quant.rules.1", "- residual",
     "unknown quantization rule 'residual'"),
    ("  rules: [shared_add, bottleneck_residual]\n", "quant.rules.1", "rules:",
     "rule 'bottleneck_residual' matched nothing"),
    ("  rules: [shared_add]\n  keep_float: [head, add]\n", "quant.keep_float.1", "keep_float:",
     "rule 'shared_add' conflicts with keep_float pattern 'add'"),
])
def test_bad_quant_settings_are_case_errors_naming_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str, key: str, text: str, message: str
) -> None:
    run = make_run(tmp_path, monkeypatch, quant)
    with pytest.raises(CaseError) as err:
        run.quantized_model()
    assert err.value.key == key
    assert err.value.line == _line(run, text)
    assert message in err.value.detail


def test_rules_shape_the_calibrated_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, monkeypatch, "  rules: [shared_input, shared_add]\n  keep_float: [head]\n")
    model = run.quantized_model()
    add = model.get_submodule("add")
    assert isinstance(add, QuantAdd)
    assert add.get_input_quantizer(1) is model.get_submodule("body.0").input_quantizer  # both read the stem output
    assert all(q.is_calibrated for q in add.input_quantizers())
