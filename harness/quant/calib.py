"""Calibrators that turn observed tensors into an int8 range (amax), as NVIDIA Model Optimizer does.

Two calibrators, each usable alone:

* `MaxCalibrator(axis)`: running max of |x|, per tensor or per channel along `axis`
  (keepdims, so a conv weight with axis 0 gets amax of shape `[C, 1, 1, 1]`).
* `HistogramCalibrator(num_bins)`: a histogram of |x| collected on the tensor's device with
  `torch.histc`, reproducing Model Optimizer 0.47.0's growing-range histogram exactly
  (range `[0, max|x| of the first batch]`, fixed bin width, bins appended when a later batch
  exceeds the range, float32 counts). `compute_amax(method=...)` then gives

  - `"percentile"`: the left edge of the first bin whose cumulative share reaches `p/100`;
  - `"mse"`: the bin centre minimising the count-weighted squared error of narrow-range
    ([-127, 127]) fake quantization of the bin centres, i.e. the *intended* Model Optimizer
    algorithm (0.47.0 passes its arguments in the wrong order and returns `centers[start_bin]`);
  - `"entropy"`: TensorRT's KL-divergence search (bin 0's count replaced by bin 1's, outliers
    folded into the last kept bin, the last candidate among equal minima wins).

The searches are vectorised: entropy evaluates every candidate's divergence with prefix sums in
O(bins * 128) and recomputes only the near-minimal candidates with the exact reference arithmetic,
so the chosen bin is the one Model Optimizer's O(bins^2) Python loop chooses.
The exact semantics are spelled out in the project's `int8-calibration.md` specification.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from harness.errors import QuantError

HistMethod = Literal["percentile", "mse", "entropy"]
HIST_METHODS: tuple[str, ...] = ("percentile", "mse", "entropy")

_NUM_LEVELS = 128  # 1 << (num_bits - 1) for signed int8: the groups of the entropy search
_MSE_CHUNK_ELEMENTS = 1 << 22  # candidates x bins evaluated at once by the MSE search


class MaxCalibrator:
    """Running max of |x| over every collected tensor, per tensor or per channel along `axis`."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self._amax: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget everything collected so far."""
        self._amax = None

    def collect(self, x: torch.Tensor) -> None:
        """Fold `max |x|` (over every dim except `axis`, dims kept) into the running max.

        A per-tensor result is a 0-d tensor. The shape of a per-channel max may not change
        between calls (`QuantError`). NaN in `x` propagates into amax (caught by `compute_amax`
        users); the computation stays on `x`'s device.
        """
        x = x.detach()
        if self.axis is None:
            local = x.abs().amax().float()
        else:
            axis = self.axis % x.dim()
            dims = [d for d in range(x.dim()) if d != axis]
            local = x.abs().amax(dim=dims, keepdim=True).float() if dims else x.abs().float()
        if self._amax is None:
            self._amax = local.clone()
            return
        if self._amax.shape != local.shape:
            raise QuantError(
                f"per-channel amax shape changed from {tuple(self._amax.shape)} to "
                f"{tuple(local.shape)} (axis {self.axis})"
            )
        self._amax = torch.maximum(self._amax, local)

    def compute_amax(self) -> torch.Tensor | None:
        """The running max (float32), or None when nothing was collected."""
        return self._amax


