"""Camera 3D detection task: multi-camera images in, nuScenes boxes and NDS out.

Samples are `harness.datasets.scenes.SceneSample`s (six RGB images, the camera rig, ground-truth
`Box3D`s with `num_pts`). The program input `image` is one sample's six images, normalised as
FastBEV expects ((x - IMAGE_MEAN) / IMAGE_STD on 0..255 RGB) and stacked channels-first,
[B*6, 3, H, W] for a batch of B samples. What the program outputs is the model's business: the
case names a decoder (`task_args: {decoder: "module:Class", decoder_args: {...}}`, e.g.
`harness.zoo.fastbev:AnchorRowDecoder`, CUDA-FastBEV's CPU scale-NMS over the seed post graph's
rows) that turns one sample's outputs into `Detections`; `decode` gives the `nds` metric
(`harness.metrics.nds`) box lists with mmdet3d's attributes.

Predicted attributes follow mmdet3d's nuScenes formatting (FastBEV's evaluation): a box moving
faster than 0.2 m/s is `vehicle.moving` (cars, trucks, buses, trailers, construction vehicles)
or `cycle.with_rider` (bicycles, motorcycles); a slower pedestrian is `pedestrian.standing` and a
slower bus `vehicle.stopped`; every other box takes its class's default attribute.

Boxes with NaN or Inf in any field are reported before the metric runs, naming the sample and
the box (the devkit crashes on them in user reports).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from harness.errors import HarnessError
from harness.factory import FactoryError, resolve
from harness.metrics.nds import DETECTION_CLASSES
from harness.tasks.base import Batch, Dataset, TaskAdapter
from harness.tasks.options import NORMALISATION_KEYS, Normalisation, TaskOptions

if TYPE_CHECKING:
    from harness.cases import Case

CLASSES = DETECTION_CLASSES
OUTPUT_NAMES: tuple[str, ...] = ("cls_score", "bbox_pred", "dir_cls_preds")
IMAGE_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGE_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
"""FastBEV's `img_norm_cfg` on 0..255 RGB (mmdet's ImageNet statistics)."""
_TASK_ARGS = frozenset({"decoder", "decoder_args"}) | NORMALISATION_KEYS
CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
"""Camera names in the order images and matrices are stacked (nuScenes)."""
AGREEMENT_DISTANCE = 1.0
"""Two backends' boxes agree when they have the same class and centres closer than this (m)."""
PICTURE_SCORE = 0.3
"""Predicted boxes below this score are left out of the pictures."""

DEFAULT_ATTRIBUTE: Mapping[str, str] = {
    "car": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "trailer": "vehicle.parked",
    "construction_vehicle": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider",
    "traffic_cone": "",
    "barrier": "",
}
"""mmdet3d's `NuScenesDataset.DefaultAttribute`."""
_VEHICLES = frozenset({"car", "truck", "bus", "trailer", "construction_vehicle"})
_CYCLES = frozenset({"bicycle", "motorcycle"})


FASTBEV_NORM = Normalisation(IMAGE_MEAN, IMAGE_STD, "rgb", 1.0)
"""FastBEV's `img_norm_cfg`: (x - IMAGE_MEAN) / IMAGE_STD on 0..255 RGB."""


def preprocess(images: npt.NDArray[np.uint8], norm: Normalisation = FASTBEV_NORM) -> npt.NDArray[np.float32]:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 normalised by `norm` (default FastBEV's
    `img_norm_cfg`: (x - IMAGE_MEAN) / IMAGE_STD, to_rgb, 0..255 scale)."""
    return norm.apply(images)


def denormalize(images: npt.NDArray[np.float32], norm: Normalisation = FASTBEV_NORM) -> npt.NDArray[np.uint8]:
    """Inverse of `preprocess` for pictures: (N, 3, H, W) -> (N, H, W, 3) uint8 RGB."""
    return norm.invert(images)


FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Detections:
    """Final boxes of one sample (numpy): centre z, sizes (w, l, h), labels index `classes`."""

    center: FloatArray
    size: FloatArray
    yaw: FloatArray
    velocity: FloatArray
    score: FloatArray
    label: npt.NDArray[np.int64]
    classes: tuple[str, ...] = field(default=CLASSES)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to_boxes(self) -> list[dict[str, Any]]:
        """Boxes as `harness.metrics.nds` mappings (attribute '')."""
        return [
            {
                "label": self.classes[int(self.label[i])],
                "center": [float(v) for v in self.center[i]],
                "size": [float(v) for v in self.size[i]],
                "yaw": float(self.yaw[i]),
                "velocity": [float(v) for v in self.velocity[i]],
                "attribute": "",
                "score": float(self.score[i]),
            }
            for i in range(len(self))
        ]


class Decoder(Protocol):
    """Turns sample `index` of a batch's program outputs (numpy) into final boxes."""

    def __call__(self, outputs: Mapping[str, np.ndarray], index: int) -> Detections: ...


