"""FastBEV as a staged harness model: run_stages, lookup-table files, golden files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness import tensorfile
from harness.datasets.scenes import DrivingScenes
from harness.errors import HarnessError
from harness.program import Program
from harness.tasks.detection3d import preprocess
from harness.zoo.fastbev import (
    TABLE_NAMES,
    FastBEV,
    FastBEVConfig,
    LookupTables,
    build_lookup_tables,
    fastbev_r18,
    load_lookup_tables,
    normalize_images,
)

SMALL = {"grid": (24, 24, 4), "voxel_size": (2.5, 2.5, 1.5), "point_cloud_range": (-30.0, -30.0, -5.0, 30.0, 30.0, 3.0)}
STAGES = {
    "pre": (("image",), ("mlvl_feat",)),
    "post": (("mlvl_volume",), ("anchor_scores", "anchor_deltas", "anchor_dir_logits")),
}
DATA = DrivingScenes("val", size=2, image_height=64, image_width=176, max_boxes=10, max_range=25.0)


@pytest.fixture(scope="module")
def model() -> FastBEV:
    m = fastbev_r18("ci", topk=200, **SMALL)
    torch.nn.init.normal_(m.bbox_head.conv_reg.weight, std=0.05)  # decoded boxes vary
    return m


def test_run_stages_equals_the_direct_forward(model: FastBEV) -> None:
    samples = [DATA[0], DATA[1]]
    images = np.concatenate([s.images for s in samples])
    program = Program.staged(model, STAGES)
    calls: list[str] = []

    def call(name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls.append(name)
        return program.stages[name](feeds)

    with torch.no_grad():
        staged = program.run({"image": torch.from_numpy(preprocess(images))}, call)
        for b, sample in enumerate(samples):
            raw = torch.from_numpy(sample.images).permute(0, 3, 1, 2).contiguous()
            head = model(normalize_images(raw), torch.from_numpy(sample.lidar2img))
            direct = model.select_and_decode(head)
            for name, want in zip(("cls_score", "bbox_pred", "dir_cls_preds"), direct, strict=True):
                torch.testing.assert_close(staged[name][b], want, rtol=1e-5, atol=1e-5)
    assert calls == ["pre", "post", "pre", "post"]
    assert staged["cls_score"].shape == (2, 200, 10) and staged["dir_cls_preds"].dtype == torch.int64


def test_dense_post_rows_follow_the_anchors(model: FastBEV) -> None:
    (volume,) = model.post.example_inputs()
    with torch.no_grad():
        scores, deltas, dir_logits = model.post(volume)
        head = model.head_forward(volume)
    cfg = model.config
    assert scores.shape == (cfg.num_anchors, 10) and deltas.shape == (cfg.num_anchors, 9)
    assert dir_logits.shape == (cfg.num_anchors, 2) and model.anchors.shape == (cfg.num_anchors, 9)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    # anchor a = ((y*X + x)*S + s)*R + r sits in head cell (y, x); its class logits are channels
    # (s*R + r)*10 .. +10 of that cell
    per_cell = cfg.num_anchors_per_cell
    a = 7 * cfg.head_xy[0] * per_cell + 3 * per_cell + 5
    logits = head.cls_score[0, 5 * 10 : 6 * 10, 7, 3]
    torch.testing.assert_close(scores[a], logits.sigmoid())


def test_rig_tables_are_the_datasets_projection(model: FastBEV) -> None:
    cfg = model.config
    want = build_lookup_tables(torch.from_numpy(DATA[0].lidar2img), cfg.feat_hw, cfg.grid, cfg.voxel_size,
                               cfg.point_cloud_range, cfg.feat_stride)
    for got, ref in zip(model.tables, want, strict=True):
        assert torch.equal(got, ref)
    assert 0.2 < float(model.tables.valid_c_idx.amax(0).mean()) < 1.0  # most voxels seen by a camera


def _write(folder: Path, files: dict[str, np.ndarray]) -> None:
    for name, array in files.items():
        tensorfile.save(folder / f"{name}.tensor", array)


def test_tables_round_trip_through_tensor_files(model: FastBEV, tmp_path: Path) -> None:
    files = model.golden_files()
    assert set(files) == set(TABLE_NAMES)
    assert files["x"].dtype == np.int64 and files["valid_c_idx"].dtype == np.float32
    assert files["anchors"].shape == (model.config.num_anchors, 9)
    # the files win over the rig: blank camera 0 and shift the anchors
    files["valid_c_idx"][0] = 0.0
    files["anchors"][:, 2] += 0.25
    _write(tmp_path, files)
    loaded = fastbev_r18("ci", topk=200, tables_dir=tmp_path, **SMALL)
    np.testing.assert_array_equal(loaded.tables.valid_c_idx.numpy(), files["valid_c_idx"])
    np.testing.assert_array_equal(loaded.anchors.numpy(), files["anchors"])
    assert {k: v.tobytes() for k, v in loaded.golden_files().items()} == {k: v.tobytes() for k, v in files.items()}
    assert "table_x" not in loaded.state_dict()  # tables are not weights


def test_missing_tables_dir_falls_back_to_the_rig(model: FastBEV, tmp_path: Path) -> None:
    other = fastbev_r18("ci", topk=200, tables_dir=tmp_path / "none", **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(other.tables, model.tables, strict=True))


def test_table_of_another_grid_is_an_error_naming_the_file(model: FastBEV, tmp_path: Path) -> None:
    _write(tmp_path, model.golden_files())
    with pytest.raises(HarnessError, match=r"x\.tensor: 'x' is int64 \[6, 2304\], expected int64 \[6, 4096\]"):
        fastbev_r18("ci", grid=(32, 32, 4), voxel_size=(2.0, 2.0, 1.5), tables_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("y", lambda a: a.astype(np.int32), r"y\.tensor: 'y' is int32"),
        ("anchors", lambda a: a[:-8], r"anchors\.tensor: 'anchors' is float32 \[1144, 9\], expected float32 \[1152, 9\]"),
        ("valid_c_idx", lambda a: a * 2, r"valid_c_idx\.tensor: 'valid_c_idx' holds values other than 0 and 1"),
        ("x", lambda a: a + 1000, r"x\.tensor: 'x' has valid entries outside 0\.\.43"),
    ],
)
def test_bad_table_files_name_the_file(model: FastBEV, tmp_path: Path, name: str, change, message: str) -> None:  # type: ignore[no-untyped-def]
    files = model.golden_files()
    files[name] = change(files[name])
    _write(tmp_path, files)
    with pytest.raises(HarnessError, match=message):
        load_lookup_tables(tmp_path, model.config)


def test_incomplete_tables_dir_names_the_missing_files(model: FastBEV, tmp_path: Path) -> None:
    files = model.golden_files()
    del files["anchors"], files["y"]
    _write(tmp_path, files)
    with pytest.raises(HarnessError, match=r"incomplete: missing .*y\.tensor, .*anchors\.tensor"):
        fastbev_r18("ci", tables_dir=tmp_path, **SMALL)


def test_run_stages_rejects_bad_input_and_missing_tables(model: FastBEV) -> None:
    program = Program.staged(model, STAGES)
    with pytest.raises(HarnessError, match=r"\[B\*6, 3, H, W\], got \(5, 3, 64, 176\)"):
        program.run_eager({"image": torch.zeros(5, 3, 64, 176)})
    bare = FastBEV(FastBEVConfig(image_hw=(64, 176), **SMALL))  # type: ignore[arg-type]
    with pytest.raises(HarnessError, match="no lookup tables"):
        Program.staged(bare, STAGES).run_eager({"image": torch.zeros(6, 3, 64, 176)})
    with pytest.raises(HarnessError, match="set_lookup_tables"):
        bare.set_lookup_tables(LookupTables(model.tables.x[:, :10], model.tables.y, model.tables.valid_c_idx))
