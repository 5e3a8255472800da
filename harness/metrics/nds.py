"""nuScenes detection metrics (mAP, TP errors, NDS) computed exactly as nuscenes-devkit 1.2.0 does.

The devkit (``nuscenes/eval/detection/algo.py``) matches predictions to ground truth greedily, one
prediction at a time in Python; here the same matching runs vectorised with numpy and every
number after the matching (cumulative sums, ``np.interp`` calls, the NaN-aware running mean,
``calc_ap`` / ``calc_tp`` index ranges, the per-class NaN rules and the NDS formula) is computed
with the same numpy operations on the same arrays, so results agree with the devkit to the bit
(distances use the same BLAS dot product as ``np.linalg.norm``).

Boxes are given in the ego frame (ego at the origin), so there is no nuScenes database: the class
range filter uses the xy distance of the box centre to the origin, and the devkit's bicycle-rack
filter (which needs ``static_object.bicycle_rack`` annotations) is not applied.

Why matching per (class, sample) is the devkit's matching
---------------------------------------------------------
The devkit calls ``accumulate`` once per class and distance threshold. It sorts the class's
predictions, flattened in (prediction sample order, list order), by descending ``(score,
flattened index)`` -- ties in score go to the larger flattened index first -- and then, for each
prediction in that order, takes the nearest untaken ground-truth box of the class *in the
prediction's own sample* (first in list order on equal distance) and calls it a match if the
distance is strictly below the threshold. So:

1. A prediction's outcome depends only on which ground-truth boxes of its own (class, sample)
   are taken when its turn comes, and only predictions of that same (class, sample) take them.
   Processing each (class, sample) group in the global order restricted to the group -- which is
   again descending ``(score, index within the sample)``, because the flattened index grows with
   the index within a sample -- therefore gives every prediction the same outcome, whatever the
   interleaving between groups. Here all groups advance in lockstep: step ``k`` handles the
   ``k``-th prediction of every group at once (groups never share ground truth, so the updates
   of one step cannot conflict). The TP/FP flags are then read back in the global order.
2. Only ground truth strictly closer than the threshold can be matched, and when one exists the
   nearest untaken box is among them, so matching only needs the candidate pairs ``d < th``,
   sorted by ``(distance, ground-truth index)``: the first untaken one is the devkit's choice
   (ground-truth indices grow with the list order inside a sample).
3. A prediction without any candidate is a false positive whatever is taken and takes nothing,
   so it can be left out of the lockstep altogether.
4. Range filtering removes boxes but keeps the relative order of the rest, so flattened indices
   before and after filtering sort the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from harness.errors import MetricError
from harness.metrics.base import Figure, Metric, MetricArgsError, MetricValues

__all__ = [
    "ATTRIBUTE_NAMES",
    "CLASS_ATTRIBUTES",
    "CLASS_RANGES",
    "DETECTION_CLASSES",
    "DIST_THRESHOLDS",
    "DIST_TH_TP",
    "MAX_BOXES_PER_SAMPLE",
    "MEAN_AP_WEIGHT",
    "MIN_PRECISION",
    "MIN_RECALL",
    "TP_METRICS",
    "ClassMetrics",
    "NDSMetric",
    "NDSResult",
    "check_finite",
    "evaluate",
]

DETECTION_CLASSES: Final[tuple[str, ...]] = (
    "car", "truck", "bus", "trailer", "construction_vehicle",
    "pedestrian", "motorcycle", "bicycle", "traffic_cone", "barrier",
)  # fmt: skip
"""The 10 nuScenes detection classes in devkit order."""

ATTRIBUTE_NAMES: Final[tuple[str, ...]] = (
    "pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing",
    "cycle.with_rider", "cycle.without_rider",
    "vehicle.moving", "vehicle.parked", "vehicle.stopped",
)  # fmt: skip
"""The 8 nuScenes attributes in devkit order; a box without attribute has ''."""

_VEHICLE = ("vehicle.moving", "vehicle.parked", "vehicle.stopped")
_CYCLE = ("cycle.with_rider", "cycle.without_rider")
_PEDESTRIAN = ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing")

CLASS_ATTRIBUTES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "car": _VEHICLE, "truck": _VEHICLE, "bus": _VEHICLE, "trailer": _VEHICLE,
    "construction_vehicle": _VEHICLE, "pedestrian": _PEDESTRIAN,
    "motorcycle": _CYCLE, "bicycle": _CYCLE, "traffic_cone": (), "barrier": (),
})  # fmt: skip
"""Attributes a box of each class may carry besides ''."""

CLASS_RANGES: Final[Mapping[str, float]] = MappingProxyType({
    "car": 50.0, "truck": 50.0, "bus": 50.0, "trailer": 50.0, "construction_vehicle": 50.0,
    "pedestrian": 40.0, "motorcycle": 40.0, "bicycle": 40.0,
    "traffic_cone": 30.0, "barrier": 30.0,
})  # fmt: skip
"""Evaluation range per class (m, xy distance to the ego); boxes must be strictly closer."""

DIST_THRESHOLDS: Final[tuple[float, ...]] = (0.5, 1.0, 2.0, 4.0)
"""Centre-distance matching thresholds (m) that AP is averaged over."""
DIST_TH_TP: Final = 2.0
"""Matching threshold (m) whose matches give the TP errors."""
MIN_RECALL: Final = 0.1
MIN_PRECISION: Final = 0.1
MAX_BOXES_PER_SAMPLE: Final = 500
MEAN_AP_WEIGHT: Final = 5
TP_METRICS: Final[tuple[str, ...]] = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
"""TP error names in devkit order (mATE, mASE, mAOE, mAVE, mAAE)."""

_N_RECALL = 101
_FIRST_IND = round(100 * MIN_RECALL) + 1
_NAN_TP: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "traffic_cone": frozenset({"attr_err", "vel_err", "orient_err"}),
    "barrier": frozenset({"attr_err", "vel_err"}),
})  # fmt: skip
_CLASS_INDEX = {name: i for i, name in enumerate(DETECTION_CLASSES)}
_ATTR_INDEX = {name: i for i, name in enumerate(("", *ATTRIBUTE_NAMES))}
_ATTR_ALLOWED = np.array(
    [[a == "" or a in CLASS_ATTRIBUTES[c] for a in _ATTR_INDEX] for c in DETECTION_CLASSES]
)
_RANGE = np.array([CLASS_RANGES[c] for c in DETECTION_CLASSES])
_PAIR_BLOCK = 1 << 21  # (prediction, ground truth) pairs whose distances are computed at once
_X_CLAMP = 1e6  # metres; keeps x buckets in int64 range for absurd but finite centres

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class: AP averaged over the distance thresholds, AP per threshold, and
    the TP errors from the matches at ``DIST_TH_TP`` (NaN where the devkit has NaN: cone
    orientation, velocity and attribute, barrier velocity and attribute)."""

    name: str
    num_gt: int
    num_pred: int
    ap: float
    ap_per_threshold: tuple[float, ...]
    trans_err: float
    scale_err: float
    orient_err: float
    vel_err: float
    attr_err: float

    def to_dict(self) -> dict[str, Any]:
        """Plain floats, ints and lists (NaN stays a float NaN, as the devkit writes it)."""
        return {
            "num_gt": self.num_gt,
            "num_pred": self.num_pred,
            "AP": self.ap,
            "AP_per_threshold": list(self.ap_per_threshold),
            **{name: getattr(self, name) for name in TP_METRICS},
        }


