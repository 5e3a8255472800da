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
from harness.tasks.options import NORMALISATION_KEYS, Normalisation, TaskOptions

if TYPE_CHECKING:
    from harness.cases import Case

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


IMAGENET = Normalisation(IMAGENET_MEAN, IMAGENET_STD, "rgb", 255.0)
"""PIDNet's training normalisation: x / 255, then ImageNet mean / std per RGB channel."""
TASK_ARGS = frozenset({"input_name", "output_name", "align_corners"}) | NORMALISATION_KEYS


def preprocess(images: npt.NDArray[np.uint8], norm: Normalisation = IMAGENET) -> npt.NDArray[np.float32]:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 normalised by `norm` (default: x / 255,
    then ImageNet mean / std per channel, as PIDNet is trained)."""
    return norm.apply(images)


def postprocess(logits: npt.NDArray[np.floating], size: tuple[int, int],
                align_corners: bool = False) -> npt.NDArray[np.int64]:
    """(N, C, h, w) logits -> (N, H, W) int64 class ids: bilinear resize to `size` = (H, W)
    (`align_corners` as given, False by default; in float32 through torch), then argmax over C."""
    if logits.ndim != 4:
        raise HarnessError(f"postprocess expects (N, C, h, w) logits, got shape {logits.shape}")
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    with torch.no_grad():
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners)
        labels: npt.NDArray[np.int64] = t.argmax(dim=1).numpy().astype(np.int64)
    return labels


class SegmentationTask(TaskAdapter):
    """Images in (normalised NCHW float32, input `image`), logits out (output `logits`), label
    maps as predictions.

    Datasets yield samples with `image` (H, W, 3) uint8 RGB and `label` (H, W) integer ids
    (`ignore_index` for void). `decode` upsamples the logits bilinearly to the label size and
    takes the argmax: per-sample "label_map" predictions for the `miou` metric.

    task_args: `mean`, `std` (3 numbers each, on the 0..1 scale; default ImageNet's),
    `channel_order` (rgb | bgr: the channel order the model takes; mean and std are in that
    order), `input_name` / `output_name` (the single-stage model's tensor names; default
    `image` / `logits`), `align_corners` (the bilinear upsampling of `decode`; default false).
    """

    input_names = ("image",)
    output_names = ("logits",)
    prediction_kind = "label_map"

    def __init__(self, case: Case):
        super().__init__(case)
        options = TaskOptions(case, "segmentation", TASK_ARGS)
        self.norm = options.normalisation(IMAGENET_MEAN, IMAGENET_STD, 255.0)
        self.align_corners = options.boolean("align_corners", False)
        input_name, output_name = options.name("input_name"), options.name("output_name")
        for key, value in (("input_name", input_name), ("output_name", output_name)):
            if value is not None and case.spec.stages:
                raise case.error(f"task_args.{key} names the tensor of a single-stage model; this case declares "
                                 "`stages:`, whose inputs and outputs name the tensors", "task_args", key)
        self.input_names = (input_name or "image",)
        self.output_names = (output_name or "logits",)

    @property
    def input_name(self) -> str:
        """The name of the image input."""
        return self.input_names[0]

    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """The first `count` images, preprocessed, as one batch."""
        images = np.stack([dataset[i].image for i in range(count)])
        return {self.input_name: torch.from_numpy(preprocess(images, self.norm))}

    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Preprocessed images with their label maps as targets."""
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = np.stack([s.image for s in samples])
            labels = np.stack([s.label for s in samples])
            ids = tuple(str(getattr(s, "index", start + k)) for k, s in enumerate(samples))
            yield Batch({self.input_name: torch.from_numpy(preprocess(images, self.norm))}, labels, ids)

    def decode(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> list[np.ndarray]:
        """Label maps at the targets' resolution (bilinear upsampling, then argmax)."""
        labels = np.asarray(batch.targets)
        return list(postprocess(self._logits(outputs), labels.shape[-2:], self.align_corners))

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
        images = self.norm.invert(batch.inputs[self.input_name].numpy())
        preds = {name: postprocess(self._logits(o), labels.shape[-2:], self.align_corners)
                 for name, o in outputs.items()}
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

    def _logits(self, outputs: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The logits output as a numpy array; HarnessError naming the outputs it got otherwise."""
        name = self.output_names[0]
        if name not in outputs:
            raise HarnessError(f"segmentation: the program produced no '{name}' (got {sorted(outputs)})")
        return outputs[name].detach().cpu().numpy()
