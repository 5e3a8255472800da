"""Cross-check harness.quant.calib against NVIDIA Model Optimizer 0.47.0 on identical batch streams.

Maintenance tool, never imported by the package or the tests. Run it in a throw-away venv that
has `torch==2.13.0` (CPU wheel), `nvidia-modelopt==0.47.0` and scipy, with this repository on
PYTHONPATH:

    PYTHONPATH=$PWD /work/ref/modelopt/bin/python tools/modelopt_crosscheck.py

For several distributions x batch orders it feeds the same batches to Model Optimizer's
`HistogramCalibrator` / `MaxCalibrator` and to ours and prints, per stream, whether the
histograms are identical and the largest amax difference for max, percentiles, entropy and mse.
`mse` is compared with Model Optimizer's own `_compute_amax_mse` with its `fake_tensor_quant`
call fixed (`apply(inputs, amax, None, num_bits, unsigned)`): the intended algorithm. The value
0.47.0 returns as shipped is printed for information. Exit status 1 when anything differs.

Last run (torch 2.13.0+cpu, modelopt 0.47.0, scipy 1.17.1; 8 distributions x 6 orders = 48
streams, 2048-9000 bins): histograms identical, largest |amax difference| 0 for max (per tensor,
axis 0, axis 1), percentiles 50..100, entropy and mse (intended); entropy 150-400x faster.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from modelopt.torch.quantization.calib import histogram as mo_hist
from modelopt.torch.quantization.calib.histogram import HistogramCalibrator as MoHist
from modelopt.torch.quantization.calib.max import MaxCalibrator as MoMax
from modelopt.torch.quantization.tensor_quant import FakeTensorQuantFunction

from harness.quant.calib import HistogramCalibrator, MaxCalibrator

PERCENTILES = (50.0, 99.0, 99.9, 99.99, 99.999, 100.0)


def _fixed_fake_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool) -> torch.Tensor:
    out: torch.Tensor = FakeTensorQuantFunction.apply(inputs, amax, None, num_bits, unsigned)
    return out


def distributions(rng: np.random.Generator) -> dict[str, Callable[[int], np.ndarray]]:
    """Batch generators: each call returns one batch of float32 values."""
    return {
        "gaussian": lambda n: rng.standard_normal(n),
        "laplace": lambda n: rng.laplace(0.0, 1.0, n),
        "uniform": lambda n: rng.uniform(-3.0, 3.0, n),
        "relu_gaussian": lambda n: np.maximum(rng.standard_normal(n), 0.0),
        "lognormal": lambda n: rng.lognormal(0.0, 1.0, n),
        "sparse_outliers": lambda n: np.where(rng.uniform(size=n) < 1e-4, 50.0, 1.0) * rng.standard_normal(n),
        "small_ints": lambda n: rng.integers(-20, 21, n).astype(np.float64),
        "tiny": lambda n: 1e-4 * rng.standard_normal(n),
    }


def streams(batches: list[torch.Tensor], rng: np.random.Generator) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """The same data in several orders and batchings, plus growing and shrinking ranges."""
    yield "forward", batches
    yield "reversed", batches[::-1]
    yield "shuffled", [batches[i] for i in rng.permutation(len(batches))]
    yield "one_batch", [torch.cat([b.reshape(-1) for b in batches])]
    yield "growing", [b * (1.0 + 0.25 * k) for k, b in enumerate(batches)]
    yield "shrinking", [b / (1.0 + 0.25 * k) for k, b in enumerate(batches)]


def compare_histogram(name: str, stream: list[torch.Tensor]) -> tuple[bool, dict[str, float]]:
    """Feed `stream` to both histogram calibrators; returns (identical?, max |difference| per method)."""
    mo, ours = MoHist(), HistogramCalibrator()
    for b in stream:
        mo.collect(b)
        ours.collect(b)
    hist = ours.histogram
    assert hist is not None
    same_hist = torch.equal(mo._calib_hist, hist[0]) and torch.equal(mo._calib_bin_edges, hist[1])
    diffs: dict[str, float] = {}
    timings: dict[str, float] = {}
    for p in PERCENTILES:
        a = mo.compute_amax("percentile", percentile=p)
        b = ours.compute_amax("percentile", percentile=p)
        diffs[f"p{p}"] = abs(float(a) - float(b))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    a = mo.compute_amax("entropy")
    timings["entropy_mo"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = ours.compute_amax("entropy")
    timings["entropy_ours"] = time.perf_counter() - t0
    diffs["entropy"] = abs(float(a) - float(b))  # type: ignore[arg-type]
    shipped = float(mo.compute_amax("mse"))
    original = mo_hist.fake_tensor_quant
    mo_hist.fake_tensor_quant = _fixed_fake_tensor_quant
    try:
        intended = float(mo.compute_amax("mse"))
    finally:
        mo_hist.fake_tensor_quant = original
    mine = float(ours.compute_amax("mse"))  # type: ignore[arg-type]
    diffs["mse"] = abs(intended - mine)
    ok = same_hist and all(v == 0.0 for v in diffs.values())
    print(
        f"  {name:<28} bins={hist[0].numel():5d} hist={'same' if same_hist else 'DIFF'} "
        + " ".join(f"{k}={v:.3g}" for k, v in diffs.items())
        + f" | mse intended={intended:.6g} shipped={shipped:.6g}"
        + f" | entropy {timings['entropy_mo']:.2f}s vs {timings['entropy_ours'] * 1e3:.1f}ms",
        flush=True,
    )
    return ok, diffs


def compare_max(name: str, stream: list[torch.Tensor], axis: int | None) -> bool:
    """Running max per tensor or per channel: must be identical."""
    mo, ours = MoMax(axis=axis), MaxCalibrator(axis=axis)
    for b in stream:
        mo.collect(b)
        ours.collect(b)
    a, b = mo.compute_amax(), ours.compute_amax()
    assert b is not None
    same = torch.equal(a.reshape(b.shape), b)
    print(f"  {name:<28} max axis={axis}: {'same' if same else 'DIFF'} shape={tuple(b.shape)}")
    return bool(same)


def main() -> int:
    rng = np.random.default_rng(20240611)
    all_ok = True
    worst: dict[str, float] = {}
    for dist, make in distributions(rng).items():
        print(dist)
        batches = [torch.from_numpy(make(40_000).astype(np.float32)).reshape(4, 10, 1000) for _ in range(4)]
        for order, stream in streams(batches, rng):
            ok, diffs = compare_histogram(f"{dist}/{order}", stream)
            all_ok &= ok
            for k, v in diffs.items():
                worst[k] = max(worst.get(k, 0.0), v)
        all_ok &= compare_max(f"{dist}/forward", batches, None)
    print("weights")
    weight = torch.from_numpy(rng.standard_normal((64, 32, 3, 3)).astype(np.float32))
    all_ok &= compare_max("conv_weight", [weight], 0)
    all_ok &= compare_max("convtranspose_weight", [weight], 1)
    all_ok &= compare_max("activation_channels", [torch.from_numpy(make(4 * 64 * 100).astype(np.float32)).reshape(4, 64, 10, 10)], 1)
    print("largest |amax difference| over all streams: " + ", ".join(f"{k}={v:.3g}" for k, v in worst.items()))
    print("RESULT:", "identical" if all_ok else "DIFFERENCES FOUND")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
