"""Tests of harness.export.scn_executor and scn_golden: fidelity, fp16/int8 emulation, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from harness import tensorfile
from harness.datasets.lidar import LidarSweeps
from harness.errors import ExportError, TensorFileError
from harness.export import scn_golden
from harness.export.custom import ScnExport, export_scn, set_attribute
from harness.export.scn_executor import ScnExecutor, ScnInputError, check_indices
from harness.quant.calibrate import calibrate
from harness.quant.sparse import quantize_scn
from harness.zoo import centerpoint as cp

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

WIDTHS = (8, 16, 16, 32)


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    x, y = a.double().flatten(), b.double().flatten()
    return float((x - y).abs().max()), float(x @ y / (x.norm() * y.norm()))


@pytest.fixture(scope="module")
def model() -> cp.CenterPointSCN:
    return cp.centerpoint_scn(widths=WIDTHS, grid=cp.CI_GRID, seed=5, fit_voxels=3000, fuse=True,
                              fp16_params=True)


@pytest.fixture(scope="module")
def voxels() -> tuple[torch.Tensor, torch.Tensor]:
    f, i = cp.random_voxels(cp.CI_GRID, 3000, seed=6)
    return f.half().float(), i


@pytest.fixture(scope="module")
def reference(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(*voxels)
    return out


@pytest.fixture(scope="module")
def exported(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> dict[str, ScnExport]:
    return {order: export_scn(model, *voxels, order=order) for order in ("zyx", "xyz")}


def test_fp32_matches_pytorch(exported: dict[str, ScnExport], voxels: tuple[torch.Tensor, torch.Tensor],
                              reference: torch.Tensor) -> None:
    out = ScnExecutor(exported["zyx"].model)(*voxels)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    err, cos = _stats(out, reference)
    assert err <= 1e-4 and cos >= 0.9999


def test_xyz_file_with_xyz_indices_gives_the_same_output(
        exported: dict[str, ScnExport], voxels: tuple[torch.Tensor, torch.Tensor], reference: torch.Tensor) -> None:
    ex = ScnExecutor(exported["xyz"].model)
    assert ex.format == "xyz" and ex.grid == [180, 180, 41]
    out = ex(voxels[0], scn_golden.swap_order(voxels[1]))
    err, cos = _stats(out, reference)
    assert err <= 1e-4 and cos >= 0.9999


def test_fp16_storage_stays_close(exported: dict[str, ScnExport], voxels: tuple[torch.Tensor, torch.Tensor],
                                  reference: torch.Tensor) -> None:
    out = ScnExecutor(exported["zyx"].model, precision="fp16")(*voxels)
    assert out.dtype == torch.float16
    err, cos = _stats(out, reference)
    assert 0 < err < 0.05 * float(reference.abs().max()) and cos >= 0.9999


def test_reads_only_the_file(exported: dict[str, ScnExport], voxels: tuple[torch.Tensor, torch.Tensor],
                             reference: torch.Tensor, tmp_path: Path) -> None:
    path = exported["zyx"].save(tmp_path / "scn.onnx")
    m = onnx.load(str(path))
    w = next(i for i in m.graph.initializer if i.name == "spconv20.bias")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + np.float16(1), w.name))
    changed = tmp_path / "changed.onnx"
    onnx.save_model(m, str(changed))
    base = ScnExecutor(path)(*voxels)
    assert torch.equal(base, ScnExecutor(exported["zyx"].model)(*voxels))
    shifted = ScnExecutor(changed)(*voxels)
    assert float((shifted - base).max()) > 0.5


def _quantized(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    q = quantize_scn(model)
    calibrate(q, [voxels], progress=False)
    return q


@pytest.mark.slow
def test_int8_ranges_match_fakequant_pytorch(
        model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor], reference: torch.Tensor) -> None:
    quantized = _quantized(model, voxels)
    proto = export_scn(quantized, *voxels).model
    assert _stats(ScnExecutor(proto)(*voxels), reference)[0] <= 1e-4  # ranges unused unless int8
    with torch.no_grad():
        fakequant = quantized(*voxels)
    out = ScnExecutor(proto, int8=True)(*voxels)
    err, cos = _stats(out, fakequant)
    assert err <= 1e-4 and cos >= 0.99999
    assert _stats(out, reference)[1] >= 0.98
    # fp16 storage moves values across rounding boundaries: a different int8 noise draw.
    out16 = ScnExecutor(proto, int8=True, precision="fp16")(*voxels)
    assert _stats(out16, reference)[1] >= 0.98


@pytest.mark.slow
def test_goals_on_the_ci_profile_with_lidar_sweeps() -> None:
    model = cp.centerpoint_scn_ci()
    calib = [(torch.from_numpy(s.features), torch.from_numpy(s.indices))
             for s in LidarSweeps(split="train", size=4, seed=1, grid="ci")]
    sample = LidarSweeps(split="val", size=1, seed=1, grid="ci")[0]
    f, i = torch.from_numpy(sample.features).half().float(), torch.from_numpy(sample.indices)
    quantized = quantize_scn(model)
    calibrate(quantized, calib, progress=False)
    with torch.no_grad():
        ref = model(f, i)
        fakequant = quantized(f, i)
    float_proto = export_scn(model, f, i).model
    err, cos = _stats(ScnExecutor(float_proto)(f, i), ref)
    assert err <= 1e-4 and cos >= 0.9999
    proto = export_scn(quantized, f, i).model
    int8 = ScnExecutor(proto, int8=True)(f, i)
    assert _stats(int8, ref)[1] >= 0.99
    assert _stats(int8, fakequant)[0] <= 1e-4


def test_bad_indices_name_source_and_row() -> None:
    grid = [41, 180, 180]
    good = np.array([[0, 1, 2, 3], [0, 40, 179, 179], [0, 0, 0, 0]], dtype=np.int32)
    check_indices(good, grid, "x")
    out = good.copy()
    out[2] = [0, 41, 0, 0]
    with pytest.raises(ScnInputError, match=r"^f\.tensor: row 2: index \[0, 41, 0, 0\] is outside"):
        check_indices(out, grid, "f.tensor")
    neg = good.copy()
    neg[1, 3] = -1
    with pytest.raises(ScnInputError, match="row 1: "):
        check_indices(neg, grid, "f.tensor")
    batch = good.copy()
    batch[0, 0] = 1
    with pytest.raises(ScnInputError, match=r"row 0: .* outside batch 1"):
        check_indices(batch, grid, "f.tensor")
    dup = np.concatenate([good, good[1:2], good[0:1]])
    with pytest.raises(ScnInputError, match=r"row 3: index \[0, 40, 179, 179\] repeats row 1"):
        check_indices(dup, grid, "f.tensor")
    with pytest.raises(ScnInputError, match=r"must be \[N, 4\]"):
        check_indices(good[:, :3], grid, "f.tensor")


def test_files_in_nvidia_layout_round_trip(
        exported: dict[str, ScnExport], voxels: tuple[torch.Tensor, torch.Tensor],
        reference: torch.Tensor, tmp_path: Path) -> None:
    paths = scn_golden.save_inputs(tmp_path, *voxels)
    assert sorted(p.name for p in paths) == ["in_features.torch.fp16.tensor",
                                             "in_indices_xyz.torch.int32.tensor",
                                             "in_indices_zyx.torch.int32.tensor"]
    feats = tensorfile.load(tmp_path / "in_features.torch.fp16.tensor")
    zyx = tensorfile.load(tmp_path / "in_indices_zyx.torch.int32.tensor")
    xyz = tensorfile.load(tmp_path / "in_indices_xyz.torch.int32.tensor")
    assert feats.dtype == np.float16 and feats.shape == (voxels[0].shape[0], 5)
    assert zyx.dtype == np.int32 and np.array_equal(xyz[:, [0, 3, 2, 1]], zyx)
    out_path = scn_golden.save_output(tmp_path, reference)
    assert out_path.name == "out_dense.torch.fp16.tensor"
    assert scn_golden.load_output(tmp_path).dtype == np.float16
    for order in ("zyx", "xyz"):
        ex = ScnExecutor(exported[order].model)
        out = ex.run_files(*scn_golden.input_paths(tmp_path, order))
        assert _stats(out, reference)[0] <= 1e-4
    assert set(scn_golden.golden_inputs(*voxels)) == {scn_golden.FEATURES, *scn_golden.INDICES.values()}
    assert scn_golden.golden_output(reference)[scn_golden.OUTPUT].dtype == np.float16


def test_bad_input_files_name_the_file(exported: dict[str, ScnExport],
                                       voxels: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    f_path, i_path = scn_golden.input_paths(tmp_path, "zyx")
    ind = voxels[1].numpy().copy()
    ind[7] = ind[3]
    scn_golden.save_inputs(tmp_path, voxels[0], ind)
    ex = ScnExecutor(exported["zyx"].model)
    with pytest.raises(ScnInputError, match=rf"^{i_path}: row 7: index .* repeats row 3"):
        ex.run_files(f_path, i_path)
    ind = voxels[1].numpy().copy()
    ind[11, 3] = 180
    scn_golden.save_inputs(tmp_path, voxels[0], ind)
    with pytest.raises(ScnInputError, match=rf"^{i_path}: row 11: .* outside"):
        ex.run_files(f_path, i_path)
    tensorfile.save(i_path, ind.astype(np.int64))
    with pytest.raises(TensorFileError, match="indices must be int32"):
        ex.run_files(f_path, i_path)
    bad = voxels[0].numpy().copy()
    bad[5, 2] = np.nan
    scn_golden.save_inputs(tmp_path, bad, voxels[1])
    with pytest.raises(ScnInputError, match=rf"^{f_path}: row 5: features hold NaN"):
        ex.run_files(f_path, i_path)
    with pytest.raises(ScnInputError, match=r"features \[10, 5\] must be"):
        ex(voxels[0][:10], voxels[1])


def test_output_bound_is_enforced(exported: dict[str, ScnExport],
                                  voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(exported["zyx"].model)
    set_attribute(next(n for n in m.graph.node if n.name == "conv5"), "output_bound", 100)
    with pytest.raises(ExportError, match=r"node 'conv5': .* exceed output_bound 100"):
        ScnExecutor(m)(*voxels)


def test_rejects_what_the_engine_cannot_run(exported: dict[str, ScnExport]) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(exported["zyx"].model)
    set_attribute(m.graph.node[0], "transposed", 1)
    with pytest.raises(ExportError, match="'conv0': transposed convolution"):
        ScnExecutor(m)
    m2 = onnx.ModelProto()
    m2.CopyFrom(exported["zyx"].model)
    set_attribute(m2.graph.node[1], "precision", "int8")
    with pytest.raises(ExportError, match="'conv1': int8 needs input_dynamic_range > 0"):
        ScnExecutor(m2)
    with pytest.raises(ExportError, match="precision must be fp32 or fp16"):
        ScnExecutor(exported["zyx"].model, precision="int8")  # type: ignore[arg-type]
