"""Camera 3D detection task: multi-camera images in, nuScenes boxes and NDS out.

Samples are `harness.datasets.scenes.SceneSample`s (six RGB images, the camera rig, ground-truth
`Box3D`s with `num_pts`). The program input `image` is one sample's six images, normalised as
FastBEV expects ((x - IMAGE_MEAN) / IMAGE_STD on 0..255 RGB) and stacked channels-first,
[B*6, 3, H, W] for a batch of B samples. The program's outputs are the seed post graph's
`cls_score` [B, K, 10], `bbox_pred` [B, K, 9] (decoded, bottom z) and `dir_cls_preds` [B, K];
`harness.zoo.fastbev.postprocess` (CUDA-FastBEV's CPU scale-NMS) turns each sample's rows into
boxes, and `harness.metrics.nds.evaluate` scores all samples of the split at once.

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from harness.errors import HarnessError, MetricError
from harness.metrics import nds
from harness.tasks.base import Batch, Dataset, MetricAccumulator, MetricValues, TaskAdapter
from harness.zoo.fastbev import CLASSES, IMAGE_MEAN, IMAGE_STD, Detections, NMSConfig, postprocess

if TYPE_CHECKING:
    from harness.cases import Case

OUTPUT_NAMES: tuple[str, ...] = ("cls_score", "bbox_pred", "dir_cls_preds")
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


def preprocess(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 (x - IMAGE_MEAN) / IMAGE_STD, FastBEV's
    `img_norm_cfg` (to_rgb, 0..255 scale)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise HarnessError(
            f"preprocess expects (N, H, W, 3) uint8 RGB images, got {images.dtype} {images.shape}"
        )
    x = images.astype(np.float32)
    x -= np.asarray(IMAGE_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGE_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def denormalize(images: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Inverse of `preprocess` for pictures: (N, 3, H, W) -> (N, H, W, 3) uint8."""
    x = images.transpose(0, 2, 3, 1) * np.asarray(IMAGE_STD, np.float32)
    x += np.asarray(IMAGE_MEAN, np.float32)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


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


def check_finite(sample: str, boxes: Sequence[Mapping[str, Any]], source: str = "predicted") -> None:
    """MetricError naming the sample, the box and the field of the first box with NaN or Inf."""
    for k, box in enumerate(boxes):
        for key in ("center", "size", "yaw", "velocity", "score"):
            if key not in box:
                continue
            values = np.asarray(box[key], dtype=np.float64)
            if not np.isfinite(values).all():
                raise MetricError(
                    f"sample {sample!r}: {source} box {k} ({box.get('label')}) has a non-finite "
                    f"{key} {np.asarray(values).tolist()}"
                )


@dataclass(frozen=True)
class Detection3DTarget:
    """What the metric and the pictures need of one sample."""

    token: str
    boxes: tuple[Any, ...]
    lidar2img: npt.NDArray[np.float32]


