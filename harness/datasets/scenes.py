"""Six-camera renderings of the synthetic driving scenes: images, camera rig and 3D boxes.

Cameras (order of mmdet3d's nuScenes infos, which CUDA-FastBEV's example data keeps):
CAM_FRONT, CAM_FRONT_RIGHT, CAM_FRONT_LEFT, CAM_BACK, CAM_BACK_LEFT, CAM_BACK_RIGHT. Poses and
focal lengths are those of a real nuScenes calibration (yaw 0.3, -56.4, 55.2, 179.9, 108.6,
-110.8 degrees; 1.5-1.6 m above the ground; horizontal field of view 64.5 degrees, 89.3 for
CAM_BACK), with the cameras made level (real ones pitch and roll by under a degree). Intrinsics
are scaled as FastBEV / BEVDet feed nuScenes images to the network: the 1600x900 image is resized
by s = W / 1600 and its top cropped to height H (0.44 and 140 rows for 256x704), so
fx' = s fx, cx' = s cx, cy' = s cy - (round(900 s) - H). The rig is fixed for a given image size
(CUDA-FastBEV computes its view-transform lookup tables once per rig): `camera_rig(H, W)`.

All geometry is in the frame of `harness.datasets.scene3d` (origin at the LiDAR, x forward,
y left, z up); `cam2ego` maps camera coordinates (x right, y down, z forward) into it and
`lidar2img` = K @ inverse(cam2ego) maps homogeneous points (x, y, z, 1) to (u d, v d, d, 1),
pixel centres at integer (u, v).

Rendering is ray casting: one ray per pixel against the ground plane (asphalt, lane markings,
crosswalks, sidewalks, grass, textured by world position), every box and every piece of clutter
(slab test in the box frame); the nearest hit wins (z-buffer); sky above the horizon. Box faces
are shaded by a fixed light with per-class base colours, per-instance variation, class-specific
parts (windows, wheels, headlights at the front and red tail lights at the back, so a vehicle's
heading is visible over the full circle) and pixel noise. Only + - * / sqrt, comparisons and
integer hashing touch pixels, so the bytes are the same on every machine.
"""

from __future__ import annotations

import dataclasses
import functools
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
    LIDAR_HEIGHT,
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
from harness.tasks.detection3d import CAMERAS

LIDAR_IN_EGO = (0.943713, 0.0, LIDAR_HEIGHT)
"""nuScenes LIDAR_TOP position in the ego (rear-axle) frame; our frame's origin."""

# name: (yaw deg, position in the nuScenes ego frame (m), fx, cx, cy at 1600x900)
_NUSCENES_CAMERAS: dict[str, tuple[float, tuple[float, float, float], float, float, float]] = {
    "CAM_FRONT": (0.3, (1.701, 0.016, 1.511), 1266.417, 816.267, 491.507),
    "CAM_FRONT_RIGHT": (-56.4, (1.551, -0.493, 1.496), 1260.847, 807.968, 495.334),
    "CAM_FRONT_LEFT": (55.2, (1.524, 0.495, 1.509), 1272.598, 826.615, 479.752),
    "CAM_BACK": (179.9, (0.028, 0.003, 1.579), 809.221, 829.220, 481.778),
    "CAM_BACK_LEFT": (108.6, (1.036, 0.485, 1.591), 1256.741, 792.113, 492.776),
    "CAM_BACK_RIGHT": (-110.8, (1.015, -0.481, 1.562), 1259.514, 807.253, 501.196),
}
_NATIVE_W, _NATIVE_H = 1600, 900
_NEAR = 0.05

LIGHT = (-0.35, 0.45, 0.82)
"""Direction towards the light (unnormalised); faces are lit by AMBIENT + DIFFUSE * max(0, n.l)."""
AMBIENT, DIFFUSE = 0.5, 0.5

