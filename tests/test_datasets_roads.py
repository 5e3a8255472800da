"""Synthetic road scenes: Cityscapes constants, determinism, splits, resolutions, coverage."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from harness.datasets.roads import (
    CLASS_NAMES,
    IGNORE_INDEX,
    LABEL_IDS,
    RoadSample,
    RoadScenes,
)
from harness.errors import HarnessError
from harness.tasks.segmentation import PALETTE, colorize

# sha256 of image bytes + label bytes. A change here means every generated dataset changed:
# update only on purpose, together with anything trained or calibrated on the old one.
PINNED = {
    ("val", 64, 128, 0): "0ab676ac8d0c069674102f40e6b13054e7fe05b1332cb1feacdb1a3ce9bef4ea",
    ("train", 96, 192, 5): "5873fb01efb77167581f1bdd1a05bc1f14bb4f8b32ba3ef4ed78bd56017a391b",
}


def _digest(sample: RoadSample) -> str:
    return hashlib.sha256(sample.image.tobytes() + sample.label.tobytes()).hexdigest()


def test_cityscapes_constants() -> None:
    assert len(CLASS_NAMES) == len(LABEL_IDS) == len(PALETTE) == 19
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[10] == "sky" and CLASS_NAMES[18] == "bicycle"
    assert LABEL_IDS[:3] == (7, 8, 11) and LABEL_IDS[-3:] == (31, 32, 33)
    assert tuple(PALETTE[13]) == (0, 0, 142)  # car
    assert tuple(PALETTE[11]) == (220, 20, 60)  # person
    assert PALETTE.dtype == np.uint8 and not PALETTE.flags.writeable


def test_colorize() -> None:
    label = np.array([[0, 10], [255, 18]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (128, 64, 128)
    assert tuple(rgb[0, 1]) == (70, 130, 180)
    assert tuple(rgb[1, 0]) == (0, 0, 0)
    assert tuple(rgb[1, 1]) == (119, 11, 32)


@pytest.mark.parametrize(("split", "height", "width", "index"), list(PINNED))
def test_pinned_bytes(split: str, height: int, width: int, index: int) -> None:
    sample = RoadScenes(split, size=8, height=height, width=width)[index]
    assert sample.index == index
    assert _digest(sample) == PINNED[(split, height, width, index)]


def test_same_arguments_same_bytes() -> None:
    a = RoadScenes("calibration", size=4, height=64, width=128, seed=3)
    b = RoadScenes("calibration", size=4, height=64, width=128, seed=3)
    assert _digest(a[2]) == _digest(b[2])
    assert _digest(a[-1]) == _digest(b[3])


def test_splits_seeds_and_indices_differ() -> None:
    digests = {
        _digest(RoadScenes(split, size=4, height=64, width=128, seed=seed)[index])
        for split in ("train", "val", "calibration")
        for seed in (7, 8)
        for index in (0, 1)
    }
    assert len(digests) == 12


@pytest.mark.parametrize(("height", "width"), [(64, 128), (256, 512)])
def test_sample_layout_and_label_values(height: int, width: int) -> None:
    ds = RoadScenes("val", size=3, height=height, width=width)
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.shape == (height, width, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (height, width) and s.label.dtype == np.uint8
        values = set(np.unique(s.label).tolist())
        assert values <= set(range(19)) | {IGNORE_INDEX}
        # void is the ego vehicle's hood along the bottom edge only
        rows = np.nonzero((s.label == IGNORE_INDEX).any(axis=1))[0]
        assert rows.size == 0 or rows.min() >= 0.8 * height


def test_scene_is_resolution_independent() -> None:
    small = RoadScenes("val", size=4, height=128, width=256)
    large = RoadScenes("val", size=4, height=256, width=512)
    for i in range(4):
        a = small[i].label
        # the pixel centres of the small grid are the corners shared by 2x2 large pixels; the
        # four large pixels around each agree with it unless an edge passes through
        b = large[i].label.reshape(128, 2, 256, 2)
        agree = (b == a[:, None, :, None]).any(axis=(1, 3))
        assert agree.mean() > 0.97


def test_every_class_is_common() -> None:
    """Each class appears in a good share of images, with enough pixels to score at 1/8."""
    ds = RoadScenes("val", size=32, height=128, width=256)
    counts = np.stack([np.bincount(ds[i].label.ravel(), minlength=256) for i in range(32)])
    for cls, name in enumerate(CLASS_NAMES):
        present = counts[:, cls] >= 16  # one output pixel of PIDNet at this resolution
        assert present.mean() >= 0.25, f"{name} in only {present.mean():.0%} of images"
    assert (counts[:, IGNORE_INDEX] > 0).any()


DIGEST_SCRIPT = """
import hashlib
from harness.datasets.roads import RoadScenes
for s in (RoadScenes("val", 2, 64, 128)[0], RoadScenes("train", 2, 128, 256)[1]):
    print(hashlib.sha256(s.image.tobytes() + s.label.tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_bytes_do_not_depend_on_numpy_simd_dispatch() -> None:
    """The same bytes with numpy's widest SIMD kernels and with its baseline ones."""
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
        dispatch = [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)]
    except (ImportError, AttributeError):
        pytest.skip("numpy does not expose its CPU dispatch targets")
    if not dispatch:
        pytest.skip("this CPU has no SIMD extension beyond numpy's baseline")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(dispatch))
    run = [sys.executable, "-c", DIGEST_SCRIPT]
    baseline = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    widest = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert len(widest.split()) == 2
    assert baseline == widest


def test_bad_arguments() -> None:
    with pytest.raises(HarnessError, match="unknown split 'test'"):
        RoadScenes("test")
    with pytest.raises(HarnessError, match="size"):
        RoadScenes(size=0)
    with pytest.raises(HarnessError, match="height and width"):
        RoadScenes(height=4)
    ds = RoadScenes(size=2, height=32, width=64)
    with pytest.raises(IndexError, match="index 2"):
        ds[2]
    assert len(ds) == 2 and "split='val'" in repr(ds)