@dataclass(frozen=True)
class NDSResult:
    """nuScenes detection metrics over the evaluated classes, keyed by class name in order."""

    mAP: float
    NDS: float
    mATE: float
    mASE: float
    mAOE: float
    mAVE: float
    mAAE: float
    per_class: Mapping[str, ClassMetrics]

    @property
    def classes(self) -> tuple[str, ...]:
        """The evaluated classes in evaluation order."""
        return tuple(self.per_class)

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and lists for JSON (NaN stays a float NaN, as the devkit writes it)."""
        return {
            "mAP": self.mAP,
            "NDS": self.NDS,
            "mATE": self.mATE,
            "mASE": self.mASE,
            "mAOE": self.mAOE,
            "mAVE": self.mAVE,
            "mAAE": self.mAAE,
            "dist_thresholds": list(DIST_THRESHOLDS),
            "classes": {name: m.to_dict() for name, m in self.per_class.items()},
        }


@dataclass(frozen=True)
class _Boxes:
    """One side (ground truth or predictions) flattened in sample order, then list order."""

    sample: IntArray
    label: IntArray
    attribute: IntArray  # 0 for '', else 1 + index in ATTRIBUTE_NAMES
    center: FloatArray  # (n, 3)
    size: FloatArray  # (n, 3)
    yaw: FloatArray
    velocity: FloatArray  # (n, 2)
    score: FloatArray  # predictions only (zeros for ground truth)
    num_pts: NDArray[np.int64]  # ground truth only (ones for predictions)


def evaluate(
    gt: Mapping[str, Sequence[Mapping[str, Any]]],
    pred: Mapping[str, Sequence[Mapping[str, Any]]],
    classes: Sequence[str] | None = None,
    filter_range: bool = False,
) -> NDSResult:
    """Evaluate predictions against ground truth as nuscenes-devkit 1.2.0 does.

    ``gt`` and ``pred`` map the same sample tokens to lists of boxes; a box is a mapping with
    ``label`` (a class of ``DETECTION_CLASSES``), ``center`` [x, y, z] (m, ego at the origin),
    ``size`` [w, l, h], ``yaw`` (rad), ``velocity`` [vx, vy] (NaN allowed), ``attribute`` (''
    or one of ``CLASS_ATTRIBUTES[label]``), ``score`` (predictions) and optionally ``num_pts``
    (ground truth, default 1; boxes with 0 points are dropped as the devkit drops them). Boxes of
    classes outside ``classes`` are ignored. ``classes=None`` evaluates all 10 classes (a class
    without ground truth scores AP 0 and TP errors 1, as in the devkit); ``filter_range`` drops
    boxes of both sides that are not strictly inside ``CLASS_RANGES``. The order of ``pred``'s
    samples matters as it does in the devkit: equal scores are broken by flattened position.

    Raises ``MetricError`` naming the sample and box for invalid input.
    """
    class_ids = _resolve_classes(classes)
    tokens = _check_tokens(gt, pred)
    gt_boxes = _parse("gt", gt, tokens, is_pred=False)
    pred_boxes = _parse("pred", pred, tokens, is_pred=True)

    evaluated = np.zeros(len(DETECTION_CLASSES), dtype=bool)
    evaluated[class_ids] = True
    gt_keep = evaluated[gt_boxes.label] & (gt_boxes.num_pts != 0)
    pred_keep = evaluated[pred_boxes.label]
    if filter_range:
        gt_keep &= _in_range(gt_boxes)
        pred_keep &= _in_range(pred_boxes)

    matching = _Matching.run(gt_boxes, pred_boxes, gt_keep, pred_keep, len(tokens))
    per_class = {
        DETECTION_CLASSES[c]: _class_metrics(c, gt_boxes, pred_boxes, gt_keep, pred_keep, matching)
        for c in class_ids
    }
    return _summarise(per_class)


def _resolve_classes(classes: Sequence[str] | None) -> list[int]:
    if classes is None:
        return list(range(len(DETECTION_CLASSES)))
    if isinstance(classes, str):
        raise MetricError(f"classes must be a sequence of class names, not the string {classes!r}")
    names = list(classes)
    unknown = [c for c in names if c not in _CLASS_INDEX]
    if unknown:
        raise MetricError(f"unknown classes {unknown}; expected some of {list(DETECTION_CLASSES)}")
    if not names or len(set(names)) != len(names):
        raise MetricError(f"classes must be a non-empty list without repeats, got {names}")
    return [_CLASS_INDEX[c] for c in names]


def _check_tokens(
    gt: Mapping[str, Sequence[Mapping[str, Any]]], pred: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[str, ...]:
    """The sample tokens in prediction order; both sides must hold the same samples."""
    for side, boxes in (("gt", gt), ("pred", pred)):
        if not isinstance(boxes, Mapping):
            raise MetricError(
                f"{side} must map sample tokens to box lists, got {type(boxes).__name__}"
            )
    missing_pred = [t for t in gt if t not in pred]
    missing_gt = [t for t in pred if t not in gt]
    problems = []
    for side, other, missing in (("pred", "gt", missing_pred), ("gt", "pred", missing_gt)):
        if missing:
            shown = ", ".join(repr(t) for t in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(
                f"{len(missing)} sample(s) of {other} missing from {side}: {shown}{more}"
            )
    if problems:
        raise MetricError("gt and pred must hold the same samples: " + "; ".join(problems))
    if not pred:
        raise MetricError("gt and pred hold no samples")
    return tuple(pred)


def _parse(
    side: str,
    boxes_by_sample: Mapping[str, Sequence[Mapping[str, Any]]],
    tokens: tuple[str, ...],
    *,
    is_pred: bool,
) -> _Boxes:
    """Flatten one side into arrays; invalid boxes raise ``MetricError`` naming sample and box."""
    per_sample = [boxes_by_sample[t] for t in tokens]
    for token, boxes in zip(tokens, per_sample, strict=True):
        if not isinstance(boxes, Sequence) or isinstance(boxes, str):
            raise MetricError(
                f"{side} sample {token!r}: boxes must be a list, got {type(boxes).__name__}"
            )
        if is_pred and len(boxes) > MAX_BOXES_PER_SAMPLE:
            raise MetricError(
                f"pred sample {token!r}: {len(boxes)} predictions, at most "
                f"{MAX_BOXES_PER_SAMPLE} per sample are allowed (the devkit rejects the file)"
            )
    counts = np.fromiter(map(len, per_sample), dtype=np.intp, count=len(per_sample))
    sample = np.repeat(np.arange(len(tokens), dtype=np.intp), counts)
    flat: list[Mapping[str, Any]] = list(itertools.chain.from_iterable(per_sample))
    try:
        parsed = _columns(flat, sample, is_pred)
    except _READ_ERRORS as exc:
        # Some box is malformed: find its sample with the same fast path, then the box.
        for token, boxes in zip(tokens, per_sample, strict=True):
            try:
                _columns(boxes, np.zeros(len(boxes), dtype=np.intp), is_pred)
            except _READ_ERRORS:
                raise _first_box_error(side, token, boxes, is_pred) from exc
        raise  # pragma: no cover - every box read alone, so reading them all cannot fail
    bad = np.flatnonzero(_bad_values(parsed))
    if len(bad):
        s = int(sample[bad[0]])
        i = int(bad[0]) - int(counts[:s].sum())
        raise _first_box_error(side, tokens[s], per_sample[s][i:], is_pred, offset=i)
    return parsed


_READ_ERRORS = (KeyError, TypeError, ValueError, AttributeError)


def _columns(flat: Sequence[Mapping[str, Any]], sample: IntArray, is_pred: bool) -> _Boxes:
    """Read boxes into arrays; raises one of ``_READ_ERRORS`` on a malformed box."""
    n = len(flat)
    num_pts = (
        np.ones(n, dtype=np.int64)
        if is_pred or n == 0
        else np.array([b.get("num_pts", 1) for b in flat])
    )
    if num_pts.dtype.kind not in "iu":
        raise TypeError("num_pts must be integers")
    return _Boxes(
        sample=sample,
        label=np.fromiter(map(_CLASS_INDEX.__getitem__, [b["label"] for b in flat]), np.intp, n),
        attribute=np.fromiter(
            map(_ATTR_INDEX.__getitem__, [b["attribute"] for b in flat]), np.intp, n
        ),
        center=_float_rows([b["center"] for b in flat], 3),
        size=_float_rows([b["size"] for b in flat], 3),
        yaw=_float_column([b["yaw"] for b in flat]),
        velocity=_float_rows([b["velocity"] for b in flat], 2),
        score=_float_column([b["score"] for b in flat]) if is_pred else np.zeros(n),
        num_pts=num_pts.astype(np.int64),
    )


def _bad_values(boxes: _Boxes) -> NDArray[np.bool_]:
    """Boxes that read fine but break a rule of ``_box_problem`` (same rules, vectorised)."""
    bad: NDArray[np.bool_] = (
        ~_ATTR_ALLOWED[boxes.label, boxes.attribute]
        | ~np.isfinite(boxes.center).all(axis=1)
        | ~np.isfinite(boxes.size).all(axis=1)
        | ~(boxes.size > 0).all(axis=1)
        | ~np.isfinite(boxes.yaw)
        | np.isinf(boxes.velocity).any(axis=1)
        | ~np.isfinite(boxes.score)
    )
    return bad


def _first_box_error(
    side: str, token: str, boxes: Sequence[Any], is_pred: bool, offset: int = 0
) -> MetricError:
    """The error for the first invalid box of ``boxes`` (box ``offset`` of the sample)."""
    for i, box in enumerate(boxes):
        problem = _box_problem(box, is_pred)
        if problem:
            return MetricError(f"{side} sample {token!r} box {offset + i}: {problem}")
    return MetricError(f"{side} sample {token!r}: boxes could not be read")  # pragma: no cover


def _float_rows(values: list[Any], width: int) -> FloatArray:
    """Stack per-box vectors into an (n, width) float64 array (ValueError on other lengths)."""
    n = len(values)
    if not (np.fromiter(map(len, values), np.intp, n) == width).all():
        raise ValueError(f"expected rows of {width} values")
    flat = np.fromiter(itertools.chain.from_iterable(values), np.float64, n * width)
    return flat.reshape(n, width)


def _float_column(values: list[Any]) -> FloatArray:
    """One float64 per box (ValueError on other shapes)."""
    column = np.array(values, dtype=np.float64)
    if column.shape != (len(values),):
        raise ValueError("expected one number per box")
    return column


def _box_problem(box: Any, is_pred: bool) -> str | None:
    """What is wrong with one box, or None; the single source of box error messages."""
    if not isinstance(box, Mapping):
        return f"a box must be a mapping, got {type(box).__name__}"
    required = ("label", "center", "size", "yaw", "velocity", "attribute")
    for key in (*required, "score") if is_pred else required:
        if key not in box:
            return f"missing key {key!r}"
    label = box["label"]
    if not isinstance(label, str) or label not in _CLASS_INDEX:
        return f"unknown class {label!r}; expected one of {list(DETECTION_CLASSES)}"
    attribute = box["attribute"]
    allowed = CLASS_ATTRIBUTES[label]
    if not isinstance(attribute, str) or (attribute != "" and attribute not in allowed):
        return f"attribute {attribute!r} is not valid for class {label!r}; expected '' or one of {list(allowed)}"
    vectors = {}
    for key, width in (("center", 3), ("size", 3), ("velocity", 2)):
        try:
            vectors[key] = np.asarray(box[key], dtype=np.float64)
        except (TypeError, ValueError):
            vectors[key] = np.zeros(0)
        if vectors[key].shape != (width,):
            return f"{key} must be {width} numbers, got {box[key]!r}"
    scalars = {}
    for key in ("yaw", "score") if is_pred else ("yaw",):
        try:
            scalars[key] = float(box[key])
        except (TypeError, ValueError):
            return f"{key} must be a number, got {box[key]!r}"
    num_pts = box.get("num_pts", 1)
    if not is_pred and (isinstance(num_pts, bool) or not isinstance(num_pts, int | np.integer)):
        return f"num_pts must be an integer, got {box['num_pts']!r}"
    for key in ("center", "size"):
        if not np.isfinite(vectors[key]).all():
            return f"{key} must be finite, got {box[key]!r}"
    if not (vectors["size"] > 0).all():
        return f"size must be positive, got {box['size']!r}"
    if np.isinf(vectors["velocity"]).any():
        return f"velocity must be finite or NaN, got {box['velocity']!r}"
    for key, value in scalars.items():
        if not math.isfinite(value):
            return f"{key} must be finite, got {box[key]!r}"
    return None


def _in_range(boxes: _Boxes) -> NDArray[np.bool_]:
    """The devkit's range filter: xy distance to the ego strictly below the class range."""
    x, y = boxes.center[:, 0], boxes.center[:, 1]
    return np.asarray(np.sqrt(x * x + y * y) < _RANGE[boxes.label])


