"""Semantic segmentation task: image normalisation in, logits to label maps out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.tasks.base import Batch, Dataset, TaskAdapter

if TYPE_CHECKING:
    pass

PALETTE: npt.NDArray[np.uint8] = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)
"""Cityscapes colour of each train id."""
PALETTE.setflags(write=False)


def colorize(label: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """(H, W) train-id label map -> (H, W, 3) uint8 Cityscapes colours; 255 (and any other value
    outside the 19 classes) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(PALETTE)] = PALETTE
    return lut[np.asarray(label).astype(np.uint8)]


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


class SegmentationTask(TaskAdapter):
    """Images in (ImageNet-normalised NCHW float32), `logits` out, label maps as predictions.

    Datasets yield samples with `image` (H, W, 3) uint8 RGB and `label` (H, W) integer ids
    (`ignore_index` for void). `decode` upsamples the logits to the label size and takes the
    argmax: per-sample "label_map" predictions for the `miou` metric.
    """

    input_names = ("image",)
    output_names = ("logits",)
    prediction_kind = "label_map"

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

    def decode(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> list[np.ndarray]:
        """Label maps at the targets' resolution (bilinear upsampling, then argmax)."""
        labels = np.asarray(batch.targets)
        return list(postprocess(_logits(outputs), labels.shape[-2:]))

    def agreement(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray], batch: Batch) -> tuple[int, int]:
        """Pixels (at label resolution, void included) whose decoded class is the same in both."""
        pa, pb = np.stack(list(a)), np.stack(list(b))
        return int((pa == pb).sum()), int(pa.size)

    def pictures(self, batch: Batch, outputs: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path,
                 prefix: str) -> list[Path]:
        """Per sample: image | ground truth | float | each backend | disagreement with float
        (white), in the Cityscapes palette; one PNG per sample and backend."""
        from PIL import Image

        labels = np.asarray(batch.targets)
        images = _denormalize(batch.inputs["image"].numpy())
        preds = {name: postprocess(_logits(o), labels.shape[-2:]) for name, o in outputs.items()}
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


def _logits(outputs: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The `logits` output as a numpy array; HarnessError naming the outputs it got otherwise."""
    if "logits" not in outputs:
        raise HarnessError(f"segmentation: the program produced no 'logits' (got {sorted(outputs)})")
    return outputs["logits"].detach().cpu().numpy()


def _denormalize(images: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Inverse of `preprocess` for pictures: (N, 3, H, W) -> (N, H, W, 3) uint8."""
    x = images.transpose(0, 2, 3, 1) * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
