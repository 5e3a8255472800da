"""CaseContext used from plain Python: golden round trip, backends, fidelity, staleness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.cases import load_case
from harness.checks import run_check
from harness.context import (
    CaseContext,
    ItemFailure,
    RunOptions,
    build_float_model,
    regenerate_command,
)
from harness.errors import CaseError, GoldenError

TESTS = Path(__file__).parent


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tiny import CASE

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases/tiny.yaml").write_text(CASE)
    return tmp_path


def make_run(project: Path, update: bool = False) -> CaseContext:
    case = load_case(project / "cases/tiny.yaml")
    options = RunOptions(device=torch.device("cpu"), cache_dir=project / ".cache", update_golden=update)
    return CaseContext(case, options)


def test_golden_round_trip_and_every_cpu_backend(project: Path) -> None:
    run_check(make_run(project, update=True), "golden", "torch-fp32", "model")
    run = make_run(project)
    for backend in ("torch-fp32", "ort-fp32", "fakequant-int8", "ort-int8"):
        record = run_check(run, "golden", backend, "model")
        assert record.verdict == "passed" and record.sections["compare"]["output"]["passed"]
    assert "onnx:model" in run.runner("ort-int8").artifacts
    assert run.runner("ort-int8").info["precision"].startswith("int8")


def test_missing_golden_names_the_command(project: Path) -> None:
    with pytest.raises(GoldenError, match=r"pytest cases/tiny.yaml --update-golden"):
        run_check(make_run(project), "golden", "torch-fp32", "model")
    assert regenerate_command(make_run(project).case) == "pytest cases/tiny.yaml --update-golden"


def test_fidelity_measures_cosine_against_the_reference(project: Path) -> None:
    record = run_check(make_run(project), "fidelity", "ort-int8")
    assert record.sections["fidelity"] is not None
    assert record.sections["fidelity"]["reference"] == "fakequant-int8"
    assert record.sections["fidelity"]["cosine"]["output"] > 0.999
    assert record.sections["fidelity"]["agreement"] is None  # the tensors task has no agreement measure


def test_fidelity_gate_on_agreement_fails_without_a_measure(project: Path) -> None:
    case = project / "cases/tiny.yaml"
    case.write_text(case.read_text().replace("cosine_min: 0.999}", "cosine_min: 0.999, agreement_min: 0.9}"))
    with pytest.raises(ItemFailure, match=r"agreement with fakequant-int8 \(n/a: the task has no agreement measure\)"):
        run_check(make_run(project), "fidelity", "ort-int8")


def test_calibration_is_cached_on_disk(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_run(project).quantized_model()
    import harness.calibration as pipeline

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibrated again although the amax values are cached")

    monkeypatch.setattr(pipeline, "calibrate", fail)
    second = make_run(project).quantized_model()
    assert {k: v for k, v in first.state_dict().items() if "amax" in k}.keys() == \
        {k for k in second.state_dict() if "amax" in k}
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_keep_float_pattern_matching_nothing_is_a_case_error(project: Path) -> None:
    case = project / "cases/tiny.yaml"
    case.write_text(case.read_text().replace("quant: {", "quant: {keep_float: [nothing.here], "))
    from harness.errors import CaseError

    with pytest.raises(CaseError, match=r"key 'quant.keep_float.0': keep_float pattern 'nothing.here' matches no module"):
        make_run(project).quantized_model()


def test_checkpoint_that_does_not_fit_names_the_key(project: Path) -> None:
    torch.save({"bogus": torch.zeros(1)}, project / "bad.pt")
    case = project / "cases/tiny.yaml"
    case.write_text(case.read_text().replace("args: {width: 8}}", "args: {width: 8}, checkpoint: bad.pt}"))
    from harness.errors import CaseError

    with pytest.raises(CaseError, match=r"model.checkpoint.*does not fit the model"):
        build_float_model(load_case(case))


def test_stage_feeds_fall_back_to_the_reference_without_golden(project: Path) -> None:
    feeds = make_run(project).stage_feeds()
    assert list(feeds) == ["model"] and feeds["model"]["input"].shape == (2, 3, 16, 16)


def test_a_factory_that_raises_is_a_case_error_naming_it(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "boom_ctx.py").write_text("def model(**kwargs):\n    raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(project))
    path = project / "cases" / "tiny.yaml"
    path.write_text(path.read_text().replace('"tiny:make"', '"boom_ctx:model"'))
    run = make_run(project)
    with pytest.raises(CaseError, match=r"key 'model.factory': boom_ctx:model raised RuntimeError: no weights here "
                                        r"\(at .*boom_ctx.py:2, in model\)"):
        run.float_model()


def test_editing_model_code_makes_every_backends_golden_stale(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One activation changed in the model's module: no backend may pass on the old golden files
    or on exports cached for the old code."""
    (project / "editable.py").write_text((TESTS / "tiny.py").read_text())
    monkeypatch.syspath_prepend(str(project))
    path = project / "cases" / "tiny.yaml"
    path.write_text(path.read_text().replace('"tiny:make"', '"editable:make"'))
    run = make_run(project, update=True)
    for backend in ("torch-fp32", "ort-fp32", "ort-int8"):
        run_check(run, "golden", backend, "model")
    old_export = make_run(project).float_onnx()["model"]
    source = (project / "editable.py").read_text()
    (project / "editable.py").write_text(source.replace("self.relu = nn.ReLU()", "self.relu = nn.GELU()"))
    import importlib

    import editable
    importlib.reload(editable)
    run = make_run(project)
    for backend in ("torch-fp32", "ort-fp32", "ort-int8"):
        with pytest.raises(GoldenError, match="stale: the code of editable changed"):
            run_check(run, "golden", backend, "model")
    assert run.float_onnx()["model"] != old_export


def test_more_golden_samples_than_data_is_an_error(project: Path) -> None:
    path = project / "cases" / "tiny.yaml"
    path.write_text(path.read_text().replace("samples: 2", "samples: 9"))
    with pytest.raises(CaseError, match=r"key 'golden.samples': golden.samples 9 is more than the 4 samples"):
        _ = make_run(project, update=True).reference
