"""Benchmark of harness.metrics.nds on a nuScenes-val-sized evaluation, against the devkit if present.

    PYTHONPATH=$PWD python -m pytest -p no:qharness tests/bench_metrics_nds.py -s

6019 samples with about 40 ground-truth boxes and 300 predictions each (seeded, nuScenes-like
class mix, sizes, attributes and velocities). When nuscenes-devkit is importable in the same
interpreter, the devkit's own accumulate / calc_ap / calc_tp / DetectionMetrics are timed on the
same boxes (box construction not counted) and the speed ratio is printed.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.metrics import nds

N_SAMPLES = 6019
GT_PER_SAMPLE = 40
PRED_PER_SAMPLE = 300

# Share of each class among nuScenes val ground truth (rounded), and mean box size (w, l, h).
CLASS_MIX = {
    "car": 0.43, "truck": 0.07, "bus": 0.015, "trailer": 0.02, "construction_vehicle": 0.012,
    "pedestrian": 0.19, "motorcycle": 0.012, "bicycle": 0.011, "traffic_cone": 0.10, "barrier": 0.13,
}  # fmt: skip
MEAN_SIZE = {
    "car": (1.95, 4.6, 1.7), "truck": (2.5, 7.0, 2.9), "bus": (2.9, 11.0, 3.5),
    "trailer": (2.9, 12.0, 3.9), "construction_vehicle": (2.8, 6.4, 3.2),
    "pedestrian": (0.67, 0.73, 1.77), "motorcycle": (0.77, 2.1, 1.47), "bicycle": (0.6, 1.7, 1.3),
    "traffic_cone": (0.41, 0.41, 1.07), "barrier": (2.5, 0.5, 0.98),
}  # fmt: skip

Boxes = dict[str, list[dict[str, Any]]]


def val_sized_case(seed: int = 0, n_samples: int = N_SAMPLES) -> tuple[Boxes, Boxes]:
    """Ground truth and detector-like predictions: a noisy hit for most boxes, lower-scored
    duplicates, and low-scored false positives up to PRED_PER_SAMPLE per sample."""
    rng = np.random.default_rng(seed)
    names = list(nds.DETECTION_CLASSES)
    mix = np.array([CLASS_MIX[c] for c in names])
    mix /= mix.sum()
    sizes = np.array([MEAN_SIZE[c] for c in names])
    gt: Boxes = {}
    pred: Boxes = {}
    for s in range(n_samples):
        token = f"{s:032x}"
        n_gt = int(rng.poisson(GT_PER_SAMPLE))
        label = rng.choice(len(names), size=n_gt, p=mix)
        gt_rows = _rows(rng, label, rng.uniform(-54, 54, size=(n_gt, 2)), sizes)
        gt_rows["velocity"][rng.random(n_gt) < 0.05] = math.nan
        gt[token] = _dicts(names, label, gt_rows, rng.integers(0, 30, size=n_gt))

        hits = np.repeat(np.arange(n_gt), rng.integers(0, 4, size=n_gt))
        n_fp = max(PRED_PER_SAMPLE - len(hits), 0)
        p_label = np.concatenate([label[hits], rng.choice(len(names), size=n_fp, p=mix)])
        p_xy = np.concatenate(
            [
                gt_rows["center"][hits, :2] + rng.normal(scale=0.6, size=(len(hits), 2)),
                rng.uniform(-54, 54, size=(n_fp, 2)),
            ]
        )
        p_rows = _rows(rng, p_label, p_xy, sizes)
        p_rows["score"] = np.concatenate(
            [rng.beta(4, 2, size=len(hits)), rng.beta(1, 6, size=n_fp)]
        )
        pred[token] = _dicts(names, p_label, p_rows, None)[:PRED_PER_SAMPLE]
    return gt, pred


def _rows(
    rng: np.random.Generator, label: np.ndarray, xy: np.ndarray, sizes: np.ndarray
) -> dict[str, np.ndarray]:
    n = len(label)
    return {
        "center": np.column_stack([xy, rng.normal(0.5, 0.5, size=n)]),
        "size": sizes[label] * rng.lognormal(0.0, 0.1, size=(n, 3)),
        "yaw": rng.uniform(-math.pi, math.pi, size=n),
        "velocity": rng.normal(0.0, 2.0, size=(n, 2)) * (label < 8)[:, None],
        "attribute": rng.integers(0, 3, size=n),
    }


def _dicts(
    names: list[str], label: np.ndarray, rows: dict[str, np.ndarray], num_pts: np.ndarray | None
) -> list[dict[str, Any]]:
    out = []
    columns = {k: v.tolist() for k, v in rows.items()}
    for i, c in enumerate(label.tolist()):
        attrs = nds.CLASS_ATTRIBUTES[names[c]]
        box: dict[str, Any] = {
            "label": names[c],
            "center": columns["center"][i],
            "size": columns["size"][i],
            "yaw": columns["yaw"][i],
            "velocity": columns["velocity"][i],
            "attribute": attrs[columns["attribute"][i] % len(attrs)] if attrs else "",
        }
        if "score" in columns:
            box["score"] = columns["score"][i]
        if num_pts is not None:
            box["num_pts"] = int(num_pts[i])
        out.append(box)
    return out


def _devkit_tool() -> Any:
    """tools/devkit_crosscheck.py as a module, or None when the devkit is not importable."""
    if importlib.util.find_spec("nuscenes") is None:
        return None
    path = Path(__file__).resolve().parents[1] / "tools" / "devkit_crosscheck.py"
    spec = importlib.util.spec_from_file_location("devkit_crosscheck", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def val_case() -> tuple[Boxes, Boxes]:
    return val_sized_case()


def _timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """fn(*args), its wall time and its CPU time (steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def test_bench_nds_val_sized(benchmark: Any, val_case: tuple[Boxes, Boxes]) -> None:
    gt, pred = val_case
    n_gt = sum(map(len, gt.values()))
    n_pred = sum(map(len, pred.values()))
    result, wall, cpu = benchmark.pedantic(
        _timed, args=(nds.evaluate, gt, pred), rounds=1, iterations=1
    )
    print(
        f"\nharness.metrics.nds: {len(gt)} samples, {n_gt} GT, {n_pred} predictions: "
        f"{wall:.2f} s wall, {cpu:.2f} s CPU (mAP {result.mAP:.4f}, NDS {result.NDS:.4f})"
    )
    tool = _devkit_tool()
    if tool is None:
        print("nuscenes-devkit is not installed: no devkit timing")
        return
    gt_boxes, pred_boxes = tool.to_devkit_boxes(gt, pred)
    gt_boxes = tool.devkit_filter(gt_boxes, False)
    theirs, dk_wall, dk_cpu = _timed(
        tool.devkit_metrics, gt_boxes, pred_boxes, nds.DETECTION_CLASSES
    )
    diff, where = tool.max_abs_diff(result.to_dict(), theirs)
    print(
        f"nuscenes-devkit (accumulate, calc_ap/calc_tp, DetectionMetrics; boxes prebuilt): "
        f"{dk_wall:.1f} s wall, {dk_cpu:.1f} s CPU; ratio {dk_wall / wall:.1f}x wall, "
        f"{dk_cpu / cpu:.1f}x CPU; max abs difference {diff:.3g} {where} (the devkit's "
        "yaws pass through quaternions: expect float noise in orient_err)"
    )
