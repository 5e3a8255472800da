"""Tests for harness/compare.py: statistics, tolerance verdicts and the printed reports."""

from __future__ import annotations

import json
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harness.compare import (
    TOP_WORST,
    Tolerance,
    compare,
    cosine_similarity,
    failure_table,
    nvidia_report,
    snr_db,
)

SETTINGS = settings(max_examples=50, deadline=None)

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
finite32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
finite64 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def pairs(draw: st.DrawFn, elements: st.SearchStrategy[float] = finite64, dtype: str = "f8") -> tuple[np.ndarray, np.ndarray]:
    shape = draw(shapes)
    a = draw(hnp.arrays(dtype, shape, elements=elements))
    r = draw(hnp.arrays(dtype, shape, elements=elements))
    return a, r


def strict_json(obj: object) -> object:
    return json.loads(json.dumps(obj, allow_nan=False))


# --- identical inputs ---

@SETTINGS
@given(array=hnp.arrays(st.sampled_from(["f2", "f4", "f8", "i4", "u1"]), shapes))
def test_identical_is_perfect(array: np.ndarray) -> None:
    assume(np.isfinite(array.astype(np.float64)).all())
    tol = Tolerance(atol=0.0, rtol=0.0, cosine_min=1.0, snr_min_db=1e9)
    result = compare(array, array.copy(), tol)
    s = result.stats
    assert s.cosine == 1.0
    assert s.max_abs == s.mean_abs == s.sum_abs == s.std_abs == s.max_rel == 0.0
    assert s.snr_db == math.inf
    assert s.mismatch_count == 0 and s.mismatch_fraction == 0.0
    assert s.exact_equal_fraction == 1.0
    assert result.passed, result.checks
    assert not result.problems


def test_all_zero_tensors_are_identical() -> None:
    z = np.zeros((3, 3), np.float32)
    assert compare(z, z, Tolerance(cosine_min=1.0)).passed
    assert cosine_similarity(z, z) == 1.0
    assert cosine_similarity(z, np.ones_like(z)) == 0.0
    assert snr_db(np.ones(3), np.zeros(3)) == -math.inf


# --- properties ---

@SETTINGS
@given(ar=pairs(), k=st.floats(1e-3, 1e3), side=st.booleans())
def test_cosine_invariant_to_positive_scaling(ar: tuple[np.ndarray, np.ndarray], k: float, side: bool) -> None:
    a, r = ar
    assume(np.linalg.norm(a) > 1e-3 and np.linalg.norm(r) > 1e-3)
    base = compare(a, r).stats.cosine
    scaled = compare(a * k, r).stats.cosine if side else compare(a, r * k).stats.cosine
    assert scaled == pytest.approx(base, abs=1e-12)
    assert -1.0 <= base <= 1.0


@pytest.mark.parametrize("k", [1e-300, 1e-160, 1e160, 1e300])
def test_cosine_survives_extreme_float64_scales(k: float) -> None:
    a = np.array([3.0, 4.0, 0.0])
    r = np.array([4.0, 3.0, 0.0])
    assert cosine_similarity(a * k, r * k) == pytest.approx(24 / 25, rel=1e-12)
    assert cosine_similarity(a * k, a * k) == 1.0


@SETTINGS
@given(ar=pairs(), atol=st.floats(0, 10), rtol=st.floats(0, 1))
def test_mismatch_count_is_numpy_isclose(ar: tuple[np.ndarray, np.ndarray], atol: float, rtol: float) -> None:
    a, r = ar
    # Make some elements sit exactly on the atol + rtol*|ref| boundary.
    a = np.where(np.arange(a.size).reshape(a.shape) % 3 == 0, r + atol, a)
    result = compare(a, r, Tolerance(atol=atol, rtol=rtol, max_mismatch=1.0))
    expected = int((~np.isclose(a, r, rtol=rtol, atol=atol)).sum())
    assert result.stats.mismatch_count == expected
    assert result.stats.mismatch_fraction == expected / a.size
    assert result.passed


@SETTINGS
@given(ar=pairs(finite32, "f4"), atol=st.floats(0, 10, width=32), rtol=st.floats(0, 1, width=32))
def test_mismatch_count_float32_is_isclose_in_float64(ar: tuple[np.ndarray, np.ndarray], atol: float, rtol: float) -> None:
    a, r = ar
    result = compare(a, r, Tolerance(atol=atol, rtol=rtol))
    a64, r64 = a.astype(np.float64), r.astype(np.float64)
    assert result.stats.mismatch_count == int((~np.isclose(a64, r64, rtol=rtol, atol=atol)).sum())


