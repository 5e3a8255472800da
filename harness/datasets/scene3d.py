"""nuScenes detection classes, 3D boxes and the seeded driving-scene layout both sensors share.

Frame: one right-handed frame for everything (boxes, cameras, LiDAR points), mmdet3d's LiDAR
convention: origin at the LiDAR sensor, x forward, y left, z up. The LiDAR sits where nuScenes'
LIDAR_TOP sits on its car (0.94 m ahead of the rear axle, 1.84 m above the ground), so the ground
is the plane z = GROUND_Z = -1.84 and CenterPoint's z range [-5, 3] m holds every object.
(nuScenes' raw LIDAR_TOP frame is turned by 90 degrees, x right / y forward; we do not copy that.)

Boxes follow nuScenes: `center` is the geometric centre, `size` is (w, l, h) with l along the
heading, `yaw` is the heading angle from +x towards +y, `velocity` is (vx, vy) in m/s in this
frame (the ego car stands still). Distances for class ranges are xy distances to the origin.

A scene is a straight main road along x (1-3 lanes each way, right- or left-hand traffic,
optional parking lanes), sidewalks, an optional cross road, buildings and poles beyond the
sidewalks (non-box clutter), and non-overlapping boxes of the 10 classes placed where they
belong (vehicles in lanes along the lane heading or parked, pedestrians on sidewalks and
crosswalks, cones and barriers in rows). `make_scene(split, seed, index)` is the single entry point
both the camera and the LiDAR datasets use, so equal (split, seed, index) give equal layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.errors import HarnessError
from harness.metrics.nds import DETECTION_CLASSES

CLASSES: tuple[str, ...] = DETECTION_CLASSES
"""The 10 nuScenes detection classes in devkit order (the metric's own tuple)."""

VEHICLE_ATTRIBUTES = ("vehicle.moving", "vehicle.parked", "vehicle.stopped")
PEDESTRIAN_ATTRIBUTES = (
    "pedestrian.moving",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
)
CYCLE_ATTRIBUTES = ("cycle.with_rider", "cycle.without_rider")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "car": VEHICLE_ATTRIBUTES,
    "truck": VEHICLE_ATTRIBUTES,
    "bus": VEHICLE_ATTRIBUTES,
    "trailer": VEHICLE_ATTRIBUTES,
    "construction_vehicle": VEHICLE_ATTRIBUTES,
    "pedestrian": PEDESTRIAN_ATTRIBUTES,
    "motorcycle": CYCLE_ATTRIBUTES,
    "bicycle": CYCLE_ATTRIBUTES,
    "traffic_cone": (),
    "barrier": (),
}
"""Attributes a ground-truth box of each class may carry (cones and barriers carry '')."""

CLASS_RANGE: dict[str, float] = {
    "car": 50.0,
    "truck": 50.0,
    "bus": 50.0,
    "trailer": 50.0,
    "construction_vehicle": 50.0,
    "pedestrian": 40.0,
    "motorcycle": 40.0,
    "bicycle": 40.0,
    "traffic_cone": 30.0,
    "barrier": 30.0,
}
"""nuScenes detection class ranges (m, xy distance); generated boxes lie strictly inside."""

MEAN_SIZE: dict[str, tuple[float, float, float]] = {
    "car": (1.95, 4.62, 1.73),
    "truck": (2.46, 6.74, 2.73),
    "bus": (2.94, 11.19, 3.47),
    "trailer": (2.87, 12.01, 3.82),
    "construction_vehicle": (2.73, 6.38, 3.13),
    "pedestrian": (0.66, 0.73, 1.76),
    "motorcycle": (0.76, 2.10, 1.44),
    "bicycle": (0.60, 1.68, 1.27),
    "traffic_cone": (0.40, 0.40, 1.06),
    "barrier": (2.49, 0.49, 0.98),
}
"""Mean (w, l, h) of nuScenes ground truth per class (the mmdet3d nuScenes anchor sizes)."""

