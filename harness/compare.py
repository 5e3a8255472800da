"""Tensor comparison: statistics, tolerance verdicts, and the texts users read.

`compare(actual, reference, tolerance)` computes, in float64, everything a deployment engineer
looks at when an engine disagrees with PyTorch: max / mean / sum / std of the absolute error, the
max relative error, cosine similarity, SNR in dB, the fraction of elements outside
`atol + rtol * |reference|` (exactly `numpy.isclose`'s rule), NaN / Inf counts, the exactly-equal
share and the worst elements with their indices. The verdict checks only the tolerances given,
except that NaN or Inf in either tensor and a shape mismatch always fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from harness.fmt import general

TOP_WORST = 5


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one output tensor; None means "not checked"."""

    atol: float | None = None
    rtol: float | None = None
    max_mismatch: float = 0.0
    cosine_min: float | None = None
    snr_min_db: float | None = None

    @property
    def checks_closeness(self) -> bool:
        """True when an elementwise atol/rtol bound is part of the verdict."""
        return self.atol is not None or self.rtol is not None


@dataclass(frozen=True)
class WorstElement:
    """One element with a large absolute error."""

    index: tuple[int, ...]
    actual: float
    reference: float
    abs_error: float


@dataclass(frozen=True)
class CompareStats:
    """Statistics of `actual` against `reference` (errors are |actual - reference|)."""

    actual_shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    actual_dtype: str
    reference_dtype: str
    numel: int
    max_abs: float
    mean_abs: float
    sum_abs: float
    std_abs: float
    max_rel: float
    cosine: float
    snr_db: float
    mismatch_fraction: float | None
    mismatch_count: int | None
    exact_equal_fraction: float
    above_fraction: dict[str, float]
    nan_actual: int
    inf_actual: int
    nan_reference: int
    inf_reference: int
    worst: tuple[WorstElement, ...]
    actual_summary: dict[str, float]
    reference_summary: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict (infinities become strings "inf"/"-inf")."""
        out: dict[str, object] = {}
        for key, value in self.__dict__.items():
            if key == "worst":
                out[key] = [
                    {"index": list(w.index), "actual": _json_float(w.actual),
                     "reference": _json_float(w.reference), "abs_error": _json_float(w.abs_error)}
                    for w in value
                ]
            elif isinstance(value, dict):
                out[key] = {k: _json_float(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                out[key] = list(value)
            elif isinstance(value, float):
                out[key] = _json_float(value)
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class Check:
    """One verdict line: what was measured, the bound, and whether it held."""

    name: str
    measured: float
    bound: float
    passed: bool
    relation: str

    def describe(self) -> str:
        """Human text such as "cosine 0.9812 >= 0.99 FAILED (missed by 0.0088)"."""
        status = "ok" if self.passed else f"FAILED (missed by {_fmt(abs(self.measured - self.bound))})"
        return f"{self.name} {_fmt(self.measured)} {self.relation} {_fmt(self.bound)} {status}"


@dataclass(frozen=True)
class CompareResult:
    """Statistics plus the verdict of every check that applied."""

    name: str
    stats: CompareStats
    checks: tuple[Check, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """True when there are no problems (NaN, Inf, shape) and every check held."""
        return not self.problems and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict with name, verdict, problems, checks and statistics."""
        return {
            "name": self.name,
            "passed": self.passed,
            "problems": list(self.problems),
            "checks": [
                {"name": c.name, "measured": _json_float(c.measured), "bound": _json_float(c.bound),
                 "relation": c.relation, "passed": c.passed}
                for c in self.checks
            ],
            "stats": self.stats.to_dict(),
        }


