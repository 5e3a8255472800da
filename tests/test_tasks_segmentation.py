"""Segmentation pre/post-processing: normalisation constants, layout, resize + argmax."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.cases import load_case
from harness.datasets.roads import RoadScenes
from harness.errors import CaseError, HarnessError
from harness.tasks.base import Batch
from harness.tasks.segmentation import SegmentationTask, postprocess, preprocess


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


SEG_CASE = """\
name: seg
task: segmentation
{task_args}
model: {{factory: "harness.zoo.pidnet:pidnet_s", args: {{num_classes: 4}}}}
data: {{factory: "harness.datasets.roads:RoadScenes", args: {{split: val, size: 2, height: 32, width: 64}}}}
golden: golden/seg
backends: {{torch-fp32: {{compare: {{atol: 1.0e-5}}}}}}
"""


def seg_task(tmp_path: Path, task_args: str) -> SegmentationTask:
    """The segmentation adapter of a case with `task_args` (a YAML line, or empty)."""
    path = tmp_path / "case.yaml"
    path.write_text(SEG_CASE.format(task_args=task_args))
    return SegmentationTask(load_case(path, root=tmp_path))


@pytest.mark.parametrize(("line", "key"), [
    ("task_args: {mean: [0.5, 0.5, 0.5], nomalize: true}", "task_args.nomalize"),
    ("task_args: {mean: [0.5, 0.5]}", "task_args.mean"),
    ("task_args: {std: [1, 0, 1]}", "task_args.std"),
    ("task_args: {channel_order: rbg}", "task_args.channel_order"),
    ("task_args: {align_corners: 1}", "task_args.align_corners"),
    ("task_args: {input_name: ''}", "task_args.input_name"),
])
def test_task_args_are_checked_and_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(CaseError) as info:
        seg_task(tmp_path, line)
    assert info.value.key == key and info.value.line == 3


def test_task_args_normalisation_channel_order_and_names_are_used(tmp_path: Path) -> None:
    default = seg_task(tmp_path, "")
    images = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    assert np.array_equal(default.norm.apply(images), preprocess(images))
    task = seg_task(tmp_path, "task_args: {mean: [0.1, 0.2, 0.3], std: [0.5, 0.5, 0.25], channel_order: bgr, "
                              "input_name: input.1, output_name: out}")
    x = task.norm.apply(images)
    expected = (images[0, :, :, ::-1].astype(np.float32) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.5, 0.25]
    np.testing.assert_allclose(x[0].transpose(1, 2, 0), expected, rtol=1e-6)
    assert np.array_equal(task.norm.invert(x), images)
    assert task.input_names == ("input.1",) and task.output_names == ("out",)
    assert set(task.golden_inputs([RoadScenes(split="val", size=1, height=8, width=8)[0]], 1)) == {"input.1"}


def test_align_corners_option_changes_decode(tmp_path: Path) -> None:
    logits = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    batch = Batch({}, np.zeros((1, 37, 61), dtype=np.int64), ("0",))
    plain = seg_task(tmp_path, "").decode({"logits": logits}, batch)[0]
    aligned = seg_task(tmp_path, "task_args: {align_corners: true}").decode({"logits": logits}, batch)[0]
    ref = F.interpolate(logits, size=(37, 61), mode="bilinear", align_corners=True).argmax(1)[0].numpy()
    assert np.array_equal(aligned, ref) and not np.array_equal(plain, aligned)