SIZE_STD: dict[str, tuple[float, float, float]] = {
    "car": (0.16, 0.42, 0.20),
    "truck": (0.30, 1.60, 0.50),
    "bus": (0.18, 1.60, 0.28),
    "trailer": (0.30, 2.40, 0.45),
    "construction_vehicle": (0.40, 1.60, 0.55),
    "pedestrian": (0.10, 0.12, 0.12),
    "motorcycle": (0.12, 0.25, 0.15),
    "bicycle": (0.10, 0.18, 0.15),
    "traffic_cone": (0.06, 0.06, 0.15),
    "barrier": (0.35, 0.10, 0.10),
}
"""Standard deviation of (w, l, h) per class (sizes are clipped to 0.6x .. 1.5x the mean)."""

CLASS_WEIGHT: dict[str, float] = {
    "car": 0.32,
    "truck": 0.08,
    "bus": 0.05,
    "trailer": 0.04,
    "construction_vehicle": 0.04,
    "pedestrian": 0.21,
    "motorcycle": 0.06,
    "bicycle": 0.06,
    "traffic_cone": 0.07,
    "barrier": 0.07,
}
"""How often each class is proposed; cones and barriers come in rows of 2-6, so per box the mix
is close to nuScenes' with its long tail flattened (every class appears often enough to learn)."""

LIDAR_HEIGHT = 1.84023
"""Height of the LiDAR (the frame origin) above the ground, as nuScenes' LIDAR_TOP."""
GROUND_Z = -LIDAR_HEIGHT
"""The ground plane is z = GROUND_Z."""
EGO_FOOTPRINT = (-2.0, 3.0, -1.1, 1.1)
"""Ego car footprint (x_min, x_max, y_min, y_max) in this frame; no box or clutter enters it."""

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""Split names and the code each feeds into the seed, so splits draw different scenes."""

# Ground materials (codes shared by the camera renderer and the LiDAR).
ASPHALT, LANE_WHITE, LANE_YELLOW, CROSSWALK, SIDEWALK, GRASS = range(6)
MATERIALS = ("asphalt", "lane_white", "lane_yellow", "crosswalk", "sidewalk", "grass")

LINE_HALF_WIDTH = 0.075
DASH_LENGTH = 3.0


class SceneError(HarnessError):
    """A box or scene request is invalid; the message names the box, field or split."""


def box_corners(
    center: tuple[float, float, float], size: tuple[float, float, float], yaw: float
) -> np.ndarray:
    """The 8 corners (8, 3) float64 of an upright box (`size` (w, l, h), l along `yaw`): bottom
    face first, each face counter-clockwise from the front-left corner."""
    w, length, h = size
    c, s = math.cos(yaw), math.sin(yaw)
    out = np.empty((8, 3), dtype=np.float64)
    local = ((0.5, 0.5), (-0.5, 0.5), (-0.5, -0.5), (0.5, -0.5))
    for k, (fx, fy) in enumerate(local):
        lx, ly = fx * length, fy * w
        x = center[0] + c * lx - s * ly
        y = center[1] + s * lx + c * ly
        out[k] = (x, y, center[2] - 0.5 * h)
        out[k + 4] = (x, y, center[2] + 0.5 * h)
    return out


@dataclass(frozen=True)
class Box3D:
    """One ground-truth box of a nuScenes detection class, in the frame described above.

    `num_pts` is left None by the layout generator; the datasets fill it with the number of
    LiDAR points (LiDAR) or visible pixels (cameras) on the box, as nuScenes' `num_lidar_pts`,
    so the NDS metric drops boxes no sensor saw.
    """

    label: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float
    velocity: tuple[float, float] = (0.0, 0.0)
    attribute: str = ""
    num_pts: int | None = None

    def __post_init__(self) -> None:
        if self.label not in ATTRIBUTES:
            raise SceneError(f"box label {self.label!r} is not one of {CLASSES}")
        if self.attribute and self.attribute not in ATTRIBUTES[self.label]:
            raise SceneError(
                f"box {self.label!r}: attribute {self.attribute!r} is not one of "
                f"{ATTRIBUTES[self.label] or ('',)}"
            )
        if len(self.size) != 3 or not all(s > 0.0 for s in self.size):
            raise SceneError(f"box {self.label!r}: size {self.size} must be three positive numbers")
        if len(self.center) != 3 or len(self.velocity) != 2:
            raise SceneError(f"box {self.label!r}: center needs 3 values and velocity 2")
        if not all(math.isfinite(v) for v in (*self.center, *self.size, self.yaw)):
            raise SceneError(f"box {self.label!r}: center, size and yaw must be finite")

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) float64: bottom face first, each face counter-clockwise from
        the front-left corner (front = +l/2 along the heading)."""
        return box_corners(self.center, self.size, self.yaw)

    def to_nds(self, score: float | None = None) -> dict[str, object]:
        """The box as the mapping `harness.metrics.nds.evaluate` takes: label, center, size,
        yaw, velocity, attribute, plus `num_pts` when known and `score` when given."""
        out: dict[str, object] = {
            "label": self.label,
            "center": [float(v) for v in self.center],
            "size": [float(v) for v in self.size],
            "yaw": float(self.yaw),
            "velocity": [float(v) for v in self.velocity],
            "attribute": self.attribute,
        }
        if self.num_pts is not None:
            out["num_pts"] = int(self.num_pts)
        if score is not None:
            out["score"] = float(score)
        return out


