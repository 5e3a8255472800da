"""Tests of harness.tasks.lidar: SCN program inputs, NVIDIA-named golden files, checks, skips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import tensorfile
from harness.backends.registry import backend_info
from harness.cases import load_case
from harness.checks import run_check
from harness.context import CaseContext, RunOptions
from harness.errors import CaseError
from harness.export import scn_golden
from harness.export.scn_executor import ScnInputError
from harness.tasks import lidar
from harness.tasks.base import task_class

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

CASE = """\
name: scn-tiny
task: lidar
model:
  factory: harness.zoo.centerpoint:centerpoint_scn
  args: {widths: [8, 16, 16, 32], grid: [41, 180, 180], seed: 5, fit_voxels: 2000, fuse: true, fp16_params: true}
data:
  factory: harness.datasets.lidar:LidarSweeps
  args: {split: val, size: 2, seed: 1, grid: ci}
  calibration: {args: {split: train, size: 2}}
  batch_size: 1
golden: {dir: golden/scn-tiny, samples: 1}
quant:
  quantizer: harness.quant.sparse:quantize_scn_model
  activations: {calibrator: histogram, method: mse}
  keep_float: [conv_input]
  calibration_batches: 2
  calibration_batch_size: 1
backends:
  torch-fp32: {compare: {atol: 1.0e-6, rtol: 5.0e-4}}
  ort-fp32: {compare: none}
  trt-int8: {compare: none}
