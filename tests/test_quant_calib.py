"""Calibrators: running max, growing histogram, percentile / mse / entropy against loop references."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy as scipy_entropy

from harness.errors import QuantError
from harness.quant.calib import (
    HistogramCalibrator,
    MaxCalibrator,
    amax_entropy,
    amax_mse,
    amax_percentile,
)


def entropy_loop_reference(counts: np.ndarray, edges: np.ndarray, start_bin: int = 128, stride: int = 1) -> float:
    """TensorRT's KL search written the slow way (O(bins^2) Python loops, scipy entropy), as the spec describes."""
    bins = counts.astype(np.int64).copy()
    bins[0] = bins[1]
    nq = 128
    divergences, arguments = [], []
    for i in range(start_bin, len(bins) + 1, stride):
        space = np.linspace(0, i, num=nq + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        group_counts = np.zeros(nq, dtype=np.float64)
        for j, d in enumerate(digitized):
            if d != -1:
                group_counts[d] += bins[j]
        for key, val in Counter(digitized).items():
            if key != -1:
                group_counts[key] /= val
        q = np.zeros(i, dtype=np.float64)
        for j, d in enumerate(digitized):
            if d != -1:
                q[j] = group_counts[d]
        p = np.array(bins[:i])
        p[-1] += np.sum(bins[i:])
        divergences.append(scipy_entropy(p, q))
        arguments.append(i)
    d = np.array(divergences)
    last = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[arguments[last]])


def mse_loop_reference(counts: np.ndarray, edges: np.ndarray, start_bin: int = 128, stride: int = 1) -> float:
    """Intended Model Optimizer MSE search, one candidate at a time."""
    c = torch.from_numpy(counts).float()
    e = torch.from_numpy(edges).float()
    centers = (e[1:] + e[:-1]) / 2
    mses = []
    for i in range(start_bin, len(centers), stride):
        scale = torch.tensor(127.0) / centers[i]
        q = torch.clamp((centers * scale).round(), -127, 127) / scale
        mses.append(((q - centers) ** 2 * c).mean())
    return float(centers[start_bin + stride * int(np.argmin([float(m) for m in mses]))])


def _hist(values: np.ndarray, batches: int = 1, num_bins: int = 2048) -> HistogramCalibrator:
    calib = HistogramCalibrator(num_bins)
    for part in np.array_split(values.astype(np.float32), batches):
        calib.collect(torch.from_numpy(part))
    return calib


def _arrays(calib: HistogramCalibrator) -> tuple[np.ndarray, np.ndarray]:
    hist = calib.histogram
    assert hist is not None
    return hist[0].int().numpy(), hist[1].numpy()


def test_max_calibrator_per_tensor_and_per_channel() -> None:
    a = torch.tensor([[1.0, -5.0], [2.0, 0.5], [-3.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [7.0, -0.5], [1.0, 4.0]])
    per_tensor, rows, cols = MaxCalibrator(), MaxCalibrator(axis=0), MaxCalibrator(axis=-1)
    for cal in (per_tensor, rows, cols):
        cal.collect(a)
        cal.collect(b)
    assert per_tensor.compute_amax() is not None and float(per_tensor.compute_amax()) == 7.0  # type: ignore[arg-type]
    assert torch.equal(rows.compute_amax(), torch.tensor([[5.0], [7.0], [4.0]]))  # type: ignore[arg-type]
    assert torch.equal(cols.compute_amax(), torch.tensor([[7.0, 5.0]]))  # type: ignore[arg-type]
    with pytest.raises(QuantError, match="shape changed"):
        rows.collect(torch.ones(4, 2))


def test_conv_weight_per_channel_shape() -> None:
    w = torch.randn(8, 4, 3, 3)
    cal = MaxCalibrator(axis=0)
    cal.collect(w)
    amax = cal.compute_amax()
    assert amax is not None and amax.shape == (8, 1, 1, 1)
    assert torch.equal(amax.reshape(-1), w.abs().reshape(8, -1).amax(1))


def test_histogram_first_batch_and_growth_keep_bin_width() -> None:
    cal = HistogramCalibrator(num_bins=8)
    cal.collect(torch.tensor([0.0, 1.0, -2.0, 4.0]))
    counts, edges = _arrays(cal)
    assert edges[-1] == 4.0 and len(edges) == 9
    assert counts.tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    cal.collect(torch.tensor([5.2, 0.1]))  # grows: same width 0.5, ceil(5.2/0.5) = 11 bins
    counts, edges = _arrays(cal)
    assert len(counts) == 11 and len(edges) == 12
    assert np.allclose(np.diff(edges), 0.5)
    assert counts.tolist() == [2, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1]
    cal.collect(torch.tensor([1.0]))  # smaller batch: range does not shrink
    assert len(_arrays(cal)[0]) == 11


def test_histogram_depends_on_batch_order_like_modelopt() -> None:
    rng = np.random.default_rng(3)
    data = [rng.standard_normal(5000).astype(np.float32) * (1 + k) for k in range(3)]
    forward, backward = HistogramCalibrator(), HistogramCalibrator()
    for d in data:
        forward.collect(torch.from_numpy(d))
    for d in data[::-1]:
        backward.collect(torch.from_numpy(d))
    assert len(_arrays(forward)[0]) > 2048 == len(_arrays(backward)[0])
    assert _arrays(forward)[0].sum() == _arrays(backward)[0].sum() == 15000


def test_uniform_percentile_100_is_max_and_left_edge_below() -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(-2.0, 2.0, 100_000).astype(np.float32)
    cal = _hist(x)
    top = cal.compute_amax("percentile", percentile=100.0)
    assert top is not None and float(top) == pytest.approx(float(np.abs(x).max()), rel=0, abs=1e-6)
    p999 = cal.compute_amax("percentile", percentile=99.9)
    assert p999 is not None and 0.998 * 2 - 4 / 2048 <= float(p999) <= 0.999 * 2 + 4 / 2048


def test_percentile_left_edge_convention() -> None:
    counts = np.array([10, 0, 0, 10], np.int32)
    edges = np.array([0, 1, 2, 3, 4], np.float32)
    assert amax_percentile(counts, edges, 50.0) == 0.0  # the cdf reaches 0.5 in bin 0: its left edge
    assert amax_percentile(counts, edges, 50.1) == 3.0
    assert amax_percentile(counts, edges, 100.0) == 3.0  # last bin: edges[-2], not the max
    with pytest.raises(QuantError, match="percentile"):
        amax_percentile(counts, edges, 101.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=5, max_size=400),
    st.floats(0, 100),
    st.floats(0, 100),
)
def test_percentile_amax_is_monotone(values: list[float], p1: float, p2: float) -> None:
    cal = _hist(np.array(values), num_bins=64)
    lo, hi = sorted((p1, p2))
    a, b = cal.compute_amax("percentile", percentile=lo), cal.compute_amax("percentile", percentile=hi)
    assert a is not None and b is not None and float(a) <= float(b)


