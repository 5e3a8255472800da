"""Benchmarks: one camera sample (full 6x256x704 and CI 6x64x176) and one LiDAR sweep per grid.

Run: `pytest -p no:qharness tests/bench_datasets_scenes.py` (prints timings, asserts none).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.datasets.lidar import LidarSweeps
from harness.datasets.scenes import DrivingScenes

CAMERA_PROFILES = {
    "full-6x256x704": {"image_height": 256, "image_width": 704, "max_range": 50.0},
    "ci-6x64x176": {"image_height": 64, "image_width": 176, "max_range": 30.0},
}


@pytest.mark.parametrize("profile", sorted(CAMERA_PROFILES))
def test_camera_sample(benchmark: Any, profile: str) -> None:
    ds = DrivingScenes("val", size=64, seed=0, **CAMERA_PROFILES[profile])  # type: ignore[arg-type]
    ds[0]  # builds the cached rig
    counter = iter(range(10**9))
    benchmark(lambda: ds[next(counter) % len(ds)])


@pytest.mark.parametrize("grid", ["full", "ci"])
def test_lidar_sweep(benchmark: Any, grid: str) -> None:
    ds = LidarSweeps("val", size=64, seed=0, grid=grid)
    counter = iter(range(10**9))
    benchmark(lambda: ds[next(counter) % len(ds)])
