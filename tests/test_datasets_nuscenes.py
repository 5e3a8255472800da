"""Tests for harness/datasets/nuscenes.py on a tiny dataroot in the real formats (tests/nuscenes_tiny.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.datasets.nuscenes import (
    NuScenesCameras,
    NuScenesError,
    matrix_quaternion,
    quaternion_matrix,
    submission,
)
from harness.datasets.scenes import CAMERAS
from harness.tasks.detection3d import ground_truth_boxes, preprocess

pytest.importorskip("nuscenes", reason="nuscenes-devkit (the 'nuscenes' extra) is not installed")

from nuscenes.eval.common.loaders import load_prediction
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.utils.geometry_utils import view_points
from nuscenes_tiny import VERSION, write_dataroot


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("nuscenes")
    return root, write_dataroot(root)


@pytest.fixture(scope="module")
def val(dataroot: tuple[Path, dict[str, Any]]) -> NuScenesCameras:
    return NuScenesCameras(dataroot[0], VERSION, "mini_val")


def test_split_and_sample_layout(dataroot: tuple[Path, dict[str, Any]], val: NuScenesCameras) -> None:
    assert val.tokens == tuple(dataroot[1]["val_samples"])
    assert len(NuScenesCameras(dataroot[0], VERSION, None)) == 3
    assert len(NuScenesCameras(dataroot[0], VERSION, "mini_train")) == 1
    sample = val[0]
    assert sample.images.shape == (6, 90, 160, 3) and sample.images.dtype == np.uint8
    assert sample.lidar2img.shape == sample.cam2lidar.shape == (6, 4, 4)
    assert [b.label for b in sample.boxes] == ["car", "pedestrian", "barrier"]  # the animal has no class
    car, ped, barrier = sample.boxes
    assert (car.attribute, car.num_pts, barrier.attribute, ped.num_pts) == ("vehicle.moving", 41, "", 7)
    assert car.size == (1.9, 4.6, 1.7)
    assert preprocess(sample.images).shape == (6, 3, 90, 160)
    assert [b["label"] for b in ground_truth_boxes(sample.boxes)] == ["car", "pedestrian", "barrier"]


def test_boxes_in_the_lidar_frame(dataroot: tuple[Path, dict[str, Any]], val: NuScenesCameras) -> None:
    tables = dataroot[1]["tables"]
    sample = val[0]
    lidar2global = sample.ego2global @ sample.lidar2ego
    anns = {a["token"]: a for a in tables["sample_annotation"]}
    for box in sample.boxes:
        ann = anns[box.token]
        world = lidar2global @ np.array([*box.center, 1.0])
        np.testing.assert_allclose(world[:3], ann["translation"], atol=1e-9)
        # yaw only: the LiDAR's tilt (under 1.3 degrees) is dropped, as mmdet3d drops it
        heading = lidar2global[:3, :3] @ np.array([math.cos(box.yaw), math.sin(box.yaw), 0.0])
        expected = quaternion_matrix(ann["rotation"])[:, 0]
        assert abs(math.atan2(heading[1], heading[0]) - math.atan2(expected[1], expected[0])) < 1e-3
    car = sample.boxes[0]
    nxt = anns[anns[car.token]["next"]]
    stamps = {s["token"]: s["timestamp"] for s in tables["sample"]}
    dt = (stamps[nxt["sample_token"]] - stamps[anns[car.token]["sample_token"]]) * 1e-6
    global_velocity = (np.array(nxt["translation"]) - np.array(anns[car.token]["translation"])) / dt
    # (vx, vy) only: the vertical part the tilt gives is dropped
    np.testing.assert_allclose((lidar2global[:3, :3] @ np.array([*car.velocity, 0.0]))[:2],
                               global_velocity[:2], atol=0.02)


def test_lidar2img_projects_as_the_devkit(val: NuScenesCameras) -> None:
    sample = val[0]
    nusc = val.nusc
    record = nusc.get("sample", sample.token)
    seen = 0
    for c, camera in enumerate(CAMERAS):
        _, boxes, intrinsic = nusc.get_sample_data(record["data"][camera])
        by_token = {b.token: b for b in boxes}
        for box in sample.boxes:
            cam_box = by_token.get(box.token)
            if cam_box is None or cam_box.center[2] <= 0.1:
                continue
            expected = view_points(cam_box.center.reshape(3, 1), np.asarray(intrinsic), normalize=True)[:2, 0]
            projected = sample.lidar2img[c] @ np.array([*box.center, 1.0])
            np.testing.assert_allclose(projected[:2] / projected[2], expected, atol=1e-6)
            seen += 1
    assert seen >= 3


def test_resize_and_crop_follow_the_intrinsics(dataroot: tuple[Path, dict[str, Any]], val: NuScenesCameras) -> None:
    small = NuScenesCameras(dataroot[0], VERSION, "mini_val", size=1, image_height=32, image_width=88)
    assert len(small) == 1
    sample, full = small[0], val[0]
    assert sample.images.shape == (6, 32, 88, 3)
    scale, crop = 88 / 160, round(90 * 88 / 160) - 32
    point = np.array([*full.boxes[0].center, 1.0])
    for c in range(6):
        a, b = full.lidar2img[c] @ point, sample.lidar2img[c] @ point
        np.testing.assert_allclose(b[:2] / b[2], [scale * a[0] / a[2], scale * a[1] / a[2] - crop], atol=1e-9)
    with pytest.raises(NuScenesError, match="fewer than image_height 80"):
        NuScenesCameras(dataroot[0], VERSION, "mini_val", image_height=80, image_width=88)[0]


def test_submission_round_trips_the_ground_truth(dataroot: tuple[Path, dict[str, Any]], val: NuScenesCameras,
                                                 tmp_path: Path) -> None:
    anns = {a["token"]: a for a in dataroot[1]["tables"]["sample_annotation"]}
    sample = val[0]
    predictions = {sample.token: [dict(b.to_nds(score=0.5 + 0.1 * k), token=b.token)
                                  for k, b in enumerate(sample.boxes)]}
    path = val.write_submission(tmp_path / "results_nusc.json", predictions)
    written = json.loads(path.read_text())
    assert written["meta"]["use_camera"] is True and not written["meta"]["use_lidar"]
    assert set(written["results"]) == set(val.tokens) and written["results"][val.tokens[1]] == []
    entries = written["results"][sample.token]
    for entry, box in zip(sorted(entries, key=lambda e: e["detection_score"]), sample.boxes, strict=True):
        ann = anns[box.token]
        np.testing.assert_allclose(entry["translation"], ann["translation"], atol=1e-9)
        np.testing.assert_allclose(entry["size"], ann["size"])
        np.testing.assert_allclose(quaternion_matrix(entry["rotation"]), quaternion_matrix(ann["rotation"]), atol=0.03)
        assert entry["detection_name"] == box.label and entry["attribute_name"] == box.attribute
    boxes, meta = load_prediction(str(path), 500, DetectionBox)
    assert len(boxes.boxes[sample.token]) == 3 and meta["use_camera"]
    with pytest.raises(NuScenesError, match="tokens not in this split"):
        val.submission({"nope": []})
    with pytest.raises(NuScenesError, match="label 'dog'"):
        submission({"t": [{"label": "dog", "center": [0, 0, 0], "size": [1, 1, 1], "yaw": 0.0,
                           "velocity": [0, 0], "score": 1.0}]}, {"t": (np.eye(4), np.eye(4))})


def test_quaternions_round_trip() -> None:
    gen = np.random.default_rng(0)
    for q in gen.normal(size=(50, 4)):
        q = q / np.linalg.norm(q) * (1 if q[0] >= 0 else -1)
        np.testing.assert_allclose(matrix_quaternion(quaternion_matrix(q)), q, atol=1e-12)


def test_bad_roots_and_splits_are_named(dataroot: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(NuScenesError, match="no table folder"):
        NuScenesCameras(tmp_path, VERSION, "mini_val")
    with pytest.raises(NuScenesError, match="unknown split 'holdout'"):
        NuScenesCameras(dataroot[0], VERSION, "holdout")
    with pytest.raises(NuScenesError, match="no samples"):
        NuScenesCameras(dataroot[0], VERSION, "test")
    with pytest.raises(NuScenesError, match="both image_height and image_width"):
        NuScenesCameras(dataroot[0], VERSION, "mini_val", image_height=32)


CASE = """\
name: nuscenes-fastbev
task: detection3d
task_args: {{decoder: harness.zoo.fastbev:AnchorRowDecoder}}
model:
  factory: harness.zoo.fastbev:fastbev_r18
  args: {{profile: ci}}
