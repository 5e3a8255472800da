"""Seeded synthetic road scenes with exact per-pixel labels in the 19 Cityscapes train classes.

A scene is first drawn, from a generator seeded by `SeedSequence([seed, split_id, index])`, as a
resolution-independent description: a pinhole camera over a flat ground plane; a street of
lanes with markings, curbs, sidewalks and verges; facades of buildings, walls, fences and hedges
along both sides; a backdrop at the far end; sprites (vehicles, people, poles, traffic lights and
signs, trees) standing on the ground. It is then rasterised at any height x width in painter's
order (far to near), so every pixel's label is exactly the class of the surface drawn last
there. The ego vehicle's hood is void (255), as in Cityscapes.

Scene coordinates are isotropic: x in [0, 2] across the width, y in [0, 1] down the height (the
2:1 aspect of Cityscapes; other aspects stretch the scene). Per-pixel work uses only + - * /,
floor, comparisons and integer operations, so a sample is the same bytes on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from harness.errors import HarnessError
from harness.metrics.miou import CITYSCAPES_CLASSES

CLASS_NAMES: tuple[str, ...] = CITYSCAPES_CLASSES
"""The 19 Cityscapes train classes, in train-id order."""

LABEL_IDS: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)  # fmt: skip
"""Original Cityscapes label ids of `CLASS_NAMES`."""


IGNORE_INDEX = 255
NUM_CLASSES = len(CLASS_NAMES)
SPLITS: dict[str, int] = {"train": 0, "val": 1, "calibration": 2}

(
    ROAD,
    SIDEWALK,
    BUILDING,
    WALL,
    FENCE,
    POLE,
    LIGHT,
    SIGN,
    VEGETATION,
    TERRAIN,
    SKY,
    PERSON,
    RIDER,
    CAR,
    TRUCK,
    BUS,
    TRAIN,
    MOTORCYCLE,
    BICYCLE,
) = range(NUM_CLASSES)

ASPECT = 2.0
F32 = np.float32
Array = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]
RGB = tuple[float, float, float]


@dataclass(frozen=True)
class RoadSample:
    """One rendered scene: `image` (H, W, 3) uint8 RGB and `label` (H, W) uint8 train ids, 255
    where void."""

    index: int
    image: npt.NDArray[np.uint8]
    label: npt.NDArray[np.uint8]


class RoadScenes:
    """`size` synthetic road scenes of one split, rendered on access at `height` x `width`.

    Deterministic in (seed, split, index); splits draw from disjoint seed sequences, and the
    scene (not the pixel grain) of an index is the same at every resolution.
    """

    def __init__(
        self,
        split: str = "val",
        size: int = 32,
        height: int = 256,
        width: int = 512,
        seed: int = 7,
    ) -> None:
        if split not in SPLITS:
            raise HarnessError(f"RoadScenes: unknown split {split!r}; known: {sorted(SPLITS)}")
        if size < 1:
            raise HarnessError(f"RoadScenes: size must be >= 1, got {size}")
        if height < 8 or width < 8:
            raise HarnessError(f"RoadScenes: height and width must be >= 8, got {height}x{width}")
        self.split = split
        self.size = size
        self.height = height
        self.width = width
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> RoadSample:
        if not -self.size <= index < self.size:
            raise IndexError(f"RoadScenes[{self.split}]: index {index} out of range({self.size})")
        index %= self.size
        seq = np.random.SeedSequence([self.seed, SPLITS[self.split], index])
        scene_seq, grain_seq = seq.spawn(2)
        scene = _sample_scene(np.random.default_rng(scene_seq))
        image, label = _render(scene, self.height, self.width, np.random.default_rng(grain_seq))
        return RoadSample(index=index, image=image, label=label)

    def __repr__(self) -> str:
        return (
            f"RoadScenes(split={self.split!r}, size={self.size}, height={self.height}, "
            f"width={self.width}, seed={self.seed})"
        )


# ----------------------------------------------------------------------------------------------
# Value noise and the canvas.


class _Noise:
    """Tileable value noise on random 64x64 grids, smooth-step interpolated, evaluated on
    separable coordinates (one x per column, one y per row)."""

    SIZE = 64

    def __init__(self, rng: np.random.Generator, count: int = 4) -> None:
        s = self.SIZE
        grids = rng.random((count, s, s), dtype=F32)
        self.grids = np.empty((count, s + 1, s + 1), dtype=F32)
        self.grids[:, :s, :s] = grids
        self.grids[:, s, :s] = grids[:, 0]
        self.grids[:, :, s] = self.grids[:, :, 0]

    def __call__(self, k: int, gx: Array, gy: Array) -> Array:
        """(len(gy), len(gx)) noise in [0, 1] of grid `k` at grid coordinates gx (columns), gy
        (rows)."""
        ix, tx = self._cell(gx)
        iy, ty = self._cell(gy)
        g = self.grids[k % len(self.grids)]
        left = g[:, ix]
        cols = left + (g[:, ix + 1] - left) * tx
        top = cols[iy]
        out: Array = top + (cols[iy + 1] - top) * ty[:, None]
        return out

    def _cell(self, g: Array) -> tuple[npt.NDArray[np.int32], Array]:
        f = np.floor(g)
        t = g - f
        t = t * t * (F32(3.0) - F32(2.0) * t)
        return f.astype(np.int32) & (self.SIZE - 1), t

    def fractal(self, k: int, gx: Array, gy: Array) -> Array:
        """Two octaves, in [0, 1]."""
        a = self(k, gx, gy)
        b = self(k + 1, gx * F32(2.7) + F32(17.0), gy * F32(2.7) + F32(5.0))
        out: Array = a * F32(0.65) + b * F32(0.35)
        return out


FIELD_BASE = 4.0  # noise cells per image height of texture field 0; field k has 4 * 2**k
FIELDS = 7


def _octave(cells_per_height: float) -> int:
    """Index of the texture field whose frequency is nearest `cells_per_height`."""
    k, f = 0, FIELD_BASE
    while k < FIELDS - 1 and f * 1.41421356 < cells_per_height:
        f *= 2.0
        k += 1
    return k


class _Canvas:
    """Label and float colour buffers of one rendering, pixel-centre coordinates, and screen
    texture fields (computed on first use)."""

    def __init__(self, height: int, width: int, noise: _Noise) -> None:
        self.h = height
        self.w = width
        self.xs: Array = ((np.arange(width, dtype=np.float64) + 0.5) * (ASPECT / width)).astype(F32)
        self.ys: Array = ((np.arange(height, dtype=np.float64) + 0.5) / height).astype(F32)
        self.label = np.full((height, width), SKY, dtype=np.uint8)
        self.image = np.zeros((height, width, 3), dtype=F32)
        self.noise = noise
        self._fields: dict[int, Array] = {}

    def field(self, k: int) -> Array:
        """(H, W) fractal noise in [0, 1] at 4 * 2**k cells per image height."""
        if k not in self._fields:
            f = F32(FIELD_BASE * 2**k)
            self._fields[k] = self.noise.fractal(k, self.xs * f + F32(5.3 * k), self.ys * f)
        return self._fields[k]

    def cols(self, x0: float, x1: float) -> tuple[int, int]:
        """Column range holding every pixel centre in [x0, x1), plus a pixel of margin."""
        return (
            max(0, math.floor(x0 * self.w / ASPECT - 0.5)),
            min(self.w, math.ceil(x1 * self.w / ASPECT + 0.5)),
        )

    def cols_exact(self, x0: float, x1: float) -> tuple[int, int]:
        """Column range whose centres lie in [x0, x1) (computed in float64)."""
        scale = self.w / ASPECT
        return max(0, math.ceil(x0 * scale - 0.5)), min(self.w, math.ceil(x1 * scale - 0.5))

    def rows_exact(self, y0: float, y1: float) -> tuple[int, int]:
        """Row range whose centres lie in [y0, y1) (computed in float64)."""
        return max(0, math.ceil(y0 * self.h - 0.5)), min(self.h, math.ceil(y1 * self.h - 0.5))

    def rows(self, y0: float, y1: float) -> tuple[int, int]:
        """Row range holding every pixel centre in [y0, y1), plus a pixel of margin."""
        return max(0, math.floor(y0 * self.h - 0.5)), min(self.h, math.ceil(y1 * self.h + 0.5))

    def paint(
        self, r0: int, r1: int, c0: int, c1: int, mask: Mask | None, cls: int, colour: Array
    ) -> None:
        """Label `cls` and `colour` ((h, w, 3) or (3,)) in the window rows r0:r1, columns c0:c1,
        where `mask` holds (everywhere when None)."""
        if mask is None:
            self.label[r0:r1, c0:c1] = cls
            self.image[r0:r1, c0:c1] = colour
            return
        np.copyto(self.label[r0:r1, c0:c1], np.uint8(cls), where=mask)
        np.copyto(self.image[r0:r1, c0:c1], colour, where=mask[..., None])


# ----------------------------------------------------------------------------------------------
# Sprite primitives, in local metres: x right, y up from the ground contact point.


@dataclass(frozen=True)
class _Prim:
    """One filled shape of a sprite.

    kind: "box" (x0, y0, x1, y1), "rbox" (x0, y0, x1, y1, corner radius), "ellipse"
    (cx, cy, rx, ry) or "poly" (x0, y0, x1, y1, ...: convex, either winding). Colour: `rgb`
    times (1 + tex * (noise - 0.5)) with `freq` noise cells per metre, plus a vertical gradient
    `grad` (brighter at the top) and a cylinder shading `cyl` across x. With `period` > 0,
    vertical bands of relative width `duty` every `period` metres (from x0) take colour `alt`.
    """

    kind: str
    params: tuple[float, ...]
    cls: int
    rgb: RGB
    tex: float = 0.08
    freq: float = 2.0
    grad: float = 0.0
    cyl: float = 0.0
    alt: RGB = (0.0, 0.0, 0.0)
    period: float = 0.0
    duty: float = 0.0


def _box(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    cls: int,
    rgb: RGB,
    *,
    tex: float = 0.08,
    freq: float = 2.0,
    grad: float = 0.0,
    cyl: float = 0.0,
    alt: RGB = (0.0, 0.0, 0.0),
    period: float = 0.0,
    duty: float = 0.0,
) -> _Prim:
    """An axis-aligned box between x0 and x1 (either order) and from y0 up to y1."""
    return _Prim(
        "box", (min(x0, x1), y0, max(x0, x1), y1), cls, rgb, tex, freq, grad, cyl, alt, period, duty
    )


def _line(
    x0: float, y0: float, x1: float, y1: float, width: float, cls: int, rgb: RGB, tex: float = 0.0
) -> _Prim:
    """A segment of thickness `width` as a quadrilateral."""
    dx, dy = x1 - x0, y1 - y0
    n = math.sqrt(dx * dx + dy * dy) or 1.0
    ox, oy = -dy / n * width / 2, dx / n * width / 2
    return _Prim(
        "poly",
        (x0 + ox, y0 + oy, x1 + ox, y1 + oy, x1 - ox, y1 - oy, x0 - ox, y0 - oy),
        cls,
        rgb,
        tex=tex,
    )


def _bounds(prim: _Prim) -> tuple[float, float, float, float]:
    p = prim.params
    if prim.kind in ("box", "rbox"):
        return p[0], p[1], p[2], p[3]
    if prim.kind == "ellipse":
        return p[0] - p[2], p[1] - p[3], p[0] + p[2], p[1] + p[3]
    return min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])


def _poly_mask(xs: Array, ys: Array, pts: Sequence[tuple[float, float]]) -> Mask:
    """Pixel centres xs (w,) x ys (h,) inside a convex polygon."""
    n = len(pts)
    area2 = sum(pts[k][0] * pts[(k + 1) % n][1] - pts[(k + 1) % n][0] * pts[k][1] for k in range(n))
    sign = 1.0 if area2 >= 0 else -1.0
    mask = np.ones((ys.shape[0], xs.shape[0]), dtype=bool)
    for k in range(n):
        x0, y0 = pts[k]
        x1, y1 = pts[(k + 1) % n]
        ex, ey = F32(sign * (x1 - x0)), F32(sign * (y1 - y0))
        mask &= ((xs - F32(x0)) * ey)[None, :] <= ((ys - F32(y0)) * ex)[:, None]
    return mask


Fade = Callable[[RGB], RGB]


def _draw_prim(
    canvas: _Canvas, prim: _Prim, ax: float, ay: float, scale: float, fade: Fade
) -> None:
    """Rasterise `prim` with its local origin at image point (ax, ay) and `scale` image units
    per metre; `fade` applies light and haze to its colours."""
    lx0, ly0, lx1, ly1 = _bounds(prim)
    x0, x1 = ax + lx0 * scale, ax + lx1 * scale
    y0, y1 = ay - ly1 * scale, ay - ly0 * scale
    mask: Mask | None = None
    if prim.kind in ("box", "rbox"):
        # pixel centre j lies in [x0, x1) exactly when x0 <= (j + 0.5) * 2 / W < x1
        c0, c1 = canvas.cols_exact(x0, x1)
        r0, r1 = canvas.rows_exact(y0, y1)
    else:
        c0, c1 = canvas.cols(x0, x1)
        r0, r1 = canvas.rows(y0, y1)
    if c0 >= c1 or r0 >= r1:
        return
    xs = canvas.xs[c0:c1]
    ys = canvas.ys[r0:r1]
    p = prim.params
    if prim.kind == "rbox":
        rad = min(p[4], (p[2] - p[0]) / 2, (p[3] - p[1]) / 2) * scale
        dx = np.maximum(np.abs(xs - F32((x0 + x1) / 2)) - F32((x1 - x0) / 2 - rad), F32(0.0))
        dy = np.maximum(np.abs(ys - F32((y0 + y1) / 2)) - F32((y1 - y0) / 2 - rad), F32(0.0))
        mask = (dy * dy)[:, None] + dx * dx <= F32(rad * rad)
    elif prim.kind == "ellipse":
        ex = (xs - F32(ax + p[0] * scale)) * F32(1.0 / (p[2] * scale))
        ey = (ys - F32(ay - p[1] * scale)) * F32(1.0 / (p[3] * scale))
        mask = (ey * ey)[:, None] + ex * ex <= F32(1.0)
    elif prim.kind == "poly":
        pts = [(ax + p[k] * scale, ay - p[k + 1] * scale) for k in range(0, len(p), 2)]
        mask = _poly_mask(xs, ys, pts)
    rgb = np.asarray(fade(prim.rgb), dtype=F32)
    plain = prim.tex == 0.0 and prim.grad == 0.0 and prim.cyl == 0.0
    if prim.period == 0.0 and (plain or (r1 - r0) * (c1 - c0) < 32):
        # texture is invisible on a few pixels
        canvas.paint(r0, r1, c0, c1, mask, prim.cls, rgb)
        return
    if prim.tex:
        tex = F32(prim.tex)
        field = canvas.field(_octave(prim.freq / scale))[r0:r1, c0:c1]
        shade = field * tex + (F32(1.0) - tex * F32(0.5))
    else:
        shade = np.ones((r1 - r0, c1 - c0), dtype=F32)
    if prim.grad:
        # local height in [-1/2, 1/2] over the primitive, top brighter
        ly = (F32(ay - (ly0 + ly1) / 2 * scale) - ys) * F32(prim.grad / ((ly1 - ly0) * scale))
        shade += ly[:, None]
    if prim.cyl:
        u = (xs - F32((x0 + x1) / 2)) * F32(2.0 / (x1 - x0))
        shade += F32(prim.cyl / 3) - F32(prim.cyl) * u * u
    colour = shade[..., None] * rgb
    if prim.period:
        u = (xs - F32(x0)) * F32(1.0 / (prim.period * scale))
        band = (u - np.floor(u)) < F32(prim.duty)
        alt = np.asarray(fade(prim.alt), dtype=F32)
        colour = np.where(band[None, :, None], shade[..., None] * alt, colour)
    canvas.paint(r0, r1, c0, c1, mask, prim.cls, colour)


# ----------------------------------------------------------------------------------------------
# Scene description.


@dataclass(frozen=True)
class _Camera:
    horizon: float  # image y of the horizon
    vanish: float  # image x of the vanishing point
    focal: float  # image units per metre at 1 m depth
    height: float  # camera height above the ground, metres

    def point(self, x: float, y: float, z: float) -> tuple[float, float]:
        """Image position of the world point (x lateral, y up, z depth), metres."""
        return self.vanish + self.focal * x / z, self.horizon + self.focal * (self.height - y) / z


@dataclass(frozen=True)
class _Strip:
    """A ground band between lateral positions x0 < x1 (metres); later strips cover earlier."""

    x0: float
    x1: float
    cls: int
    surface: int  # index into SURFACES
    rgb: RGB


SURFACES = ("asphalt", "curb", "paving", "grass")
ASPHALT, CURB, PAVING, GRASS = range(4)


@dataclass(frozen=True)
class _Segment:
    """A stretch of facade from depth z0 to z1: class (or -1, a gap), height and style."""

    z0: float
    z1: float
    cls: int
    height: float
    rgb: RGB
    style: tuple[float, ...] = (1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class _Facade:
    """Vertical surfaces parallel to the street at lateral `offset` (metres, signed)."""

    side: int  # -1 left, +1 right
    offset: float
    segments: tuple[_Segment, ...]


@dataclass(frozen=True)
class _Sprite:
    """Primitives standing at ground point (x, z), drawn in order."""

    x: float
    z: float
    prims: tuple[_Prim, ...]
    shadow: float = 0.0  # half width of a ground shadow, metres (0: none)


@dataclass(frozen=True)
class _Side:
    """Cross-section of one side of the street (signed lateral metres)."""

    road_edge: float
    walk_inner: float  # paving edge nearer the road
    walk_outer: float
    boundary: float  # line of walls / fences / hedges
    buildings: float


@dataclass(frozen=True)
class _Scene:
    camera: _Camera
    sky_top: RGB
    sky_bottom: RGB
    clouds: float
    strips: tuple[_Strip, ...]
    markings: tuple[tuple[float, float, float, float], ...]  # (x, width, dash period, duty)
    rails: tuple[float, ...]  # lateral positions of tram rails
    crossing: tuple[float, float] | None  # depth range of a cross street
    zebra: tuple[float, float] | None  # depth range of a crosswalk
    cross_rails: tuple[float, ...]  # depths of rails along the cross street
    shadow_line: tuple[float, float, int] | None  # ground in shadow where side*(x - a - b z) > 0
    backdrop: tuple[float, tuple[tuple[float, float, float, int, RGB], ...]]
    facades: tuple[_Facade, ...]  # far layers first on each side
    sprites: tuple[_Sprite, ...]  # far first
    hood: tuple[float, float, RGB] | None  # (top y at the centre, curvature, colour)
    light: float
    tint: RGB
    side_light: tuple[float, float]  # facade brightness, left and right
    haze: float  # fraction of sky colour per metre of depth
    grain: int
    blur: bool
    noise: _Noise


# ----------------------------------------------------------------------------------------------
# Colours.


def _jitter(rng: np.random.Generator, rgb: RGB, amount: float = 12.0) -> RGB:
    d = rng.uniform(-amount, amount, 3)
    return (rgb[0] + float(d[0]), rgb[1] + float(d[1]), rgb[2] + float(d[2]))


def _pick(rng: np.random.Generator, options: Sequence[RGB], amount: float = 12.0) -> RGB:
    return _jitter(rng, options[int(rng.integers(len(options)))], amount)


def _scale(rgb: RGB, k: float) -> RGB:
    return (rgb[0] * k, rgb[1] * k, rgb[2] * k)


CAR_PAINT: tuple[RGB, ...] = (
    (200, 200, 205), (30, 30, 35), (150, 150, 155), (235, 235, 235), (40, 60, 120),
    (150, 30, 30), (60, 90, 60), (90, 90, 100), (180, 150, 90), (20, 40, 80),
)  # fmt: skip
TRUCK_BOX: tuple[RGB, ...] = ((225, 225, 220), (200, 200, 195), (210, 120, 40), (70, 100, 150))
BUS_PAINT: tuple[RGB, ...] = ((230, 185, 30), (190, 35, 35), (35, 85, 170), (225, 120, 30))
TRAIN_PAINT: tuple[tuple[RGB, RGB], ...] = (
    ((235, 235, 230), (190, 20, 30)),
    ((225, 228, 232), (30, 110, 60)),
    ((215, 215, 220), (40, 60, 150)),
)
CLOTHES: tuple[RGB, ...] = (
    (40, 40, 50), (200, 60, 60), (60, 80, 160), (230, 230, 230), (120, 90, 60),
    (80, 130, 80), (230, 180, 50), (150, 60, 150), (90, 90, 90),
)  # fmt: skip
SKIN: tuple[RGB, ...] = ((235, 195, 165), (200, 150, 110), (140, 95, 65), (90, 60, 45))
HAIR: tuple[RGB, ...] = ((30, 25, 20), (90, 60, 30), (180, 150, 90), (60, 60, 60))
HELMET: tuple[RGB, ...] = ((30, 30, 30), (230, 230, 230), (200, 40, 40), (40, 80, 160))
GLASS: RGB = (45, 55, 70)
TYRE: RGB = (28, 28, 30)
RIM: RGB = (150, 150, 155)
HEADLIGHT: RGB = (240, 235, 200)
TAILLIGHT: RGB = (210, 25, 25)
DARK: RGB = (40, 40, 43)
WHITE: RGB = (235, 235, 230)


# ----------------------------------------------------------------------------------------------
# Sprites. Each returns its primitives and its half width along the image x axis (metres).


def _mirror(d: int, *xs: float) -> tuple[float, ...]:
    return tuple(d * x for x in xs)


def _wheel(cx: float, r: float, cls: int, hub: float = 0.55, rim: RGB = RIM) -> list[_Prim]:
    """A tyre of radius r standing on the ground at x = cx, with a rim of relative size hub."""
    return [
        _Prim("ellipse", (cx, r, r, r), cls, TYRE, tex=0.0),
        _Prim("ellipse", (cx, r, r * hub, r * hub), cls, rim, tex=0.0),
    ]


SPOKES: RGB = (175.0, 175.0, 170.0)


def _car(rng: np.random.Generator, view: str) -> tuple[list[_Prim], float]:
    paint = _pick(rng, CAR_PAINT, 15)
    h = rng.uniform(1.35, 1.6)
    if view == "side":
        half = rng.uniform(1.95, 2.4)
        d = 1 if rng.random() < 0.5 else -1
        a, b, c, e = _mirror(d, half - 0.9, half - 1.15, half - 1.7, half - 1.3)
        return [
            _Prim("rbox", (-half, 0.28, half, 0.95, 0.18), CAR, paint, grad=0.25),
            _Prim("poly", (-a, 0.94, b, 0.94, c, h, -e, h), CAR, paint, grad=0.2),
            _Prim("poly", (-a * 1.12, 1.0, b * 1.1, 1.0, c * 1.02, h - 0.07, -e * 1.05, h - 0.07),
                  CAR, GLASS, grad=0.5),
            _box(d * 0.05, 0.95, d * 0.17, h - 0.03, CAR, paint),
            _box(d * (half - 0.12), 0.62, d * half, 0.75, CAR, HEADLIGHT, tex=0.0),
            _box(-d * (half - 0.1), 0.66, -d * half, 0.78, CAR, TAILLIGHT, tex=0.0),
            *_wheel(-d * (half - 0.75), 0.33, CAR),
            *_wheel(d * (half - 0.8), 0.33, CAR),
        ], half  # fmt: skip
    w2 = rng.uniform(0.82, 0.95)
    lamp = HEADLIGHT if view == "front" else TAILLIGHT
    return [
        _box(-w2 + 0.05, 0.0, -w2 + 0.32, 0.5, CAR, TYRE, tex=0.0),
        _box(w2 - 0.32, 0.0, w2 - 0.05, 0.5, CAR, TYRE, tex=0.0),
        _Prim("rbox", (-w2, 0.22, w2, 0.98, 0.14), CAR, paint, grad=0.3),
        _Prim("poly", (-w2 + 0.1, 0.97, w2 - 0.1, 0.97, w2 - 0.28, h, -w2 + 0.28, h), CAR, paint),
        _Prim("poly", (-w2 + 0.2, 1.0, w2 - 0.2, 1.0, w2 - 0.33, h - 0.06, -w2 + 0.33, h - 0.06),
              CAR, GLASS, grad=0.6),
        _box(-w2 + 0.08, 0.68, -w2 + 0.42, 0.84, CAR, lamp, tex=0.0),
        _box(w2 - 0.42, 0.68, w2 - 0.08, 0.84, CAR, lamp, tex=0.0),
        _box(-0.26, 0.38, 0.26, 0.5, CAR, (225, 225, 215), tex=0.0),
        _box(-w2 + 0.02, 0.22, w2 - 0.02, 0.32, CAR, DARK),
    ], w2  # fmt: skip


def _truck(rng: np.random.Generator, view: str) -> tuple[list[_Prim], float]:
    box = _pick(rng, TRUCK_BOX, 12)
    cab = _pick(rng, (*CAR_PAINT, (200, 60, 30), (40, 80, 160)), 12)
    top = rng.uniform(3.4, 4.0)
    if view == "side":
        half = rng.uniform(3.8, 5.0)
        d = 1 if rng.random() < 0.5 else -1
        return [
            _box(-half + 0.3, 0.55, half - 0.3, 1.0, TRUCK, DARK),
            _box(-d * half, 1.0, d * (half - 2.5), top, TRUCK, box, grad=0.15, tex=0.06),
            _box(-d * half, top - 0.5, d * (half - 2.5), top - 0.25, TRUCK, _scale(box, 0.7)),
            _Prim("rbox", (min(d * half, d * (half - 2.3)), 0.55, max(d * half, d * (half - 2.3)),
                           3.0, 0.2), TRUCK, cab, grad=0.2),
            _Prim("poly", (d * (half - 0.15), 1.9, d * (half - 1.4), 1.9, d * (half - 1.4), 2.75,
                           d * (half - 0.3), 2.75), TRUCK, GLASS, grad=0.5),
            *_wheel(d * (half - 1.2), 0.5, TRUCK),
            *_wheel(-d * (half - 1.3), 0.5, TRUCK),
            *_wheel(-d * (half - 2.4), 0.5, TRUCK),
        ], half  # fmt: skip
    w2 = 1.25
    if view == "front":
        return [
            _box(-w2 + 0.1, 0.0, -w2 + 0.45, 0.9, TRUCK, TYRE, tex=0.0),
            _box(w2 - 0.45, 0.0, w2 - 0.1, 0.9, TRUCK, TYRE, tex=0.0),
            _box(-w2 - 0.05, 2.6, w2 + 0.05, top, TRUCK, box, grad=0.2),
            _Prim("rbox", (-w2, 0.45, w2, 3.0, 0.15), TRUCK, cab, grad=0.2),
            _box(-w2 + 0.15, 1.95, w2 - 0.15, 2.85, TRUCK, GLASS, grad=0.5),
            _box(-0.8, 0.9, 0.8, 1.5, TRUCK, (60, 60, 65)),
            _box(-w2 + 0.1, 0.75, -w2 + 0.5, 0.95, TRUCK, HEADLIGHT, tex=0.0),
            _box(w2 - 0.5, 0.75, w2 - 0.1, 0.95, TRUCK, HEADLIGHT, tex=0.0),
        ], w2
    return [
        _box(-w2 + 0.1, 0.0, -w2 + 0.5, 0.9, TRUCK, TYRE, tex=0.0),
        _box(w2 - 0.5, 0.0, w2 - 0.1, 0.9, TRUCK, TYRE, tex=0.0),
        _box(-w2, 0.95, w2, top, TRUCK, box, grad=0.15, tex=0.06),
        _box(-0.02, 1.0, 0.02, top - 0.05, TRUCK, _scale(box, 0.6)),
        _box(-w2 + 0.05, 0.55, w2 - 0.05, 0.95, TRUCK, DARK),
        _box(-w2 + 0.1, 0.6, -w2 + 0.4, 0.8, TRUCK, TAILLIGHT, tex=0.0),
        _box(w2 - 0.4, 0.6, w2 - 0.1, 0.8, TRUCK, TAILLIGHT, tex=0.0),
    ], w2


def _bus(rng: np.random.Generator, view: str) -> tuple[list[_Prim], float]:
    paint = _pick(rng, BUS_PAINT, 10)
    stripe = _pick(rng, ((40, 40, 45), (230, 230, 230)), 10)
    top = rng.uniform(3.0, 3.3)
    if view == "side":
        half = rng.uniform(5.5, 6.8)
        d = 1 if rng.random() < 0.5 else -1
        prims = [
            _Prim("rbox", (-half, 0.3, half, top, 0.35), BUS, paint, grad=0.15),
            _box(-half + 0.2, 0.55, half - 0.2, 0.8, BUS, stripe),
            _box(
                -half + 0.3,
                1.3,
                half - 0.3,
                top - 0.35,
                BUS,
                GLASS,
                grad=0.5,
                alt=paint,
                period=1.4,
                duty=0.1,
            ),
        ]
        for door in (d * (half - 1.6), -d * 0.5):
            prims.append(_box(door - 0.55, 0.45, door + 0.55, top - 0.3, BUS, (55, 60, 70)))
        sign = d * (half - 1.3)
        prims.append(
            _box(sign - 0.9, top - 0.33, sign + 0.9, top - 0.08, BUS, (250, 150, 30), tex=0.0)
        )
        prims += _wheel(d * (half - 2.6), 0.5, BUS) + _wheel(-d * (half - 3.0), 0.5, BUS)
        return prims, half
    w2 = 1.27
    lamp = HEADLIGHT if view == "front" else TAILLIGHT
    return [
        _box(-w2 + 0.1, 0.0, -w2 + 0.45, 0.7, BUS, TYRE, tex=0.0),
        _box(w2 - 0.45, 0.0, w2 - 0.1, 0.7, BUS, TYRE, tex=0.0),
        _Prim("rbox", (-w2, 0.3, w2, top, 0.3), BUS, paint, grad=0.15),
        _box(-w2 + 0.12, 1.25 if view == "front" else 1.7, w2 - 0.12, top - 0.45, BUS, GLASS,
             grad=0.5),
        _box(-0.9, top - 0.4, 0.9, top - 0.12, BUS, (250, 150, 30), tex=0.0),
        _box(-w2 + 0.1, 0.55, w2 - 0.1, 0.75, BUS, stripe),
        _box(-w2 + 0.12, 0.8, -w2 + 0.45, 1.0, BUS, lamp, tex=0.0),
        _box(w2 - 0.45, 0.8, w2 - 0.12, 1.0, BUS, lamp, tex=0.0),
    ], w2  # fmt: skip


def _pantograph(cx: float, top: float) -> list[_Prim]:
    return [
        _box(cx - 1.2, top, cx + 1.2, top + 0.25, TRAIN, (70, 70, 75)),
        _line(cx - 0.8, top + 0.25, cx + 0.2, top + 1.0, 0.1, TRAIN, (50, 50, 55)),
        _line(cx + 0.2, top + 1.0, cx - 0.6, top + 1.5, 0.1, TRAIN, (50, 50, 55)),
        _box(cx - 1.0, top + 1.45, cx + 0.2, top + 1.6, TRAIN, (50, 50, 55)),
    ]


def _train(rng: np.random.Generator, view: str) -> tuple[list[_Prim], float]:
    """A tram (Cityscapes' trains are mostly trams): articulated cars, pantograph, colour band."""
    body, band = TRAIN_PAINT[int(rng.integers(len(TRAIN_PAINT)))]
    body = _jitter(rng, body, 8)
    top = rng.uniform(3.3, 3.6)
    if view == "side":
        cars = int(rng.integers(2, 4))
        car_len = rng.uniform(7.5, 9.5)
        half = cars * car_len / 2
        prims: list[_Prim] = []
        for k in range(cars):
            a = -half + k * car_len + 0.15
            b = a + car_len - 0.3
            prims += [
                _Prim("rbox", (a, 0.35, b, top, 0.3), TRAIN, body, grad=0.15),
                _box(a + 0.1, 0.55, b - 0.1, 0.95, TRAIN, band),
                _box(
                    a + 0.4,
                    1.35,
                    b - 0.4,
                    top - 0.5,
                    TRAIN,
                    GLASS,
                    grad=0.5,
                    alt=body,
                    period=1.1,
                    duty=0.18,
                ),
                _box(a + 0.4, top - 0.45, b - 0.4, top - 0.3, TRAIN, band),
                _box(a + 1.0, 0.1, a + 2.2, 0.4, TRAIN, DARK),
                _box(b - 2.2, 0.1, b - 1.0, 0.4, TRAIN, DARK),
            ]
            if k < cars - 1:
                prims.append(_box(b - 0.05, 0.6, b + 0.35, top - 0.3, TRAIN, DARK))
        return prims + _pantograph(-half + car_len / 2, top), half
    w2 = 1.32
    lamp = HEADLIGHT if view == "front" else TAILLIGHT
    return [
        _Prim("rbox", (-w2, 0.3, w2, top, 0.45), TRAIN, body, grad=0.15),
        _box(-w2 + 0.05, 0.45, w2 - 0.05, 0.95, TRAIN, band),
        _Prim("rbox", (-w2 + 0.18, 1.35, w2 - 0.18, top - 0.45, 0.2), TRAIN, GLASS, grad=0.5),
        _box(-0.8, top - 0.4, 0.8, top - 0.15, TRAIN, (30, 30, 30), tex=0.0),
        _Prim("ellipse", (-w2 + 0.4, 1.1, 0.14, 0.1), TRAIN, lamp, tex=0.0),
        _Prim("ellipse", (w2 - 0.4, 1.1, 0.14, 0.1), TRAIN, lamp, tex=0.0),
        *_pantograph(0.0, top),
    ], w2  # fmt: skip


def _person(rng: np.random.Generator) -> list[_Prim]:
    """A standing or walking pedestrian seen from the front, back or side."""
    h = rng.uniform(1.55, 1.95)
    top = _pick(rng, CLOTHES, 15)
    legs = _pick(rng, CLOTHES[:5], 15)
    skin = _pick(rng, SKIN, 8)
    hair = _pick(rng, HAIR, 8)
    hip, shoulder, head = 0.5 * h, 0.81 * h, 0.065 * h
    shoe = (35.0, 30.0, 30.0)
    if rng.random() < 0.5:  # side view, walking
        stride = rng.uniform(0.0, 0.28)
        w = 0.22
        prims = [
            _line(0.0, hip, -stride, 0.05, 0.16, PERSON, legs, tex=0.1),
            _line(0.0, hip, stride, 0.05, 0.16, PERSON, _scale(legs, 0.85), tex=0.1),
            _box(-stride - 0.1, 0.0, -stride + 0.12, 0.08, PERSON, shoe),
            _box(stride - 0.1, 0.0, stride + 0.12, 0.08, PERSON, shoe),
        ]
    else:
        stride = 0.0
        w = 0.38
        prims = [
            _box(-0.17, 0.05, -0.01, hip + 0.05, PERSON, legs, tex=0.1, grad=0.2),
            _box(0.01, 0.05, 0.17, hip + 0.05, PERSON, legs, tex=0.1, grad=0.2),
            _box(-0.18, 0.0, -0.01, 0.07, PERSON, shoe),
            _box(0.01, 0.0, 0.18, 0.07, PERSON, shoe),
        ]
    prims += [
        _Prim("rbox", (-w / 2, hip - 0.02, w / 2, shoulder + 0.02, 0.06), PERSON, top, tex=0.12,
              grad=0.25),
        _line(-w / 2 - 0.02, shoulder - 0.03, -w / 2 - 0.05 - stride / 2, hip - 0.05, 0.1, PERSON,
              _scale(top, 0.9)),
        _line(w / 2 + 0.02, shoulder - 0.03, w / 2 + 0.05 + stride / 2, hip - 0.05, 0.1, PERSON,
              _scale(top, 0.9)),
        _box(-0.05, shoulder, 0.05, shoulder + 0.06, PERSON, skin),
        _Prim("ellipse", (0.0, shoulder + 0.06 + head, head * 0.85, head), PERSON, skin),
        _Prim("ellipse", (0.0, shoulder + 0.1 + head, head * 0.9, head * 0.7), PERSON, hair),
    ]  # fmt: skip
    if rng.random() < 0.3:
        bag = _pick(rng, ((60, 40, 30), (30, 30, 30), (150, 120, 80)), 8)
        prims.append(_Prim("rbox", (w / 2, hip - 0.15, w / 2 + 0.2, hip + 0.15, 0.03), PERSON, bag))
    return prims


def _cycle(
    rng: np.random.Generator, motor: bool, ridden: bool, view: str
) -> tuple[list[_Prim], float]:
    """A bicycle or motorcycle, with its rider (class rider) on top when `ridden`."""
    cls = MOTORCYCLE if motor else BICYCLE
    paint = _pick(rng, (*CAR_PAINT, (200, 40, 40), (30, 120, 200)), 15)
    clothes = _pick(rng, CLOTHES, 15)
    head_rgb = _pick(rng, HELMET, 8) if motor else _pick(rng, SKIN, 8)
    head_r = 0.14 if motor else 0.12
    if view != "side":
        seat = 0.95 if motor else 1.0
        prims = [
            _box(-0.07, 0.0, 0.07, 0.62 if motor else 0.68, cls, TYRE, tex=0.0),
            _line(-0.36, 1.0, 0.36, 1.0, 0.07, cls, (60, 60, 60)),
            _box(-0.04, 0.6, 0.04, 1.0, cls, paint),
        ]
        if motor:
            prims += [
                _Prim("rbox", (-0.28, 0.35, 0.28, 0.95, 0.1), cls, paint, grad=0.2),
                _box(
                    -0.1, 0.75, 0.1, 0.85, cls, TAILLIGHT if view == "rear" else HEADLIGHT, tex=0.0
                ),
                _Prim("ellipse", (-0.38, 1.1, 0.07, 0.06), cls, DARK),
                _Prim("ellipse", (0.38, 1.1, 0.07, 0.06), cls, DARK),
            ]
        if ridden:
            prims += [
                _line(-0.17, seat, -0.25, 0.25, 0.14, RIDER, _scale(clothes, 0.6)),
                _line(0.17, seat, 0.25, 0.25, 0.14, RIDER, _scale(clothes, 0.6)),
                _Prim("rbox", (-0.23, seat - 0.05, 0.23, seat + 0.62, 0.08), RIDER, clothes,
                      tex=0.12, grad=0.2),
                _line(-0.2, seat + 0.55, -0.34, 1.0, 0.1, RIDER, clothes),
                _line(0.2, seat + 0.55, 0.34, 1.0, 0.1, RIDER, clothes),
                _Prim("ellipse", (0.0, seat + 0.62 + head_r, head_r * 0.95, head_r), RIDER,
                      head_rgb),
            ]  # fmt: skip
        return prims, 0.4
    d = 1 if rng.random() < 0.5 else -1
    r = 0.31 if motor else 0.34
    base = 0.72 if motor else 0.53
    back, front = -d * base, d * base
    if motor:  # solid dark wheels, a bulky engine and fairing between them
        prims = _wheel(back, r, cls, 0.35, (95, 95, 100)) + _wheel(
            front, r, cls, 0.35, (95, 95, 100)
        )
        prims += [
            _Prim("poly", (back + d * 0.15, 0.3, front - d * 0.25, 0.3, front - d * 0.05, 0.8,
                           back + d * 0.3, 0.9), cls, DARK, tex=0.15, freq=8.0),
            _Prim("rbox", (min(-d * 0.35, d * 0.5), 0.55, max(-d * 0.35, d * 0.5), 1.0, 0.15),
                  cls, paint, grad=0.2),
            _box(back, 0.8, -d * 0.15, 0.9, cls, (25, 25, 25)),
            _line(front, r, front - d * 0.2, 1.05, 0.07, cls, (70, 70, 75)),
            _Prim("ellipse", (front - d * 0.12, 0.95, 0.1, 0.08), cls, HEADLIGHT, tex=0.0),
        ]  # fmt: skip
        seat_x, seat_y, bar = -d * 0.25, 0.9, (front - d * 0.2, 1.05)
    else:  # thin tyres around light, see-through looking spokes and an open frame
        prims = [
            prim
            for x in (back, front)
            for prim in (
                _Prim("ellipse", (x, r, r, r), cls, TYRE, tex=0.0),
                _Prim("ellipse", (x, r, r * 0.86, r * 0.86), cls, SPOKES, tex=0.5, freq=14.0),
            )
        ]
        seat_x, seat_y, bar = back + d * 0.3, 0.9, (front - d * 0.1, 0.98)
        crank = (d * 0.02, r)
        head_tube = (front - d * 0.12, 0.85)
        saddle = (seat_x, seat_y - 0.05)
        for a, b in (
            ((back, r), crank), ((back, r), saddle), (crank, saddle),
            ((seat_x, seat_y - 0.1), head_tube), (crank, head_tube), ((front, r), bar),
        ):  # fmt: skip
            prims.append(_line(a[0], a[1], b[0], b[1], 0.06, cls, paint, tex=0.0))
        prims += [
            _box(seat_x - 0.11, seat_y - 0.04, seat_x + 0.11, seat_y + 0.02, cls, (30, 30, 30)),
            _line(bar[0] - d * 0.06, bar[1], bar[0] + d * 0.1, bar[1] + 0.04, 0.06, cls, DARK),
        ]
    if ridden:
        shoulder = (seat_x + d * 0.3, seat_y + 0.6)
        knee = (seat_x + d * 0.35, seat_y - (0.05 if motor else 0.15))
        foot = (seat_x + d * 0.3, 0.35 if motor else 0.25)
        prims += [
            _line(seat_x, seat_y, knee[0], knee[1], 0.16, RIDER, _scale(clothes, 0.6)),
            _line(knee[0], knee[1], foot[0], foot[1], 0.13, RIDER, _scale(clothes, 0.6)),
            _line(seat_x, seat_y + 0.02, shoulder[0], shoulder[1], 0.32, RIDER, clothes, tex=0.12),
            _line(shoulder[0], shoulder[1] - 0.05, bar[0], bar[1], 0.1, RIDER, clothes),
            _Prim("ellipse", (shoulder[0] + d * 0.08, shoulder[1] + 0.17, head_r * 0.95, head_r),
                  RIDER, head_rgb),
        ]  # fmt: skip
    return prims, base + r


def _light_head(rng: np.random.Generator, x0: float, y0: float) -> list[_Prim]:
    """A three-lamp traffic light housing with its lower left corner at (x0, y0), one lamp lit."""
    housing = _pick(rng, ((35, 35, 35), (50, 55, 50), (200, 170, 40)), 6)
    bw = rng.uniform(0.5, 0.7)
    bh = bw * 2.6
    prims = [_Prim("rbox", (x0, y0, x0 + bw, y0 + bh, 0.06), LIGHT, housing, tex=0.05)]
    lit = int(rng.integers(3))
    lamps = ((230, 40, 30), (240, 180, 30), (40, 220, 120))
    for k, rgb in enumerate(lamps):
        cy = y0 + bh * (0.8 - 0.3 * k)
        prims.append(_Prim("ellipse", (x0 + bw / 2, cy, bw * 0.3, bw * 0.3), LIGHT,
                           rgb if k == lit else _scale(rgb, 0.25), tex=0.0))  # fmt: skip
    return prims


POLE_GREY: tuple[RGB, ...] = ((130, 132, 135), (90, 95, 95), (160, 160, 150), (60, 70, 65))


def _pole(rng: np.random.Generator, toward: int, kind: str) -> list[_Prim]:
    """A pole carrying a traffic light ("light"), signs ("sign"), a street lamp ("lamp") or
    traffic lights on a mast arm over the road ("mast"); `toward` (+1 / -1) is the direction of
    the road seen from the pole."""
    grey = _pick(rng, POLE_GREY, 8)
    w = rng.uniform(0.28, 0.42)  # thicker than real poles: they must survive 1/8 resolution
    if kind == "sign":
        h = rng.uniform(2.6, 3.4)
        prims = [_box(-w * 0.4, 0.0, w * 0.4, h, POLE, grey, cyl=0.5), *_sign(rng, h + 0.1)]
        if rng.random() < 0.35:
            prims += _sign(rng, h - 0.9)
        return prims
    if kind == "light":
        h = rng.uniform(2.8, 3.6)
        x0 = -0.3 if rng.random() < 0.5 else (w / 2 if toward > 0 else -w / 2 - 0.6)
        prims = [_box(-w / 2, 0.0, w / 2, h, POLE, grey, cyl=0.5, tex=0.05)]
        prims += _light_head(rng, x0, h - 0.6)
        if rng.random() < 0.4:
            prims += _sign(rng, h - 0.8)
        return prims
    if kind == "mast":
        h = rng.uniform(5.5, 6.5)
        reach = rng.uniform(3.0, 6.0) * toward
        prims = [
            _box(-w * 0.6, 0.0, w * 0.6, h + 0.2, POLE, grey, cyl=0.5, tex=0.05),
            _box(0.0, h - 0.15, reach, h + 0.15, POLE, grey),
        ]
        for at in (0.55, 0.95)[: int(rng.integers(1, 3))]:
            prims += _light_head(rng, reach * at - 0.3, h - 1.8)
        return prims
    h = rng.uniform(6.0, 9.0)
    reach = rng.uniform(1.0, 2.2) * toward
    head = (reach, reach + 0.7 * toward)
    prims = [
        _box(-w / 2, 0.0, w / 2, h, POLE, grey, cyl=0.5, tex=0.05),
        _line(0.0, h - 0.1, reach, h + 0.3, 0.15, POLE, grey),
        _Prim("rbox", (min(head), h + 0.1, max(head), h + 0.4, 0.08), POLE, _scale(grey, 0.8)),
    ]
    if rng.random() < 0.3:
        prims += _sign(rng, rng.uniform(2.6, 3.4))
    return prims


def _sign(rng: np.random.Generator, top: float) -> list[_Prim]:
    """A traffic sign plate whose top is at `top` metres."""
    r = rng.uniform(0.42, 0.62)
    cy = top - r
    red, blue, black = (200.0, 30.0, 35.0), (30.0, 80.0, 170.0), (30.0, 30.0, 30.0)
    shape = int(rng.integers(5))
    if shape == 0:  # prohibition: red ring, white disc, black bar
        return [
            _Prim("ellipse", (0.0, cy, r, r), SIGN, red, tex=0.04),
            _Prim("ellipse", (0.0, cy, r * 0.72, r * 0.72), SIGN, WHITE, tex=0.04),
            _box(-r * 0.45, cy - r * 0.12, r * 0.45, cy + r * 0.12, SIGN, black),
        ]
    if shape == 1:  # mandatory: blue disc, white arrow
        return [
            _Prim("ellipse", (0.0, cy, r, r), SIGN, blue, tex=0.04),
            _line(0.0, cy - r * 0.55, 0.0, cy + r * 0.3, r * 0.22, SIGN, WHITE),
            _Prim("poly", (-r * 0.35, cy + r * 0.2, r * 0.35, cy + r * 0.2, 0.0, cy + r * 0.6),
                  SIGN, WHITE),
        ]  # fmt: skip
    if shape == 2:  # warning: red triangle, white inside
        return [
            _Prim("poly", (-r * 1.1, cy - r * 0.8, r * 1.1, cy - r * 0.8, 0.0, cy + r), SIGN, red),
            _Prim("poly", (-r * 0.75, cy - r * 0.6, r * 0.75, cy - r * 0.6, 0.0, cy + r * 0.62),
                  SIGN, WHITE),
            _box(-r * 0.07, cy - r * 0.35, r * 0.07, cy + r * 0.2, SIGN, black),
        ]  # fmt: skip
    if shape == 3:  # priority road: yellow diamond with a white border
        return [
            _Prim("poly", (-r, cy, 0.0, cy - r, r, cy, 0.0, cy + r), SIGN, WHITE),
            _Prim("poly", (-r * 0.65, cy, 0.0, cy - r * 0.65, r * 0.65, cy, 0.0, cy + r * 0.65),
                  SIGN, (240, 190, 20)),
        ]  # fmt: skip
    return [  # information: blue rectangle, white symbol
        _box(-r, cy - r * 0.9, r, cy + r, SIGN, blue, tex=0.04),
        _box(-r * 0.2, cy - r * 0.6, r * 0.2, cy + r * 0.6, SIGN, WHITE),
        _box(-r * 0.7, cy - r * 0.2, r * 0.7, cy + r * 0.2, SIGN, WHITE),
    ]


LEAVES: tuple[RGB, ...] = ((60, 100, 40), (45, 80, 35), (80, 115, 45), (70, 90, 50))


def _tree(rng: np.random.Generator) -> list[_Prim]:
    """Trunk and crown, both vegetation as in Cityscapes."""
    trunk = rng.uniform(1.8, 3.2)
    r = rng.uniform(1.4, 2.8)
    leaf = _pick(rng, LEAVES, 10)
    prims = [_box(-0.15, 0.0, 0.15, trunk + r * 0.5, VEGETATION, (85, 65, 50), cyl=0.4, tex=0.25,
                  freq=6.0)]  # fmt: skip
    for _ in range(int(rng.integers(3, 6))):
        rr = r * rng.uniform(0.55, 0.85)
        prims.append(
            _Prim("ellipse", (rng.uniform(-0.6, 0.6) * r, trunk + r * rng.uniform(0.6, 1.4), rr,
                              rr * rng.uniform(0.8, 1.1)), VEGETATION, _jitter(rng, leaf, 8),
                  tex=0.9, freq=4.5, grad=0.25)
        )  # fmt: skip
    return prims


def _bush(rng: np.random.Generator) -> list[_Prim]:
    leaf = _pick(rng, LEAVES, 8)
    w = rng.uniform(0.8, 2.0)
    h = rng.uniform(0.6, 1.3)
    return [
        _Prim("ellipse", (-w * 0.3, h * 0.5, w * 0.45, h * 0.5), VEGETATION, leaf, tex=0.9,
              freq=5.0, grad=0.3),
        _Prim("ellipse", (w * 0.25, h * 0.45, w * 0.45, h * 0.45), VEGETATION, _scale(leaf, 0.9),
              tex=0.9, freq=5.0, grad=0.3),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Scene sampling.


def _sample_scene(rng: np.random.Generator) -> _Scene:
    noise = _Noise(rng)
    cam = _Camera(
        horizon=rng.uniform(0.36, 0.47),
        vanish=rng.uniform(0.85, 1.15),
        focal=rng.uniform(1.15, 1.45),
        height=rng.uniform(1.35, 1.65),
    )
    z_far = rng.uniform(55.0, 110.0)
    lane_w = rng.uniform(3.0, 3.6)
    n_lanes = int(rng.integers(2, 5))
    left_edge = -(int(rng.integers(n_lanes)) + 0.5) * lane_w
    right_edge = left_edge + n_lanes * lane_w
    lanes = [left_edge + (k + 0.5) * lane_w for k in range(n_lanes)]
    oncoming = int(rng.integers(0, n_lanes)) if rng.random() < 0.6 else 0

    grey = rng.uniform(75.0, 110.0)
    strips = [_Strip(left_edge, right_edge, ROAD, ASPHALT, _jitter(rng, (grey, grey, grey), 6))]
    curb = _jitter(rng, (165, 163, 158), 8)
    paving = _pick(rng, ((150, 140, 135), (125, 122, 120), (170, 160, 150), (140, 120, 115)), 8)
    grass = _pick(rng, ((120, 150, 70), (140, 160, 90), (150, 140, 90), (110, 135, 75)), 8)
    markings: list[tuple[float, float, float, float]] = []
    median = None
    if n_lanes >= 3 and rng.random() < 0.3:
        mid = left_edge + int(rng.integers(1, n_lanes)) * lane_w
        half = rng.uniform(0.6, 1.4)
        median = (mid - half, mid + half)
        strips += [
            _Strip(median[0] - 0.2, median[1] + 0.2, SIDEWALK, CURB, curb),
            _Strip(median[0], median[1], TERRAIN, GRASS, grass),
        ]
    for k in range(1, n_lanes):
        x = left_edge + k * lane_w
        if median is None or not median[0] - 0.5 < x < median[1] + 0.5:
            markings.append((x, 0.13, rng.uniform(6.0, 12.0), rng.uniform(0.3, 0.55)))
    if rng.random() < 0.6:
        markings += [(left_edge + 0.35, 0.14, 1.0, 1.0), (right_edge - 0.35, 0.14, 1.0, 1.0)]
    tram_lane = lanes[int(rng.integers(n_lanes))] if rng.random() < 0.35 else None
    rails = () if tram_lane is None else (tram_lane - 0.72, tram_lane + 0.72)

    sides: dict[int, _Side] = {}
    for side in (-1, 1):
        edge = left_edge if side < 0 else right_edge
        pieces: list[tuple[float, int, int, RGB]] = []
        if rng.random() < 0.25:
            pieces.append((rng.uniform(1.0, 3.0), TERRAIN, GRASS, grass))
        pieces.append((rng.uniform(0.2, 0.3), SIDEWALK, CURB, curb))
        walk_at = len(pieces)
        pieces.append((rng.uniform(2.0, 5.0), SIDEWALK, PAVING, paving))
        if rng.random() < 0.55:
            pieces.append((rng.uniform(1.5, 4.0), TERRAIN, GRASS, _jitter(rng, grass, 6)))
        x = edge
        edges = [x]
        for width, cls, surface, rgb in pieces:
            nx = x + side * width
            strips.append(_Strip(min(x, nx), max(x, nx), cls, surface, rgb))
            edges.append(nx)
            x = nx
        yard = (TERRAIN, GRASS, grass) if rng.random() < 0.5 else (SIDEWALK, PAVING, paving)
        strips.append(_Strip(min(x, x + side * 300), max(x, x + side * 300), *yard))
        sides[side] = _Side(
            road_edge=edge,
            walk_inner=edges[walk_at],
            walk_outer=edges[walk_at + 1],
            boundary=x,
            buildings=x + side * rng.uniform(0.0, 4.0),
        )

    crossing = zebra = None
    cross_rails: tuple[float, ...] = ()
    if rng.random() < 0.6:
        zc = rng.uniform(14.0, 32.0)
        half = rng.uniform(5.0, 8.0)
        crossing = (zc - half, zc + half)
        if rng.random() < 0.7:
            zebra = (zc - half - 3.5, zc - half - 0.5)
        if rng.random() < 0.4:
            cross_rails = (zc - 2.5, zc - 1.06)

    facades: list[_Facade] = []
    for side in (-1, 1):
        facades += _sample_facades(rng, cam, side, sides[side], crossing, z_far)
    sprites = _sample_sprites(
        rng, cam, lanes, oncoming, sides, crossing, tram_lane, cross_rails, z_far
    )
    clear = rng.random() < 0.65
    if clear:
        sky_top, sky_bottom = _jitter(rng, (70, 120, 200), 10), _jitter(rng, (175, 200, 230), 8)
    else:
        g = rng.uniform(170.0, 215.0)
        sky_top, sky_bottom = _jitter(rng, (g - 15, g - 10, g), 5), _jitter(rng, (g + 20,) * 3, 5)
    hood = None
    if rng.random() < 0.75:
        hood = (rng.uniform(0.84, 0.93), rng.uniform(0.05, 0.15), _pick(rng, CAR_PAINT, 10))
    shadow = None
    if rng.random() < 0.4:
        shadow = (rng.uniform(-3.0, 3.0), rng.uniform(-0.08, 0.08), 1 if rng.random() < 0.5 else -1)
    return _Scene(
        camera=cam,
        sky_top=sky_top,
        sky_bottom=sky_bottom,
        clouds=rng.uniform(0.0, 1.0) if clear else 0.3,
        strips=tuple(strips),
        markings=tuple(markings),
        rails=rails,
        crossing=crossing,
        zebra=zebra,
        cross_rails=cross_rails if crossing is not None else (),
        shadow_line=shadow,
        backdrop=(z_far, _sample_backdrop(rng, z_far)),
        facades=tuple(facades),
        sprites=sprites,
        hood=hood,
        light=rng.uniform(0.75, 1.15),
        tint=(rng.uniform(0.92, 1.08), rng.uniform(0.95, 1.05), rng.uniform(0.92, 1.08)),
        side_light=(rng.uniform(0.7, 1.1), rng.uniform(0.7, 1.1)),
        haze=rng.uniform(0.003, 0.012),
        grain=int(rng.integers(3, 9)),
        blur=bool(rng.random() < 0.5),
        noise=noise,
    )


def _first_visible_depth(cam: _Camera, offset: float) -> float:
    """Depth at which a facade at lateral `offset` enters the image at its left / right edge."""
    room = cam.vanish if offset < 0 else ASPECT - cam.vanish
    return max(1.0, cam.focal * abs(offset) / room)


def _sample_facades(
    rng: np.random.Generator,
    cam: _Camera,
    side: int,
    s: _Side,
    crossing: tuple[float, float] | None,
    z_far: float,
) -> list[_Facade]:
    """Buildings (or tree lines, in a park) along the building line, then a low boundary of
    walls, fences and hedges where it is set apart; both stop at the cross street."""
    park = rng.random() < 0.15
    buildings: list[_Segment] = []
    z = _first_visible_depth(cam, s.buildings)
    while z < z_far:
        z1 = min(z + rng.uniform(8.0, 30.0), z_far)
        if crossing is not None and z < crossing[1] and z1 > crossing[0]:
            if z < crossing[0]:
                buildings.append(_building(rng, z, crossing[0], park))
            z = crossing[1]
            continue
        buildings.append(_building(rng, z, z1, park))
        z = z1
    facades = [_Facade(side, s.buildings, tuple(buildings))]
    if abs(s.buildings - s.boundary) < 0.3 and rng.random() < 0.7:
        return facades
    boundary: list[_Segment] = []
    z = _first_visible_depth(cam, s.boundary)
    kinds = (WALL, WALL, FENCE, FENCE, VEGETATION, -1)
    while z < z_far:
        z1 = min(z + rng.uniform(6.0, 25.0), z_far)
        if crossing is not None and z < crossing[1] and z1 > crossing[0]:
            if z < crossing[0]:
                boundary.append(_boundary(rng, z, crossing[0], kinds[int(rng.integers(6))]))
            z = crossing[1]
            continue
        boundary.append(_boundary(rng, z, z1, kinds[int(rng.integers(6))]))
        z = z1
    return [*facades, _Facade(side, s.boundary, tuple(boundary))]


FACADE_PAINT: tuple[RGB, ...] = (
    (180, 170, 150), (150, 140, 130), (200, 190, 170), (120, 110, 105), (170, 120, 100),
    (210, 205, 195), (140, 150, 160), (100, 95, 90),
)  # fmt: skip


def _building(rng: np.random.Generator, z0: float, z1: float, park: bool) -> _Segment:
    if park or rng.random() < 0.1:
        return _Segment(z0, z1, VEGETATION, rng.uniform(5.0, 12.0), _pick(rng, LEAVES, 8))
    if rng.random() < 0.08:
        return _Segment(z0, z1, -1, 0.0, (0.0, 0.0, 0.0))
    glass = _pick(rng, ((50, 60, 75), (70, 85, 100), (35, 40, 45), (110, 120, 130)), 10)
    style = (rng.uniform(1.8, 3.6), rng.uniform(2.8, 3.6), rng.uniform(0.3, 0.6),
             rng.uniform(0.35, 0.6), *glass)  # fmt: skip
    return _Segment(z0, z1, BUILDING, rng.uniform(7.0, 26.0), _pick(rng, FACADE_PAINT, 12), style)


def _boundary(rng: np.random.Generator, z0: float, z1: float, cls: int) -> _Segment:
    if cls == WALL:
        rgb = _pick(rng, ((150, 150, 160), (170, 160, 140), (120, 120, 130), (185, 180, 170)), 8)
        return _Segment(z0, z1, WALL, rng.uniform(1.0, 2.6), rgb, (rng.uniform(0.3, 0.7),))
    if cls == FENCE:
        rgb = _pick(rng, ((110, 110, 105), (130, 95, 60), (60, 80, 60), (170, 170, 165)), 8)
        gap = _pick(rng, ((70, 80, 70), (90, 90, 95), (60, 70, 55)), 8)
        style = (rng.uniform(0.12, 0.3), rng.uniform(0.3, 0.6), *gap)
        return _Segment(z0, z1, FENCE, rng.uniform(1.0, 2.2), rgb, style)
    if cls == VEGETATION:
        return _Segment(z0, z1, VEGETATION, rng.uniform(0.9, 2.0), _pick(rng, LEAVES, 8))
    return _Segment(z0, z1, -1, 0.0, (0.0, 0.0, 0.0))


def _sample_backdrop(
    rng: np.random.Generator, z_far: float
) -> tuple[tuple[float, float, float, int, RGB], ...]:
    """Frontal blocks (x0, x1, height, class, colour) across the far end of the street."""
    blocks: list[tuple[float, float, float, int, RGB]] = []
    x = -z_far * 1.6
    while x < z_far * 1.6:
        w = rng.uniform(8.0, 30.0)
        u = rng.random()
        if u < 0.6:
            blocks.append(
                (x, x + w, rng.uniform(8.0, 35.0), BUILDING, _pick(rng, FACADE_PAINT, 10))
            )
        elif u < 0.85:
            blocks.append((x, x + w, rng.uniform(6.0, 15.0), VEGETATION, _pick(rng, LEAVES, 8)))
        x += w
    return tuple(blocks)


def _on_walk(rng: np.random.Generator, s: _Side) -> float:
    """A lateral position on the paved sidewalk."""
    return float(rng.uniform(min(s.walk_inner, s.walk_outer), max(s.walk_inner, s.walk_outer)))


def _sample_sprites(
    rng: np.random.Generator,
    cam: _Camera,
    lanes: list[float],
    oncoming: int,
    sides: dict[int, _Side],
    crossing: tuple[float, float] | None,
    tram_lane: float | None,
    cross_rails: tuple[float, ...],
    z_far: float,
) -> tuple[_Sprite, ...]:
    """Traffic in the lanes, traffic crossing at the cross street, and life on the sidewalks
    (people, poles with lights, signs and lamps, trees, parked cycles), sorted far to near."""
    sprites: list[_Sprite] = []
    near = cam.focal * cam.height / (1.0 - cam.horizon) + 1.0

    def add(x: float, z: float, prims: list[_Prim], shadow: float = 0.0) -> None:
        if near * 0.7 <= z < z_far - 2.0:
            sprites.append(_Sprite(x, z, tuple(prims), shadow))

    for k, lane in enumerate(lanes):
        view = "front" if k < oncoming else "rear"
        z = near + rng.uniform(-1.0, 10.0)
        while z < 70.0:
            if rng.random() < 0.6:
                u = rng.random()
                if lane == tram_lane and rng.random() < 0.45:
                    prims, half = _train(rng, view)
                elif u < 0.45:
                    prims, half = _car(rng, view)
                elif u < 0.58:
                    prims, half = _truck(rng, view)
                elif u < 0.72:
                    prims, half = _bus(rng, view)
                else:
                    prims, half = _cycle(rng, rng.random() < 0.55, True, view)
                add(lane + rng.uniform(-0.3, 0.3), z, prims, half)
            z += rng.uniform(8.0, 20.0)

    if crossing is not None:
        zc = (crossing[0] + crossing[1]) / 2
        for lz in (zc - 1.8, zc + 1.8):
            x = rng.uniform(-25.0, -5.0)
            while x < 25.0:
                u = rng.random()
                z = lz
                if cross_rails and lz < zc and rng.random() < 0.75:
                    prims, half = _train(rng, "side")
                    z = (cross_rails[0] + cross_rails[1]) / 2
                elif u < 0.3:
                    prims, half = _car(rng, "side")
                elif u < 0.48:
                    prims, half = _bus(rng, "side")
                elif u < 0.64:
                    prims, half = _truck(rng, "side")
                elif u < 0.86:
                    prims, half = _cycle(rng, rng.random() < 0.5, True, "side")
                else:
                    prims, half = [], 0.5
                if prims:
                    add(x + half, z + rng.uniform(-0.3, 0.3), prims)
                x += 2 * half + rng.uniform(2.0, 14.0)
        for _ in range(int(rng.integers(0, 4))):
            add(rng.uniform(lanes[0] - 1, lanes[-1] + 1), crossing[0] - rng.uniform(1.0, 3.5),
                _person(rng))  # fmt: skip

    for side, s in sides.items():
        toward = -side
        curb_x = s.walk_inner + side * 0.45
        if crossing is not None and rng.random() < 0.6:
            add(curb_x, crossing[0] - 0.5, _pole(rng, toward, "mast"))
        if rng.random() < 0.35:  # cyclists keeping to the edge of the road
            z = near + rng.uniform(0.0, 10.0)
            for _ in range(int(rng.integers(1, 4))):
                view = "rear" if side > 0 or oncoming == 0 else "front"
                prims, half = _cycle(rng, rng.random() < 0.3, True, view)
                add(s.road_edge - side * 0.8, z, prims, half)
                z += rng.uniform(4.0, 15.0)
        z = near + rng.uniform(-1.0, 6.0)
        while z < 60.0:
            u = rng.random()
            if u < 0.3:
                for _ in range(int(rng.integers(1, 4))):
                    add(_on_walk(rng, s), z + rng.uniform(-1.0, 1.0), _person(rng))
            elif u < 0.4:
                add(curb_x, z, _pole(rng, toward, "light"))
            elif u < 0.53:
                add(curb_x, z, _pole(rng, toward, "sign"))
            elif u < 0.6:
                add(curb_x, z, _pole(rng, toward, "lamp"))
            elif u < 0.7:
                add(s.boundary - side * rng.uniform(0.5, 1.5), z, _tree(rng))
            elif u < 0.96:  # a row of parked bicycles or motorcycles, side on
                motor = u >= 0.84
                x = _on_walk(rng, s)
                for k in range(int(rng.integers(1, 5))):
                    add(x, z + k * rng.uniform(0.7, 1.2), _cycle(rng, motor, False, "side")[0])
            else:
                add(s.boundary - side * 0.6, z, _bush(rng))
            z += rng.uniform(3.0, 9.0)
    sprites.sort(key=lambda sprite: -sprite.z)
    return tuple(sprites)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _render(
    scene: _Scene, height: int, width: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    canvas = _Canvas(height, width, scene.noise)
    cam = scene.camera
    _draw_sky(canvas, scene)
    _draw_ground(canvas, scene)
    _draw_backdrop(canvas, scene)
    for facade in scene.facades:
        _draw_front_faces(canvas, scene, facade)
    for facade in scene.facades:
        _draw_facade(canvas, scene, facade)
    for sprite in scene.sprites:
        scale = cam.focal / sprite.z
        ax, ay = cam.point(sprite.x, 0.0, sprite.z)
        if sprite.shadow:
            _draw_shadow(canvas, ax, ay, sprite.shadow * scale)
        fade = _fade(scene, sprite.z)
        for prim in sprite.prims:
            _draw_prim(canvas, prim, ax, ay, scale, fade)
    if scene.hood is not None:
        _draw_hood(canvas, scene.hood, scene.light)
    return _finish(canvas, scene, rng), canvas.label


def _fade(scene: _Scene, z: float, light: float = 1.0) -> Fade:
    """Colour transform at depth z: scene light times `light`, then haze towards the sky."""
    a = min(0.7, z * scene.haze)
    k = scene.light * light * (1.0 - a)
    sky = scene.sky_bottom

    def fade(rgb: RGB) -> RGB:
        return (rgb[0] * k + sky[0] * a, rgb[1] * k + sky[1] * a, rgb[2] * k + sky[2] * a)

    return fade


def _draw_sky(canvas: _Canvas, scene: _Scene) -> None:
    t = np.minimum(canvas.ys * F32(1.0 / scene.camera.horizon), F32(1.0))
    top = np.asarray(scene.sky_top, dtype=F32) * F32(scene.light)
    bottom = np.asarray(scene.sky_bottom, dtype=F32) * F32(scene.light)
    canvas.image[:] = (top[None, :] + (bottom - top)[None, :] * t[:, None])[:, None, :]
    if scene.clouds > 0.05:
        rows = min(canvas.h, math.ceil(scene.camera.horizon * canvas.h))
        n = canvas.field(2)[:rows]
        cover = np.clip((n - F32(1.0 - 0.6 * scene.clouds)) * F32(3.0), F32(0.0), F32(1.0))
        sky = canvas.image[:rows]
        sky += (F32(235.0 * scene.light) - sky) * cover[..., None]


def _strip_table(strips: Sequence[_Strip]) -> tuple[Array, list[_Strip]]:
    """Breakpoints and, per interval between them (and beyond both ends), the strip on top."""
    points = sorted({v for s in strips for v in (s.x0, s.x1)})
    top: list[_Strip] = []
    for k in range(len(points) + 1):
        lo = points[max(k - 1, 0)]
        hi = points[min(k, len(points) - 1)]
        mid = (lo + hi) / 2 if 0 < k < len(points) else (lo - 1 if k == 0 else hi + 1)
        covering = [s for s in strips if s.x0 <= mid < s.x1]
        if covering:
            top.append(covering[-1])
        else:
            nearest = min(strips, key=lambda s: min(abs(s.x0 - mid), abs(s.x1 - mid)))
            top.append(nearest)
    return np.asarray(points, dtype=F32), top


def _draw_ground(canvas: _Canvas, scene: _Scene) -> None:
    """Road, curbs, sidewalks and verges by lateral position on the ground plane, with
    markings, rails, a crosswalk and shadows painted on."""
    cam = scene.camera
    r0 = min(canvas.h, math.floor(cam.horizon * canvas.h - 0.5) + 1)
    while r0 < canvas.h and float(canvas.ys[r0]) <= cam.horizon + 1e-4:
        r0 += 1
    if r0 >= canvas.h:
        return
    z = F32(cam.focal * cam.height) / (canvas.ys[r0:] - F32(cam.horizon))
    x = (canvas.xs - F32(cam.vanish))[None, :] * (z * F32(1.0 / cam.focal))[:, None]
    points, top = _strip_table(scene.strips)
    idx = np.searchsorted(points, x, side="right")
    cls_t = np.asarray([s.cls for s in top], dtype=np.uint8)
    surf_t = np.asarray([s.surface for s in top], dtype=np.uint8)
    rgb_t = np.asarray([s.rgb for s in top], dtype=F32)
    if scene.crossing is not None:
        band = (z >= F32(scene.crossing[0])) & (z < F32(scene.crossing[1]))
        road = int(np.nonzero(cls_t == ROAD)[0][0])
        idx[band] = road
    label = np.take(cls_t, idx)
    surface = np.take(surf_t, idx)
    rgb = np.take(rgb_t, idx, axis=0)
    # texture: coarse and fine screen noise, tile joints for paving
    coarse = canvas.field(1)[r0:]
    fine = canvas.field(6)[r0:]
    a = np.take(np.asarray([0.85, 0.95, 0.9, 0.75], dtype=F32), surface)
    b = np.take(np.asarray([0.25, 0.05, 0.2, 0.45], dtype=F32), surface)
    c = np.take(np.asarray([0.12, 0.08, 0.05, 0.12], dtype=F32), surface)
    shade = a + b * coarse + c * fine
    gx = x * F32(2.5)
    gz = z * F32(2.5)
    joint = ((gx - np.floor(gx)) < F32(0.08)) | ((gz - np.floor(gz)) < F32(0.08))[:, None]
    shade -= (joint & (surface == PAVING)) * F32(0.25)
    rgb *= shade[..., None]
    asphalt = surface == ASPHALT
    paint = np.zeros(x.shape, dtype=bool)
    open_road = np.ones(z.shape, dtype=bool)
    if scene.crossing is not None:
        open_road = (z < F32(scene.crossing[0])) | (z >= F32(scene.crossing[1]))
    for mx, mw, period, duty in scene.markings:
        along = z * F32(1.0 / period)
        dashed = ((along - np.floor(along)) < F32(duty)) & open_road
        paint |= (np.abs(x - F32(mx)) < F32(mw / 2)) & dashed[:, None]
    if scene.zebra is not None:
        band = (z >= F32(scene.zebra[0])) & (z < F32(scene.zebra[1]))
        stripes = x * F32(1.0 / 1.1)
        paint |= ((stripes - np.floor(stripes)) < F32(0.5)) & band[:, None]
    paint &= asphalt
    rgb[paint] = np.asarray((225.0, 225.0, 220.0), dtype=F32) * shade[paint][:, None]
    rail = np.zeros(x.shape, dtype=bool)
    for rx in scene.rails:
        rail |= np.abs(x - F32(rx)) < F32(0.05)
    for rz in scene.cross_rails:
        rail |= (np.abs(z - F32(rz)) < F32(0.05))[:, None]
    rgb[rail & asphalt] = np.asarray((60.0, 58.0, 55.0), dtype=F32)
    if scene.shadow_line is not None:
        a0, b0, side = scene.shadow_line
        dark = (x - F32(a0) - z[:, None] * F32(b0)) * F32(side) > 0
        rgb[dark] *= F32(0.6)
    fog = np.minimum(z * F32(scene.haze), F32(0.7))
    sky = np.asarray(scene.sky_bottom, dtype=F32)
    rgb *= F32(scene.light)
    rgb += (sky[None, None, :] - rgb) * fog[:, None, None]
    canvas.label[r0:] = label
    canvas.image[r0:] = rgb


def _draw_backdrop(canvas: _Canvas, scene: _Scene) -> None:
    cam = scene.camera
    z, blocks = scene.backdrop
    scale = cam.focal / z
    fade = _fade(scene, z)
    for x0, x1, h, cls, rgb in blocks:
        ax, ay = cam.point(x0, 0.0, z)
        veg = cls == VEGETATION
        prim = _box(
            0.0, 0.0, x1 - x0, h, cls, rgb, tex=0.6 if veg else 0.1, freq=3.0 if veg else 0.3
        )
        _draw_prim(canvas, prim, ax, ay, scale, fade)


def _draw_front_faces(canvas: _Canvas, scene: _Scene, facade: _Facade) -> None:
    """Street-facing end walls of buildings, seen where a nearer segment is lower."""
    cam = scene.camera
    light = scene.side_light[0 if facade.side < 0 else 1] * 0.85
    for seg in sorted(facade.segments, key=lambda s: -s.z0):
        if seg.cls != BUILDING:
            continue
        ax, ay = cam.point(facade.offset, 0.0, seg.z0)
        prim = _box(0.0, 0.0, 80.0 * facade.side, seg.height, BUILDING, seg.rgb, tex=0.1, freq=0.5)
        _draw_prim(canvas, prim, ax, ay, cam.focal / seg.z0, _fade(scene, seg.z0, light))


def _draw_facade(canvas: _Canvas, scene: _Scene, facade: _Facade) -> None:
    """Surfaces parallel to the street: column x shows depth z = f * offset / (x - vanish)."""
    segments = facade.segments
    if not segments:
        return
    cam = scene.camera
    rel = canvas.xs - F32(cam.vanish)
    on_side = rel * F32(facade.side) > F32(1e-4)
    zc: Array = (F32(cam.focal * facade.offset) / np.where(on_side, rel, F32(1.0))).astype(F32)
    bounds = np.asarray([s.z0 for s in segments] + [segments[-1].z1], dtype=F32)
    seg = np.searchsorted(bounds, zc, side="right") - 1
    seg_c = np.clip(seg, 0, len(segments) - 1)
    cls_t = np.asarray([s.cls for s in segments], dtype=np.int64)
    valid = on_side & (seg >= 0) & (seg < len(segments)) & (cls_t[seg_c] >= 0)
    # covered by an earlier segment's z range only: gaps between segments stay open
    valid &= zc < np.asarray([s.z1 for s in segments], dtype=F32)[seg_c]
    cols = np.nonzero(valid)[0]
    if cols.size == 0:
        return
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    valid, zc, seg_c = valid[c0:c1], zc[c0:c1], seg_c[c0:c1]
    zc = np.where(valid, zc, F32(1.0)).astype(F32, copy=False)
    cls_w = cls_t[seg_c]
    heights = np.asarray([s.height for s in segments], dtype=F32)[seg_c]
    veg = cls_w == VEGETATION
    if veg.any():
        wave = canvas.noise(1, zc * F32(0.25), np.asarray([3.5 + facade.side], dtype=F32))[0]
        heights = np.where(veg, heights * (F32(0.75) + F32(0.5) * wave), heights)
    top = np.where(valid, F32(cam.horizon) + F32(cam.focal) * (F32(cam.height) - heights) / zc, 2)
    bottom = np.where(valid, F32(cam.horizon) + F32(cam.focal * cam.height) / zc, -1)
    r0, r1 = canvas.rows(float(top.min()), float(bottom.max()))
    if r0 >= r1:
        return
    ys = canvas.ys[r0:r1]
    mask = (ys[:, None] >= top[None, :]) & (ys[:, None] < bottom[None, :])
    # facade coordinates: s along the street (= depth), t height above the ground
    t = F32(cam.height) - (ys[:, None] - F32(cam.horizon)) * (zc * F32(1.0 / cam.focal))[None, :]
    style = np.asarray([s.style[:7] + (0.0,) * (7 - len(s.style[:7])) for s in segments], F32)[
        seg_c
    ]
    colour = np.broadcast_to(
        np.asarray([s.rgb for s in segments], dtype=F32)[seg_c][None, :, :], (*mask.shape, 3)
    ).copy()
    coarse = canvas.field(2)[r0:r1, c0:c1]
    fine = canvas.field(5)[r0:r1, c0:c1]
    shade = F32(0.92) + F32(0.16) * coarse
    if (cls_w == BUILDING).any():
        u = zc / style[:, 0]
        v = t / style[:, 1][None, :]
        fu = (u - np.floor(u))[None, :]
        fv = v - np.floor(v)
        margin = style[:, 2][None, :] * F32(0.5)
        window = (fu > margin) & (fu < F32(1.0) - margin) & (fv > F32(0.25))
        window &= (fv < F32(0.25) + style[:, 3][None, :]) & (t > F32(2.5))
        window &= (t < heights[None, :] - F32(0.8)) & (cls_w == BUILDING)[None, :]
        cell = (
            np.floor(u).astype(np.int64)[None, :] * 73856093
            ^ np.floor(v).astype(np.int64) * 19349663
        )
        glint = F32(0.8) + F32(0.4 / 255) * (cell & 255).astype(F32)
        glass = style[None, :, 4:7] * glint[..., None]
        colour = np.where(window[..., None], glass, colour)
    if veg.any():
        shade = np.where(veg[None, :], F32(0.55) + F32(0.5) * coarse + F32(0.5) * fine, shade)
    wall = cls_w == WALL
    if wall.any():
        v = t / style[:, 0][None, :]
        joint = (v - np.floor(v)) < F32(0.07)
        shade -= (joint & wall[None, :]) * F32(0.2)
    fence = cls_w == FENCE
    if fence.any():
        u = zc / style[:, 0]
        bar = (
            ((u - np.floor(u)) < style[:, 1])[None, :]
            | (t > heights[None, :] - F32(0.1))
            | (t < F32(0.12))
        )
        colour = np.where((~bar & fence[None, :])[..., None], style[None, :, 2:5], colour)
    light = F32(scene.light * scene.side_light[0 if facade.side < 0 else 1])
    fog = np.minimum(zc * F32(scene.haze), F32(0.7))
    sky = np.asarray(scene.sky_bottom, dtype=F32)
    colour *= (shade * light)[..., None]
    colour += (sky[None, None, :] - colour) * fog[None, :, None]
    window_label = canvas.label[r0:r1, c0:c1]
    np.copyto(
        window_label, np.broadcast_to(cls_w.astype(np.uint8)[None, :], mask.shape), where=mask
    )
    np.copyto(canvas.image[r0:r1, c0:c1], colour, where=mask[..., None])


def _draw_shadow(canvas: _Canvas, ax: float, ay: float, half: float) -> None:
    """Darken the ground in a flat ellipse under a vehicle."""
    rx, ry = half * 1.15, max(half * 0.12, 1.0 / canvas.h)
    c0, c1 = canvas.cols(ax - rx, ax + rx)
    r0, r1 = canvas.rows(ay - ry, ay + ry)
    if c0 >= c1 or r0 >= r1:
        return
    ex = (canvas.xs[c0:c1] - F32(ax)) * F32(1.0 / rx)
    ey = (canvas.ys[r0:r1] - F32(ay)) * F32(1.0 / ry)
    inside = ex[None, :] * ex[None, :] + ey[:, None] * ey[:, None] <= F32(1.0)
    inside &= canvas.label[r0:r1, c0:c1] <= SIDEWALK
    window = canvas.image[r0:r1, c0:c1]
    window[inside] *= F32(0.45)


def _draw_hood(canvas: _Canvas, hood: tuple[float, float, RGB], light: float) -> None:
    """The ego vehicle's bonnet along the bottom edge: void."""
    top, curve, rgb = hood
    r0 = canvas.rows(top, 1.0)[0]
    if r0 >= canvas.h:
        return
    dx = canvas.xs - F32(ASPECT / 2)
    edge = F32(top) + F32(curve) * dx * dx
    below = canvas.ys[r0:, None] - edge[None, :]
    depth = np.minimum(np.maximum(below * F32(8.0), F32(0.0)), F32(1.0))
    shade = F32(0.55 * light) + F32(0.35 * light) * depth
    colour = np.asarray(rgb, dtype=F32) * shade[..., None]
    canvas.paint(r0, canvas.h, 0, canvas.w, below >= 0, IGNORE_INDEX, colour)


def _finish(canvas: _Canvas, scene: _Scene, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Colour cast, optional [1 2 1] blur, grain, rounding to uint8."""
    img = canvas.image
    img *= np.asarray(scene.tint, dtype=F32)
    if scene.blur:
        rows = img.copy()
        rows[:, 1:-1] += img[:, 1:-1]
        rows[:, 1:-1] += img[:, :-2]
        rows[:, 1:-1] += img[:, 2:]
        rows[:, 1:-1] *= F32(0.25)
        img[1:-1] = rows[1:-1] + rows[1:-1]
        img[1:-1] += rows[:-2]
        img[1:-1] += rows[2:]
        img[1:-1] *= F32(0.25)
        img[0] = rows[0]
        img[-1] = rows[-1]
    grain = rng.integers(-scene.grain, scene.grain + 1, size=(canvas.h, canvas.w, 1), dtype=np.int8)
    img += grain
    np.rint(img, out=img)
    np.clip(img, F32(0.0), F32(255.0), out=img)
    return img.astype(np.uint8)