@dataclass(frozen=True)
class Static:
    """Non-box clutter (a building or a pole): an upright box that occludes and reflects."""

    kind: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float
    colour: tuple[float, float, float]

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) float64, as `Box3D.corners`."""
        return box_corners(self.center, self.size, self.yaw)


@dataclass(frozen=True)
class Road:
    """Ground layout: a main road along x and an optional cross road along y.

    Lane centres are y values (main road) or x values (cross road) with the lane's heading.
    `side` is +1 for right-hand traffic and -1 for left-hand traffic.
    """

    side: int
    lane_width: float
    lanes: tuple[tuple[float, float], ...]
    parking: tuple[tuple[float, float], ...]
    dashed_lines: tuple[float, ...]
    centre_line: float
    edge_lines: tuple[float, float]
    asphalt: tuple[float, float]
    sidewalk_width: float
    cross_x: float | None
    cross_half_width: float
    cross_lanes: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scene:
    """A full layout: road, clutter, boxes and one RGB base colour (0..255) per box."""

    token: str
    road: Road
    statics: tuple[Static, ...]
    boxes: tuple[Box3D, ...]
    colours: tuple[tuple[float, float, float], ...]
    texture_seed: int


def scene_token(split: str, seed: int, index: int) -> str:
    """The sample token of (split, seed, index), shared by the camera and LiDAR datasets."""
    return f"{split}-{seed}-{index:06d}"


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The generator that draws sample `index` of `split` for dataset seed `seed`."""
    if split not in SPLITS:
        raise SceneError(f"split {split!r} is not one of {tuple(SPLITS)}")
    if seed < 0 or index < 0:
        raise SceneError(f"seed ({seed}) and index ({index}) must be >= 0")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


def check_layout_args(split: str, seed: int, *, max_range: float, max_boxes: int) -> None:
    """Raise SceneError naming the argument when make_scene would refuse these arguments."""
    if split not in SPLITS:
        raise SceneError(f"split {split!r} is not one of {tuple(SPLITS)}")
    if seed < 0:
        raise SceneError(f"seed {seed} must be >= 0")
    if max_range <= 5.0:
        raise SceneError(f"max_range {max_range} must be > 5 m")
    if max_boxes < 0:
        raise SceneError(f"max_boxes {max_boxes} must be >= 0")


def make_scene(
    split: str, seed: int, index: int, *, max_range: float = 50.0, max_boxes: int = 40
) -> Scene:
    """The layout of sample `index`: same arguments, same scene, on any machine.

    Boxes lie strictly inside min(class range, `max_range`) (xy distance); the number of boxes
    is drawn from [max_boxes // 2, max_boxes] and may fall short when the road is full.
    """
    check_layout_args(split, seed, max_range=max_range, max_boxes=max_boxes)
    rng = scene_rng(split, seed, index)
    return generate_scene(
        rng, token=scene_token(split, seed, index), max_range=max_range, max_boxes=max_boxes
    )


# --------------------------------------------------------------------------------------------
# Layout generation


