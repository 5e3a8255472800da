"""Mean intersection-over-union from one confusion matrix accumulated over a whole dataset.

Conventions as Cityscapes and mmsegmentation: pixels whose target is `ignore_index` are
dropped; a class absent from both target and prediction has IoU NaN and is left out of the
mean; a class that is predicted but never present counts with IoU 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.errors import MetricError
from harness.metrics.base import Figure, Metric, MetricArgsError, MetricValues

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
"""The 19 Cityscapes train classes, in train-id order."""


@dataclass(frozen=True)
class MeanIoUResult:
    """Scores of a `MeanIoU`; `confusion[t, p]` counts pixels of target t predicted as p."""

    miou: float
    iou: npt.NDArray[np.float64]
    pixel_acc: float
    mean_acc: float
    confusion: npt.NDArray[np.int64]


class MeanIoU:
    """Accumulates a `num_classes x num_classes` confusion matrix with `update`, scores with
    `compute`."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise MetricError(f"MeanIoU needs num_classes >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise MetricError(
                f"ignore_index {ignore_index} is a valid class id (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.updates = 0

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion[:] = 0
        self.updates = 0

    def update(
        self, pred: npt.ArrayLike, target: npt.ArrayLike, sample: object | None = None
    ) -> None:
        """Add integer label maps of equal shape (any leading dimensions) to the confusion matrix.

        Raises `MetricError` naming both shapes when they differ, and naming the offending value
        (and `sample`, when given) when a target value is outside [0, num_classes) and is not
        `ignore_index`, or a prediction value is outside [0, num_classes).
        """
        p = np.asarray(pred)
        t = np.asarray(target)
        where = "" if sample is None else f" in sample {sample}"
        if p.shape != t.shape:
            raise MetricError(f"prediction shape {p.shape} != target shape {t.shape}{where}")
        for name, a in (("prediction", p), ("target", t)):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise MetricError(
                    f"{name} must be an integer label map, got dtype {a.dtype}{where}"
                )
        t = t.reshape(-1).astype(np.int64)
        p = p.reshape(-1).astype(np.int64)
        keep = t != self.ignore_index
        t = t[keep]
        p = p[keep]
        bad_t = (t < 0) | (t >= self.num_classes)
        if bad_t.any():
            raise MetricError(
                f"target value {int(t[bad_t][0])}{where} is outside [0, {self.num_classes}) "
                f"and is not ignore_index {self.ignore_index}"
            )
        bad_p = (p < 0) | (p >= self.num_classes)
        if bad_p.any():
            raise MetricError(
                f"prediction value {int(p[bad_p][0])}{where} is outside [0, {self.num_classes})"
            )
        counts = np.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)
        self.updates += 1

    def compute(self) -> MeanIoUResult:
        """Scores over everything accumulated; raises `MetricError` when no labelled pixel was
        seen (no update, or every target pixel was `ignore_index`)."""
        total = int(self.confusion.sum())
        if total == 0:
            raise MetricError(
                "MeanIoU has no labelled pixels to score "
                f"({self.updates} updates; every target pixel ignored or nothing updated)"
            )
        conf = self.confusion.copy()
        tp = np.diag(conf).astype(np.float64)
        gt = conf.sum(axis=1).astype(np.float64)
        predicted = conf.sum(axis=0).astype(np.float64)
        union = gt + predicted - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        return MeanIoUResult(
            miou=float(np.nanmean(iou)),
            iou=iou,
            pixel_acc=float(tp.sum() / total),
            mean_acc=float(np.nanmean(acc)),
            confusion=conf,
        )


class MeanIoUMetric(Metric):
    """The `miou` metric: label maps (what the segmentation task decodes) against target maps.

    Arguments: `num_classes` (19), `ignore_index` (255), `class_names` (default: the Cityscapes
    train classes when num_classes is 19, else the class ids). Figures: miou (primary),
    pixel_acc, mean_acc, all higher-is-better; IoU per class in the details.
    """

    name = "miou"
    figures = (Figure("miou", "higher", "mean IoU over classes present"),
               Figure("pixel_acc", "higher", "share of labelled pixels predicted right"),
               Figure("mean_acc", "higher", "mean per-class accuracy"))
    primary = "miou"
    consumes = "label_map"
    ARGS = frozenset({"num_classes", "ignore_index", "class_names"})

    def __init__(self, **args: Any) -> None:
        self.check_args(args)
        num_classes = int(args.get("num_classes", 19))
        self.miou = MeanIoU(num_classes, ignore_index=int(args.get("ignore_index", 255)))
        names = args.get("class_names") or (CITYSCAPES_CLASSES if num_classes == len(CITYSCAPES_CLASSES) else None)
        self.class_names = tuple(str(n) for n in names) if names else tuple(str(i) for i in range(num_classes))
        if len(self.class_names) != num_classes:
            raise MetricArgsError(f"{len(self.class_names)} class names for {num_classes} classes", "class_names")

    def update(self, predictions: Sequence[Any], targets: Sequence[Any], sample_ids: Sequence[str]) -> None:
        """Add each sample's predicted label map against its target label map."""
        for pred, target, sample in zip(predictions, targets, sample_ids, strict=True):
            self.miou.update(pred, target, sample=f"sample {sample}")

    def compute(self) -> MetricValues:
        """miou (primary), pixel_acc, mean_acc; per-class IoU in details (NaN: class absent)."""
        result = self.miou.compute()
        per_class: Mapping[str, float] = {n: float(v) for n, v in zip(self.class_names, result.iou, strict=True)}
        return MetricValues(
            values={"miou": result.miou, "pixel_acc": result.pixel_acc, "mean_acc": result.mean_acc},
            primary="miou",
            details={"per_class": dict(per_class), "per_class_title": "IoU per class"},
        )