_SKY_HORIZON = np.array([205.0, 215.0, 230.0], dtype=np.float32)
_SKY_ZENITH = np.array([95.0, 140.0, 205.0], dtype=np.float32)
_HAZE = np.array([185.0, 190.0, 200.0], dtype=np.float32)
_GROUND_COLOUR = np.zeros((6, 3), dtype=np.float32)
_GROUND_COLOUR[ASPHALT] = (82.0, 82.0, 86.0)
_GROUND_COLOUR[LANE_WHITE] = (225.0, 225.0, 220.0)
_GROUND_COLOUR[LANE_YELLOW] = (220.0, 180.0, 45.0)
_GROUND_COLOUR[CROSSWALK] = (215.0, 215.0, 210.0)
_GROUND_COLOUR[SIDEWALK] = (158.0, 152.0, 145.0)
_GROUND_COLOUR[GRASS] = (78.0, 115.0, 52.0)
_GROUND_NOISE = np.array([14.0, 10.0, 10.0, 10.0, 8.0, 22.0], dtype=np.float32)

GLASS = (35.0, 45.0, 60.0)
TYRE = (22.0, 22.0, 24.0)
HEADLIGHT = (250.0, 245.0, 215.0)
TAILLIGHT = (215.0, 25.0, 25.0)
SKIN = (225.0, 180.0, 150.0)
HAIR = (50.0, 35.0, 25.0)
TROUSERS = (45.0, 45.0, 70.0)
RIDER = (170.0, 85.0, 60.0)
WHITE = (240.0, 240.0, 240.0)
BLACK = (25.0, 25.0, 25.0)
WINDOW = (55.0, 65.0, 85.0)


@dataclass(frozen=True)
class SceneSample:
    """One synthetic sample: six RGB images, the fixed camera rig and the ground-truth boxes.

    `boxes[k].num_pts` is the number of pixels (over all six images) where box k is the
    nearest surface, so NDS drops boxes no camera sees, as the devkit drops boxes without points.
    """

    token: str
    images: np.ndarray
    intrinsics: np.ndarray
    cam2ego: np.ndarray
    lidar2img: np.ndarray
    boxes: tuple[Box3D, ...]


@dataclass(frozen=True)
class Rendering:
    """Images (6, H, W, 3) uint8, the index of the box seen at each pixel (6, H, W) int16
    (-1: ground, sky or clutter) and the number of pixels per box."""

    images: np.ndarray
    box_ids: np.ndarray
    pixel_counts: tuple[int, ...]


@dataclass(frozen=True)
class _Camera:
    origin: tuple[float, float, float]
    forward: tuple[float, float]
    right: tuple[float, float]
    fx: float
    fy: float
    cx: float
    cy: float


@dataclass(frozen=True)
class _Rig:
    height: int
    width: int
    cams: tuple[_Camera, ...]
    intrinsics: np.ndarray
    cam2ego: np.ndarray
    lidar2img: np.ndarray
    ray_x: tuple[np.ndarray, ...]
    ray_y: tuple[np.ndarray, ...]
    ray_z: tuple[np.ndarray, ...]
    ground_row: tuple[int, ...]
    ground_xy: tuple[tuple[np.ndarray, np.ndarray], ...]
    ground_depth: tuple[np.ndarray, ...]
    ground_cells: tuple[np.ndarray, ...]
    haze: tuple[np.ndarray, ...]
    background: tuple[np.ndarray, ...]
    pixel_hash: tuple[np.ndarray, ...]


def _noise(h: np.ndarray, seed: int) -> np.ndarray:
    """Uniform noise in [-1, 1) (float32) from hashes `h` and a seed."""
    mixed = mix_hash(h ^ np.uint32(seed & 0xFFFFFFFF))
    return (mixed >> np.uint32(8)).astype(np.float32) * np.float32(2.0 / 16777216.0) - np.float32(
        1.0
    )