def predicted_attribute(label: str, velocity: Sequence[float]) -> str:
    """mmdet3d's attribute for a predicted box of class `label` moving at `velocity` (m/s)."""
    if math.hypot(float(velocity[0]), float(velocity[1])) > 0.2:
        if label in _VEHICLES:
            return "vehicle.moving"
        if label in _CYCLES:
            return "cycle.with_rider"
    elif label == "pedestrian":
        return "pedestrian.standing"
    elif label == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTE[label]


def prediction_boxes(detections: Detections) -> list[dict[str, Any]]:
    """Boxes in `harness.metrics.nds` form with mmdet3d's attributes."""
    boxes = detections.to_boxes()
    for box in boxes:
        box["attribute"] = predicted_attribute(box["label"], box["velocity"])
    return boxes


def ground_truth_boxes(boxes: Sequence[Any]) -> list[dict[str, Any]]:
    """`Box3D`-like records (label, center, size, yaw, velocity, attribute, num_pts) as
    `harness.metrics.nds` boxes; `num_pts` None leaves the metric's default (1)."""
    out = []
    for b in boxes:
        box: dict[str, Any] = {
            "label": b.label,
            "center": [float(v) for v in b.center],
            "size": [float(v) for v in b.size],
            "yaw": float(b.yaw),
            "velocity": [float(v) for v in b.velocity],
            "attribute": b.attribute,
        }
        if getattr(b, "num_pts", None) is not None:
            box["num_pts"] = int(b.num_pts)
        out.append(box)
    return out


@dataclass(frozen=True)
class Detection3DTarget:
    """What the metric and the pictures need of one sample."""

    token: str
    boxes: tuple[Any, ...]
    lidar2img: npt.NDArray[np.float32]


class Detection3DTask(TaskAdapter):
    """Six-camera images in, the model's outputs decoded by the case's decoder into boxes.

    task_args: `decoder` ("module:Class", required for metrics and agreement: called with
    `decoder_args` once, then with (outputs, sample index) per sample), `decoder_args`; `mean`,
    `std` (3 numbers each on the 0..255 scale, default FastBEV's `img_norm_cfg`) and
    `channel_order` (rgb | bgr, the order the model takes; mean and std in that order).
    Predictions are "boxes3d": per sample, `harness.metrics.nds` box mappings.
    """

    input_names = ("image",)
    output_names = OUTPUT_NAMES
    prediction_kind = "boxes3d"

    def __init__(self, case: Case):
        super().__init__(case)
        args = case.spec.task_args
        self.norm = TaskOptions(case, "detection3d", _TASK_ARGS).normalisation(IMAGE_MEAN, IMAGE_STD, 1.0)
        self.decoder: Decoder | None = None
        spec = args.get("decoder")
        if spec is None:
            if case.spec.metric is not None:
                raise case.error("the detection3d task needs a decoder (task_args.decoder: \"module:Class\") "
                                 "to turn outputs into boxes for the metric", "task_args")
            return
        try:
            self.decoder = resolve(str(spec))(**dict(args.get("decoder_args") or {}))
        except FactoryError as exc:
            raise case.error(str(exc), "task_args", "decoder") from exc
        except (TypeError, ValueError, HarnessError) as exc:
            raise case.error(f"{spec} rejected its arguments: {exc}", "task_args", "decoder_args") from exc

    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """The first sample's images (the staged model runs each stage once per sample)."""
        if count != 1:
            raise self.case.error(f"detection3d golden files hold one sample (its stages run once per sample), "
                                  f"got golden.samples {count}", "golden", "samples")
        return {"image": torch.from_numpy(preprocess(dataset[0].images, self.norm))}

    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Preprocessed images of `batch_size` samples each, targets `Detection3DTarget`s."""
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = np.concatenate([s.images for s in samples])
            targets = tuple(Detection3DTarget(s.token, tuple(s.boxes), np.asarray(s.lidar2img)) for s in samples)
            yield Batch({"image": torch.from_numpy(preprocess(images, self.norm))}, targets, tuple(t.token for t in targets))

    def detections(self, outputs: Mapping[str, torch.Tensor], index: int) -> Detections:
        """Final boxes of sample `index` of a batch's outputs (the case's decoder)."""
        if self.decoder is None:
            raise HarnessError(f"{self.case.path}: task_args.decoder is not set; the detection3d task cannot "
                               "decode boxes without it")
        arrays = {k: v.detach().cpu().numpy() for k, v in outputs.items()}
        return self.decoder(arrays, index)

    def decode(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> list[list[dict[str, Any]]]:
        """Per sample: the decoded boxes as `harness.metrics.nds` mappings with mmdet3d's attributes."""
        return [prediction_boxes(self.detections(outputs, k)) for k in range(len(batch.targets))]

    def targets(self, batch: Batch) -> list[list[dict[str, Any]]]:
        """Per sample: the ground-truth boxes as `harness.metrics.nds` mappings."""
        return [ground_truth_boxes(t.boxes) for t in batch.targets]

    def agreement(self, a: Sequence[Sequence[Mapping[str, Any]]], b: Sequence[Sequence[Mapping[str, Any]]],
                  batch: Batch) -> tuple[int, int]:
        """Decoded boxes of two backends that match (same class, centres closer than
        AGREEMENT_DISTANCE, one to one, greedily by descending score), out of all boxes of either
        (matched pairs counted once): identical box sets give 1, disjoint ones 0."""
        agree = total = 0
        for boxes_a, boxes_b in zip(a, b, strict=True):
            da, db = detections_of(boxes_a), detections_of(boxes_b)
            matched = match_count(da, db, AGREEMENT_DISTANCE)
            agree += matched
            total += len(da) + len(db) - matched
        return agree, total

    def pictures(self, batch: Batch, outputs: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path,
                 prefix: str) -> list[Path]:
        """Per sample: a BEV plot (ground truth, float, backend boxes) and the six camera images
        with the boxes projected (ground truth thin, float and backend)."""
        images = denormalize(batch.inputs["image"].numpy(), self.norm)
        ncam = images.shape[0] // max(len(batch.targets), 1)
        written: list[Path] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, target in enumerate(batch.targets):
            dets = {name: self.detections(o, k) for name, o in outputs.items()}
            stem = f"{prefix}-{target.token}"
            written.append(bev_plot(target.boxes, dets, out_dir / f"{stem}-bev.png", target.token))
            written.append(camera_plot(images[k * ncam:(k + 1) * ncam], target.lidar2img, target.boxes, dets,
                                            out_dir / f"{stem}-cameras.png", target.token))
        return written