def test_float32_closeness_is_judged_in_float64_not_float32() -> None:
    # float32(0.2) - float32(0.1) = 0.10000000149 > 0.1: outside atol, although numpy.isclose on
    # the float32 arrays rounds the difference to 0.1 and calls it close.
    a, r = np.float32([0.2]), np.float32([0.1])
    assert bool(np.isclose(a, r, rtol=0, atol=0.1)[0])
    assert compare(a, r, Tolerance(atol=0.1)).stats.mismatch_count == 1


@SETTINGS
@given(ar=pairs(finite32, "f4"))
def test_error_statistics_equal_numpy(ar: tuple[np.ndarray, np.ndarray]) -> None:
    a, r = ar
    s = compare(a, r).stats
    d = np.abs(a.astype(np.float64) - r.astype(np.float64))
    assert s.max_abs == d.max()
    assert s.mean_abs == pytest.approx(d.mean(), rel=1e-12, abs=1e-300)
    assert s.sum_abs == pytest.approx(d.sum(), rel=1e-12, abs=1e-300)
    assert s.std_abs == pytest.approx(d.std(), rel=1e-9, abs=1e-12)
    assert s.exact_equal_fraction == (d == 0).mean()
    assert s.numel == a.size
    nz = r != 0
    if nz.all():
        assert s.max_rel == pytest.approx((d / np.abs(r.astype(np.float64))).max(), rel=1e-12)
    a64, r64 = a.ravel().astype(np.float64), r.ravel().astype(np.float64)
    norms = float(np.linalg.norm(a64) * np.linalg.norm(r64))
    if norms > 0:
        assert s.cosine == pytest.approx(float(np.dot(a64, r64)) / norms, abs=1e-12)


def test_max_rel_is_inf_when_reference_is_zero_and_error_is_not() -> None:
    assert compare(np.array([1.0, 1.0]), np.array([0.0, 2.0])).stats.max_rel == math.inf
    assert compare(np.array([0.0, 3.0]), np.array([0.0, 2.0])).stats.max_rel == 0.5
    assert compare(np.array([1.0]), np.array([0.0])).stats.max_rel == math.inf


def test_snr_value() -> None:
    r = np.array([3.0, 4.0])  # signal 25
    a = np.array([3.0, 4.5])  # noise 0.25
    assert compare(a, r).stats.snr_db == pytest.approx(20.0)


# --- NaN / Inf ---

@SETTINGS
@given(
    ar=pairs(finite32, "f4"),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    where=st.sampled_from(["actual", "reference", "both"]),
    pos=st.integers(0, 10**6),
)
def test_nan_and_inf_always_fail_and_name_the_tensor(
    ar: tuple[np.ndarray, np.ndarray], bad: float, where: str, pos: int
) -> None:
    a, r = ar
    i = pos % a.size
    if where in ("actual", "both"):
        a.flat[i] = bad
    if where in ("reference", "both"):
        r.flat[i] = bad
    result = compare(a, r, Tolerance(atol=1e30, max_mismatch=1.0), name="logits")
    assert not result.passed
    assert result.problems and all("logits" in p for p in result.problems)
    side = "reference" if where == "reference" else "actual"
    kind = "NaN" if math.isnan(bad) else "Inf"
    assert any(p.startswith(f"logits: {side} has") for p in result.problems)
    s = result.stats
    counts = {"actual": (s.nan_actual, s.inf_actual), "reference": (s.nan_reference, s.inf_reference)}
    assert counts[side][0 if kind == "NaN" else 1] == 1
    # The bad element is reported first among the worst elements.
    assert s.worst[0].abs_error == math.inf
    assert s.worst[0].index == tuple(int(x) for x in np.unravel_index(i, a.shape))
    assert "logits" in failure_table(result)
    strict_json(result.to_dict())


# --- shapes ---

def test_shape_mismatch_fails_unless_reshape_allowed() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    r = a.reshape(3, 2)
    result = compare(a, r, name="feat")
    assert not result.passed
    assert result.problems == ("feat: shape (2, 3) differs from reference (3, 2)",)
    allowed = compare(a, r, allow_reshape=True)
    assert allowed.passed and allowed.stats.max_abs == 0
    assert allowed.stats.actual_shape == (2, 3) and allowed.stats.reference_shape == (3, 2)


def test_different_numel_raises_naming_tensor() -> None:
    with pytest.raises(ValueError, match=r"feat: element counts differ: actual \(2, 3\) \(6\) vs reference \(7,\) \(7\)"):
        compare(np.zeros((2, 3)), np.zeros(7), name="feat", allow_reshape=True)


def test_dtypes_are_reported() -> None:
    s = compare(np.zeros(2, np.float16), np.zeros(2, np.float32)).stats
    assert (s.actual_dtype, s.reference_dtype) == ("float16", "float32")