def _sample_rows(outputs: Mapping[str, torch.Tensor], index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        raise HarnessError(f"detection3d: the program produced no {missing} (got {sorted(outputs)})")
    cls_score, bbox_pred, dir_cls_preds = (outputs[n][index].detach().cpu().numpy() for n in OUTPUT_NAMES)
    return cls_score, bbox_pred, dir_cls_preds


class Detection3DMetric(MetricAccumulator):
    """nuScenes NDS / mAP over every sample added (boxes accumulated per sample token)."""

    def __init__(self, nms: NMSConfig, classes: Sequence[str] | None, filter_range: bool):
        self.nms = nms
        self.classes = None if classes is None else tuple(classes)
        self.filter_range = filter_range
        self.gt: dict[str, list[dict[str, Any]]] = {}
        self.pred: dict[str, list[dict[str, Any]]] = {}

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Postprocess each sample's rows into boxes, check them, and keep them by token."""
        for b, target in enumerate(batch.targets):
            if target.token in self.pred:
                raise MetricError(f"sample {target.token!r} was added twice")
            boxes = prediction_boxes(postprocess(*_sample_rows(outputs, b), self.nms))
            check_finite(target.token, boxes)
            self.pred[target.token] = boxes
            self.gt[target.token] = ground_truth_boxes(target.boxes)

    def compute(self) -> MetricValues:
        """NDS (primary), mAP and the mean TP errors; per-class AP and TP errors in details."""
        if not self.pred:
            raise MetricError("no samples were added to the NDS metric")
        result = nds.evaluate(self.gt, self.pred, classes=self.classes, filter_range=self.filter_range)
        full = result.to_dict()
        values = {key: float(full[key]) for key in ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE")}
        return MetricValues(
            values=values,
            primary="NDS",
            details={
                "per_class": {name: m.ap for name, m in result.per_class.items()},
                "per_class_title": "AP per class",
                "classes": full["classes"],
                "samples": len(self.pred),
                "predictions": sum(len(v) for v in self.pred.values()),
            },
        )


def nms_config(args: Mapping[str, Any]) -> NMSConfig:
    """`NMSConfig` from YAML-style keyword arguments (lists become tuples); ValueError names
    unknown keys, HarnessError invalid values."""
    known = {f.name for f in fields(NMSConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown nms argument(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return NMSConfig(**kwargs)


class Detection3DTask(TaskAdapter):
    """Six-camera images in, the seed's top-k rows out, NDS against the scene's boxes.

    Metric args: `classes` (default: the 10 nuScenes classes), `filter_range` (the devkit's
    class ranges, default true), `nms` (fields of `harness.zoo.fastbev.NMSConfig`, e.g.
    `{score_thr: 0.05, max_num: 500}`).
    """

    input_names = ("image",)
    output_names = OUTPUT_NAMES
    _METRIC_ARGS = frozenset({"classes", "filter_range", "nms"})

    def __init__(self, case: Case):
        super().__init__(case)
        metric = case.spec.metric
        args = dict(metric.args) if metric else {}
        if metric is not None and metric.name != "nds":
            raise case.error(f"the detection3d task computes 'nds', not '{metric.name}'", "metric", "name")
        unknown = sorted(set(args) - self._METRIC_ARGS)
        if unknown:
            raise case.error(f"unknown metric argument(s) {unknown}; known: {sorted(self._METRIC_ARGS)}",
                             "metric", "args")
        classes = args.get("classes")
        bad = [c for c in classes or () if c not in CLASSES]
        if bad:
            raise case.error(f"unknown class(es) {bad}; known: {list(CLASSES)}", "metric", "args", "classes")
        self.classes: tuple[str, ...] | None = None if classes is None else tuple(classes)
        self.filter_range = bool(args.get("filter_range", True))
        try:
            self.nms = nms_config(args.get("nms") or {})
        except (ValueError, TypeError, HarnessError) as exc:
            raise case.error(str(exc), "metric", "args", "nms") from exc

    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """The first sample's images (the staged model runs each stage once per sample)."""
        if count != 1:
            raise self.case.error(f"detection3d golden files hold one sample (its stages run once per sample), "
                                  f"got golden.samples {count}", "golden", "samples")
        return {"image": torch.from_numpy(preprocess(dataset[0].images))}

    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Preprocessed images of `batch_size` samples each, targets `Detection3DTarget`s."""
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = np.concatenate([s.images for s in samples])
            targets = tuple(Detection3DTarget(s.token, tuple(s.boxes), np.asarray(s.lidar2img)) for s in samples)
            yield Batch({"image": torch.from_numpy(preprocess(images))}, targets, tuple(t.token for t in targets))

    def metric(self) -> MetricAccumulator:
        """A fresh NDS accumulator."""
        return Detection3DMetric(self.nms, self.classes, self.filter_range)

    def primary_metric(self) -> str:
        """NDS is the headline figure."""
        return "NDS"

    def detections(self, outputs: Mapping[str, torch.Tensor], index: int) -> Detections:
        """Final boxes of sample `index` of a batch's outputs (the metric's postprocess)."""
        return postprocess(*_sample_rows(outputs, index), self.nms)

    def agreement(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], batch: Batch) -> tuple[int, int]:
        """Boxes of two backends that match (same class, centres closer than AGREEMENT_DISTANCE,
        one to one, greedily by descending score), out of all boxes of either (matched pairs
        counted once): identical box sets give 1, disjoint ones 0."""
        agree = total = 0
        for k in range(len(batch.targets)):
            da, db = self.detections(a, k), self.detections(b, k)
            matched = match_count(da, db, AGREEMENT_DISTANCE)
            agree += matched
            total += len(da) + len(db) - matched
        return agree, total

    def pictures(self, batch: Batch, outputs: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path,
                 prefix: str) -> list[Path]:
        """Per sample: a BEV plot (ground truth, float, backend boxes) and the six camera images
        with the boxes projected (ground truth thin, float and backend)."""
        images = denormalize(batch.inputs["image"].numpy())
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

    from harness.datasets.scenes import CAMERAS

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