class HistogramCalibrator:
    """Histogram of |x| with Model Optimizer 0.47.0's growing range; amax by percentile/mse/entropy."""

    def __init__(self, num_bins: int = 2048) -> None:
        if num_bins < 1:
            raise QuantError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self._bins = num_bins
        self._hist: torch.Tensor | None = None
        self._edges: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the histogram (the next batch fixes a new range and bin width)."""
        self._bins = self.num_bins
        self._hist = None
        self._edges = None

    @property
    def histogram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(float32 counts, float32 edges with one more element), or None before any collect."""
        if self._hist is None or self._edges is None:
            return None
        return self._hist, self._edges

    def collect(self, x: torch.Tensor) -> None:
        """Add |x| to the histogram, on `x`'s device.

        The first call fixes the range `[0, max|x|]` in `num_bins` bins; a later call whose
        max exceeds the range appends bins of the same width (old counts stay where they are);
        every call bins with `torch.histc` over `[0, last edge]` and adds float32 counts.
        """
        with torch.no_grad():
            x = x.detach()
            if torch.min(x) < 0.0:
                x = x.abs()
            x = x.float()
            x_max = x.max().cpu()
            if self._hist is None or self._edges is None:
                self._hist = torch.histc(x, bins=self._bins, min=0, max=float(x_max))
                self._edges = torch.linspace(0, float(x_max), self._bins + 1)
                return
            if x_max > self._edges[-1]:
                width = self._edges[1] - self._edges[0]
                self._bins = int((x_max / width).ceil().item())
                self._edges = torch.arange(0, float(x_max + width), float(width))
            hist = torch.histc(x, bins=self._bins, min=0, max=float(self._edges[-1]))
            hist[: self._hist.numel()] += self._hist.to(hist.device)
            self._hist = hist

    def compute_amax(
        self,
        method: str,
        *,
        percentile: float = 99.99,
        start_bin: int = 128,
        stride: int = 1,
    ) -> torch.Tensor | None:
        """amax (0-d float32 tensor, CPU) by `method`, or None when nothing was collected.

        `percentile` must lie in [0, 100]; `start_bin` and `stride` choose the mse / entropy
        candidates `start_bin, start_bin + stride, ...`. Unknown methods raise `QuantError`.
        """
        if method not in HIST_METHODS:
            raise QuantError(f"unknown histogram method '{method}' (expected one of {', '.join(HIST_METHODS)})")
        if self._hist is None or self._edges is None:
            return None
        counts = self._hist.int().cpu().numpy()
        edges = self._edges.cpu().numpy()
        if method == "percentile":
            value = amax_percentile(counts, edges, percentile)
        elif method == "mse":
            value = amax_mse(counts, edges, start_bin=start_bin, stride=stride)
        else:
            value = amax_entropy(counts, edges, start_bin=start_bin, stride=stride)
        return torch.tensor(value, dtype=torch.float32)


def amax_percentile(counts: npt.NDArray[np.int32], edges: npt.NDArray[np.float32], percentile: float) -> float:
    """Left edge of the first bin where the float64 cdf of `counts` reaches `percentile / 100`."""
    if not 0.0 <= percentile <= 100.0:
        raise QuantError(f"percentile must be in [0, 100], got {percentile}")
    cdf = np.cumsum(counts / counts.sum())
    idx = int(np.searchsorted(cdf, percentile / 100))
    return float(edges[idx])