# --- worst elements ---

@SETTINGS
@given(ar=pairs(finite32, "f4"))
def test_worst_elements_sorted_with_correct_indices(ar: tuple[np.ndarray, np.ndarray]) -> None:
    a, r = ar
    worst = compare(a, r).stats.worst
    err = np.abs(a.astype(np.float64) - r.astype(np.float64))
    assert len(worst) == min(TOP_WORST, a.size)
    assert [w.abs_error for w in worst] == sorted(np.sort(err.ravel())[::-1][: len(worst)].tolist(), reverse=True)
    assert len({w.index for w in worst}) == len(worst)
    for w in worst:
        assert len(w.index) == a.ndim
        assert w.actual == float(a[w.index]) and w.reference == float(r[w.index])
        assert w.abs_error == err[w.index]


def test_worst_example() -> None:
    r = np.zeros((2, 3, 4), np.float32)
    a = r.copy()
    a[1, 2, 3], a[0, 1, 0], a[1, 0, 2] = 5, -3, 1
    worst = compare(a, r).stats.worst
    assert [(w.index, w.actual, w.abs_error) for w in worst[:3]] == [
        ((1, 2, 3), 5.0, 5.0), ((0, 1, 0), -3.0, 3.0), ((1, 0, 2), 1.0, 1.0)]
    assert [w.abs_error for w in worst[3:]] == [0.0, 0.0]


def test_empty_tensors() -> None:
    result = compare(np.zeros((0, 3)), np.zeros((0, 3)), Tolerance(atol=0.0, cosine_min=1.0))
    assert result.passed
    assert result.stats.worst == () and result.stats.numel == 0
    assert result.stats.mismatch_fraction == 0.0


# --- every tolerance at its boundary ---

def verdict(a: list[float], r: list[float], **tol: float) -> bool:
    return compare(np.array(a), np.array(r), Tolerance(**tol)).passed


def test_atol_boundary() -> None:
    assert verdict([1.0, 2.5], [1.0, 2.0], atol=0.5)
    assert not verdict([1.0, 2.5], [1.0, 2.0], atol=np.nextafter(0.5, 0))


def test_rtol_boundary() -> None:
    assert verdict([2.5], [2.0], rtol=0.25)
    assert not verdict([2.5], [2.0], rtol=np.nextafter(0.25, 0))
    assert not verdict([-2.5], [-2.0], rtol=0.2)


def test_atol_plus_rtol() -> None:
    assert verdict([3.0], [2.0], atol=0.5, rtol=0.25)
    assert not verdict([3.0], [2.0], atol=0.5, rtol=0.2)


def test_max_mismatch_boundary() -> None:
    a, r = [1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0]
    assert verdict(a, r, atol=0.0, max_mismatch=0.25)
    assert not verdict(a, r, atol=0.0, max_mismatch=np.nextafter(0.25, 0))
    assert not verdict(a, r, atol=0.0)  # default max_mismatch is 0


def test_max_mismatch_alone_checks_nothing() -> None:
    assert verdict([1.0], [100.0], max_mismatch=0.0)
    assert compare(np.ones(2), np.zeros(2)).checks == ()


def test_cosine_boundary() -> None:
    a, r = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])
    c = compare(a, r).stats.cosine
    assert compare(a, r, Tolerance(cosine_min=c)).passed
    assert not compare(a, r, Tolerance(cosine_min=float(np.nextafter(c, 2)))).passed


def test_snr_boundary() -> None:
    a, r = np.array([3.0, 4.5]), np.array([3.0, 4.0])
    s = compare(a, r).stats.snr_db
    assert compare(a, r, Tolerance(snr_min_db=s)).passed
    assert not compare(a, r, Tolerance(snr_min_db=float(np.nextafter(s, 100)))).passed


def test_snr_of_a_vanishing_signal_is_minus_inf() -> None:
    # found by hypothesis: sum(ref^2) is subnormal, the ratio to the noise underflows to 0
    tiny = 3.99080635e-160
    assert compare(np.array([tiny, 360.0]), np.array([tiny, tiny])).stats.snr_db == -math.inf


def test_checks_describe_what_missed() -> None:
    result = compare(np.array([1.0, 2.0]), np.array([1.0, 3.0]), Tolerance(atol=0.5, cosine_min=0.999999))
    names = [c.name for c in result.checks]
    assert names == ["outside atol=0.5+rtol=0*|ref|", "cosine"]
    mismatch, cosine = result.checks
    assert (mismatch.measured, mismatch.bound, mismatch.passed, mismatch.relation) == (0.5, 0.0, False, "<=")
    assert mismatch.describe() == "outside atol=0.5+rtol=0*|ref| 0.5 <= 0 FAILED (missed by 0.5)"
    assert cosine.describe().startswith("cosine 0.98") and "FAILED (missed by" in cosine.describe()
    ok = compare(np.ones(2), np.ones(2), Tolerance(cosine_min=0.5)).checks[0]
    assert ok.describe() == "cosine 1 >= 0.5 ok"