"""


def _case(tmp_path: Path, text: str = CASE) -> Path:
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "cases").mkdir(exist_ok=True)
    path = tmp_path / "cases" / "scn_tiny.yaml"
    path.write_text(text)
    return path


def _run(tmp_path: Path, text: str = CASE, update: bool = False) -> CaseContext:
    case = load_case(_case(tmp_path, text), root=tmp_path)
    return CaseContext(case, RunOptions(torch.device("cpu"), tmp_path / ".cache", update_golden=update))


def test_registered_and_inputs_in_zyx_order(tmp_path: Path) -> None:
    assert task_class("lidar") is lidar.LidarTask
    run = _run(tmp_path)
    task = run.adapter
    assert task.input_names == ("features", "indices") and task.output_names == ("dense",)
    assert not task.dynamic_batch and not run.stage_is_dynamic("model")
    sample = run.dataset()[0]
    inputs = task.golden_inputs(run.dataset(), 1)
    assert inputs["features"].dtype == torch.float32 and inputs["indices"].dtype == torch.int32
    assert torch.equal(inputs["features"], torch.from_numpy(sample.features).half().float())
    assert np.array_equal(inputs["indices"].numpy(), sample.indices)
    batches = list(task.batches(run.dataset(), 1))
    assert [b.sample_ids for b in batches] == [(run.dataset()[i].token,) for i in range(2)]
    assert torch.equal(batches[0].inputs["features"], torch.from_numpy(sample.features))
    assert batches[0].targets == sample.boxes


def test_xyz_order_swaps_columns_and_names_the_file(tmp_path: Path) -> None:
    run = _run(tmp_path, CASE.replace("task: lidar", "task: lidar\ntask_args: {index_order: xyz}"))
    task = run.adapter
    assert isinstance(task, lidar.LidarTask) and task.index_order == "xyz" and task.grid == (180, 180, 41)
    zyx = run.dataset()[0].indices
    assert np.array_equal(task.golden_inputs(run.dataset(), 1)["indices"].numpy(), zyx[:, [0, 3, 2, 1]])
    assert task.golden_layout()["indices"].stem == "in_indices_xyz.torch.int32"


def test_golden_files_in_nvidia_naming_and_layout(tmp_path: Path) -> None:
    run = _run(tmp_path, update=True)
    record = run.golden_record()["model"]
    folder = tmp_path / "golden/scn-tiny"
    assert sorted(p.name for p in (folder / "inputs").iterdir()) == [
        "in_features.torch.fp16.tensor", "in_indices_zyx.torch.int32.tensor"]
    assert [p.name for p in (folder / "outputs").iterdir()] == ["out_dense.torch.fp16.tensor"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tensor_files"] == {"inputs": {"features": "in_features.torch.fp16",
                                               "indices": "in_indices_zyx.torch.int32"},
                                    "outputs": {"dense": "out_dense.torch.fp16"}}
    assert meta["stages"] == {"model": {"inputs": ["features", "indices"], "outputs": ["dense"]}}
    features, indices = scn_golden.load_inputs(folder / "inputs", "zyx")
    assert features.dtype == np.float16 and indices.dtype == np.int32
    dense = scn_golden.load_output(folder / "outputs")
    assert dense.dtype == np.float16 and dense.shape == (1, 64, 23, 23)
    # The stored inputs produced the stored output (features were rounded to fp16 first).
    reference = run.reference["model"]
    assert np.array_equal(reference.inputs["features"], features.astype(np.float32))
    assert np.array_equal(reference.outputs["dense"].astype(np.float16), dense)
    assert np.array_equal(record.inputs["indices"], indices) and np.array_equal(record.outputs["dense"], dense)
    assert run_check(run, "golden", "torch-fp32", "model").verdict == "passed"


def test_bad_indices_in_golden_files_name_the_file_and_row(tmp_path: Path) -> None:
    run = _run(tmp_path, update=True)
    run.golden_record()
    path = tmp_path / "golden/scn-tiny/inputs/in_indices_zyx.torch.int32.tensor"
    good = tensorfile.load(path)

    def rewrite(indices: np.ndarray) -> CaseContext:
        tensorfile.save(path, indices)
        meta_path = tmp_path / "golden/scn-tiny/meta.json"
        meta = json.loads(meta_path.read_text())
        meta["files"][f"inputs/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()  # as if regenerated
        meta_path.write_text(json.dumps(meta))
        return _run(tmp_path)

    repeated = good.copy()
    repeated[9] = repeated[4]
    with pytest.raises(ScnInputError, match=rf"^{path}: row 9: index .* repeats row 4"):
        rewrite(repeated).golden_record()
    outside = good.copy()
    outside[12, 1] = 41
    with pytest.raises(ScnInputError, match=rf"^{path}: row 12: index \[0, 41, .* outside batch 1 x grid \[41, 180, 180\]"):
        run_check(rewrite(outside), "golden", "torch-fp32", "model")


def test_bad_sample_indices_name_the_sample(tmp_path: Path) -> None:
    run = _run(tmp_path)
    task = run.adapter
    assert isinstance(task, lidar.LidarTask)
    sample = run.dataset()[0]
    features, indices = sample.features.copy(), sample.indices.copy()
    indices[3] = indices[0]
    bad = type(sample)(sample.token, sample.points, features, indices, sample.spatial_shape, sample.boxes)
    with pytest.raises(ScnInputError, match=rf"^sample 0 \({sample.token}\) indices: row 3: .* repeats row 0"):
        task.sweep_inputs(bad, 0)
    features[5, 1] = np.inf
    with pytest.raises(ScnInputError, match=r"features: row 5: features hold NaN or Inf"):
        task.check_inputs({"features": features, "indices": sample.indices}, {})


def test_unsupported_backends_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def reason(name: str, device: torch.device = cpu) -> str | None:
        return run.adapter.unsupported_reason(backend_info(name), device)

    for name in ("ort-fp32", "ort-int8", "trt-fp16", "trt-int8"):
        text = reason(name)
        assert text is not None and "custom SparseConvolution/ScatterDense ops" in text and f"{name} has no kernels" in text
    assert run.unavailable_reason("ort-fp32") == reason("ort-fp32")
    assert reason("torch-fp32") is None and reason("scn-ref") is None and reason("fakequant-int8") is None
    monkeypatch.setattr(lidar, "spconv_cpu_only", lambda: False)
    assert reason("torch-fp16") is None and reason("torch-fp32", cuda) is None
    monkeypatch.setattr(lidar, "spconv_cpu_only", lambda: True)
    for name, device in (("torch-fp16", cpu), ("torch-fp32", cuda), ("fakequant-int8", cuda)):
        text = reason(name, device)
        assert text is not None and "CPU-only build" in text and "--device cpu" in text, name
    assert reason("scn-ref", cuda) is None  # the reference executor runs on the CPU


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("samples: 1", "samples: 2"), r"scn_tiny.yaml:11: key 'golden.samples': 2: the SCN takes one sweep"),
        (("batch_size: 1", "batch_size: 4"), r"scn_tiny.yaml:10: key 'data.batch_size': 4: the SCN takes one sweep"),
        (("calibration_batch_size: 1", "calibration_batch_size: 2"), r"key 'quant.calibration_batch_size': 2:"),
        (("task: lidar", "task: lidar\ntask_args: {index_order: yxz}"),
         r"key 'task_args.index_order': index_order must be one of \['zyx', 'xyz'\], got 'yxz'"),
        (("task: lidar", "task: lidar\ntask_args: {grid: 3}"), r"key 'task_args.grid': unknown lidar task option"),
        (("backends:", "metric: {name: nds}\nbackends:"), r"key 'metric': the lidar task has no metric"),
    ],
    ids=["samples", "batch-size", "calibration-batch-size", "index-order", "unknown-option", "metric"],
)
def test_case_errors_name_the_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    run = _run(tmp_path, CASE.replace(*edit))
    with pytest.raises(CaseError, match=message):
        run.adapter  # noqa: B018 - building the adapter validates the case