def _norm2(v: FloatArray) -> FloatArray:
    """Row-wise L2 norm of (n, 2) rows, bit-identical to ``np.linalg.norm`` of each row.

    ``np.linalg.norm`` of a vector is ``sqrt(x.dot(x))`` and the dot goes to BLAS, which may use
    fused multiply-adds; a stacked ``matmul`` of 1-vectors runs the same dot kernel.
    """
    squared: FloatArray = np.matmul(v[:, None, :], v[:, :, None])[:, 0, 0]
    return np.sqrt(squared)


@dataclass(frozen=True)
class _Matching:
    """Greedy matching of every evaluated prediction at every distance threshold.

    ``orders[c]`` is class ``c``'s devkit processing order; ``pair_gt`` / ``pair_dist`` list
    the candidate (prediction, ground truth) pairs closer than the largest threshold;
    ``matched[t, p]`` is the pair that prediction ``p`` matched at threshold ``t``, or -1.
    """

    orders: list[IntArray]
    pair_gt: IntArray
    pair_dist: FloatArray
    matched: IntArray

    @classmethod
    def run(
        cls,
        gt: _Boxes,
        pred: _Boxes,
        gt_keep: NDArray[np.bool_],
        pred_keep: NDArray[np.bool_],
        n_samples: int,
    ) -> _Matching:
        n_pred = len(pred.label)
        orders = _processing_orders(pred, pred_keep)
        priority = np.zeros(n_pred, dtype=np.intp)
        for order in orders:
            priority[order] = np.arange(len(order))

        pair_pred, pair_gt, pair_dist = _candidate_pairs(gt, pred, gt_keep, pred_keep, n_samples)
        # Sort the pairs by (prediction, distance, ground-truth index): for every prediction and
        # threshold the candidates form a prefix of its segment, nearest (then first listed) first.
        by_pair = np.lexsort((pair_gt, pair_dist, pair_pred))
        pair_pred, pair_gt, pair_dist = pair_pred[by_pair], pair_gt[by_pair], pair_dist[by_pair]
        seg_len = np.bincount(pair_pred, minlength=n_pred)
        seg_start = np.cumsum(seg_len) - seg_len

        part_t, part_p, part_len = [], [], []
        for t, th in enumerate(DIST_THRESHOLDS):
            counts = np.bincount(pair_pred[pair_dist < th], minlength=n_pred)
            p = np.flatnonzero(counts)
            part_t.append(np.full(len(p), t, dtype=np.intp))
            part_p.append(p)
            part_len.append(counts[p])
        t_all = np.concatenate(part_t)
        p_all = np.concatenate(part_p)
        len_all = np.concatenate(part_len).astype(np.intp)

        # Rank of each participant inside its (threshold, class, sample) group, by priority.
        label, sample = pred.label[p_all], pred.sample[p_all]
        group = (t_all * len(DETECTION_CLASSES) + label) * n_samples + sample
        by_group = np.lexsort((priority[p_all], group))
        g_sorted = group[by_group]
        pos = np.arange(len(by_group))
        first_of_group = np.maximum.accumulate(
            np.where(np.r_[True, g_sorted[1:] != g_sorted[:-1]], pos, 0)
        )
        rank = np.empty(len(by_group), dtype=np.intp)
        rank[by_group] = pos - first_of_group

        matched = np.full((len(DIST_THRESHOLDS), n_pred), -1, dtype=np.intp)
        if len(rank):
            _lockstep(rank, t_all, p_all, len_all, seg_start, pair_gt, len(gt.label), matched)
        return cls(orders=orders, pair_gt=pair_gt, pair_dist=pair_dist, matched=matched)


