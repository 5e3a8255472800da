"""MeanIoU: hand-computed confusion matrices, Cityscapes conventions, bad input, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.errors import MetricError
from harness.metrics.miou import MeanIoU


def test_hand_computed_three_classes() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    metric = MeanIoU(3)
    metric.update(pred, target)
    r = metric.compute()
    # rows: target, columns: prediction; the ignored pixel (255 -> 2) is dropped
    np.testing.assert_array_equal(r.confusion, [[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    # IoU = tp / (row + col - tp): 1/(2+2-1), 2/(3+3-2), 1/(2+2-1)
    np.testing.assert_allclose(r.iou, [1 / 3, 2 / 4, 1 / 3])
    assert r.miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert r.pixel_acc == pytest.approx(4 / 7)
    assert r.mean_acc == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_predicted_absent_class_is_zero() -> None:
    metric = MeanIoU(4)
    metric.update(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))
    r = metric.compute()
    # class 3 never appears: NaN, left out; class 2 predicted but absent: IoU 0
    assert math.isnan(r.iou[3])
    assert r.iou[2] == 0.0
    np.testing.assert_allclose(r.iou[:3], [1.0, 0.5, 0.0])
    assert r.miou == pytest.approx(0.5)
    # mean accuracy averages over classes present in the target only
    assert r.mean_acc == pytest.approx((1.0 + 0.5) / 2)


def test_accumulates_over_updates_and_leading_shapes() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 2, 7, 9))
    pred = rng.integers(0, 5, size=(3, 2, 7, 9))
    whole = MeanIoU(5)
    whole.update(pred, target)
    parts = MeanIoU(5)
    for i in range(3):
        parts.update(pred[i], target[i], sample=i)
    np.testing.assert_array_equal(whole.compute().confusion, parts.compute().confusion)
    assert whole.compute().confusion.sum() == target.size


def test_reset() -> None:
    metric = MeanIoU(2)
    metric.update(np.array([0, 1]), np.array([1, 1]))
    metric.reset()
    with pytest.raises(MetricError, match="no labelled pixels"):
        metric.compute()


def test_shape_mismatch_names_both_shapes() -> None:
    metric = MeanIoU(3)
    with pytest.raises(MetricError, match=r"\(2, 3\).*\(3, 2\)"):
        metric.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))


def test_bad_target_value_names_value_and_sample() -> None:
    metric = MeanIoU(19)
    target = np.zeros((4, 4), np.uint8)
    target[2, 1] = 19
    with pytest.raises(MetricError, match=r"target value 19 in sample val/0007"):
        metric.update(np.zeros((4, 4), np.int64), target, sample="val/0007")
    with pytest.raises(MetricError, match=r"target value -1 is outside"):
        metric.update(np.zeros(2, np.int64), np.array([0, -1]))


def test_bad_prediction_value_and_dtype() -> None:
    metric = MeanIoU(3)
    with pytest.raises(MetricError, match=r"prediction value 3"):
        metric.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(MetricError, match="integer label map"):
        metric.update(np.array([0.0, 1.0]), np.array([0, 1]))


def test_empty_metric_raises() -> None:
    with pytest.raises(MetricError, match="no labelled pixels"):
        MeanIoU(3).compute()
    metric = MeanIoU(3)
    metric.update(np.array([1, 2]), np.array([255, 255]))
    with pytest.raises(MetricError, match="no labelled pixels"):
        metric.compute()


def test_ignore_index_may_not_be_a_class() -> None:
    with pytest.raises(MetricError, match="ignore_index 2"):
        MeanIoU(3, ignore_index=2)


label_maps = hnp.arrays(
    np.int64, st.tuples(st.integers(1, 4), st.integers(1, 12)), elements=st.integers(0, 5)
)


@settings(max_examples=60, deadline=None)
@given(label_maps)
def test_perfect_prediction_scores_one(target: np.ndarray) -> None:
    metric = MeanIoU(6)
    metric.update(target, target)
    r = metric.compute()
    assert r.miou == 1.0 and r.pixel_acc == 1.0 and r.mean_acc == 1.0
    present = np.zeros(6, bool)
    present[np.unique(target)] = True
    assert np.isnan(r.iou[~present]).all()


@settings(max_examples=60, deadline=None)
@given(label_maps, st.data())
def test_permuting_class_ids_on_both_sides_keeps_miou(
    target: np.ndarray, data: st.DataObject
) -> None:
    pred = data.draw(hnp.arrays(np.int64, target.shape, elements=st.integers(0, 5)))
    perm = np.array(data.draw(st.permutations(range(6))))
    a, b = MeanIoU(6), MeanIoU(6)
    a.update(pred, target)
    b.update(perm[pred], perm[target])
    ra, rb = a.compute(), b.compute()
    assert ra.miou == pytest.approx(rb.miou)
    np.testing.assert_allclose(ra.iou, rb.iou[perm])
    assert ra.pixel_acc == pytest.approx(rb.pixel_acc)


@settings(max_examples=60, deadline=None)
@given(label_maps, st.data())
def test_ignored_pixels_never_count(target: np.ndarray, data: st.DataObject) -> None:
    pred = data.draw(hnp.arrays(np.int64, target.shape, elements=st.integers(0, 5)))
    ignored = data.draw(hnp.arrays(np.bool_, target.shape))
    noise = data.draw(hnp.arrays(np.int64, target.shape, elements=st.integers(0, 5)))
    with_ignore = np.where(ignored, 255, target)
    a, b = MeanIoU(6), MeanIoU(6)
    a.update(pred, with_ignore)
    # whatever is predicted on ignored pixels changes nothing
    b.update(np.where(ignored, noise, pred), with_ignore)
    np.testing.assert_array_equal(a.confusion, b.confusion)
    assert a.confusion.sum() == int((~ignored).sum())
    if (~ignored).any():
        ref = MeanIoU(6)
        ref.update(pred[~ignored], target[~ignored])
        np.testing.assert_array_equal(a.compute().confusion, ref.compute().confusion)