def detections_of(boxes: Sequence[Mapping[str, Any]]) -> Detections:
    """`harness.metrics.nds` box mappings (with scores) as `Detections` arrays."""
    index = {name: i for i, name in enumerate(CLASSES)}
    def rows(key: str, width: int) -> FloatArray:
        return np.asarray([b[key] for b in boxes], dtype=np.float64).reshape(len(boxes), width)
    return Detections(rows("center", 3), rows("size", 3), rows("yaw", 1)[:, 0], rows("velocity", 2),
                      rows("score", 1)[:, 0], np.asarray([index[b["label"]] for b in boxes], dtype=np.int64))


def match_count(a: Detections, b: Detections, distance: float) -> int:
    """One-to-one matches between two box sets: boxes of `a` by descending score each take the
    nearest unmatched box of `b` with the same label whose BEV centre is closer than `distance`."""
    if len(a) == 0 or len(b) == 0:
        return 0
    d = np.hypot(a.center[:, None, 0] - b.center[None, :, 0], a.center[:, None, 1] - b.center[None, :, 1])
    d = np.where(a.label[:, None] == b.label[None, :], d, np.inf)
    taken = np.zeros(len(b), dtype=bool)
    matched = 0
    for i in np.argsort(-a.score, kind="stable"):
        row = np.where(taken, np.inf, d[i])
        j = int(np.argmin(row))
        if row[j] < distance:
            taken[j] = True
            matched += 1
    return matched


# ---------------------------------------------------------------------------------------------
# Pictures (matplotlib, Agg canvas; no global pyplot state)

_GT_STYLE: dict[str, Any] = {"color": "#2ca02c", "linewidth": 1.2}
_COLOURS = (("blue", "#1f77b4"), ("red", "#d62728"), ("orange", "#ff7f0e"), ("purple", "#9467bd"), ("brown", "#8c564b"))
_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


def _style(index: int) -> dict[str, Any]:
    return {"color": _COLOURS[index % len(_COLOURS)][1], "linewidth": 1.0, "linestyle": "-" if index == 0 else "--"}