def _processing_orders(pred: _Boxes, pred_keep: NDArray[np.bool_]) -> list[IntArray]:
    """Per class, the devkit's ``sorted((score, index))[::-1]``: kept predictions by descending
    score, ties by descending flattened index."""
    idx = np.flatnonzero(pred_keep)
    # lexsort is stable and idx ascending: by class, then ascending (score, index).
    ascending = idx[np.lexsort((pred.score[idx], pred.label[idx]))]
    bounds = np.searchsorted(pred.label[ascending], np.arange(len(DETECTION_CLASSES) + 1))
    return [ascending[a:b][::-1] for a, b in itertools.pairwise(bounds.tolist())]


def _candidate_pairs(
    gt: _Boxes,
    pred: _Boxes,
    gt_keep: NDArray[np.bool_],
    pred_keep: NDArray[np.bool_],
    n_samples: int,
) -> tuple[IntArray, IntArray, FloatArray]:
    """All (prediction, ground truth) pairs of one class and sample closer than the largest
    threshold, with their xy centre distance computed as the devkit's ``center_distance``.

    Ground truth is bucketed by ``floor(x / max_th)`` inside each (class, sample) group, so a
    prediction only looks at its own and the two neighbouring buckets: any pair closer than
    ``max_th`` has ``|dx| < max_th`` and thus buckets at most one apart.
    """
    max_th = max(DIST_THRESHOLDS)
    gt_idx = np.flatnonzero(gt_keep)
    pred_idx = np.flatnonzero(pred_keep)
    gt_bucket = _x_bucket(gt, gt_idx, max_th)
    pred_bucket = _x_bucket(pred, pred_idx, max_th)
    low = int(min(gt_bucket.min(initial=0), pred_bucket.min(initial=0))) - 1
    n_buckets = int(max(gt_bucket.max(initial=0), pred_bucket.max(initial=0))) - low + 2
    gt_group = gt.label[gt_idx] * n_samples + gt.sample[gt_idx]
    gt_key = gt_group * n_buckets + (gt_bucket - low)
    by_key = np.argsort(gt_key, kind="stable")
    gt_sorted, gt_key = gt_idx[by_key], gt_key[by_key]
    pred_group = pred.label[pred_idx] * n_samples + pred.sample[pred_idx]
    pred_key = pred_group * n_buckets + (pred_bucket - low)
    lo = np.searchsorted(gt_key, pred_key - 1, "left")
    count = np.searchsorted(gt_key, pred_key + 1, "right") - lo
    ends = np.cumsum(count)
    gx, gy = gt.center[:, 0], gt.center[:, 1]
    px, py = pred.center[:, 0], pred.center[:, 1]

    out_p, out_g, out_d = [], [], []
    n_blocks = int(ends[-1]) // _PAIR_BLOCK + 1 if len(ends) else 0
    cuts = np.searchsorted(ends, np.arange(1, n_blocks) * _PAIR_BLOCK)
    for a, b in itertools.pairwise([0, *cuts.tolist(), len(pred_idx)]):
        c = count[a:b]
        total = int(c.sum())
        if total == 0:
            continue
        first = np.cumsum(c) - c
        p = np.repeat(pred_idx[a:b], c)
        g = gt_sorted[np.repeat(lo[a:b] - first, c) + np.arange(total)]
        dx = px[p] - gx[g]
        dy = py[p] - gy[g]
        # |dx| >= th implies distance >= th (rounding is monotone): an exact, cheap pre-filter.
        near = np.flatnonzero((np.abs(dx) < max_th) & (np.abs(dy) < max_th))
        d = _norm2(np.stack([dx[near], dy[near]], axis=1))
        close = d < max_th
        out_p.append(p[near[close]])
        out_g.append(g[near[close]])
        out_d.append(d[close])
    if not out_p:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0)
    return np.concatenate(out_p), np.concatenate(out_g), np.concatenate(out_d)