data:
  factory: harness.datasets.nuscenes:NuScenesCameras
  args: {{dataroot: {root}, version: v1.0-mini, split: mini_val, image_height: 64, image_width: 176}}
  calibration: {{args: {{split: mini_train}}}}
golden: {{dir: golden/nuscenes-fastbev, samples: 1}}
metric: {{name: nds}}
backends:
  torch-fp32: {{compare: {{atol: 1.0e-4}}}}
"""


def test_a_case_feeds_the_loader_to_the_detection3d_task(dataroot: tuple[Path, dict[str, Any]],
                                                         tmp_path: Path) -> None:
    from harness.cases import load_case
    from harness.context import CaseContext, RunOptions

    path = tmp_path / "cases" / "nuscenes.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(CASE.format(root=dataroot[0]))
    (tmp_path / "pyproject.toml").touch()
    run = CaseContext(load_case(path, allow_outside_root=True), RunOptions.default(tmp_path))  # datasets live elsewhere
    data = run.dataset()
    assert len(data) == 2 and len(run.dataset("calibration")) == 1
    batches = list(run.adapter.batches(data, 2))
    assert len(batches) == 1 and batches[0].inputs["image"].shape == (12, 3, 64, 176)
    assert batches[0].sample_ids == data.tokens
    assert [b.label for b in batches[0].targets[0].boxes] == ["car", "pedestrian", "barrier"]
    np.testing.assert_array_equal(batches[0].targets[1].lidar2img, data[1].lidar2img)
