"""FusionInputs: BEVFusion's images, LiDAR depth images and LiDAR BEV of the synthetic scenes."""

from __future__ import annotations

import numpy as np
import pytest

from harness.datasets.fusion import FusionInputs, depth_images, lidar_bev, normalise_images
from harness.datasets.lidar import cast_lidar
from harness.datasets.scene3d import GROUND_Z, SceneError, make_scene
from harness.datasets.scenes import DrivingScenes, camera_rig

CI = {"image_height": 64, "image_width": 192, "beams": 16, "azimuth_steps": 720, "bev_range": 51.2,
      "bev_cells": 16, "bev_channels": 32}


def _bytes(sample: object) -> bytes:
    return b"".join(getattr(sample, k).tobytes() for k in ("img", "depth", "lidar2img", "lidar_bev"))


def test_sample_shapes_and_the_scenes_they_come_from() -> None:
    ds = FusionInputs("val", size=2, seed=3, **CI)  # type: ignore[arg-type]
    s = ds[1]
    assert s.token == "val-3-000001"
    assert s.img.shape == (1, 6, 3, 64, 192) and s.depth.shape == (1, 6, 1, 64, 192)
    assert s.lidar2img.shape == (1, 6, 4, 4) and s.lidar_bev.shape == (1, 32, 16, 16)
    assert all(a.dtype == np.float32 for a in (s.img, s.depth, s.lidar2img, s.lidar_bev))
    scenes = DrivingScenes("val", size=2, image_height=64, image_width=192, seed=3)
    assert np.array_equal(s.img[0], normalise_images(scenes[1].images))
    assert np.array_equal(s.lidar2img[0], scenes[1].lidar2img)
    assert (s.depth > 0).mean() > 0.01 and s.depth.max() < 80.0
    assert s.lidar_bev.min() >= 0.0 and (s.lidar_bev > 0).any()


def test_samples_are_deterministic_and_differ_by_split_and_index() -> None:
    a = FusionInputs("val", size=2, **CI)  # type: ignore[arg-type]
    assert _bytes(a[0]) == _bytes(FusionInputs("val", size=2, **CI)[0])  # type: ignore[arg-type]
    assert _bytes(a[0]) != _bytes(a[1])
    assert _bytes(a[0]) != _bytes(FusionInputs("train", size=2, **CI)[0])  # type: ignore[arg-type]
    assert _bytes(a[-1]) == _bytes(a[1])


def test_depth_lands_where_lidar2img_projects_and_the_nearest_point_wins() -> None:
    _, cam2ego, lidar2img = camera_rig(64, 192)
    origin = cam2ego[0, :3, 3].astype(np.float64)  # CAM_FRONT looks along +x
    near = np.array([10.0, 0.0, 0.0])
    far = origin + 2.0 * (near - origin)  # on the same ray, twice as far
    depth = depth_images(np.stack([far, near, [-10.0, 0.0, 0.0]]), lidar2img, 64, 192)
    p = lidar2img[0].astype(np.float64) @ np.array([10.0, 0.0, 0.0, 1.0])
    col, row = int(np.floor(p[0] / p[2] + 0.5)), int(np.floor(p[1] / p[2] + 0.5))
    assert depth[0, 0, row, col] == pytest.approx(p[2], rel=1e-6)  # the point 20 m away hides behind it
    # CAM_FRONT sees one point (the far one hides), CAM_BACK the point behind the car
    assert [np.count_nonzero(depth[c]) for c in range(6)] == [1, 0, 0, 1, 0, 0]


def test_lidar_bev_lights_the_3x3_cells_around_points() -> None:
    points = np.array([[-51.2 + 6.4 * 5 + 1.0, -51.2 + 6.4 * 9 + 1.0, GROUND_Z + 1.0, 40.0]])
    bev = lidar_bev(points, 51.2, 16, 8)
    lit = np.argwhere(bev[0].max(axis=0) > 0)
    assert {(int(x), int(y)) for x, y in lit} <= {(x, y) for x in range(4, 7) for y in range(8, 11)}
    assert (5, 9) in {(int(x), int(y)) for x, y in lit}
    assert not lidar_bev(np.zeros((0, 4), np.float32), 51.2, 16, 8).any()


def test_bev_matches_the_sweep_of_the_same_scene() -> None:
    s = FusionInputs("val", size=1, **CI)[0]  # type: ignore[arg-type]
    points = cast_lidar(make_scene("val", 0, 0), beams=16, azimuth_steps=720).points
    assert np.array_equal(s.lidar_bev, lidar_bev(points, 51.2, 16, 32))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(SceneError, match="split"):
        FusionInputs("dev")
    with pytest.raises(SceneError, match="bev_cells"):
        FusionInputs(bev_cells=0)
    with pytest.raises(IndexError, match="out of range"):
        FusionInputs(size=1, **CI)[1]  # type: ignore[arg-type]