def _x_bucket(boxes: _Boxes, idx: IntArray, width: float) -> NDArray[np.int64]:
    """``floor(x / width)``; clamping x first is monotone and only shrinks differences, so
    boxes closer than ``width`` still land at most one bucket apart."""
    x = np.clip(boxes.center[idx, 0], -_X_CLAMP, _X_CLAMP)
    bucket: NDArray[np.int64] = np.floor(x / width).astype(np.int64)
    return bucket


def _lockstep(
    rank: IntArray,
    part_t: IntArray,
    part_p: IntArray,
    part_len: IntArray,
    seg_start: IntArray,
    pair_gt: IntArray,
    n_gt: int,
    matched: IntArray,
) -> None:
    """Step k matches the k-th participant of every group: its first candidate not yet taken."""
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
    taken = np.zeros(len(DIST_THRESHOLDS) * n_gt, dtype=bool)
    for a, b in itertools.pairwise(bounds.tolist()):
        active = by_rank[a:b]
        t, p, lens = part_t[active], part_p[active], part_len[active]
        ends = np.cumsum(lens)
        total = int(ends[-1])
        first = ends - lens
        pos = np.arange(total)
        pair = np.repeat(seg_start[p] - first, lens) + pos
        slot = np.repeat(t * n_gt, lens) + pair_gt[pair]
        best = np.minimum.reduceat(np.where(taken[slot], total, pos), first)
        hit = best < total
        taken[slot[best[hit]]] = True
        matched[t[hit], p[hit]] = pair[best[hit]]


