"""Benchmarks: histogram collection (torch.histc vs a numpy baseline) and the vectorised entropy search.

Run: PYTHONPATH=$PWD python -m pytest -p no:qharness tests/bench_quant_calib.py -s
Figures are printed; nothing asserts a timing.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pytest_benchmark.fixture import BenchmarkFixture
from test_quant_calib import entropy_loop_reference

from harness.quant.calib import HistogramCalibrator, amax_entropy

SHAPE = (1, 64, 256, 512)


def _activation() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(SHAPE, generator=g))


def _numpy_collect(x: np.ndarray, num_bins: int = 2048) -> np.ndarray:
    a = np.abs(x)
    hist, _ = np.histogram(a, bins=num_bins, range=(0.0, float(a.max())))
    return hist


def test_bench_histogram_collect(benchmark: BenchmarkFixture) -> None:
    x = _activation()
    xn = x.numpy()
    _numpy_collect(xn)
    t0 = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        _numpy_collect(xn)
    numpy_s = (time.perf_counter() - t0) / rounds

    def collect() -> None:
        HistogramCalibrator().collect(x)

    benchmark.pedantic(collect, rounds=rounds, warmup_rounds=1)
    ours_s = benchmark.stats.stats.min
    n = x.numel()
    print(
        f"\nhistogram collect {SHAPE}: torch.histc {ours_s * 1e3:.1f} ms ({n / ours_s / 1e6:.0f} M elem/s), "
        f"numpy histogram {numpy_s * 1e3:.1f} ms ({n / numpy_s / 1e6:.0f} M elem/s), ratio {numpy_s / ours_s:.2f}x"
    )


def test_bench_entropy_vs_loop(benchmark: BenchmarkFixture) -> None:
    rng = np.random.default_rng(1)
    cal = HistogramCalibrator()
    for k in range(4):
        cal.collect(torch.from_numpy(rng.laplace(0, 1 + 0.1 * k, 200_000).astype(np.float32)))
    hist = cal.histogram
    assert hist is not None
    counts = hist[0][:2048].int().numpy()
    edges = hist[1][:2049].numpy()
    t0 = time.perf_counter()
    reference = entropy_loop_reference(counts, edges)
    loop_s = time.perf_counter() - t0
    result = benchmark.pedantic(lambda: amax_entropy(counts, edges), rounds=5, warmup_rounds=1)
    ours_s = benchmark.stats.stats.min
    assert result == reference
    print(
        f"\nentropy amax, 2048 bins: vectorised {ours_s * 1e3:.1f} ms, O(bins^2) loop {loop_s:.2f} s, "
        f"speedup {loop_s / ours_s:.0f}x, identical amax {result:.6f}"
    )