# --- serialisation and texts ---

def test_to_dict_is_strict_json_with_infinities() -> None:
    result = compare(np.ones(3, np.float32), np.ones(3, np.float32), Tolerance(atol=0.1, snr_min_db=40))
    data = strict_json(result.to_dict())
    assert isinstance(data, dict)
    assert data["passed"] is True and data["name"] == "output"
    assert data["stats"]["snr_db"] == "inf"
    assert data["stats"]["actual_shape"] == [3]
    assert data["checks"][1] == {"name": "snr_db", "measured": "inf", "bound": 40, "relation": ">=", "passed": True}
    bad = compare(np.array([np.nan, 1.0, np.inf]), np.array([0.0, 1.0, 2.0]), Tolerance(snr_min_db=math.inf))
    data = strict_json(bad.to_dict())
    assert isinstance(data, dict)
    assert data["stats"]["worst"][0]["actual"] in ("nan", "inf")
    assert data["checks"][0]["bound"] == "inf"


def test_failure_table_lines() -> None:
    r = np.zeros((2, 2), np.float32)
    a = r.copy()
    a[1, 0] = 0.5
    text = failure_table(compare(a, r, Tolerance(atol=0.1, cosine_min=0.9), name="seg"))
    lines = text.splitlines()
    assert lines[0] == "tensor 'seg' [2, 2] float32 vs reference [2, 2] float32"
    assert "check" in text and "measured" in text and "verdict" in text
    assert "FAILED by 0.25" in text  # 1 of 4 outside, bound 0
    assert "max_abs 0.5" in text and "cosine 0" in text
    assert "[1, 0]" in text and "worst index" in text
    problem = failure_table(compare(a, r.reshape(4), name="seg", allow_reshape=False))
    assert "problem: seg: shape (2, 2) differs from reference (4,)" in problem


def test_nvidia_report_lines() -> None:
    r = np.ones(8, np.float32)
    a = r + np.array([0, 0, 0, 0, 1, 2, 3, 4], np.float32)
    result = compare(a, r, Tolerance(atol=1.5))
    text = nvidia_report(result, "cpp.tensor", "torch.tensor", detail=True)
    lines = text.splitlines()
    d = np.array([0, 0, 0, 0, 1, 2, 3, 4], np.float64)
    cosine = float(a.astype(np.float64).sum() / (math.sqrt(8) * np.linalg.norm(a.astype(np.float64))))
    expected = [
        "[actual] shape=[8], dtype=float32, path=cpp.tensor",
        f"[actual] absmax=5.000000, min=1.000000, std={a.std():.6f}, mean={a.mean():.6f}",
        "[reference] shape=[8], dtype=float32, path=torch.tensor",
        "[reference] absmax=1.000000, min=1.000000, std=0.000000, mean=1.000000",
        f"[absdiff] max=4.000000, sum=10.000000, std={d.std():.6f}, mean=1.250000",
        "[absdiff > 75% max] 12.500 %, 1 elements",
        "[absdiff > 50% max] 25.000 %, 2 elements",
        "[absdiff > 25% max] 37.500 %, 3 elements",
        "[absdiff > 0] 50.000 %, 4 elements",
        "[absdiff = 0] 50.000 %, 4 elements",
        f"[cosine] {cosine * 100:.3f} %",
    ]
    assert lines[: len(expected)] == expected
    assert lines[len(expected)].startswith("[qharness] max_rel=4, snr=")
    assert "outside tolerance=3 (0.375)" in lines[len(expected)]
    assert lines[len(expected) + 1] == "[worst] index=[7] actual=5 reference=1 abs_err=4"
    assert "[check] outside atol=1.5+rtol=0*|ref| 0.375 <= 0 FAILED (missed by 0.375)" in lines
    assert lines[-1] == "[verdict] FAILED"


def test_nvidia_report_without_detail_or_tolerance() -> None:
    a = np.array([1.0, 2.0])
    text = nvidia_report(compare(a, a), "a.npy", "b.npy", detail=False)
    assert text.splitlines()[0] == "[absdiff] max=0.000000, sum=0.000000, std=0.000000, mean=0.000000"
    assert "[actual]" not in text and "[cosine]" not in text and "[verdict]" not in text
    assert "outside tolerance" not in text