def _class_metrics(
    c: int,
    gt: _Boxes,
    pred: _Boxes,
    gt_keep: NDArray[np.bool_],
    pred_keep: NDArray[np.bool_],
    matching: _Matching,
) -> ClassMetrics:
    """AP per threshold and TP errors of one class, mirroring accumulate / calc_ap / calc_tp."""
    name = DETECTION_CLASSES[c]
    npos = int(np.count_nonzero(gt_keep & (gt.label == c)))
    order = matching.orders[c]
    aps: list[float] = []
    tp_errors = dict.fromkeys(TP_METRICS, 1.0)  # the devkit's no_predictions() gives 1
    for t, th in enumerate(DIST_THRESHOLDS):
        pairs = matching.matched[t, order]
        is_tp = pairs >= 0
        if npos == 0 or not is_tp.any():
            aps.append(0.0)  # calc_ap of no_predictions()
            continue
        tp = np.cumsum(is_tp).astype(float)
        fp = np.cumsum(~is_tp).astype(float)
        prec = tp / (fp + tp)
        rec = tp / float(npos)
        rec_interp = np.linspace(0, 1, _N_RECALL)
        prec_i = np.interp(rec_interp, rec, prec, right=0)
        conf_i = np.interp(rec_interp, rec, pred.score[order], right=0)
        aps.append(_calc_ap(prec_i))
        if th == DIST_TH_TP:
            tp_preds = order[is_tp]
            tp_pairs = pairs[is_tp]
            errors = _match_errors(
                c, gt, pred, tp_preds, matching.pair_gt[tp_pairs], matching.pair_dist[tp_pairs]
            )
            match_conf = pred.score[tp_preds]
            for metric, err in errors.items():
                curve = np.interp(conf_i[::-1], match_conf[::-1], _cummean(err)[::-1])[::-1]
                tp_errors[metric] = _calc_tp(curve, conf_i)
    for metric in _NAN_TP.get(name, ()):
        tp_errors[metric] = math.nan
    return ClassMetrics(
        name=name,
        num_gt=npos,
        num_pred=len(order),
        ap=float(np.mean(aps)),
        ap_per_threshold=tuple(aps),
        **tp_errors,
    )