def compare(
    actual: np.ndarray,
    reference: np.ndarray,
    tolerance: Tolerance | None = None,
    *,
    name: str = "output",
    allow_reshape: bool = False,
) -> CompareResult:
    """Compare `actual` with `reference` and judge the result against `tolerance`.

    Shapes must match unless `allow_reshape` (then only the element counts must, and both are
    flattened, as NVIDIA's tool/compare.py does); a count mismatch raises ValueError. NaN/Inf in
    either tensor and a shape mismatch are problems that fail the verdict whatever the tolerance.
    """
    tolerance = tolerance or Tolerance()
    a_arr = np.asarray(actual)
    r_arr = np.asarray(reference)
    if a_arr.size != r_arr.size:
        raise ValueError(
            f"{name}: element counts differ: actual {a_arr.shape} ({a_arr.size}) vs "
            f"reference {r_arr.shape} ({r_arr.size})"
        )
    problems: list[str] = []
    if a_arr.shape != r_arr.shape and not allow_reshape:
        problems.append(f"{name}: shape {tuple(a_arr.shape)} differs from reference {tuple(r_arr.shape)}")
    # inf - inf and huge / tiny values are expected here and reported as statistics, not warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        stats = _statistics(a_arr, r_arr, tolerance)
    if stats.nan_actual or stats.inf_actual:
        problems.append(f"{name}: actual has {stats.nan_actual} NaN and {stats.inf_actual} Inf values")
    if stats.nan_reference or stats.inf_reference:
        problems.append(f"{name}: reference has {stats.nan_reference} NaN and {stats.inf_reference} Inf values")
    return CompareResult(name=name, stats=stats, checks=_checks(stats, tolerance), problems=tuple(problems))