def _wrap(angle: float) -> float:
    """Angle wrapped to [-pi, pi)."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def _footprint(
    x: float, y: float, w: float, length: float, yaw: float, margin: float
) -> tuple[tuple[float, float], ...]:
    c, s = math.cos(yaw), math.sin(yaw)
    hl, hw = 0.5 * length + margin, 0.5 * w + margin
    return tuple(
        (x + c * fx * hl - s * fy * hw, y + s * fx * hl + c * fy * hw)
        for fx, fy in ((1, 1), (-1, 1), (-1, -1), (1, -1))
    )


def _separated(a: tuple[tuple[float, float], ...], b: tuple[tuple[float, float], ...]) -> bool:
    """Separating-axis test for two convex quadrilaterals: True when they do not overlap."""
    for poly in (a, b):
        for k in range(2):
            ex = poly[k + 1][0] - poly[k][0]
            ey = poly[k + 1][1] - poly[k][1]
            nx, ny = -ey, ex
            pa = [nx * px + ny * py for px, py in a]
            pb = [nx * px + ny * py for px, py in b]
            if max(pa) <= min(pb) or max(pb) <= min(pa):
                return True
    return False


def _make_road(rng: np.random.Generator) -> Road:
    side = 1 if rng.random() < 0.6 else -1
    lw = float(rng.uniform(3.2, 3.7))
    n_fwd = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
    n_back = int(rng.choice([1, 2], p=[0.55, 0.45]))
    ego_lane = int(rng.integers(0, n_fwd))
    # Canonical layout for right-hand traffic; left-hand traffic mirrors every y.
    fwd = [(i - ego_lane) * lw for i in range(n_fwd)]
    back = [(n_fwd - ego_lane + k) * lw for k in range(n_back)]
    dashed = [y + 0.5 * lw for y in fwd[:-1]] + [y + 0.5 * lw for y in back[:-1]]
    centre = (n_fwd - ego_lane - 0.5) * lw
    lo, hi = fwd[0] - 0.5 * lw, back[-1] + 0.5 * lw
    asph_lo, asph_hi = lo, hi
    parking: list[tuple[float, float]] = []
    if rng.random() < 0.6:
        parking.append((lo - 1.2, 0.0))
        asph_lo = lo - 2.4
    if rng.random() < 0.6:
        parking.append((hi + 1.2, math.pi))
        asph_hi = hi + 2.4
    lanes = [(y, 0.0) for y in fwd] + [(y, math.pi) for y in back]
    cross_x: float | None = None
    cross_lanes: list[tuple[float, float]] = []
    if rng.random() < 0.5:
        cross_x = float(rng.uniform(12.0, 38.0)) * (1.0 if rng.random() < 0.7 else -1.0)
        cross_lanes = [
            (cross_x + side * 0.5 * lw, 0.5 * math.pi),
            (cross_x - side * 0.5 * lw, -0.5 * math.pi),
        ]
    sy = float(side)
    edges = sorted((sy * lo, sy * hi))
    asphalt = sorted((sy * asph_lo, sy * asph_hi))
    return Road(
        side=side,
        lane_width=lw,
        lanes=tuple((sy * y, yaw) for y, yaw in lanes),
        parking=tuple((sy * y, yaw) for y, yaw in parking),
        dashed_lines=tuple(sy * y for y in dashed),
        centre_line=sy * centre,
        edge_lines=(edges[0], edges[1]),
        asphalt=(asphalt[0], asphalt[1]),
        sidewalk_width=float(rng.uniform(2.5, 5.0)),
        cross_x=cross_x,
        cross_half_width=lw,
        cross_lanes=tuple(cross_lanes),
    )


def _make_statics(rng: np.random.Generator, road: Road) -> list[Static]:
    """Buildings in rows beyond both sidewalks (a gap for the cross road) and poles."""
    out: list[Static] = []
    corridor = (
        None
        if road.cross_x is None
        else (
            road.cross_x - road.cross_half_width - 1.0,
            road.cross_x + road.cross_half_width + 1.0,
        )
    )
    for sign, edge in ((-1.0, road.asphalt[0]), (1.0, road.asphalt[1])):
        inner = edge + sign * (road.sidewalk_width + float(rng.uniform(0.5, 4.0)))
        x = -90.0 + float(rng.uniform(0.0, 10.0))
        while x < 90.0:
            length = float(rng.uniform(8.0, 30.0))
            depth = float(rng.uniform(6.0, 14.0))
            height = float(rng.uniform(4.0, 18.0))
            x0, x1 = x, x + length
            x = x1 + float(rng.uniform(1.0, 8.0))
            if corridor is not None and x1 > corridor[0] and x0 < corridor[1]:
                continue
            grey = float(rng.uniform(120.0, 200.0))
            tint = rng.uniform(0.9, 1.1, size=3)
            out.append(
                Static(
                    kind="building",
                    center=(0.5 * (x0 + x1), inner + sign * 0.5 * depth, GROUND_Z + 0.5 * height),
                    size=(depth, length, height),
                    yaw=0.0,
                    colour=(grey * float(tint[0]), grey * float(tint[1]), grey * float(tint[2])),
                )
            )
        for _ in range(int(rng.integers(0, 5))):
            px = float(rng.uniform(-45.0, 45.0))
            if corridor is not None and corridor[0] - 1.0 < px < corridor[1] + 1.0:
                continue
            height = float(rng.uniform(3.5, 7.0))
            out.append(
                Static(
                    kind="pole",
                    center=(
                        px,
                        edge + sign * (road.sidewalk_width - 0.35),
                        GROUND_Z + 0.5 * height,
                    ),
                    size=(0.25, 0.25, height),
                    yaw=0.0,
                    colour=(95.0, 95.0, 100.0),
                )
            )
    return out


def _size(rng: np.random.Generator, label: str) -> tuple[float, float, float]:
    mean, std = MEAN_SIZE[label], SIZE_STD[label]
    return (
        float(np.clip(rng.normal(mean[0], std[0]), 0.6 * mean[0], 1.5 * mean[0])),
        float(np.clip(rng.normal(mean[1], std[1]), 0.6 * mean[1], 1.5 * mean[1])),
        float(np.clip(rng.normal(mean[2], std[2]), 0.6 * mean[2], 1.5 * mean[2])),
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...], probs: tuple[float, ...]) -> str:
    return str(options[int(rng.choice(len(options), p=np.asarray(probs)))])


def _sidewalk_y(rng: np.random.Generator, road: Road, inset: float) -> float:
    width = road.sidewalk_width
    offset = float(rng.uniform(inset, max(inset, width - inset)))
    if rng.random() < 0.5:
        return road.asphalt[0] - offset
    return road.asphalt[1] + offset


def _lane(rng: np.random.Generator, road: Road, cross_ok: bool) -> tuple[str, float, float]:
    """A random lane: ("main", y, yaw) or ("cross", x, yaw)."""
    if cross_ok and road.cross_lanes and rng.random() < 0.25:
        x, yaw = road.cross_lanes[int(rng.integers(0, len(road.cross_lanes)))]
        return "cross", x, yaw
    y, yaw = road.lanes[int(rng.integers(0, len(road.lanes)))]
    return "main", y, yaw


_SPEED = {
    "car": (3.0, 14.0),
    "truck": (3.0, 12.0),
    "bus": (3.0, 11.0),
    "trailer": (3.0, 11.0),
    "construction_vehicle": (0.5, 4.0),
    "pedestrian": (0.6, 1.8),
    "motorcycle": (3.0, 14.0),
    "bicycle": (2.0, 7.0),
}
_VEHICLE_ATTR_P = {
    "car": (0.45, 0.40, 0.15),
    "truck": (0.40, 0.45, 0.15),
    "bus": (0.50, 0.15, 0.35),
    "trailer": (0.30, 0.60, 0.10),
    "construction_vehicle": (0.15, 0.75, 0.10),
}


def _place_on_lane(
    rng: np.random.Generator, road: Road, reach: float, cross_ok: bool
) -> tuple[float, float, float]:
    kind, pos, yaw = _lane(rng, road, cross_ok)
    along = float(rng.uniform(-reach, reach))
    jitter = float(rng.normal(0.0, 0.2))
    if kind == "cross":
        return pos + jitter, along, yaw
    return along, pos + jitter, yaw


def _propose(
    rng: np.random.Generator, road: Road, label: str, reach: float
) -> list[tuple[str, float, float, float, tuple[float, float, float], float, str]]:
    """Candidate boxes (label, x, y, yaw, size, speed, attribute) for one proposal of `label`."""
    size = _size(rng, label)
    if label in _VEHICLE_ATTR_P:
        attr = _pick(rng, VEHICLE_ATTRIBUTES, _VEHICLE_ATTR_P[label])
        if attr == "vehicle.parked" and road.parking and rng.random() < 0.85:
            y, yaw = road.parking[int(rng.integers(0, len(road.parking)))]
            x = float(rng.uniform(-reach, reach))
            y += float(rng.normal(0.0, 0.15))
            if rng.random() < 0.15:
                yaw += math.pi
        else:
            x, y, yaw = _place_on_lane(rng, road, reach, cross_ok=True)
        if label == "construction_vehicle" and attr != "vehicle.moving" and rng.random() < 0.5:
            yaw = float(rng.uniform(-math.pi, math.pi))
        yaw += float(rng.normal(0.0, 0.04))
        speed = float(rng.uniform(*_SPEED[label])) if attr == "vehicle.moving" else 0.0
        return [(label, x, y, yaw, size, speed, attr)]
    if label == "pedestrian":
        attr = _pick(rng, PEDESTRIAN_ATTRIBUTES, (0.65, 0.05, 0.30))
        if attr == "pedestrian.sitting_lying_down":
            size = (size[0], size[1], size[2] * 0.62)
        if attr == "pedestrian.moving" and rng.random() < 0.25:
            y = float(rng.uniform(*road.asphalt))
            if road.cross_x is not None and rng.random() < 0.7:
                offset = road.cross_half_width + float(rng.uniform(1.0, 4.0))
                x = road.cross_x + (offset if rng.random() < 0.5 else -offset)
            else:
                x = float(rng.uniform(-reach, reach))
            yaw = (0.5 if rng.random() < 0.5 else -0.5) * math.pi + float(rng.normal(0.0, 0.2))
        else:
            x = float(rng.uniform(-reach, reach))
            y = _sidewalk_y(rng, road, 0.5)
            if attr == "pedestrian.moving":
                yaw = (0.0 if rng.random() < 0.5 else math.pi) + float(rng.normal(0.0, 0.25))
            else:
                yaw = float(rng.uniform(-math.pi, math.pi))
        speed = float(rng.uniform(*_SPEED[label])) if attr == "pedestrian.moving" else 0.0
        return [(label, x, y, yaw, size, speed, attr)]
    if label in ("motorcycle", "bicycle"):
        ridden = rng.random() < 0.45
        attr = "cycle.with_rider" if ridden else "cycle.without_rider"
        w, length, h = size
        size = (w, length, h * (1.2 if ridden else 0.85))
        if ridden:
            x, y, yaw = _place_on_lane(rng, road, reach, cross_ok=True)
            yaw += float(rng.normal(0.0, 0.05))
            speed = float(rng.uniform(*_SPEED[label])) if rng.random() < 0.8 else 0.0
        else:
            x = float(rng.uniform(-reach, reach))
            y = _sidewalk_y(rng, road, 0.8)
            yaw = (0.5 if rng.random() < 0.5 else -0.5) * math.pi + float(rng.normal(0.0, 0.3))
            speed = 0.0
        return [(label, x, y, yaw, size, speed, attr)]
    # Rows of traffic cones or barriers along the road.
    count = int(rng.integers(2, 7))
    sites = [road.edge_lines[0], road.edge_lines[1], *road.dashed_lines]
    sites += [y for y, _ in road.parking]
    sites += [road.asphalt[0] - 0.4, road.asphalt[1] + 0.4]
    y0 = float(sites[int(rng.integers(0, len(sites)))]) + float(rng.normal(0.0, 0.1))
    x0 = float(rng.uniform(-reach, reach))
    direction = 1.0 if rng.random() < 0.5 else -1.0
    out = []
    if label == "traffic_cone":
        step = float(rng.uniform(1.5, 4.0))
        for k in range(count):
            s = _size(rng, label) if k else size
            yaw = float(rng.uniform(-math.pi, math.pi))
            out.append((label, x0 + direction * k * step, y0, yaw, s, 0.0, ""))
        return out
    x = x0
    for k in range(count):
        s = _size(rng, label) if k else size
        if k:
            x += direction * (0.5 * (out[-1][4][0] + s[0]) + float(rng.uniform(0.1, 0.4)))
        yaw = 0.5 * math.pi * (1.0 if rng.random() < 0.5 else -1.0) + float(rng.normal(0.0, 0.03))
        out.append((label, x, y0, yaw, s, 0.0, ""))
    return out


_BASE_COLOUR: dict[str, tuple[float, float, float]] = {
    "car": (60.0, 100.0, 190.0),
    "truck": (185.0, 55.0, 45.0),
    "bus": (55.0, 160.0, 85.0),
    "trailer": (150.0, 95.0, 55.0),
    "construction_vehicle": (235.0, 170.0, 30.0),
    "pedestrian": (150.0, 70.0, 165.0),
    "motorcycle": (45.0, 45.0, 55.0),
    "bicycle": (30.0, 150.0, 170.0),
    "traffic_cone": (250.0, 110.0, 20.0),
    "barrier": (215.0, 40.0, 40.0),
}
"""Base RGB colour of each class; every instance varies it by up to about 15% per channel."""


def base_colour(label: str) -> tuple[float, float, float]:
    """The base RGB colour (0..255) instances of class `label` vary around."""
    return _BASE_COLOUR[label]


def generate_scene(
    rng: np.random.Generator, *, token: str, max_range: float = 50.0, max_boxes: int = 40
) -> Scene:
    """Draw a full scene from `rng` (see the module docstring for what it holds)."""
    road = _make_road(rng)
    statics = _make_statics(rng, road)
    x0, x1, y0, y1 = EGO_FOOTPRINT
    ego = ((x1 + 1.0, y1 + 1.0), (x0 - 1.0, y1 + 1.0), (x0 - 1.0, y0 - 1.0), (x1 + 1.0, y0 - 1.0))
    occupied = [ego] + [
        _footprint(s.center[0], s.center[1], s.size[0], s.size[1], s.yaw, 0.1) for s in statics
    ]
    labels = CLASSES
    total = sum(CLASS_WEIGHT[c] for c in labels)
    probs = np.asarray([CLASS_WEIGHT[c] / total for c in labels])
    target = int(rng.integers(max_boxes // 2, max_boxes + 1)) if max_boxes else 0
    boxes: list[Box3D] = []
    colours: list[tuple[float, float, float]] = []
    attempts = 0
    while len(boxes) < target and attempts < 30 * target:
        attempts += 1
        label = labels[int(rng.choice(len(labels), p=probs))]
        reach = min(CLASS_RANGE[label], max_range)
        for lab, x, y, yaw, size, speed, attr in _propose(rng, road, label, reach):
            if len(boxes) >= target or math.hypot(x, y) >= reach - 0.5:
                continue
            margin = 0.1 if lab in ("pedestrian", "traffic_cone") else 0.25
            foot = _footprint(x, y, size[0], size[1], yaw, margin)
            if not all(_separated(foot, other) for other in occupied):
                continue
            occupied.append(foot)
            yaw = _wrap(yaw)
            velocity = (speed * math.cos(yaw), speed * math.sin(yaw)) if speed else (0.0, 0.0)
            boxes.append(
                Box3D(
                    label=lab,
                    center=(x, y, GROUND_Z + 0.5 * size[2]),
                    size=size,
                    yaw=yaw,
                    velocity=velocity,
                    attribute=attr,
                )
            )
            base = _BASE_COLOUR[lab]
            gain = rng.uniform(0.85, 1.15, size=3) * float(rng.uniform(0.9, 1.1))
            colours.append(
                (
                    min(255.0, base[0] * float(gain[0])),
                    min(255.0, base[1] * float(gain[1])),
                    min(255.0, base[2] * float(gain[2])),
                )
            )
    return Scene(
        token=token,
        road=road,
        statics=tuple(statics),
        boxes=tuple(boxes),
        colours=tuple(colours),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def mix_hash(h: np.ndarray) -> np.ndarray:
    """Integer avalanche (lowbias32) of uint32 hashes: the source of all texture and noise."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    out: np.ndarray = h ^ (h >> np.uint32(16))
    return out