def _histograms() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    cases = []
    for name, values in [
        ("gaussian", rng.standard_normal(30_000)),
        ("relu", np.maximum(rng.standard_normal(30_000), 0)),
        ("laplace", rng.laplace(0, 1, 30_000)),
        ("integers", rng.integers(-9, 10, 30_000).astype(np.float64)),
        ("outliers", np.concatenate([[40.0, -55.0], rng.standard_normal(30_000)])),
    ]:
        cal = _hist(values, batches=3, num_bins=256)
        counts, edges = _arrays(cal)
        cases.append((name, counts, edges))
    return cases


@pytest.mark.parametrize(("name", "counts", "edges"), _histograms(), ids=[c[0] for c in _histograms()])
@pytest.mark.parametrize(("start_bin", "stride"), [(32, 1), (40, 3)])
def test_entropy_matches_loop_reference(name: str, counts: np.ndarray, edges: np.ndarray, start_bin: int, stride: int) -> None:
    del name
    assert amax_entropy(counts, edges, start_bin=start_bin, stride=stride) == entropy_loop_reference(counts, edges, start_bin, stride)


@pytest.mark.parametrize(("name", "counts", "edges"), _histograms(), ids=[c[0] for c in _histograms()])
def test_mse_matches_loop_reference(name: str, counts: np.ndarray, edges: np.ndarray) -> None:
    del name
    assert amax_mse(counts, edges, start_bin=32, stride=1) == mse_loop_reference(counts, edges, 32, 1)
    assert amax_mse(counts, edges, start_bin=20, stride=7) == mse_loop_reference(counts, edges, 20, 7)


def test_entropy_tie_rule_takes_last_minimum() -> None:
    counts = np.zeros(300, np.int32)
    counts[:100] = 50  # nothing above bin 100: every candidate >= 101 has the same divergence (0)
    edges = np.arange(301, dtype=np.float32)
    assert amax_entropy(counts, edges, start_bin=128) == 300.0 == entropy_loop_reference(counts, edges, 128)


def test_entropy_bin_zero_is_replaced_by_bin_one() -> None:
    rng = np.random.default_rng(6)
    relu = np.maximum(rng.standard_normal(40_000), 0)
    with_zeros = _hist(relu, num_bins=256).compute_amax("entropy", start_bin=32)
    without = _hist(relu[relu > 0], num_bins=256).compute_amax("entropy", start_bin=32)
    assert with_zeros is not None and without is not None
    assert abs(float(with_zeros) - float(without)) <= 2 * float(relu.max()) / 256


def test_gaussian_mse_and_entropy_sensible() -> None:
    rng = np.random.default_rng(7)
    cal = _hist(rng.standard_normal(400_000), batches=4)
    mse, ent, mx = cal.compute_amax("mse"), cal.compute_amax("entropy"), cal.compute_amax("percentile", percentile=100)
    assert mse is not None and ent is not None and mx is not None
    assert 3.5 < float(mse) < 4.3  # about 3.9 sigma (spec: 3.897)
    assert 2.0 < float(ent) <= float(_arrays(cal)[1][-1])


def test_histogram_errors() -> None:
    cal = HistogramCalibrator(num_bins=16)
    assert cal.compute_amax("entropy") is None
    with pytest.raises(QuantError, match="unknown histogram method 'kl'"):
        cal.compute_amax("kl")
    cal.collect(torch.randn(100))
    with pytest.raises(QuantError, match="no candidates"):
        cal.compute_amax("entropy", start_bin=128)
    with pytest.raises(QuantError, match="no candidates"):
        cal.compute_amax("mse", start_bin=128)