def _statistics(actual: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> CompareStats:
    a = actual.astype(np.float64, copy=False).reshape(-1)
    r = reference.astype(np.float64, copy=False).reshape(-1)
    nan_a, inf_a = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    nan_r, inf_r = int(np.isnan(r).sum()), int(np.isinf(r).sum())
    finite = np.isfinite(a) & np.isfinite(r)
    all_finite = bool(finite.all())
    af, rf = (a, r) if all_finite else (a[finite], r[finite])
    diff = np.abs(af - rf)
    n = diff.size
    max_abs = float(diff.max()) if n else 0.0
    above = {}
    for label, frac in (("75%", 0.75), ("50%", 0.5), ("25%", 0.25)):
        above[label] = float((diff > frac * max_abs).mean()) if n else 0.0
    above["0"] = float((diff > 0).mean()) if n else 0.0
    abs_ref = np.abs(rf)
    nonzero = abs_ref > 0
    if nonzero.any():
        max_rel = float((diff[nonzero] / abs_ref[nonzero]).max())
        if (diff[~nonzero] > 0).any():
            max_rel = math.inf
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    mismatch_fraction: float | None = None
    mismatch_count: int | None = None
    if tolerance.checks_closeness:
        close = np.isclose(a, r, rtol=tolerance.rtol or 0.0, atol=tolerance.atol or 0.0)
        mismatch_count = int((~close).sum())
        mismatch_fraction = mismatch_count / a.size if a.size else 0.0
    return CompareStats(
        actual_shape=tuple(int(d) for d in actual.shape),
        reference_shape=tuple(int(d) for d in reference.shape),
        actual_dtype=str(actual.dtype),
        reference_dtype=str(reference.dtype),
        numel=int(a.size),
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if n else 0.0,
        sum_abs=float(diff.sum()),
        std_abs=float(diff.std()) if n else 0.0,
        max_rel=max_rel,
        cosine=cosine_similarity(af, rf),
        snr_db=snr_db(af, rf),
        mismatch_fraction=mismatch_fraction,
        mismatch_count=mismatch_count,
        exact_equal_fraction=float((diff == 0).mean()) if n else 1.0,
        above_fraction=above,
        nan_actual=nan_a,
        inf_actual=inf_a,
        nan_reference=nan_r,
        inf_reference=inf_r,
        worst=_worst(actual.shape, a, r, finite),
        actual_summary=_summary(af),
        reference_summary=_summary(rf),
    )


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two flattened tensors; 1.0 when both are all zeros."""
    a64 = np.asarray(a, dtype=np.float64).reshape(-1)
    b64 = np.asarray(b, dtype=np.float64).reshape(-1)
    if np.array_equal(a64, b64):
        return 1.0
    # Scale by the largest magnitude first so that squaring cannot overflow or underflow float64.
    ma = float(np.abs(a64).max()) if a64.size else 0.0
    mb = float(np.abs(b64).max()) if b64.size else 0.0
    if ma == 0.0 or mb == 0.0:
        return 0.0
    a64, b64 = a64 / ma, b64 / mb
    return float(np.clip(np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64)), -1.0, 1.0))


class CosineAccumulator:
    """Cosine similarity of two tensors seen piece by piece (float64 sums of a.r, a.a, r.r):
    the streaming form of `cosine_similarity` (1.0 when both are all zeros, 0.0 when one is)."""

    def __init__(self) -> None:
        self.dot = self.aa = self.rr = 0.0

    def add(self, actual: np.ndarray, reference: np.ndarray) -> None:
        """Accumulate one more piece of both tensors (same number of elements)."""
        pair = np.empty((2, np.size(actual)), dtype=np.float64)
        pair[0] = np.asarray(actual).reshape(-1)
        pair[1] = np.asarray(reference).reshape(-1)
        gram = pair @ pair.T  # one float64 BLAS call for a.a, a.r and r.r
        self.aa += float(gram[0, 0])
        self.dot += float(gram[0, 1])
        self.rr += float(gram[1, 1])

    @property
    def value(self) -> float:
        """The cosine of everything accumulated."""
        if self.aa > 0 and self.rr > 0:
            return float(np.clip(self.dot / math.sqrt(self.aa * self.rr), -1.0, 1.0))
        return float(self.aa == self.rr)


def at_least(name: str, measured: float, bound: float) -> Check:
    """The check "`name` measured >= bound" (NaN fails), as compare's own checks are written."""
    return Check(name, measured, bound, not math.isnan(measured) and measured >= bound, ">=")


def snr_db(actual: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-noise ratio 10*log10(sum(ref^2) / sum((actual-ref)^2)); inf when equal."""
    r = np.asarray(reference, dtype=np.float64).reshape(-1)
    noise = float(np.sum((np.asarray(actual, dtype=np.float64).reshape(-1) - r) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return math.inf
    ratio = signal / noise
    if ratio == 0.0:  # no signal, or one so small that the ratio underflows (1e-319 / 360**2)
        return -math.inf
    return 10.0 * math.log10(ratio)


def _summary(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"absmax": 0.0, "min": 0.0, "max": 0.0, "std": 0.0, "mean": 0.0}
    return {
        "absmax": float(np.abs(x).max()),
        "min": float(x.min()),
        "max": float(x.max()),
        "std": float(x.std()),
        "mean": float(x.mean()),
    }


def _worst(shape: tuple[int, ...], a: np.ndarray, r: np.ndarray, finite: np.ndarray) -> tuple[WorstElement, ...]:
    err = np.where(finite, np.abs(a - r), np.inf)
    err = np.where(np.isnan(err), np.inf, err)
    k = min(TOP_WORST, err.size)
    if k == 0:
        return ()
    idx = np.argpartition(-err, k - 1)[:k]
    idx = idx[np.argsort(-err[idx], kind="stable")]
    out = []
    for flat in idx:
        index = tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else (int(flat),)
        out.append(WorstElement(index, float(a[flat]), float(r[flat]), float(err[flat])))
    return tuple(out)


def _checks(stats: CompareStats, tol: Tolerance) -> tuple[Check, ...]:
    checks: list[Check] = []
    if stats.mismatch_fraction is not None:
        checks.append(
            Check(
                f"outside atol={tol.atol or 0:g}+rtol={tol.rtol or 0:g}*|ref|",
                stats.mismatch_fraction,
                tol.max_mismatch,
                stats.mismatch_fraction <= tol.max_mismatch,
                "<=",
            )
        )
    if tol.cosine_min is not None:
        checks.append(Check("cosine", stats.cosine, tol.cosine_min, stats.cosine >= tol.cosine_min, ">="))
    if tol.snr_min_db is not None:
        checks.append(Check("snr_db", stats.snr_db, tol.snr_min_db, stats.snr_db >= tol.snr_min_db, ">="))
    return tuple(checks)


def failure_table(result: CompareResult) -> str:
    """A compact text table for a failing compare: problems, checks, statistics, worst elements."""
    from tabulate import tabulate

    s = result.stats
    lines = [f"tensor '{result.name}' {list(s.actual_shape)} {s.actual_dtype}"
             f" vs reference {list(s.reference_shape)} {s.reference_dtype}"]
    lines += [f"  problem: {p}" for p in result.problems]
    rows = [[c.name, _fmt(c.measured), f"{c.relation} {_fmt(c.bound)}",
             "ok" if c.passed else f"FAILED by {_fmt(abs(c.measured - c.bound))}"] for c in result.checks]
    if rows:
        lines.append(tabulate(rows, headers=["check", "measured", "bound", "verdict"], tablefmt="simple"))
    lines.append(
        f"max_abs {_fmt(s.max_abs)}  mean_abs {_fmt(s.mean_abs)}  max_rel {_fmt(s.max_rel)}  "
        f"cosine {_fmt(s.cosine)}  snr {_fmt(s.snr_db)} dB"
    )
    if s.worst:
        worst = [[str(list(w.index)), _fmt(w.actual), _fmt(w.reference), _fmt(w.abs_error)] for w in s.worst]
        lines.append(tabulate(worst, headers=["worst index", "actual", "reference", "abs err"], tablefmt="simple"))
    return "\n".join(lines)


def nvidia_report(result: CompareResult, actual_path: str, reference_path: str, *, detail: bool,
                  verdict_note: str = "") -> str:
    """The text NVIDIA's tool/compare.py prints, followed by our statistics and worst elements,
    and (when any check or problem applies) a last line "[verdict] PASSED|FAILED" + `verdict_note`."""
    s = result.stats
    lines = []
    if detail:
        for label, path, shape, dtype, summ in (
            ("actual", actual_path, s.actual_shape, s.actual_dtype, s.actual_summary),
            ("reference", reference_path, s.reference_shape, s.reference_dtype, s.reference_summary),
        ):
            lines.append(f"[{label}] shape={list(shape)}, dtype={dtype}, path={path}")
            lines.append(
                f"[{label}] absmax={summ['absmax']:.6f}, min={summ['min']:.6f}, "
                f"std={summ['std']:.6f}, mean={summ['mean']:.6f}"
            )
    lines.append(f"[absdiff] max={s.max_abs:.6f}, sum={s.sum_abs:.6f}, std={s.std_abs:.6f}, mean={s.mean_abs:.6f}")
    if detail:
        for label in ("75%", "50%", "25%"):
            frac = s.above_fraction[label]
            lines.append(f"[absdiff > {label} max] {frac * 100:.3f} %, {round(frac * s.numel)} elements")
        frac = s.above_fraction["0"]
        lines.append(f"[absdiff > 0] {frac * 100:.3f} %, {round(frac * s.numel)} elements")
        lines.append(
            f"[absdiff = 0] {s.exact_equal_fraction * 100:.3f} %, {round(s.exact_equal_fraction * s.numel)} elements"
        )
        lines.append(f"[cosine] {s.cosine * 100:.3f} %")
    lines.append(
        f"[qharness] max_rel={_fmt(s.max_rel)}, snr={_fmt(s.snr_db)} dB, cosine={_fmt(s.cosine)}, "
        f"nan={s.nan_actual}/{s.nan_reference}, inf={s.inf_actual}/{s.inf_reference}"
        + (f", outside tolerance={s.mismatch_count} ({_fmt(s.mismatch_fraction or 0.0)})"
           if s.mismatch_count is not None else "")
    )
    for w in s.worst:
        lines.append(
            f"[worst] index={list(w.index)} actual={_fmt(w.actual)} reference={_fmt(w.reference)} "
            f"abs_err={_fmt(w.abs_error)}"
        )
    lines += [f"[problem] {p}" for p in result.problems]
    lines += [f"[check] {c.describe()}" for c in result.checks]
    if result.checks or result.problems:
        lines.append("[verdict] " + ("PASSED" if result.passed else "FAILED") + verdict_note)
    return "\n".join(lines)


_fmt = general


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return x