def amax_mse(
    counts: npt.NDArray[np.int32], edges: npt.NDArray[np.float32], *, start_bin: int = 128, stride: int = 1
) -> float:
    """Bin centre minimising `mean((fq(c, amax) - c)^2 * count)` over candidates (first minimum).

    `fq` is narrow-range symmetric fake quantization (`clamp(round(c * 127/amax), -127, 127) /
    (127/amax)`, float32, half to even). Candidates are evaluated in chunks as rows of a matrix;
    each row's float32 mean is the same reduction the one-candidate-at-a-time loop performs.
    """
    counts_t = torch.from_numpy(counts).float()
    edges_t = torch.from_numpy(edges).float()
    centers = (edges_t[1:] + edges_t[:-1]) / 2
    if start_bin >= centers.numel():
        raise QuantError(f"mse search has no candidates: {centers.numel()} bins, start_bin {start_bin}")
    candidates = torch.arange(start_bin, centers.numel(), stride)
    chunk = max(1, _MSE_CHUNK_ELEMENTS // centers.numel())
    best_mse = math.inf
    best = int(candidates[0])
    for lo in range(0, candidates.numel(), chunk):
        idx = candidates[lo : lo + chunk]
        amax = centers[idx].unsqueeze(1)
        scale = torch.tensor(127.0) / amax
        quant = torch.clamp((centers.unsqueeze(0) * scale).round(), -127.0, 127.0) / scale
        mse = ((quant - centers) ** 2 * counts_t).mean(dim=1)
        k = int(torch.argmin(mse))
        if float(mse[k]) < best_mse:
            best_mse = float(mse[k])
            best = int(idx[k])
    return float(centers[best])


def amax_entropy(
    counts: npt.NDArray[np.int32], edges: npt.NDArray[np.float32], *, start_bin: int = 128, stride: int = 1
) -> float:
    """TensorRT's KL-divergence amax: `edges[i*]` for the last `i*` minimising KL(P_i || Q_i).

    `bins = counts` with `bins[0] = bins[1]`; for every candidate `i` (`start_bin..len(bins)`,
    step `stride`) P keeps the first `i` bins with the rest folded into bin `i-1`, Q merges the
    `i` bins into 128 groups (`group(j) = floor(j * 128 / i)`) spreading each group's count evenly
    over its non-empty bins. The divergence of every candidate is evaluated in closed form with
    prefix sums; candidates within a tolerance of the minimum are recomputed with the reference
    arithmetic (scipy.stats.entropy's normalisation, libm log, numpy pairwise sum) so the tie rule
    sees the same numbers as Model Optimizer.
    """
    bins = counts.astype(np.int64)
    n = len(bins)
    if n < 2:
        raise QuantError(f"entropy search needs at least 2 bins, got {n}")
    bins[0] = bins[1]
    cand = np.arange(start_bin, n + 1, stride)
    if cand.size == 0:
        raise QuantError(f"entropy search has no candidates: {n} bins, start_bin {start_bin}")
    divergence = _entropy_divergences(bins, cand)
    if np.isnan(divergence).any():
        # Model Optimizer's argmin over the reversed list stops at the last NaN.
        return float(edges[cand[np.nonzero(np.isnan(divergence))[0][-1]]])
    best = divergence.min()
    if math.isinf(best):
        return float(edges[cand[-1]])
    near = np.nonzero(divergence <= best + 1e-9 * max(1.0, abs(best)))[0]
    exact = np.array([_kl_reference(bins, int(cand[k])) for k in near])
    last = near[len(exact) - 1 - int(np.argmin(exact[::-1]))]
    return float(edges[cand[last]])


def _entropy_divergences(bins: npt.NDArray[np.int64], cand: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """KL(P_i || Q_i) for every candidate `i` in float64 (inf where P has mass Q lacks, NaN where Q is empty)."""
    total = float(bins.sum())
    nonzero = bins > 0
    b = bins.astype(np.float64)
    blogb = np.where(nonzero, b * np.log(np.where(nonzero, b, 1.0)), 0.0)
    csum = np.concatenate([[0.0], np.cumsum(b)])
    cnz = np.concatenate([[0], np.cumsum(nonzero)])
    cblogb = np.concatenate([[0.0], np.cumsum(blogb)])

    groups = np.arange(_NUM_LEVELS + 1)
    # first bin of each group: ceil(g * i / 128); group g covers [lo_g, lo_{g+1})
    bounds = -((-groups[None, :] * cand[:, None]) // _NUM_LEVELS)
    gsum = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]
    gcnt = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]
    safe = gcnt > 0
    gavg = np.where(safe, gsum / np.where(safe, gcnt, 1), 1.0)
    glog = np.where(safe & (gsum > 0), gsum * np.log(gavg), 0.0).sum(axis=1)

    s_i = csum[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        body = (cblogb[cand] - glog) / total + (s_i / total) * np.log(s_i / total)
        tail = total - s_i
        last = bins[cand - 1].astype(np.float64)
        last_group = ((cand - 1) * _NUM_LEVELS) // cand
        rows = np.arange(len(cand))
        avg_last = gavg[rows, last_group]
        q_last = avg_last / s_i
        old = np.where(last > 0, (last / total) * np.log((last / total) / q_last), 0.0)
        new = ((last + tail) / total) * np.log(((last + tail) / total) / q_last)
        div = np.where(tail > 0, body - old + new, body)
        div = np.where((tail > 0) & (last == 0), np.inf, div)
        div = np.where(s_i == 0, np.nan, div)
    return np.asarray(div, dtype=np.float64)


def _kl_reference(bins: npt.NDArray[np.int64], i: int) -> float:
    """KL(P_i || Q_i) with Model Optimizer's arithmetic for one candidate (used only near the minimum)."""
    head = bins[:i]
    group = (np.arange(i) * _NUM_LEVELS) // i
    nonzero = head != 0
    gsum = np.zeros(_NUM_LEVELS, dtype=np.float64)
    np.add.at(gsum, group[nonzero], head[nonzero].astype(np.float64))
    gcnt = np.bincount(group[nonzero], minlength=_NUM_LEVELS)
    gavg = np.where(gcnt > 0, gsum / np.maximum(gcnt, 1), 0.0)
    q = np.where(nonzero, gavg[group], 0.0)
    p = head.astype(np.float64)
    p[-1] += float(bins[i:].sum())
    p = p / np.sum(p)
    q = q / np.sum(q)
    terms = np.array([_rel_entr(float(a), float(c)) for a, c in zip(p, q, strict=True)])
    return float(np.sum(terms))


def _rel_entr(x: float, y: float) -> float:
    """scipy.special.rel_entr: x*log(x/y), 0 for x == 0, inf where x > 0 meets y == 0 (libm log)."""
    if math.isnan(x) or math.isnan(y):
        return math.nan
    if x > 0 and y > 0:
        return x * math.log(x / y)
    if x == 0 and y >= 0:
        return 0.0
    return math.inf