def _arrays(boxes: Sequence[Any] | Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres [N, 3], sizes [N, 3], yaws [N]) of GT records or of detections above PICTURE_SCORE."""
    if isinstance(boxes, Detections):
        keep = boxes.score >= PICTURE_SCORE
        return boxes.center[keep], boxes.size[keep], boxes.yaw[keep]
    if not boxes:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0)
    return (np.array([b.center for b in boxes], dtype=np.float64), np.array([b.size for b in boxes], dtype=np.float64),
            np.array([b.yaw for b in boxes], dtype=np.float64))


def box_corners(center: np.ndarray, size: np.ndarray, yaw: float) -> np.ndarray:
    """The 8 corners [8, 3] of a box (centre z; size w, l, h with l along `yaw`): bottom face
    front-left, front-right, back-right, back-left, then the top face in the same order."""
    w, length, h = (float(v) for v in size)
    local = np.array([[length, w, -h], [length, -w, -h], [-length, -w, -h], [-length, w, -h],
                      [length, w, h], [length, -w, h], [-length, -w, h], [-length, w, h]]) / 2.0
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    corners: np.ndarray = local @ rot.T + np.asarray(center, dtype=np.float64)
    return corners


def bev_plot(gt: Sequence[Any], detections: Mapping[str, Detections], path: Path, title: str) -> Path:
    """Bird's-eye view of one sample: ground truth and each backend's boxes (score >=
    PICTURE_SCORE) with a heading tick, ego at the origin, x up; written as PNG to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    sets = [("ground truth", _arrays(gt), _GT_STYLE)]
    sets += [(name, _arrays(d), _style(i)) for i, (name, d) in enumerate(detections.items())]
    extent = 10.0
    for label, (centres, sizes, yaws), style in sets:
        for k in range(len(yaws)):
            corners = box_corners(centres[k], sizes[k], float(yaws[k]))[:4]
            ring = np.vstack((corners, corners[:1]))
            # plot with x up and y to the left, as a driver's map
            ax.plot(-ring[:, 1], ring[:, 0], label=label if k == 0 else None, **style)
            front = corners[:2].mean(axis=0)
            ax.plot([-centres[k, 1], -front[1]], [centres[k, 0], front[0]], **style)
        if len(yaws):
            extent = max(extent, float(np.abs(centres[:, :2]).max()) + 5.0)
    extent = min(extent, 80.0)
    ax.plot([0.0], [0.0], marker="^", color="black", markersize=6)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("-y (m)")
    ax.set_ylabel("x (m)")
    ax.grid(True, linewidth=0.3)
    ax.set_title(f"{title}: BEV (predictions with score >= {PICTURE_SCORE})", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def camera_plot(images: npt.NDArray[np.uint8], lidar2img: npt.NDArray[Any], gt: Sequence[Any],
                detections: Mapping[str, Detections], path: Path, title: str) -> Path:
    """The sample's camera images (N, H, W, 3) in a grid with every box set projected through
    `lidar2img` (N, 4, 4): ground truth thin green, each backend in its colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncam, height, width = images.shape[:3]
    cols = min(3, ncam)
    rows = math.ceil(ncam / cols)
    scale = 5.0 / max(width, 1) * 1.4
    fig = Figure(figsize=(cols * width * scale, rows * height * scale + 0.6))
    FigureCanvasAgg(fig)
    sets = [("ground truth", _arrays(gt), _GT_STYLE)]
    sets += [(name, _arrays(d), _style(i)) for i, (name, d) in enumerate(detections.items())]
    for cam in range(ncam):
        ax = fig.add_subplot(rows, cols, cam + 1)
        ax.imshow(images[cam], interpolation="nearest")
        proj = np.asarray(lidar2img[cam], dtype=np.float64)
        for _, (centres, sizes, yaws), style in sets:
            for k in range(len(yaws)):
                corners = box_corners(centres[k], sizes[k], float(yaws[k]))
                uvd = np.hstack((corners, np.ones((8, 1)))) @ proj.T
                if (uvd[:, 2] <= 0.1).any():
                    continue
                u, v = uvd[:, 0] / uvd[:, 2], uvd[:, 1] / uvd[:, 2]
                if u.max() < 0 or u.min() >= width or v.max() < 0 or v.min() >= height:
                    continue
                for i, j in _EDGES:
                    ax.plot([u[i], u[j]], [v[i], v[j]], **style)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_axis_off()
        ax.set_title(CAMERAS[cam] if ncam == len(CAMERAS) else f"camera {cam}", fontsize=8)
    names = ", ".join(["ground truth (green)"] + [f"{n} ({_COLOURS[i % len(_COLOURS)][0]})"
                                                   for i, n in enumerate(detections)])
    fig.suptitle(f"{title}: {names}; predictions with score >= {PICTURE_SCORE}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
