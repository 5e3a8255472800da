"""Cross-check harness.metrics.nds against nuscenes-devkit 1.2.0 on random cases.

The devkit is never a dependency: run this with an interpreter that has nuscenes-devkit==1.2.0
installed (a throw-away venv is fine; torch is not needed) and this worktree on PYTHONPATH:

    PYTHONPATH=$PWD /path/to/venv/bin/python tools/devkit_crosscheck.py --cases 500

It builds devkit ``DetectionBox`` / ``EvalBoxes`` directly (no nuScenes database), applies the
devkit's range and point filters the way ``filter_eval_boxes`` writes them, runs the devkit's
``accumulate`` / ``calc_ap`` / ``calc_tp``, its per-class NaN rules and ``DetectionMetrics``, and
prints the largest absolute difference to ``harness.metrics.nds.evaluate`` over every number.
Yaws go through the devkit's quaternion round trip first, so both sides see the same yaw.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.metrics import nds

Boxes = dict[str, list[dict[str, Any]]]
# DetectionEval.evaluate's per-class NaN rules.
NAN_TP = {
    ("traffic_cone", "attr_err"),
    ("traffic_cone", "vel_err"),
    ("traffic_cone", "orient_err"),
    ("barrier", "attr_err"),
    ("barrier", "vel_err"),
}


def random_case(rng: np.random.Generator) -> tuple[Boxes, Boxes, list[str] | None, bool]:
    """A small random evaluation with the devkit's corner cases: tied scores, duplicate and
    grid-aligned positions (equal distances, distances exactly at a threshold), NaN velocities,
    '' attributes, 0-point ground truth, cones and barriers, boxes beyond the class ranges."""
    n_classes = int(rng.integers(1, 5))
    present = [str(c) for c in rng.choice(nds.DETECTION_CLASSES, size=n_classes, replace=False)]
    grid = rng.random() < 0.5  # quarter-metre grid: many exact ties and exact threshold hits
    far = rng.random() < 0.3
    score_levels = rng.random() < 0.5
    max_gt = 30 if rng.random() < 0.2 else 8  # crowded samples: long matching chains
    gt: Boxes = {}
    pred: Boxes = {}
    for s in range(int(rng.integers(1, 7))):
        token = f"sample-{s}"
        gt_boxes: list[dict[str, Any]] = []
        pred_boxes: list[dict[str, Any]] = []
        for _ in range(int(rng.integers(0, max_gt + 1))):
            label = str(rng.choice(present))
            if gt_boxes and rng.random() < 0.15:
                center = list(gt_boxes[-1]["center"])  # duplicate position
            else:
                center = _position(rng, grid, 60.0 if far else 12.0)
            box = _box(rng, label, center)
            box["num_pts"] = int(rng.choice([0, 1, 5])) if rng.random() < 0.2 else 3
            gt_boxes.append(box)
            for _ in range(int(rng.integers(0, 4))):
                jitter = _position(rng, grid, 2.5)
                guess = _box(rng, label, [center[0] + jitter[0], center[1] + jitter[1], center[2]])
                pred_boxes.append(guess)
        for _ in range(int(rng.integers(0, 5))):
            pred_boxes.append(
                _box(rng, str(rng.choice(present)), _position(rng, grid, 60.0 if far else 12.0))
            )
        rng.shuffle(pred_boxes)
        for box in pred_boxes:
            box["score"] = float(rng.integers(1, 5) / 4) if score_levels else float(rng.random())
        gt[token] = gt_boxes
        pred[token] = pred_boxes
    classes = None if rng.random() < 0.5 else present
    return gt, pred, classes, bool(far and rng.random() < 0.7)


def _position(rng: np.random.Generator, grid: bool, scale: float) -> list[float]:
    xy = rng.uniform(-scale, scale, size=2)
    if grid:
        xy = np.round(xy * 4) / 4
    return [float(xy[0]), float(xy[1]), float(rng.normal())]


def _box(rng: np.random.Generator, label: str, center: list[float]) -> dict[str, Any]:
    attrs = ("", *nds.CLASS_ATTRIBUTES[label])
    velocity = (
        [math.nan, math.nan] if rng.random() < 0.15 else [float(v) for v in rng.normal(size=2)]
    )
    return {
        "label": label,
        "center": center,
        "size": [float(v) for v in rng.uniform(0.3, 5.0, size=3)],
        "yaw": float(rng.uniform(-math.pi, math.pi)),
        "velocity": velocity,
        "attribute": str(attrs[int(rng.integers(len(attrs)))]),
    }


def snap_yaws(boxes: Mapping[str, Sequence[Mapping[str, Any]]]) -> Boxes:
    """Copies of the boxes with a devkit ``rotation`` quaternion and the yaw the devkit reads
    back from it, so that both sides compute with the same yaw."""
    from nuscenes.eval.common.utils import quaternion_yaw

    snapped: Boxes = {}
    for token, bs in boxes.items():
        snapped[token] = []
        for b in bs:
            rotation = _rotation(b["yaw"])
            yaw = float(quaternion_yaw(_quaternion_cls()(rotation)))
            snapped[token].append({**b, "rotation": rotation, "yaw": yaw})
    return snapped


def _quaternion_cls() -> Any:
    from pyquaternion import Quaternion  # type: ignore[import-not-found]

    return Quaternion


def _rotation(yaw: float) -> tuple[float, float, float, float]:
    """The (w, x, y, z) quaternion of a rotation by yaw about z, as users of the devkit build it."""
    return tuple(_quaternion_cls()(axis=[0.0, 0.0, 1.0], radians=yaw).elements)


def to_devkit_boxes(
    gt: Mapping[str, Sequence[Mapping[str, Any]]], pred: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[Any, Any]:
    """Devkit ``EvalBoxes`` of ``DetectionBox`` (ego at the origin), samples in ``pred`` order;
    a box's ``rotation`` quaternion (from ``snap_yaws``) is used as is, else its yaw's."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionBox

    def make(token: str, b: Mapping[str, Any], is_pred: bool) -> Any:
        translation = tuple(float(v) for v in b["center"])
        return DetectionBox(
            sample_token=token,
            translation=translation,
            size=tuple(float(v) for v in b["size"]),
            rotation=b.get("rotation") or _rotation(b["yaw"]),
            velocity=tuple(float(v) for v in b["velocity"]),
            ego_translation=translation,
            num_pts=-1 if is_pred else int(b.get("num_pts", 1)),
            detection_name=b["label"],
            detection_score=float(b["score"]) if is_pred else -1.0,
            attribute_name=b["attribute"],
        )

    gt_boxes, pred_boxes = EvalBoxes(), EvalBoxes()
    for token in pred:
        pred_boxes.add_boxes(token, [make(token, b, True) for b in pred[token]])
        gt_boxes.add_boxes(token, [make(token, b, False) for b in gt[token]])
    return gt_boxes, pred_boxes


