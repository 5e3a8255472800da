"""BEVFusion's inputs for the synthetic driving scenes: camera images, LiDAR depth images, LiDAR BEV.

Sample i of (split, seed, max_boxes, max_range) is the layout of `DrivingScenes` / `LidarSweeps`
sample i: the six camera images come from `harness.datasets.scenes.render_scene`, the LiDAR sweep
from `harness.datasets.lidar.cast_lidar`, so images, depth and BEV agree. Each sample holds, with
a leading batch dimension of 1, what `harness.zoo.bevfusion_staged` takes:

- `img` [1, 6, 3, H, W] float32: RGB normalised as mmdet's BEVFusion pipeline
  ((x - 255 * mean) / (255 * std), ImageNet mean and std);
- `depth` [1, 6, 1, H, W] float32: the sweep projected into each image as DepthLSSTransform's
  input (metres along the optical axis at the pixel nearest to each point, the nearest point
  wins, 0 where no point falls);
- `lidar2img` [1, 6, 4, 4] float32: the rig (`harness.datasets.scenes.camera_rig`);
- `lidar_bev` [1, C, X, Y] float32: a stand-in for the LiDAR encoder's BEV features (the
  fuser's second input): per BEV cell of a `bev_cells` x `bev_cells` grid over +-`bev_range`
  metres (x rows, y columns, as BEVFusion's BEV), four point statistics (sqrt of the point count,
  the highest point above the ground, mean intensity, occupancy), summed over the 3x3
  neighbourhood and mapped to C channels by a fixed seeded linear map and a ReLU, so the map is
  non-negative, sparse and follows the scene's objects as real post-ReLU features do.

Only + - * / sqrt, comparisons, floor and ordered reductions touch the arrays, so the bytes are
the same on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from harness.datasets.lidar import cast_lidar
from harness.datasets.scene3d import GROUND_Z, SceneError, check_layout_args, make_scene
from harness.datasets.scenes import camera_rig, render_scene

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
_BEV_STATS = 4
_PROJECTION_SEED = 20240611
_NEAR = 0.1


@dataclass(frozen=True)
class FusionSample:
    """One sample's arrays (see the module docstring) and its scene token."""

    token: str
    img: np.ndarray
    depth: np.ndarray
    lidar2img: np.ndarray
    lidar_bev: np.ndarray


def normalise_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, (x - mean) / std per channel."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    mean = np.asarray(MEAN_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def depth_images(points: np.ndarray, lidar2img: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 1, H, W) float32 depth of the points (P, >=3) in each camera of `lidar2img` (N, 4, 4).

    A point lands on the pixel nearest to its projection when its depth exceeds 0.1 m; the
    nearest point of a pixel wins; pixels without points are 0.
    """
    x, y, z = (points[:, k].astype(np.float64) for k in range(3))
    out = np.zeros((lidar2img.shape[0], 1, height, width), dtype=np.float32)
    for cam, m in enumerate(lidar2img.astype(np.float64)):
        d = m[2, 0] * x + m[2, 1] * y + m[2, 2] * z + m[2, 3]
        front = d > _NEAR
        d = d[front]
        u = (m[0, 0] * x[front] + m[0, 1] * y[front] + m[0, 2] * z[front] + m[0, 3]) / d
        v = (m[1, 0] * x[front] + m[1, 1] * y[front] + m[1, 2] * z[front] + m[1, 3]) / d
        col = np.floor(u + 0.5)
        row = np.floor(v + 0.5)
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        nearest = np.full(height * width, np.inf)
        flat = row[inside].astype(np.int64) * width + col[inside].astype(np.int64)
        np.minimum.at(nearest, flat, d[inside])
        out[cam, 0] = np.where(np.isfinite(nearest), nearest, 0.0).reshape(height, width)
    return out


def bev_projection(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed linear map (weights [C, 4], bias [C]) from point statistics to BEV channels."""
    rng = np.random.default_rng([_PROJECTION_SEED, channels])
    magnitude = rng.random((channels, _BEV_STATS)) + 0.1
    sign = np.where(rng.random((channels, 1)) < 0.3, -0.5, 1.0)
    bias = -0.2 * rng.random(channels)
    weights = magnitude * sign
    return weights, bias