def ground_material(road: Road, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Material code (ASPHALT, LANE_WHITE, ...) of the ground at points (x, y), uint8.

    Uses only comparisons, + - * and floor, so it is bit-exact on every machine.
    """
    lo, hi = road.asphalt
    sw = road.sidewalk_width
    mat = np.full(x.shape, GRASS, dtype=np.uint8)
    mat[((y >= lo - sw) & (y < lo)) | ((y > hi) & (y <= hi + sw))] = SIDEWALK
    on_main = (y >= lo) & (y <= hi)
    on_cross = np.zeros(x.shape, dtype=bool)
    if road.cross_x is not None:
        on_cross = np.abs(x - road.cross_x) <= road.cross_half_width
    mat[on_main | on_cross] = ASPHALT
    # Lane markings on the main road, interrupted by the cross road.
    marks = on_main & ~on_cross
    dash_on = (np.floor(x * (1.0 / DASH_LENGTH)).astype(np.int64) & 1) == 0
    centre = marks & (np.abs(y - road.centre_line) <= 2.0 * LINE_HALF_WIDTH)
    # A yellow centre line where traffic keeps right (Boston), a white one where it keeps left.
    mat[centre] = LANE_YELLOW if road.side == 1 else LANE_WHITE
    for yl in road.edge_lines:
        mat[marks & (np.abs(y - yl) <= LINE_HALF_WIDTH)] = LANE_WHITE
    for yl in road.dashed_lines:
        mat[marks & dash_on & (np.abs(y - yl) <= LINE_HALF_WIDTH)] = LANE_WHITE
    if road.cross_x is not None:
        near = road.cross_half_width + 1.0
        band = (np.abs(x - road.cross_x) >= near) & (np.abs(x - road.cross_x) <= near + 3.0)
        stripes = (np.floor(y * 2.0).astype(np.int64) & 1) == 0
        mat[on_main & band & stripes] = CROSSWALK
    return mat


@dataclass(frozen=True)
class BoxHits:
    """Where rays enter an upright box: `t` (ray parameter, inf where missed), the face hit
    (0 front +x, 1 back -x, 2 left +y, 3 right -y, 4 top, 5 bottom; -1 where missed) and the hit
    point in the box's own frame (x along the heading, origin at the box centre)."""

    t: np.ndarray
    face: np.ndarray
    local: tuple[np.ndarray, np.ndarray, np.ndarray]


def intersect_box(
    origin: tuple[float, float, float],
    dx: np.ndarray,
    dy: np.ndarray,
    dz: np.ndarray,
    center: tuple[float, float, float],
    size: tuple[float, float, float],
    yaw: float,
) -> BoxHits:
    """Slab test of rays `origin + t * (dx, dy, dz)` (arrays broadcast together) against the box
    (`center`, `size` (w, l, h), `yaw`); only hits with t > 0 count (origins lie outside).

    Uses only + - * /, comparisons and min/max on arrays: bit-exact on every machine.
    """
    c, s = math.cos(yaw), math.sin(yaw)
    rx, ry, rz = origin[0] - center[0], origin[1] - center[1], origin[2] - center[2]
    ox, oy, oz = c * rx + s * ry, -s * rx + c * ry, rz
    ldx = c * dx + s * dy
    ldy = -s * dx + c * dy
    ldz = dz + np.zeros_like(ldx)
    half = (0.5 * size[1], 0.5 * size[0], 0.5 * size[2])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        near, far = [], []
        for o, d, h in ((ox, ldx, half[0]), (oy, ldy, half[1]), (oz, ldz, half[2])):
            inv = 1.0 / d
            t0 = (-h - o) * inv
            t1 = (h - o) * inv
            near.append(np.minimum(t0, t1))
            far.append(np.maximum(t0, t1))
        tnear = np.maximum(np.maximum(near[0], near[1]), near[2])
        tfar = np.minimum(np.minimum(far[0], far[1]), far[2])
        hit = (tnear <= tfar) & (tnear > 0.0)
        face = np.where(
            (near[0] >= near[1]) & (near[0] >= near[2]),
            np.where(ldx < 0.0, 0, 1),
            np.where(near[1] >= near[2], np.where(ldy < 0.0, 2, 3), np.where(ldz < 0.0, 4, 5)),
        ).astype(np.int8)
        face[~hit] = -1
        t = np.where(hit, tnear, np.inf)
        tz = np.where(hit, tnear, 0.0)
        local = (ox + tz * ldx, oy + tz * ldy, oz + tz * ldz)
    return BoxHits(t=t, face=face, local=local)
