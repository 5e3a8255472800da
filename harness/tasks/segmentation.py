"""Semantic segmentation task: image normalisation in, logits to label maps out."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from harness.errors import HarnessError

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
