"""Cityscapes fine annotations read from the official folder layout, as segmentation samples.

`Cityscapes(root, split)` reads `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` and
`gtFine/<split>/<city>/<stem>_gtFine_labelIds.png` (the layout cityscapesScripts and
mmsegmentation use) and yields the samples `harness.tasks.segmentation` takes, like the
synthetic `harness.datasets.roads.RoadScenes`: `image` (H, W, 3) uint8 RGB, `label` (H, W)
uint8 train ids (the official labelIds -> trainIds table: the 19 evaluated classes 0..18, 255
for every other id), `index`. Files are in (city, name) order. `height` / `width` (both or
neither) resize on load, the image bilinearly and the label by nearest neighbour, so CPU
profiles can use smaller frames; `size` keeps the first samples only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from harness.datasets.roads import IGNORE_INDEX, LABEL_IDS
from harness.errors import HarnessError

__all__ = ["LABEL_TO_TRAIN_ID", "Cityscapes", "CityscapesError", "CityscapesSample", "train_ids"]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _train_id_table() -> npt.NDArray[np.uint8]:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(LABEL_IDS):
        table[label_id] = train_id
    return table


LABEL_TO_TRAIN_ID: npt.NDArray[np.uint8] = _train_id_table()
"""Cityscapes labelId (0..255) -> trainId: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, wall
12, fence 13, pole 17, traffic light 19, traffic sign 20, vegetation 21, terrain 22, sky 23,
person 24, rider 25, car 26, truck 27, bus 28, train 31, motorcycle 32, bicycle 33 -> 3..18;
every other id (void, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
trailer, ...) -> 255."""


class CityscapesError(HarnessError):
    """The Cityscapes root, split or a file is unusable; the message names the path."""


def train_ids(label_ids: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """labelIds map (any integer dtype, values 0..255) -> trainIds map (uint8, 255 = ignore)."""
    ids = np.asarray(label_ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise CityscapesError(f"labelIds must lie in 0..255, got {ids.min()}..{ids.max()}")
    out: npt.NDArray[np.uint8] = LABEL_TO_TRAIN_ID[ids.astype(np.intp)]
    return out


@dataclass(frozen=True)
class CityscapesSample:
    """One frame: `image` (H, W, 3) uint8 RGB, `label` (H, W) uint8 train ids (255 void), its
    position `index` in the dataset and the file `stem` (`<city>_<seq>_<frame>`)."""

    index: int
    stem: str
    image: npt.NDArray[np.uint8]
    label: npt.NDArray[np.uint8]


class Cityscapes:
    """The fine-annotated frames of one Cityscapes split (`train`, `val`, `test`) under `root`."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        size: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        self.root = Path(root)
        images = self.root / "leftImg8bit" / split
        labels = self.root / "gtFine" / split
        for folder in (images, labels):
            if not folder.is_dir():
                raise CityscapesError(f"Cityscapes: no folder {folder}")
        if (height is None) != (width is None):
            raise CityscapesError("Cityscapes: give both height and width, or neither")
        if height is not None and width is not None and (height < 8 or width < 8):
            raise CityscapesError(f"Cityscapes: height and width must be >= 8, got {height}x{width}")
        if size is not None and size < 1:
            raise CityscapesError(f"Cityscapes: size must be >= 1, got {size}")
        pairs = []
        for image in sorted(images.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = image.name.removesuffix(IMAGE_SUFFIX)
            label = labels / image.parent.name / f"{stem}{LABEL_SUFFIX}"
            if not label.is_file():
                raise CityscapesError(f"Cityscapes: {image} has no label file {label}")
            pairs.append((stem, image, label))
        if not pairs:
            raise CityscapesError(f"Cityscapes: no *{IMAGE_SUFFIX} under {images}/<city>/")
        self.split = split
        self.pairs = tuple(pairs[:size] if size is not None else pairs)
        self.size_hw = None if height is None or width is None else (height, width)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> CityscapesSample:
        from PIL import Image

        if not -len(self) <= index < len(self):
            raise IndexError(f"Cityscapes[{self.split}]: index {index} out of range({len(self)})")
        index %= len(self)
        stem, image_path, label_path = self.pairs[index]
        with Image.open(image_path) as raw:
            image = raw.convert("RGB")
        with Image.open(label_path) as raw_label:
            if raw_label.mode not in ("L", "P", "I", "I;16"):
                raise CityscapesError(f"Cityscapes: {label_path} is a {raw_label.mode} image, not a labelIds map")
            label = raw_label.copy()
        if image.size != label.size:
            raise CityscapesError(
                f"Cityscapes: {image_path} is {image.size[0]}x{image.size[1]} but {label_path} is "
                f"{label.size[0]}x{label.size[1]}"
            )
        if self.size_hw is not None:
            height, width = self.size_hw
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            label = label.resize((width, height), Image.Resampling.NEAREST)
        return CityscapesSample(
            index=index,
            stem=stem,
            image=np.asarray(image, dtype=np.uint8),
            label=train_ids(np.asarray(label)),
        )

    def __repr__(self) -> str:
        return f"Cityscapes(root={str(self.root)!r}, split={self.split!r}, size={len(self)})"