def _build_camera(name: str, height: int, width: int) -> _Camera:
    yaw_deg, pos, fx, cx, cy = _NUSCENES_CAMERAS[name]
    s = width / _NATIVE_W
    crop = round(_NATIVE_H * s) - height
    yaw = math.radians(yaw_deg)
    c, sn = math.cos(yaw), math.sin(yaw)
    origin = (pos[0] - LIDAR_IN_EGO[0], pos[1] - LIDAR_IN_EGO[1], pos[2] - LIDAR_IN_EGO[2])
    return _Camera(
        origin=origin,
        forward=(c, sn),
        right=(sn, -c),
        fx=fx * s,
        fy=fx * s,
        cx=cx * s,
        cy=cy * s - crop,
    )


@functools.lru_cache(maxsize=8)
def _rig(height: int, width: int) -> _Rig:
    if height < 8 or width < 8:
        raise SceneError(f"image size {height}x{width} is too small (need at least 8x8)")
    cams = tuple(_build_camera(name, height, width) for name in CAMERAS)
    intr = np.zeros((6, 3, 3), dtype=np.float64)
    c2e = np.zeros((6, 4, 4), dtype=np.float64)
    l2i = np.zeros((6, 4, 4), dtype=np.float64)
    rx, ry, rz, rows, gxy, gdep, cells, hazes, backs, hashes = ([] for _ in range(10))
    cols = np.arange(width, dtype=np.float64)
    vs = np.arange(height, dtype=np.float64)
    for k, cam in enumerate(cams):
        intr[k] = ((cam.fx, 0.0, cam.cx), (0.0, cam.fy, cam.cy), (0.0, 0.0, 1.0))
        # Columns of the rotation: camera x (right), y (down), z (forward) in our frame.
        axes = (
            (cam.right[0], cam.right[1], 0.0),
            (0.0, 0.0, -1.0),
            (cam.forward[0], cam.forward[1], 0.0),
        )
        for i in range(3):
            for j in range(3):
                c2e[k, i, j] = axes[j][i]
            c2e[k, i, 3] = cam.origin[i]
        c2e[k, 3, 3] = 1.0
        # ego -> camera: rows are the axes, translation -R^T o; then K.
        e2c = [[0.0] * 4 for _ in range(4)]
        for j in range(3):
            for i in range(3):
                e2c[j][i] = axes[j][i]
            e2c[j][3] = -(
                axes[j][0] * cam.origin[0] + axes[j][1] * cam.origin[1] + axes[j][2] * cam.origin[2]
            )
        e2c[3][3] = 1.0
        kmat = (
            (cam.fx, 0.0, cam.cx, 0.0),
            (0.0, cam.fy, cam.cy, 0.0),
            (0.0, 0.0, 1.0, 0.0),
            (0.0, 0.0, 0.0, 1.0),
        )
        for i in range(4):
            for j in range(4):
                l2i[k, i, j] = sum(kmat[i][m] * e2c[m][j] for m in range(4))
        # Per-pixel rays (camera z component 1, so the ray parameter is the depth).
        a = (cols - cam.cx) * (1.0 / cam.fx)
        dx = (cam.right[0] * a + cam.forward[0])[None, :]
        dy = (cam.right[1] * a + cam.forward[1])[None, :]
        dz = (-(vs - cam.cy) * (1.0 / cam.fy))[:, None]
        rx.append(dx)
        ry.append(dy)
        rz.append(dz)
        first = int(np.argmax(dz[:, 0] < 0.0)) if bool((dz[:, 0] < 0.0).any()) else height
        rows.append(first)
        depth = (GROUND_Z - cam.origin[2]) / dz[first:]
        gx = cam.origin[0] + depth * dx
        gy = cam.origin[1] + depth * dy
        gxy.append((gx, gy))
        gdep.append(np.broadcast_to(depth, gx.shape).copy())
        cx_cell = np.floor(gx * 8.0).astype(np.int64).astype(np.uint32)
        cy_cell = np.floor(gy * 8.0).astype(np.int64).astype(np.uint32)
        cells.append(
            mix_hash(cx_cell * np.uint32(0x9E3779B1) ^ mix_hash(cy_cell + np.uint32(0x632BE5AB)))
        )
        hazes.append(
            np.minimum(depth / 300.0, 1.0).astype(np.float32) + np.zeros(gx.shape, np.float32)
        )
        elev = np.clip((cam.cy - vs) * (2.0 / cam.fy), 0.0, 1.0).astype(np.float32)[:, None, None]
        sky = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * elev
        backs.append(np.ascontiguousarray(np.broadcast_to(sky, (height, width, 3))))
        grid = (np.arange(height, dtype=np.uint32)[:, None] * np.uint32(width)) + np.arange(
            width, dtype=np.uint32
        )[None, :]
        hashes.append(mix_hash(grid + np.uint32(k * 0x01000193)))
    arrays: list[np.ndarray] = [intr, c2e, l2i]
    for group in (rx, ry, rz, gdep, cells, hazes, backs, hashes):
        arrays.extend(group)
    for xy in gxy:
        arrays.extend(xy)
    for arr in arrays:
        arr.setflags(write=False)
    return _Rig(
        height=height,
        width=width,
        cams=cams,
        intrinsics=intr,
        cam2ego=c2e,
        lidar2img=l2i,
        ray_x=tuple(rx),
        ray_y=tuple(ry),
        ray_z=tuple(rz),
        ground_row=tuple(rows),
        ground_xy=tuple(gxy),
        ground_depth=tuple(gdep),
        ground_cells=tuple(cells),
        haze=tuple(hazes),
        background=tuple(backs),
        pixel_hash=tuple(hashes),
    )