def _match_errors(
    c: int, gt: _Boxes, pred: _Boxes, p: IntArray, g: IntArray, dist: FloatArray
) -> dict[str, FloatArray]:
    """Per-match errors in matching order, as the devkit's common/utils.py computes them."""
    vel = _norm2(pred.velocity[p] - gt.velocity[g])
    gs, ps = gt.size[g], pred.size[p]
    inter = np.prod(np.minimum(gs, ps), axis=1)
    iou = inter / (np.prod(gs, axis=1) + np.prod(ps, axis=1) - inter)
    period = np.pi if DETECTION_CLASSES[c] == "barrier" else 2 * np.pi
    diff = (gt.yaw[g] - pred.yaw[p] + period / 2) % period - period / 2
    diff = np.where(diff > np.pi, diff - 2 * np.pi, diff)
    attr_ok = (gt.attribute[g] == pred.attribute[p]).astype(float)
    attr_err = np.where(gt.attribute[g] == 0, np.nan, 1 - attr_ok)
    return {
        "trans_err": dist,
        "vel_err": vel,
        "scale_err": 1 - iou,
        "orient_err": np.abs(diff),
        "attr_err": attr_err,
    }


def _cummean(x: FloatArray) -> FloatArray:
    """The devkit's NaN-aware running mean: 0 before the first non-NaN, all ones if all NaN."""
    if np.isnan(x).all():
        return np.ones(len(x))
    sum_vals = np.nancumsum(x)
    count_vals = np.cumsum(~np.isnan(x))
    mean: FloatArray = np.divide(
        sum_vals, count_vals, out=np.zeros_like(sum_vals), where=count_vals != 0
    )
    return mean


def _calc_ap(prec_i: FloatArray) -> float:
    prec = prec_i[_FIRST_IND:] - MIN_PRECISION
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - MIN_PRECISION)


def _calc_tp(curve: FloatArray, conf_i: FloatArray) -> float:
    nonzero = np.nonzero(conf_i)[0]
    last_ind = int(nonzero[-1]) if len(nonzero) else 0
    if last_ind < _FIRST_IND:
        return 1.0
    return float(np.mean(curve[_FIRST_IND : last_ind + 1]))