def lidar_bev(points: np.ndarray, bev_range: float, bev_cells: int, channels: int) -> np.ndarray:
    """(1, C, X, Y) float32 BEV feature stand-in of the points (P, >=4: x, y, z, intensity)."""
    cell = 2.0 * bev_range / bev_cells
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    ix, iy = np.floor((x + bev_range) / cell), np.floor((y + bev_range) / cell)
    inside = (ix >= 0) & (ix < bev_cells) & (iy >= 0) & (iy < bev_cells)
    flat = ix[inside].astype(np.int64) * bev_cells + iy[inside].astype(np.int64)
    n_cells = bev_cells * bev_cells
    count = np.bincount(flat, minlength=n_cells).astype(np.float64)
    intensity = np.bincount(flat, weights=points[inside, 3].astype(np.float64), minlength=n_cells)
    height = np.zeros(n_cells)
    np.maximum.at(height, flat, points[inside, 2].astype(np.float64) - GROUND_Z)
    occupied = count > 0
    stats = np.stack([
        np.sqrt(count) / 4.0,
        height / 2.0,
        np.where(occupied, intensity / np.maximum(count, 1.0), 0.0) / 64.0,
        occupied.astype(np.float64),
    ]).reshape(_BEV_STATS, bev_cells, bev_cells)
    padded = np.pad(stats, ((0, 0), (1, 1), (1, 1)))
    pooled = np.zeros_like(stats)
    for dx in range(3):
        for dy in range(3):
            pooled += padded[:, dx : dx + bev_cells, dy : dy + bev_cells]
    weights, bias = bev_projection(channels)
    out = np.zeros((channels, bev_cells, bev_cells))
    for k in range(_BEV_STATS):
        out += weights[:, k, None, None] * pooled[k]
    out += bias[:, None, None]
    return np.maximum(out, 0.0).astype(np.float32)[None]


class FusionInputs:
    """Seeded BEVFusion inputs (images, depth, rig, LiDAR BEV) of the synthetic driving scenes.

    `image_height` x `image_width` images (the rig scales with them), a LiDAR of `beams` x
    `azimuth_steps` rays, and a `bev_channels` x `bev_cells` x `bev_cells` LiDAR BEV over
    +-`bev_range` m, which must match the model's fuser input (`lidar_channels`, `fused_xy`).
    """

    def __init__(
        self,
        split: str = "val",
        size: int = 4,
        seed: int = 0,
        image_height: int = 256,
        image_width: int = 704,
        beams: int = 32,
        azimuth_steps: int = 1080,
        bev_range: float = 54.0,
        bev_cells: int = 180,
        bev_channels: int = 256,
        max_boxes: int = 40,
        max_range: float = 50.0,
    ) -> None:
        if size < 0:
            raise SceneError(f"size {size} must be >= 0")
        if bev_range <= 0 or bev_cells < 1 or bev_channels < 1:
            raise SceneError(
                f"bev_range {bev_range}, bev_cells {bev_cells} and bev_channels {bev_channels} must be positive"
            )
        check_layout_args(split, seed, max_range=max_range, max_boxes=max_boxes)
        self.split = split
        self.size = size
        self.seed = seed
        self.image_height = image_height
        self.image_width = image_width
        self.beams = beams
        self.azimuth_steps = azimuth_steps
        self.bev_range = bev_range
        self.bev_cells = bev_cells
        self.bev_channels = bev_channels
        self.max_boxes = max_boxes
        self.max_range = max_range

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[FusionSample]:
        for index in range(self.size):
            yield self[index]

    def __getitem__(self, index: int) -> FusionSample:
        if not -self.size <= index < self.size:
            raise IndexError(f"sample index {index} out of range for {self.size} samples")
        index %= self.size
        scene = make_scene(self.split, self.seed, index, max_range=self.max_range, max_boxes=self.max_boxes)
        h, w = self.image_height, self.image_width
        images = render_scene(scene, h, w).images
        _, _, lidar2img = camera_rig(h, w)
        points = cast_lidar(scene, beams=self.beams, azimuth_steps=self.azimuth_steps).points
        return FusionSample(
            token=scene.token,
            img=normalise_images(images)[None],
            depth=depth_images(points, lidar2img, h, w)[None],
            lidar2img=lidar2img[None],
            lidar_bev=lidar_bev(points, self.bev_range, self.bev_cells, self.bev_channels),
        )