def camera_rig(
    image_height: int = 256, image_width: int = 704
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed rig for images of this size: intrinsics (6, 3, 3), cam2ego (6, 4, 4) and
    lidar2img (6, 4, 4), float32, cameras in `CAMERAS` order. No rendering happens."""
    rig = _rig(image_height, image_width)
    return (
        rig.intrinsics.astype(np.float32),
        rig.cam2ego.astype(np.float32),
        rig.lidar2img.astype(np.float32),
    )


def _screen_rect(
    cam: _Camera, corners: np.ndarray, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """Pixel rectangle (r0, r1, c0, c1) holding the box's projection, clipped at the near plane
    and to the image; None when the box is behind the camera or outside the image."""
    ox, oy, oz = cam.origin
    pts: list[tuple[float, float, float]] = []
    for x, y, z in corners.tolist():
        px, py, pz = x - ox, y - oy, z - oz
        pts.append(
            (px * cam.right[0] + py * cam.right[1], -pz, px * cam.forward[0] + py * cam.forward[1])
        )
    if all(p[2] <= _NEAR for p in pts):
        return None
    clipped = [p for p in pts if p[2] > _NEAR]
    edges = (
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 0),
        (4, 5),
        (5, 6),
        (6, 7),
        (7, 4),
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
    )
    for i, j in edges:
        a, b = pts[i], pts[j]
        if (a[2] > _NEAR) != (b[2] > _NEAR):
            f = (_NEAR - a[2]) / (b[2] - a[2])
            clipped.append((a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), _NEAR))
    us = [cam.cx + cam.fx * p[0] / p[2] for p in clipped]
    vs = [cam.cy + cam.fy * p[1] / p[2] for p in clipped]
    c0 = max(0, math.floor(min(us)) - 1)
    c1 = min(width, math.ceil(max(us)) + 2)
    r0 = max(0, math.floor(min(vs)) - 1)
    r1 = min(height, math.ceil(max(vs)) + 2)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def _face_shades(yaw: float) -> np.ndarray:
    """Brightness of faces 0..5 (front, back, left, right, top, bottom) of a box at `yaw`."""
    norm = math.sqrt(LIGHT[0] ** 2 + LIGHT[1] ** 2 + LIGHT[2] ** 2)
    lx, ly, lz = LIGHT[0] / norm, LIGHT[1] / norm, LIGHT[2] / norm
    c, s = math.cos(yaw), math.sin(yaw)
    normals = (
        (c, s, 0.0),
        (-c, -s, 0.0),
        (-s, c, 0.0),
        (s, -c, 0.0),
        (0.0, 0.0, 1.0),
        (0.0, 0.0, -1.0),
    )
    return np.array(
        [AMBIENT + DIFFUSE * max(0.0, n[0] * lx + n[1] * ly + n[2] * lz) for n in normals],
        dtype=np.float32,
    )


def _set(rgb: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float]) -> None:
    rgb[mask] = colour


def _paint_vehicle(
    rgb: np.ndarray,
    label: str,
    face: np.ndarray,
    ux: np.ndarray,
    uy: np.ndarray,
    uz: np.ndarray,
    length: float,
    height: float,
) -> None:
    side = (face == 2) | (face == 3)
    front, back, top = face == 0, face == 1, face == 4
    ay = np.abs(uy)
    # Wheels on both sides near the axles (trailers only at the back).
    axles = (-0.62, 0.62) if label == "car" else (-0.65, 0.72)
    if label == "trailer":
        axles = (-0.75, -0.55)
    radius = min(0.35, 0.3 * height) / (0.5 * length)
    wheels = np.zeros(face.shape, dtype=bool)
    for a in axles:
        wheels |= np.abs(ux - a) < radius
    _set(rgb, side & wheels & (uz < 0.3), TYRE)
    if label == "car":
        _set(rgb, side & (uz > 0.6) & (uz < 0.92) & (ux > -0.75) & (ux < 0.55), GLASS)
        _set(rgb, front & (uz > 0.58) & (uz < 0.93) & (ay < 0.88), GLASS)
        _set(rgb, back & (uz > 0.62) & (uz < 0.9) & (ay < 0.85), GLASS)
        _set(rgb, top & (((ux > 0.25) & (ux < 0.55)) | ((ux > -0.8) & (ux < -0.6))), GLASS)
        lights = (uz > 0.32) & (uz < 0.47)
    elif label == "truck":
        _set(rgb, side & (uz > 0.55) & (uz < 0.85) & (ux > 0.62) & (ux < 0.93), GLASS)
        _set(rgb, front & (uz > 0.55) & (uz < 0.88) & (ay < 0.88), GLASS)
        _set(rgb, back & (ay < 0.03), BLACK)
        _set(rgb, top & (ux > 0.55), GLASS)
        lights = (uz > 0.12) & (uz < 0.24)
    elif label == "bus":
        _set(rgb, side & (uz > 0.45) & (uz < 0.85) & (np.abs(ux) < 0.92), GLASS)
        _set(rgb, front & (uz > 0.3) & (uz < 0.9) & (ay < 0.9), GLASS)
        _set(rgb, back & (uz > 0.55) & (uz < 0.85) & (ay < 0.85), GLASS)
        lights = (uz > 0.1) & (uz < 0.2)
    elif label == "trailer":
        _set(rgb, side & (uz > 0.42) & (uz < 0.47), BLACK)
        _set(rgb, back & (ay < 0.02), BLACK)
        lights = (uz > 0.08) & (uz < 0.16)
    else:  # construction_vehicle
        _set(rgb, side & (uz > 0.6) & (uz < 0.9) & (ux > 0.3) & (ux < 0.85), GLASS)
        _set(rgb, front & (uz > 0.55) & (uz < 0.9) & (ay < 0.8), GLASS)
        stripes = (np.floor((ux * (0.5 * length) + uz * height) * 2.0).astype(np.int64) & 1) == 1
        _set(rgb, (side | front | back) & (uz < 0.18) & stripes, BLACK)
        lights = (uz > 0.3) & (uz < 0.42)
    lamp = lights & (ay > 0.55) & (ay < 0.92)
    if label != "trailer":
        _set(rgb, front & lamp, HEADLIGHT)
    _set(rgb, back & lamp, TAILLIGHT)


def _paint(
    label: str,
    attribute: str,
    colour: tuple[float, float, float],
    size: tuple[float, float, float],
    face: np.ndarray,
    local: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Unshaded RGB (n, 3) float32 of box pixels from the face hit and the local hit point."""
    w, length, height = size
    ux = local[0] * (2.0 / length)
    uy = local[1] * (2.0 / w)
    uz = local[2] * (1.0 / height) + 0.5
    rgb = np.empty((face.shape[0], 3), dtype=np.float32)
    rgb[:] = colour
    if label in ("car", "truck", "bus", "trailer", "construction_vehicle"):
        _paint_vehicle(rgb, label, face, ux, uy, uz, length, height)
    elif label == "pedestrian":
        _set(rgb, uz < 0.47, TROUSERS)
        head = uz > 0.86
        _set(rgb, head, HAIR)
        _set(rgb, head & (face == 0), SKIN)
    elif label in ("motorcycle", "bicycle"):
        upper = uz > 0.55
        if attribute == "cycle.with_rider":
            _set(rgb, upper, RIDER)
            _set(rgb, uz > 0.88, BLACK)
        else:
            rgb[upper] *= np.float32(0.6)
        side = (face == 2) | (face == 3)
        r = min(0.35, 0.3 * height)
        zc = uz * height - r
        for a in (-0.62, 0.62):
            xc = (ux - a) * (0.5 * length)
            _set(rgb, side & (xc * xc + zc * zc < r * r), TYRE)
        if label == "motorcycle":
            _set(rgb, (face == 0) & (uz > 0.4) & (uz < 0.52) & (np.abs(uy) < 0.35), HEADLIGHT)
    elif label == "traffic_cone":
        _set(rgb, (uz > 0.45) & (uz < 0.65), WHITE)
        _set(rgb, uz < 0.07, BLACK)
    else:  # barrier: red and white stripes along its long side
        stripes = (np.floor((uy + 1.0) * 2.5).astype(np.int64) & 1) == 1
        _set(rgb, stripes & (face != 2) & (face != 3), WHITE)
    return rgb


def _paint_static(
    kind: str,
    colour: tuple[float, float, float],
    size: tuple[float, float, float],
    face: np.ndarray,
    local: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    rgb = np.empty((face.shape[0], 3), dtype=np.float32)
    rgb[:] = colour
    if kind == "building":
        along = np.where(face <= 1, local[1], local[0]) * (1.0 / 3.0)
        z = local[2] + 0.5 * size[2]
        fz = z * (1.0 / 3.2)
        fa = along - np.floor(along)
        fz = fz - np.floor(fz)
        windows = (face <= 3) & (fa > 0.25) & (fa < 0.75) & (fz > 0.35) & (fz < 0.8) & (z > 1.0)
        _set(rgb, windows, WINDOW)
        rgb[face == 4] *= np.float32(0.8)
    return rgb


def render_scene(scene: Scene, image_height: int = 256, image_width: int = 704) -> Rendering:
    """Ray-cast `scene` into the six cameras of `camera_rig(image_height, image_width)`."""
    rig = _rig(image_height, image_width)
    h, w = image_height, image_width
    images = np.empty((6, h, w, 3), dtype=np.uint8)
    box_ids = np.full((6, h, w), -1, dtype=np.int16)
    seed = scene.texture_seed
    objects: list[
        tuple[int, np.ndarray, tuple[float, float, float], tuple[float, float, float], float]
    ] = []
    for k, box in enumerate(scene.boxes):
        objects.append((k, box.corners(), box.center, box.size, box.yaw))
    for static in scene.statics:
        objects.append((-1, static.corners(), static.center, static.size, static.yaw))
    shades = [_face_shades(yaw) for *_, yaw in objects]
    for ci, cam in enumerate(rig.cams):
        rgb = rig.background[ci].copy()
        depth = np.full((h, w), np.inf, dtype=np.float64)
        ids = box_ids[ci]
        g0 = rig.ground_row[ci]
        if g0 < h:
            gx, gy = rig.ground_xy[ci]
            mat = ground_material(scene.road, gx, gy)
            texture = _noise(rig.ground_cells[ci], seed) * _GROUND_NOISE[mat]
            ground = _GROUND_COLOUR[mat] + texture[..., None]
            haze = rig.haze[ci][..., None]
            rgb[g0:] = ground + (_HAZE - ground) * haze
            depth[g0:] = rig.ground_depth[ci]
        for oi, (index, corners, center, size, yaw) in enumerate(objects):
            rect = _screen_rect(cam, corners, h, w)
            if rect is None:
                continue
            r0, r1, c0, c1 = rect
            hits = intersect_box(
                cam.origin,
                rig.ray_x[ci][:, c0:c1],
                rig.ray_y[ci][:, c0:c1],
                rig.ray_z[ci][r0:r1],
                center,
                size,
                yaw,
            )
            win = hits.t < depth[r0:r1, c0:c1]
            if not win.any():
                continue
            depth[r0:r1, c0:c1][win] = hits.t[win]
            ids[r0:r1, c0:c1][win] = index
            face = hits.face[win]
            local = (hits.local[0][win], hits.local[1][win], hits.local[2][win])
            if index >= 0:
                box = scene.boxes[index]
                paint = _paint(box.label, box.attribute, scene.colours[index], size, face, local)
            else:
                static = scene.statics[oi - len(scene.boxes)]
                paint = _paint_static(static.kind, static.colour, size, face, local)
            rgb[r0:r1, c0:c1][win] = paint * shades[oi][face][:, None]
        rgb += _noise(rig.pixel_hash[ci], seed)[..., None] * np.float32(6.0)
        np.clip(rgb, 0.0, 255.0, out=rgb)
        rgb += np.float32(0.5)
        images[ci] = rgb.astype(np.uint8)
    counts = np.bincount(box_ids[box_ids >= 0].ravel(), minlength=len(scene.boxes))
    return Rendering(
        images=images,
        box_ids=box_ids,
        pixel_counts=tuple(int(c) for c in counts[: len(scene.boxes)]),
    )


class DrivingScenes:
    """Seeded synthetic six-camera driving scenes with nuScenes-style 3D box labels.

    Sample i of (split, seed) is the same scene layout as `LidarSweeps` sample i with equal
    split, seed, max_boxes and max_range. `max_range` (m) narrows the region boxes are placed in
    (for small CI images); it never widens the nuScenes class ranges.
    """

    def __init__(
        self,
        split: str = "val",
        size: int = 16,
        image_height: int = 256,
        image_width: int = 704,
        seed: int = 0,
        max_boxes: int = 40,
        max_range: float = 50.0,
    ) -> None:
        if size < 0:
            raise SceneError(f"size {size} must be >= 0")
        check_layout_args(split, seed, max_range=max_range, max_boxes=max_boxes)
        self.split = split
        self.size = size
        self.image_height = image_height
        self.image_width = image_width
        self.seed = seed
        self.max_boxes = max_boxes
        self.max_range = max_range
        _rig(image_height, image_width)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[SceneSample]:
        for index in range(self.size):
            yield self[index]

    def scene(self, index: int) -> Scene:
        """The layout of sample `index` (no rendering)."""
        if not -self.size <= index < self.size:
            raise IndexError(f"sample index {index} out of range for {self.size} samples")
        index %= self.size
        return make_scene(
            self.split, self.seed, index, max_range=self.max_range, max_boxes=self.max_boxes
        )

    def __getitem__(self, index: int) -> SceneSample:
        scene = self.scene(index)
        rendering = render_scene(scene, self.image_height, self.image_width)
        intrinsics, cam2ego, lidar2img = camera_rig(self.image_height, self.image_width)
        boxes = tuple(dataclasses.replace(b, num_pts=int(n)) for b, n in zip(scene.boxes, rendering.pixel_counts, strict=True))
        return SceneSample(
            token=scene.token,
            images=rendering.images,
            intrinsics=intrinsics,
            cam2ego=cam2ego,
            lidar2img=lidar2img,
            boxes=boxes,
        )