def devkit_filter(boxes: Any, filter_range: bool) -> Any:
    """Steps 1 and 2 of the devkit's ``filter_eval_boxes`` (range, then 0-point boxes)."""
    from nuscenes.eval.common.config import config_factory

    class_range = config_factory("detection_cvpr_2019").class_range
    for token in boxes.sample_tokens:
        kept = boxes[token]
        if filter_range:
            kept = [b for b in kept if b.ego_dist < class_range[b.detection_name]]
        boxes.boxes[token] = [b for b in kept if b.num_pts != 0]
    return boxes


def devkit_metrics(gt_boxes: Any, pred_boxes: Any, classes: Sequence[str]) -> dict[str, Any]:
    """What ``DetectionEval.evaluate`` computes, on filtered devkit boxes, as ``to_dict()``."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.algo import accumulate, calc_ap, calc_tp
    from nuscenes.eval.detection.data_classes import DetectionMetrics

    cfg = config_factory("detection_cvpr_2019")
    cfg.class_names = list(classes)  # the devkit's config always lists all 10 classes
    metrics = DetectionMetrics(cfg)
    out: dict[str, Any] = {"dist_thresholds": list(cfg.dist_ths), "classes": {}}
    for name in classes:
        aps = []
        mds = {}
        for th in cfg.dist_ths:
            mds[th] = accumulate(gt_boxes, pred_boxes, name, cfg.dist_fcn_callable, th)
            aps.append(calc_ap(mds[th], cfg.min_recall, cfg.min_precision))
            metrics.add_label_ap(name, th, aps[-1])
        row: dict[str, Any] = {
            "num_gt": sum(b.detection_name == name for b in gt_boxes.all),
            "num_pred": sum(b.detection_name == name for b in pred_boxes.all),
            "AP": float(metrics.mean_dist_aps[name]),
            "AP_per_threshold": aps,
        }
        for metric in nds.TP_METRICS:
            if (name, metric) in NAN_TP:
                tp = math.nan
            else:
                tp = calc_tp(mds[cfg.dist_th_tp], cfg.min_recall, metric)
            metrics.add_label_tp(name, metric, tp)
            row[metric] = tp
        out["classes"][name] = row
    tp_errors = metrics.tp_errors
    out.update(
        mAP=metrics.mean_ap,
        NDS=metrics.nd_score,
        mATE=tp_errors["trans_err"],
        mASE=tp_errors["scale_err"],
        mAOE=tp_errors["orient_err"],
        mAVE=tp_errors["vel_err"],
        mAAE=tp_errors["attr_err"],
    )
    return out


def devkit_evaluate(
    gt: Mapping[str, Sequence[Mapping[str, Any]]],
    pred: Mapping[str, Sequence[Mapping[str, Any]]],
    classes: Sequence[str] | None = None,
    filter_range: bool = False,
) -> dict[str, Any]:
    """The devkit's result for the inputs of ``nds.evaluate``, in the shape of ``to_dict()``."""
    gt_boxes, pred_boxes = to_devkit_boxes(gt, pred)
    gt_boxes = devkit_filter(gt_boxes, filter_range)
    pred_boxes = devkit_filter(pred_boxes, filter_range)
    names = list(nds.DETECTION_CLASSES if classes is None else classes)
    return devkit_metrics(gt_boxes, pred_boxes, names)


