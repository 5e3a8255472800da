"""Semantic segmentation task: image normalisation in, logits to label maps out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from harness.datasets.roads import CLASS_NAMES, colorize
from harness.errors import HarnessError
from harness.metrics.miou import MeanIoU
from harness.tasks.base import Batch, Dataset, MetricAccumulator, MetricValues, TaskAdapter

if TYPE_CHECKING:
    from harness.cases import Case

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32: x / 255, then ImageNet mean / std per
    channel, as PIDNet is trained."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise HarnessError(
            f"preprocess expects (N, H, W, 3) uint8 RGB images, got {images.dtype} {images.shape}"
        )
    x = images.astype(np.float32) / np.float32(255.0)
    x -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def postprocess(logits: npt.NDArray[np.floating], size: tuple[int, int]) -> npt.NDArray[np.int64]:
    """(N, C, h, w) logits -> (N, H, W) int64 class ids: bilinear resize to `size` = (H, W)
    (align_corners=False, in float32 through torch), then argmax over C."""
    if logits.ndim != 4:
        raise HarnessError(f"postprocess expects (N, C, h, w) logits, got shape {logits.shape}")
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    with torch.no_grad():
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        labels: npt.NDArray[np.int64] = t.argmax(dim=1).numpy().astype(np.int64)
    return labels


class SegmentationMetric(MetricAccumulator):
    """mIoU of logits (upsampled to label size, argmax) against the batch's label maps."""

    def __init__(self, num_classes: int, ignore_index: int, class_names: Sequence[str]):
        self.miou = MeanIoU(num_classes, ignore_index=ignore_index)
        self.class_names = tuple(class_names)

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Score one batch of `logits` against its labels."""
        labels = np.asarray(batch.targets)
        preds = postprocess(outputs["logits"].detach().cpu().numpy(), labels.shape[-2:])
        for pred, label, sample in zip(preds, labels, batch.sample_ids, strict=True):
            self.miou.update(pred, label, sample=f"sample {sample}")

    def compute(self) -> MetricValues:
        """miou (primary), pixel_acc, mean_acc; per-class IoU in details (NaN: class absent)."""
        result = self.miou.compute()
        per_class = {name: float(v) for name, v in zip(self.class_names, result.iou, strict=True)}
        return MetricValues(
            values={"miou": result.miou, "pixel_acc": result.pixel_acc, "mean_acc": result.mean_acc},
            primary="miou",
            details={"per_class": per_class, "per_class_title": "IoU per class"},
        )


class SegmentationTask(TaskAdapter):
    """Images in (ImageNet-normalised NCHW float32), `logits` out, mIoU against label maps.

    Datasets yield samples with `image` (H, W, 3) uint8 RGB and `label` (H, W) integer ids
    (`ignore_index` for void). Metric args: `num_classes` (19), `ignore_index` (255),
    `class_names` (default: the 19 Cityscapes train classes when num_classes is 19).
    """

    input_names = ("image",)
    output_names = ("logits",)
    _METRIC_ARGS = frozenset({"num_classes", "ignore_index", "class_names"})

    def __init__(self, case: Case):
        super().__init__(case)
        metric = case.spec.metric
        args = dict(metric.args) if metric else {}
        if metric is not None and metric.name != "miou":
            raise case.error(f"the segmentation task computes 'miou', not '{metric.name}'", "metric", "name")
        unknown = sorted(set(args) - self._METRIC_ARGS)
        if unknown:
            raise case.error(f"unknown metric argument(s) {unknown}; known: {sorted(self._METRIC_ARGS)}",
                             "metric", "args")
        self.num_classes = int(args.get("num_classes", 19))
        self.ignore_index = int(args.get("ignore_index", 255))
        names = args.get("class_names") or (CLASS_NAMES if self.num_classes == len(CLASS_NAMES) else None)
        self.class_names = tuple(names) if names else tuple(str(i) for i in range(self.num_classes))
        if len(self.class_names) != self.num_classes:
            raise case.error(f"{len(self.class_names)} class names for {self.num_classes} classes",
                             "metric", "args", "class_names")

    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """The first `count` images, preprocessed, as one batch."""
        return {"image": torch.from_numpy(preprocess(np.stack([dataset[i].image for i in range(count)])))}

    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Preprocessed images with their label maps as targets."""
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = np.stack([s.image for s in samples])
            labels = np.stack([s.label for s in samples])
            ids = tuple(str(getattr(s, "index", start + k)) for k, s in enumerate(samples))
            yield Batch({"image": torch.from_numpy(preprocess(images))}, labels, ids)

    def metric(self) -> MetricAccumulator:
        """A fresh mIoU accumulator."""
        return SegmentationMetric(self.num_classes, self.ignore_index, self.class_names)

    def primary_metric(self) -> str:
        """mIoU is the headline figure."""
        return "miou"

    def agreement(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], batch: Batch) -> tuple[int, int]:
        """Pixels (at label resolution, void included) whose predicted class is the same in both."""
        size = np.asarray(batch.targets).shape[-2:]
        pa = postprocess(a["logits"].detach().cpu().numpy(), size)
        pb = postprocess(b["logits"].detach().cpu().numpy(), size)
        return int((pa == pb).sum()), int(pa.size)

    def pictures(self, batch: Batch, outputs: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path,
                 prefix: str) -> list[Path]:
        """Per sample: image | ground truth | float | each backend | disagreement with float
        (white), in the Cityscapes palette; one PNG per sample and backend."""
        from PIL import Image

        labels = np.asarray(batch.targets)
        images = _denormalize(batch.inputs["image"].numpy())
        preds = {name: postprocess(o["logits"].detach().cpu().numpy(), labels.shape[-2:]) for name, o in outputs.items()}
        reference = preds.get("float")
        written = []
        for k, sample in enumerate(batch.sample_ids):
            panels = [images[k], colorize(labels[k])]
            panels += [colorize(preds[name][k].astype(np.uint8)) for name in preds]
            if reference is not None:
                for name in preds:
                    if name != "float":
                        differ = (preds[name][k] != reference[k]).astype(np.uint8) * 255
                        panels.append(np.repeat(differ[..., None], 3, axis=2))
            path = out_dir / f"{prefix}-sample{sample}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(panels, axis=1)).save(path)
            written.append(path)
        return written


def _denormalize(images: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Inverse of `preprocess` for pictures: (N, 3, H, W) -> (N, H, W, 3) uint8."""
    x = images.transpose(0, 2, 3, 1) * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
