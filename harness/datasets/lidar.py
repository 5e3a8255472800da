"""Synthetic LiDAR sweeps of the driving scenes, voxelised as CenterPoint's sparse encoder wants.

A spinning multi-beam sensor at the frame origin (nuScenes' LIDAR_TOP: 32 beams from -30.67 to
+10.67 degrees elevation, 1080 azimuth steps a turn) is ray-cast against the same layouts the
camera dataset renders (`harness.datasets.scene3d.make_scene`): the ground plane, every box and
every piece of clutter; the nearest hit within `sensor_range` returns a point. Points are
(x, y, z, intensity, time) float32 in the scene frame (x forward, y left, z up, ground at
z = -1.84), azimuth-major like a sensor's packets, time 0 (a single sweep); intensity (0..255)
depends on the material: lane paint and retro-reflective cones and barriers are bright, asphalt
is dark, boxes by class.

Voxelisation follows CenterPoint (det3d) on nuScenes: point cloud range [-54, -54, -5, 54, 54, 3]
and voxel size [0.075, 0.075, 0.2] give a 1440 x 1440 x 40 (x, y, z) grid; a point falls in
voxel floor((p - min) / size) when that lies inside the grid; voxels are created in the order
their first point arrives and keep their first `max_points_per_voxel` points (det3d: 10); each
voxel's feature is the mean of its points (MeanVFE, 5 channels). Voxels come sorted by
(z, y, x); indices are rows (batch 0, z, y, x) int32 and `spatial_shape` is det3d's
sparse_shape = grid[::-1] + [1, 0, 0] = (41, 1440, 1440). The "ci" grid uses 0.6 m voxels in x and
y (41 x 180 x 180) and a 16-beam, 720-step sensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from harness.datasets.scene3d import (
    ASPHALT,
    CROSSWALK,
    GRASS,
    GROUND_Z,
    LANE_WHITE,
    LANE_YELLOW,
    SIDEWALK,
    Box3D,
    Scene,
    SceneError,
    check_layout_args,
    ground_material,
    intersect_box,
    make_scene,
    mix_hash,
)

ELEVATION_RANGE = (-30.67, 10.67)
"""Lowest and highest beam elevation (degrees) of nuScenes' Velodyne HDL-32E."""


@dataclass(frozen=True)
class LidarProfile:
    """Sensor and voxel grid of one named grid ("full" or "ci")."""

    point_cloud_range: tuple[float, float, float, float, float, float]
    voxel_size: tuple[float, float, float]
    beams: int
    azimuth_steps: int


PROFILES: dict[str, LidarProfile] = {
    "full": LidarProfile((-54.0, -54.0, -5.0, 54.0, 54.0, 3.0), (0.075, 0.075, 0.2), 32, 1080),
    "ci": LidarProfile((-54.0, -54.0, -5.0, 54.0, 54.0, 3.0), (0.6, 0.6, 0.2), 16, 720),
}
"""Named grids: CenterPoint nuScenes (41 x 1440 x 1440) and a CI grid (41 x 180 x 180)."""

_BOX_INTENSITY: dict[str, float] = {
    "car": 30.0,
    "truck": 35.0,
    "bus": 40.0,
    "trailer": 35.0,
    "construction_vehicle": 45.0,
    "pedestrian": 12.0,
    "motorcycle": 25.0,
    "bicycle": 20.0,
    "traffic_cone": 120.0,
    "barrier": 90.0,
}
_STATIC_INTENSITY = {"building": 40.0, "pole": 30.0}
_GROUND_INTENSITY = np.zeros(6, dtype=np.float64)
_GROUND_INTENSITY[ASPHALT] = 8.0
_GROUND_INTENSITY[LANE_WHITE] = 70.0
_GROUND_INTENSITY[LANE_YELLOW] = 55.0
_GROUND_INTENSITY[CROSSWALK] = 65.0
_GROUND_INTENSITY[SIDEWALK] = 25.0
_GROUND_INTENSITY[GRASS] = 12.0

GROUND, NOTHING, CLUTTER = -1, -2, -3
"""Owner codes of a LiDAR return that is not on a box (box returns carry the box index)."""


@dataclass(frozen=True)
class LidarScan:
    """Points (P, 5) float32 [x, y, z, intensity, time] and, per point, the index of the box
    it lies on (GROUND or CLUTTER otherwise); `counts[k]` = points on box k."""

    points: np.ndarray
    owner: np.ndarray
    counts: tuple[int, ...]