def _summarise(per_class: dict[str, ClassMetrics]) -> NDSResult:
    """The devkit's DetectionMetrics: mAP, NaN-aware mean TP errors and NDS."""
    mean_ap = float(np.mean([m.ap for m in per_class.values()]))
    tp_errors = {}
    for metric in TP_METRICS:
        values = np.array([getattr(m, metric) for m in per_class.values()])
        tp_errors[metric] = float(np.nanmean(values)) if (~np.isnan(values)).any() else math.nan
    # max(0.0, nan) is 0.0: a metric that is NaN for every class scores 0, as in the devkit.
    tp_scores = [max(0.0, 1.0 - tp_errors[metric]) for metric in TP_METRICS]
    nds = float(MEAN_AP_WEIGHT * mean_ap + np.sum(tp_scores)) / float(
        MEAN_AP_WEIGHT + len(TP_METRICS)
    )
    return NDSResult(
        mAP=mean_ap,
        NDS=nds,
        mATE=tp_errors["trans_err"],
        mASE=tp_errors["scale_err"],
        mAOE=tp_errors["orient_err"],
        mAVE=tp_errors["vel_err"],
        mAAE=tp_errors["attr_err"],
        per_class=MappingProxyType(per_class),
    )


class NDSMetric(Metric):
    """The `nds` metric: nuScenes detection score of decoded 3-D boxes against ground truth.

    Predictions and targets are per-sample lists of box mappings (see `evaluate`); boxes are kept
    by sample id and scored all at once. Arguments: `classes` (default: all 10 detection
    classes), `filter_range` (the devkit's class ranges, default true). Figures: NDS (primary)
    and mAP (higher is better), mATE, mASE, mAOE, mAVE, mAAE (lower is better).
    """

    name = "nds"
    figures = (Figure("NDS", "higher", "nuScenes detection score"), Figure("mAP", "higher", "mean average precision"),
               Figure("mATE", "lower", "mean translation error (m)"), Figure("mASE", "lower", "mean scale error (1-IoU)"),
               Figure("mAOE", "lower", "mean orientation error (rad)"), Figure("mAVE", "lower", "mean velocity error (m/s)"),
               Figure("mAAE", "lower", "mean attribute error (1-acc)"))
    primary = "NDS"
    consumes = "boxes3d"
    ARGS = frozenset({"classes", "filter_range"})

    def __init__(self, **args: Any) -> None:
        self.check_args(args)
        classes = args.get("classes")
        bad = [c for c in classes or () if c not in DETECTION_CLASSES]
        if bad:
            raise MetricArgsError(f"unknown class(es) {bad}; known: {list(DETECTION_CLASSES)}", "classes")
        self.classes: tuple[str, ...] | None = None if classes is None else tuple(classes)
        self.filter_range = bool(args.get("filter_range", True))
        self.gt: dict[str, list[Mapping[str, Any]]] = {}
        self.pred: dict[str, list[Mapping[str, Any]]] = {}

    def update(self, predictions: Sequence[Any], targets: Sequence[Any], sample_ids: Sequence[str]) -> None:
        """Keep each sample's boxes by id; MetricError for a sample added twice or a predicted
        box with a non-finite field (naming the sample, the box and the field)."""
        for boxes, gt, sample in zip(predictions, targets, sample_ids, strict=True):
            if sample in self.pred:
                raise MetricError(f"sample {sample!r} was added twice")
            check_finite(sample, boxes)
            self.pred[sample] = list(boxes)
            self.gt[sample] = list(gt)

    def compute(self) -> MetricValues:
        """NDS (primary), mAP and the mean TP errors; per-class AP in details."""
        if not self.pred:
            raise MetricError("no samples were added to the NDS metric")
        result = evaluate(self.gt, self.pred, classes=self.classes, filter_range=self.filter_range)
        full = result.to_dict()
        values = {fig.name: float(full[fig.name]) for fig in self.figures}
        return MetricValues(
            values=values,
            primary="NDS",
            details={
                "per_class": {name: m.ap for name, m in result.per_class.items()},
                "per_class_title": "AP per class",
                "classes": full["classes"],
                "samples": len(self.pred),
                "predictions": sum(len(v) for v in self.pred.values()),
            },
        )


def check_finite(sample: str, boxes: Sequence[Mapping[str, Any]], source: str = "predicted") -> None:
    """MetricError naming the sample, the box and the field of the first box with NaN or Inf."""
    for k, box in enumerate(boxes):
        for key in ("center", "size", "yaw", "velocity", "score"):
            if key not in box:
                continue
            values = np.asarray(box[key], dtype=np.float64)
            if not np.isfinite(values).all():
                raise MetricError(
                    f"sample {sample!r}: {source} box {k} ({box.get('label')}) has a non-finite "
                    f"{key} {np.asarray(values).tolist()}"
                )
