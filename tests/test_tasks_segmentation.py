"""Segmentation pre/post-processing: normalisation constants, layout, resize + argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.tasks.segmentation import postprocess, preprocess


def test_preprocess_layout_and_values() -> None:
    images = np.zeros((2, 4, 6, 3), np.uint8)
    images[0, 1, 2] = (255, 0, 128)
    images[1] = 124
    x = preprocess(images)
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 6) and x.flags.c_contiguous
    np.testing.assert_allclose(
        x[0, :, 1, 2],
        [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225],
        rtol=1e-6,
    )
    np.testing.assert_allclose(x[0, :, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    np.testing.assert_allclose(x[1, 0], np.full((4, 6), (124 / 255 - 0.485) / 0.229), atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((4, 6, 3), np.uint8), np.zeros((1, 4, 6, 3), np.float32)])
def test_preprocess_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(HarnessError, match="uint8"):
        preprocess(bad)


def test_postprocess_resizes_then_argmax() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    labels = postprocess(logits, (32, 64))
    assert labels.dtype == np.int64 and labels.shape == (2, 32, 64)
    ref = F.interpolate(
        torch.from_numpy(logits), size=(32, 64), mode="bilinear", align_corners=False
    )
    np.testing.assert_array_equal(labels, ref.argmax(1).numpy())


def test_postprocess_keeps_confident_block_labels() -> None:
    small = np.random.default_rng(3).integers(0, 4, size=(1, 4, 8))
    logits = 10.0 * np.eye(4, dtype=np.float32)[small].transpose(0, 3, 1, 2)
    labels = postprocess(logits, (32, 64))
    # block centres (8k+3, 8k+4) are nearest their own source pixel
    for offset in (3, 4):
        np.testing.assert_array_equal(labels[:, offset::8, offset::8], small)


def test_postprocess_same_size_is_plain_argmax() -> None:
    logits = np.random.default_rng(2).standard_normal((1, 3, 5, 7))
    np.testing.assert_array_equal(postprocess(logits, (5, 7)), logits.argmax(1))


def test_postprocess_rejects_bad_rank() -> None:
    with pytest.raises(HarnessError, match=r"\(3, 4, 5\)"):
        postprocess(np.zeros((3, 4, 5), np.float32), (8, 10))