@dataclass(frozen=True)
class LidarSample:
    """One sweep: raw points, CenterPoint voxels and the ground-truth boxes.

    `features` (N, 5) float32 are voxel means, `indices` (N, 4) int32 rows (0, z, y, x) sorted,
    `spatial_shape` = (z, y, x) of the sparse tensor; `boxes[k].num_pts` counts the points on
    box k (nuScenes' num_lidar_pts).
    """

    token: str
    points: np.ndarray
    features: np.ndarray
    indices: np.ndarray
    spatial_shape: tuple[int, int, int]
    boxes: tuple[Box3D, ...]


def _ray_directions(beams: int, azimuth_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit ray directions (beams, azimuth_steps): azimuth k at -pi + k * 2 pi / steps."""
    lo, hi = ELEVATION_RANGE
    els = [math.radians(lo + (hi - lo) * i / (beams - 1)) for i in range(beams)]
    azs = [-math.pi + 2.0 * math.pi * k / azimuth_steps for k in range(azimuth_steps)]
    cos_el = np.array([math.cos(e) for e in els])[:, None]
    sin_el = np.array([math.sin(e) for e in els])[:, None]
    cos_az = np.array([math.cos(a) for a in azs])[None, :]
    sin_az = np.array([math.sin(a) for a in azs])[None, :]
    return cos_el * cos_az, cos_el * sin_az, sin_el


def _azimuth_window(corners: np.ndarray, steps: int) -> np.ndarray:
    """Azimuth columns whose rays can meet a box (corners (8, 3)) not containing the origin."""
    pts = corners[:4].tolist()
    centre = math.atan2(sum(p[1] for p in pts), sum(p[0] for p in pts))
    offsets = [(math.atan2(p[1], p[0]) - centre + math.pi) % (2.0 * math.pi) - math.pi for p in pts]
    step = 2.0 * math.pi / steps
    k0 = math.floor((centre + min(offsets) + math.pi) / step) - 1
    k1 = math.ceil((centre + max(offsets) + math.pi) / step) + 1
    if k1 - k0 + 1 >= steps:
        return np.arange(steps)
    return np.arange(k0, k1 + 1) % steps


def cast_lidar(
    scene: Scene, *, beams: int = 32, azimuth_steps: int = 1080, sensor_range: float = 70.0
) -> LidarScan:
    """Ray-cast one sweep of `scene`; returns the points within `sensor_range` (m)."""
    if beams < 2 or azimuth_steps < 8:
        raise SceneError(
            f"LiDAR needs >= 2 beams and >= 8 azimuth steps, got {beams}, {azimuth_steps}"
        )
    dx, dy, dz = _ray_directions(beams, azimuth_steps)
    shape = (beams, azimuth_steps)
    with np.errstate(divide="ignore"):
        t = np.where(dz < 0.0, GROUND_Z / dz, np.inf) + np.zeros(shape)
    # owner: index into boxes + statics, or GROUND / NOTHING.
    owner = np.where(np.isfinite(t), GROUND, NOTHING).astype(np.int32)
    solids = [(b.corners(), b.center, b.size, b.yaw) for b in scene.boxes]
    solids += [(s.corners(), s.center, s.size, s.yaw) for s in scene.statics]
    for oi, (corners, center, size, yaw) in enumerate(solids):
        cols = _azimuth_window(corners, azimuth_steps)
        hits = intersect_box((0.0, 0.0, 0.0), dx[:, cols], dy[:, cols], dz, center, size, yaw)
        current = t[:, cols]
        win = hits.t < current
        if not win.any():
            continue
        t[:, cols] = np.where(win, hits.t, current)
        owner[:, cols] = np.where(win, oi, owner[:, cols])
    keep = (t <= sensor_range) & (owner != NOTHING)
    # Azimuth-major order, as a spinning sensor delivers its packets.
    sel = np.nonzero(keep.T)
    dist = t.T[sel]
    px = dist * dx.T[sel]
    py = dist * dy.T[sel]
    pz = dist * np.broadcast_to(dz, shape).T[sel]
    own = owner.T[sel]
    ray_id = (sel[0] * beams + sel[1]).astype(np.uint32)
    noise = (mix_hash(ray_id ^ np.uint32(scene.texture_seed)) >> np.uint32(8)).astype(
        np.float64
    ) * (1.0 / 16777216.0)
    solid_intensity = np.asarray(
        [_BOX_INTENSITY[b.label] for b in scene.boxes]
        + [_STATIC_INTENSITY[s.kind] for s in scene.statics]
        + [0.0]
    )
    base = solid_intensity[np.where(own >= 0, own, len(solids))]
    ground = own == GROUND
    if ground.any():
        base[ground] = _GROUND_INTENSITY[ground_material(scene.road, px[ground], py[ground])]
    intensity = np.minimum(base * (0.75 + 0.5 * noise), 255.0)
    points = np.zeros((dist.shape[0], 5), dtype=np.float32)
    points[:, 0] = px
    points[:, 1] = py
    points[:, 2] = pz
    points[:, 3] = intensity
    n_boxes = len(scene.boxes)
    owner_out = np.where(own >= n_boxes, CLUTTER, own).astype(np.int32)
    counts = np.bincount(own[(own >= 0) & (own < n_boxes)], minlength=n_boxes)
    return LidarScan(points=points, owner=owner_out, counts=tuple(int(c) for c in counts))


def grid_shape(
    point_cloud_range: tuple[float, float, float, float, float, float],
    voxel_size: tuple[float, float, float],
) -> tuple[int, int, int]:
    """The voxel grid (x, y, z) = round((max - min) / size), as det3d computes it."""
    if len(point_cloud_range) != 6 or len(voxel_size) != 3:
        raise SceneError("point_cloud_range needs 6 values and voxel_size 3")
    out = []
    for axis in range(3):
        extent = point_cloud_range[axis + 3] - point_cloud_range[axis]
        if extent <= 0.0 or voxel_size[axis] <= 0.0:
            raise SceneError(
                f"axis {'xyz'[axis]}: range {point_cloud_range[axis]}..{point_cloud_range[axis + 3]}"
                f" and voxel size {voxel_size[axis]} must be increasing and positive"
            )
        out.append(round(extent / voxel_size[axis]))
    return out[0], out[1], out[2]


def voxelize(
    points: np.ndarray,
    point_cloud_range: tuple[float, float, float, float, float, float],
    voxel_size: tuple[float, float, float],
    *,
    max_points_per_voxel: int = 10,
    max_voxels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """CenterPoint voxelisation with MeanVFE: (features (N, C) float32 voxel means,
    indices (N, 4) int32 rows (0, z, y, x) sorted by (z, y, x), spatial_shape (z + 1, y, x)).

    Voxels are created in the order their first point arrives; beyond `max_voxels` new voxels
    are dropped, and each voxel keeps its first `max_points_per_voxel` points (det3d's rules).
    """
    if points.ndim != 2 or points.shape[1] < 3:
        raise SceneError(f"points must be (P, C>=3), got shape {points.shape}")
    if max_points_per_voxel < 1:
        raise SceneError(f"max_points_per_voxel {max_points_per_voxel} must be >= 1")
    nx, ny, nz = grid_shape(point_cloud_range, voxel_size)
    spatial_shape = (nz + 1, ny, nx)
    p64 = points[:, :3].astype(np.float64)
    coords = np.empty((points.shape[0], 3), dtype=np.int64)
    for axis in range(3):
        coords[:, axis] = np.floor((p64[:, axis] - point_cloud_range[axis]) / voxel_size[axis])
    inside = (
        (coords >= 0).all(axis=1) & (coords[:, 0] < nx) & (coords[:, 1] < ny) & (coords[:, 2] < nz)
    )
    coords = coords[inside]
    feats = points[inside].astype(np.float64)
    key = (coords[:, 2] * ny + coords[:, 1]) * nx + coords[:, 0]
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    kept_voxel = np.ones(uniq.shape[0], dtype=bool)
    if max_voxels is not None and uniq.shape[0] > max_voxels:
        arrival = np.argsort(first, kind="stable")
        kept_voxel[arrival[max_voxels:]] = False
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(uniq.shape[0]))
    rank = np.empty(inverse.shape[0], dtype=np.int64)
    rank[order] = np.arange(inverse.shape[0]) - starts[inverse[order]]
    use = (rank < max_points_per_voxel) & kept_voxel[inverse]
    inv = inverse[use]
    count = np.bincount(inv, minlength=uniq.shape[0])
    sums = np.stack(
        [
            np.bincount(inv, weights=feats[use, c], minlength=uniq.shape[0])
            for c in range(feats.shape[1])
        ],
        axis=1,
    )
    valid = kept_voxel & (count > 0)
    features = (sums[valid] / count[valid, None]).astype(np.float32)
    vkey = uniq[valid]
    indices = np.zeros((vkey.shape[0], 4), dtype=np.int32)
    indices[:, 1] = vkey // (nx * ny)
    indices[:, 2] = (vkey // nx) % ny
    indices[:, 3] = vkey % nx
    return features, indices, spatial_shape


class LidarSweeps:
    """Seeded LiDAR sweeps of the synthetic scenes, voxelised for CenterPoint's SCN.

    `grid` names a profile ("full": CenterPoint nuScenes, 41x1440x1440, 32 beams; "ci":
    41x180x180, 16 beams); `point_cloud_range`, `voxel_size`, `beams` and `azimuth_steps`
    override it. Sample i shares its layout (and token) with `DrivingScenes` sample i for equal
    split, seed, max_boxes and max_range.
    """

    def __init__(
        self,
        split: str = "val",
        size: int = 16,
        seed: int = 0,
        grid: str = "full",
        point_cloud_range: tuple[float, float, float, float, float, float] | None = None,
        voxel_size: tuple[float, float, float] | None = None,
        beams: int | None = None,
        azimuth_steps: int | None = None,
        max_points_per_voxel: int = 10,
        max_voxels: int | None = None,
        sensor_range: float = 70.0,
        max_boxes: int = 40,
        max_range: float = 50.0,
    ) -> None:
        if grid not in PROFILES:
            raise SceneError(f"grid {grid!r} is not one of {tuple(PROFILES)}")
        if size < 0:
            raise SceneError(f"size {size} must be >= 0")
        profile = PROFILES[grid]
        self.split = split
        self.size = size
        self.seed = seed
        self.point_cloud_range = tuple(
            float(v) for v in (point_cloud_range or profile.point_cloud_range)
        )
        self.voxel_size = tuple(float(v) for v in (voxel_size or profile.voxel_size))
        self.beams = beams if beams is not None else profile.beams
        self.azimuth_steps = azimuth_steps if azimuth_steps is not None else profile.azimuth_steps
        self.max_points_per_voxel = max_points_per_voxel
        self.max_voxels = max_voxels
        self.sensor_range = sensor_range
        self.max_boxes = max_boxes
        self.max_range = max_range
        pcr, vs = self._grid()
        nx, ny, nz = grid_shape(pcr, vs)
        self.spatial_shape = (nz + 1, ny, nx)
        check_layout_args(split, seed, max_range=max_range, max_boxes=max_boxes)
        if self.beams < 2 or self.azimuth_steps < 8:
            raise SceneError(
                f"LiDAR needs >= 2 beams and >= 8 azimuth steps, got {self.beams}, {self.azimuth_steps}"
            )

    def _grid(
        self,
    ) -> tuple[tuple[float, float, float, float, float, float], tuple[float, float, float]]:
        r, v = self.point_cloud_range, self.voxel_size
        if len(r) != 6 or len(v) != 3:
            raise SceneError("point_cloud_range needs 6 values and voxel_size 3")
        return (r[0], r[1], r[2], r[3], r[4], r[5]), (v[0], v[1], v[2])

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[LidarSample]:
        for index in range(self.size):
            yield self[index]

    def scene(self, index: int) -> Scene:
        """The layout of sample `index` (no ray casting)."""
        if not -self.size <= index < self.size:
            raise IndexError(f"sample index {index} out of range for {self.size} samples")
        index %= self.size
        return make_scene(
            self.split, self.seed, index, max_range=self.max_range, max_boxes=self.max_boxes
        )

    def __getitem__(self, index: int) -> LidarSample:
        scene = self.scene(index)
        scan = cast_lidar(
            scene,
            beams=self.beams,
            azimuth_steps=self.azimuth_steps,
            sensor_range=self.sensor_range,
        )
        pcr, vs = self._grid()
        features, indices, spatial_shape = voxelize(
            scan.points,
            pcr,
            vs,
            max_points_per_voxel=self.max_points_per_voxel,
            max_voxels=self.max_voxels,
        )
        boxes = tuple(dataclasses.replace(b, num_pts=int(n)) for b, n in zip(scene.boxes, scan.counts, strict=True))
        return LidarSample(
            token=scene.token,
            points=scan.points,
            features=features,
            indices=indices,
            spatial_shape=spatial_shape,
            boxes=boxes,
        )
