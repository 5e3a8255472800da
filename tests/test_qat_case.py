"""QAT in cases: the quant.qat section, the qat-int8 backend, int8 kernels on the QAT export,
identity checks of QAT checkpoints, and a tiny `qharness train --qat` step on PIDNet-S."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from harness.cases import load_case
from harness.checks import run_check
from harness.context import CaseContext, RunOptions
from harness.errors import CaseError
from harness.quant.qat import finish_qat, prepare_qat, save_qat_checkpoint

TESTS = Path(__file__).parent
ROOT = TESTS.parent
QAT = "  qat: {checkpoint: golden/tiny/qat.pt, deploy: true}\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tiny import CASE

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    (tmp_path / "golden/tiny").mkdir(parents=True)
    text = CASE.replace("quant: {calibration_batches: 2, calibration_batch_size: 1}\n",
                        "quant:\n  calibration_batches: 2\n  calibration_batch_size: 1\n" + QAT)
    text = text.replace("fidelity: {reference: fakequant-int8, cosine_min: 0.999}", "fidelity: {cosine_min: 0.999}")
    text += "  qat-int8: {compare: {cosine_min: 0.99}}\n"
    (tmp_path / "cases/tiny.yaml").write_text(text)
    return tmp_path


def make_run(project: Path, update: bool = False) -> CaseContext:
    options = RunOptions(device=torch.device("cpu"), cache_dir=project / ".cache", update_golden=update)
    return CaseContext(load_case(project / "cases/tiny.yaml"), options)


def write_checkpoint(run: CaseContext, nudge: float = 0.0) -> Path:
    """A QAT checkpoint of the case made from its calibrated model (weights optionally nudged)."""
    model = prepare_qat(copy.deepcopy(run.quantized_model()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(nudge)
    path = run.case.qat_checkpoint
    assert path is not None
    save_qat_checkpoint(path, finish_qat(model), run.qat_origin)
    return path


def edit(project: Path, old: str, new: str) -> Path:
    path = project / "cases/tiny.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return path


def test_int8_kernels_default_to_the_qat_model_as_fidelity_reference(project: Path) -> None:
    case = load_case(project / "cases/tiny.yaml")
    fidelity = case.spec.backends["ort-int8"].fidelity
    assert fidelity is not None and fidelity.reference == "qat-int8"


def test_qat_backend_without_checkpoint_is_a_case_error(project: Path) -> None:
    path = edit(project, QAT, "")
    with pytest.raises(CaseError, match=r"backends.qat-int8.*quant.qat.checkpoint"):
        load_case(path)


def test_deploy_without_checkpoint_is_a_case_error(project: Path) -> None:
    path = edit(project, "qat: {checkpoint: golden/tiny/qat.pt, deploy: true}", "qat: {deploy: true}")
    with pytest.raises(CaseError, match="deploy: true needs a checkpoint"):
        load_case(path)


def test_int8_kernels_on_the_qat_export_cannot_compare_with_ptq(project: Path) -> None:
    path = edit(project, "fidelity: {cosine_min: 0.999}", "fidelity: {reference: fakequant-int8, cosine_min: 0.999}")
    with pytest.raises(CaseError, match=r"key 'backends.ort-int8.fidelity.reference': ort-int8 runs the QAT model's export"):
        load_case(path)
    edit(project, "deploy: true", "deploy: false")
    path = edit(project, "reference: fakequant-int8", "reference: qat-int8")
    with pytest.raises(CaseError, match=r"ort-int8 runs the PTQ export; compare it with fakequant-int8"):
        load_case(path)


def test_missing_qat_checkpoint_names_the_key_and_the_training_command(project: Path) -> None:
    run_check(make_run(project, update=True), "golden", "torch-fp32", "model")
    with pytest.raises(CaseError, match=r"quant.qat.checkpoint.*does not exist.*qharness train cases/tiny.yaml --qat"):
        run_check(make_run(project), "golden", "qat-int8", "model")


def test_qat_backend_and_int8_kernels_run_the_qat_checkpoint(project: Path) -> None:
    run_check(make_run(project, update=True), "golden", "torch-fp32", "model")
    write_checkpoint(make_run(project), nudge=1e-3)
    run = make_run(project)
    qat = run_check(run, "golden", "qat-int8", "model")
    assert qat.verdict == "passed"
    ort = run_check(run, "fidelity", "ort-int8")
    assert ort.info["int8_model"] == "QAT (golden/tiny/qat.pt)"
    assert ort.section("fidelity")["reference"] == "qat-int8"
    qat_onnx = ort.artifacts["onnx:model"]
    ptq_run = make_run(edit(project, "deploy: true", "deploy: false").parents[1])
    ptq_onnx = ptq_run.runner("ort-int8").artifacts["onnx:model"]
    assert ptq_run.runner("ort-int8").info["int8_model"] == "PTQ (calibrated)"
    assert Path(qat_onnx).read_bytes() != Path(ptq_onnx).read_bytes()


def test_a_checkpoint_from_other_quant_settings_is_stale(project: Path) -> None:
    run_check(make_run(project, update=True), "golden", "torch-fp32", "model")
    write_checkpoint(make_run(project))
    edit(project, "calibration_batches: 2", "calibration_batches: 1")
    with pytest.raises(CaseError, match=r"quant.qat.checkpoint.*stale: it was trained with a different quant settings than"):
        run_check(make_run(project), "golden", "qat-int8", "model")


def test_train_qat_without_a_qat_section_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.training.cli import train_case

    case_path = tiny_pidnet_qat_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(case=str(case_path), profile="default", out=str(tmp_path / "run"), steps=None,
                              batch_size=None, lr=None, device="cpu", workers=None, time_limit_s=None, qat=True,
                              no_progress=True)
    with pytest.raises(CaseError, match=r"key 'quant.qat': `--qat` trains the model of the case's quant.qat"):
        train_case(args)


def test_a_checkpoint_of_another_format_names_the_file(project: Path) -> None:
    run_check(make_run(project, update=True), "golden", "torch-fp32", "model")
    torch.save({"weights": torch.zeros(1)}, project / "golden/tiny/qat.pt")
    with pytest.raises(CaseError, match=r"quant.qat.checkpoint.*qat.pt is not a QAT checkpoint"):
        run_check(make_run(project), "golden", "qat-int8", "model")


def tiny_pidnet_qat_case(root: Path, stop_after: int | None = None) -> Path:
    """pidnet_s.yaml with a `qat-tiny` profile: 64x128 images, 4 train samples, a QAT section
    (training stops after `stop_after` steps when given)."""
    raw = yaml.safe_load((ROOT / "cases/pidnet_s.yaml").read_text())
    raw["profiles"] = {"qat-tiny": {
        "data": {"args": {"height": 64, "width": 128, "size": 2}, "calibration": {"args": {"size": 2}},
                 "train": {"args": {"size": 4}}, "batch_size": 2},
        "golden": {"dir": "golden/pidnet-s/profile-qat-tiny", "samples": 1},
        "quant": {"calibration_batches": 1, "keep_float": [],
                  "qat": {"checkpoint": "golden/pidnet-s/profile-qat-tiny/qat.pt", "learn_amax": True,
                          "training": {"steps": 2, "batch_size": 2, "lr": 0.0001, "num_workers": 0,
                                       "eval_train_size": 2, "ohem": False, "amax_lr_scale": 2.0,
                                       **({} if stop_after is None else {"stop_after": stop_after})}}},
        "metric": {"float_min": 0.0},
        "backends": {"qat-int8": {"compare": {"cosine_min": 0.9}, "metric": {"min_ratio": 0.5}}},
    }}
    (root / "cases").mkdir(exist_ok=True)
    (root / "golden/pidnet-s").mkdir(parents=True, exist_ok=True)
    if not (root / "golden/pidnet-s/model_fp16.pt").exists():
        (root / "golden/pidnet-s/model_fp16.pt").symlink_to(ROOT / "golden/pidnet-s/model_fp16.pt")
    (root / "pyproject.toml").write_text("")
    path = root / "cases/pidnet_s.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_tiny_qat_training_step_makes_a_checkpoint_the_case_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`qharness train --qat` (two steps on the CPU, stopped after one and resumed) writes a QAT
    checkpoint and a summary; copied to
    quant.qat.checkpoint it passes the identity check and runs as qat-int8; a run with the
    recipe changed on the command line is refused as stale."""
    from harness.training.cli import train_case
    from harness.training.record import record_training

    case_path = tiny_pidnet_qat_case(tmp_path, stop_after=1)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(case=str(case_path), profile="qat-tiny", out=str(tmp_path / "run"), steps=None,
                              batch_size=None, lr=None, device="cpu", workers=None, time_limit_s=None, qat=True,
                              no_progress=True)
    assert train_case(args) == 0                   # stops after one step, resumably
    assert not (tmp_path / "run/summary.json").exists() and (tmp_path / "run/checkpoint.pt").exists()
    tiny_pidnet_qat_case(tmp_path)                 # the same recipe without the stop
    assert train_case(args) == 0                   # resumes at step 1 and finishes
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert [h["step"] for h in summary["history"] if "loss" in h] == [2.0]
    assert summary["steps"] == 2 and summary["recipe"]["amp"] is False and summary["val_miou"] is not None
    assert summary["recipe"]["amax_lr_scale"] == 2.0
    state = torch.load(tmp_path / "run/model_fp16.pt", weights_only=True)["state_dict"]
    calibrated = CaseContext(load_case(case_path, profile="qat-tiny"),
                             RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".cache")).quantized_model()
    moved = [k for k, v in calibrated.state_dict().items() if k.endswith("input_quantizer.amax") and v.numel()
             and not torch.equal(v, state[k])]
    assert moved, "learn_amax: the activation ranges did not train"
    case = load_case(case_path, profile="qat-tiny")
    options = RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".cache", update_golden=True)
    run_check(CaseContext(case, options), "golden", "torch-fp32", "model")
    target = case.qat_checkpoint
    assert target is not None
    target.write_bytes((tmp_path / "run/model_fp16.pt").read_bytes())
    run = CaseContext(case, RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".cache"))
    record = run_check(run, "metric", "qat-int8")
    assert record.section("metric")["value"] > 0
    meta = record_training(case, tmp_path / "run/summary.json", qat=True)
    assert json.loads(meta.read_text())["qat_training"]["weights_sha256"] == summary["weights_sha256"]

    args.out, args.steps = str(tmp_path / "run-3"), 3
    assert train_case(args) == 0
    target.write_bytes((tmp_path / "run-3/model_fp16.pt").read_bytes())
    with pytest.raises(CaseError, match="trained with a different qat recipe than"):
        run_check(CaseContext(case, RunOptions(device=torch.device("cpu"), cache_dir=tmp_path / ".cache")),
                  "golden", "qat-int8", "model")