def max_abs_diff(ours: Any, theirs: Any, path: str = "") -> tuple[float, str]:
    """Largest absolute difference between two nested results (NaN equals NaN only), and where."""
    if isinstance(ours, Mapping):
        if set(ours) != set(theirs):
            return math.inf, f"{path}: keys {sorted(ours)} != {sorted(theirs)}"
        return _worst(max_abs_diff(ours[k], theirs[k], f"{path}/{k}") for k in ours)
    if isinstance(ours, list | tuple):
        if len(ours) != len(theirs):
            return math.inf, f"{path}: lengths {len(ours)} != {len(theirs)}"
        pairs = enumerate(zip(ours, theirs, strict=True))
        return _worst(max_abs_diff(a, b, f"{path}[{i}]") for i, (a, b) in pairs)
    a, b = float(ours), float(theirs)
    if math.isnan(a) or math.isnan(b):
        return (0.0, "") if math.isnan(a) and math.isnan(b) else (math.inf, f"{path}: {a} vs {b}")
    return abs(a - b), f"{path}: {a!r} vs {b!r}"


def _worst(diffs: Iterable[tuple[float, str]]) -> tuple[float, str]:
    """The first largest difference; where is '' while everything is equal."""
    worst = (0.0, "")
    for diff in diffs:
        if diff[0] > worst[0]:
            worst = diff
    return worst


def crosscheck(n_cases: int, seed: int) -> tuple[float, str]:
    """Worst difference between ``nds.evaluate`` and the devkit over ``n_cases`` random cases."""
    rng = np.random.default_rng(seed)
    diffs = []
    for i in range(n_cases):
        gt, pred, classes, filter_range = random_case(rng)
        gt, pred = snap_yaws(gt), snap_yaws(pred)
        ours = nds.evaluate(gt, pred, classes=classes, filter_range=filter_range).to_dict()
        theirs = devkit_evaluate(gt, pred, classes=classes, filter_range=filter_range)
        diff, where = max_abs_diff(ours, theirs)
        diffs.append((diff, f"case {i}{where}"))
    return _worst(diffs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    diff, where = crosscheck(args.cases, args.seed)
    print(
        f"{args.cases} random cases, seed {args.seed}: max abs difference {diff:.3g} "
        f"({where or 'everywhere equal'}) in {time.perf_counter() - start:.1f} s"
    )
    return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
