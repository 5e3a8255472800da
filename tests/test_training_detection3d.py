"""Detection3D trainer: schedule, data, loss decrease, exact resume, outputs, strict reload."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.datasets.scenes import DrivingScenes
from harness.errors import HarnessError
from harness.training.detection3d import (
    DetRecipe,
    _Rendered,
    collate_items,
    evaluate_detection3d,
    learning_rate,
    train_detection3d,
)
from harness.zoo.fastbev import CLASSES, GTBoxes, HeadOutputs, direction_target, encode, fastbev_r18

SMALL: dict[str, Any] = {
    "grid": (24, 24, 4), "voxel_size": (2.5, 2.5, 1.5),
    "point_cloud_range": (-30.0, -30.0, -5.0, 30.0, 30.0, 3.0), "topk": 200,
}  # fmt: skip
FACTORY = functools.partial(fastbev_r18, "ci", **SMALL)
SCENES: dict[str, Any] = {"image_height": 64, "image_width": 176, "max_boxes": 12, "max_range": 25.0}
TRAIN = DrivingScenes("train", size=6, **SCENES)
VAL = DrivingScenes("val", size=2, **SCENES)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small models run fastest single-threaded, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(out: Path, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        steps=4, batch_size=2, lr=2e-3, warmup_steps=1, device="cpu", out_dir=out,
        val_dataset=VAL, log_every=1, val_every=2, checkpoint_every=100, eval_train_size=2,
        log=lambda _: None,
    )  # fmt: skip
    args.update(kw)
    return train_detection3d(FACTORY, TRAIN, **args)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_warms_up_then_decays() -> None:
    recipe = DetRecipe(steps=100, batch_size=1, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(recipe, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert learning_rate(recipe, 100) == pytest.approx(0.1)
    with pytest.raises(HarnessError, match="steps >= 1"):
        DetRecipe(steps=0, batch_size=1, lr=1.0)


def test_rendered_items_carry_assigned_targets() -> None:
    model = FACTORY()
    items = _Rendered(TRAIN, model.anchors, model)
    item = items[1]
    assert item.images.dtype == torch.uint8 and item.images.shape == (6, 3, 64, 176)
    assert item.targets.assigned.dtype == torch.int16
    assert item.targets.assigned.shape == (model.config.num_anchors,)
    gt = GTBoxes.from_boxes(TRAIN[1].boxes)
    want = model.loss_targets(gt)
    assert torch.equal(item.targets.assigned.long(), want.assigned) and torch.equal(item.targets.boxes, want.boxes)
    batch = collate_items([items[0], item])
    assert batch.images.shape == (2, 6, 3, 64, 176) and batch.lidar2img.shape == (2, 6, 4, 4)
    assert batch.targets[1] is item.targets


def test_loss_decreases_and_nds_is_scored(tmp_path: Path) -> None:
    result = _run(tmp_path, steps=30, lr=3e-3, warmup_steps=3, val_dataset=None, log_every=5, eval_train_size=4)
    losses = [h["loss"] for h in result.summary["history"] if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    train = result.summary["train"]
    assert 0.0 <= train["NDS"] <= 1.0 and set(train["AP"]) == set(CLASSES)


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    straight = _run(tmp_path / "a")
    first = _run(tmp_path / "b", stop_after=2)
    assert not first.finished and first.step == 2 and first.weights is None
    resumed = _run(tmp_path / "b")
    assert resumed.finished and resumed.step == 4
    a = torch.load(straight.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert _states_equal(a["model"], b["model"])
    assert _states_equal(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert straight.summary["val"] == resumed.summary["val"]
    assert [h.get("loss") for h in straight.summary["history"]] == [h.get("loss") for h in resumed.summary["history"]]


def test_streaming_equals_cached(tmp_path: Path) -> None:
    cached = _run(tmp_path / "a", steps=2, val_dataset=None)
    streamed = _run(tmp_path / "b", steps=2, val_dataset=None, cache=False)
    a = torch.load(cached.checkpoint, weights_only=True)["model"]
    b = torch.load(streamed.checkpoint, weights_only=True)["model"]
    assert _states_equal(a, b)


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path) -> None:
    result = _run(tmp_path, time_limit_s=0.0)
    assert not result.finished and result.step == 0 and result.checkpoint.exists()


def test_resume_refuses_a_different_recipe(tmp_path: Path) -> None:
    _run(tmp_path, stop_after=1)
    with pytest.raises(HarnessError, match=r"recipe differs \(lr: 0.002 -> 0.001\)"):
        _run(tmp_path, lr=1e-3)
    with pytest.raises(HarnessError, match=r"recipe differs \(dataset: "):
        train_detection3d(FACTORY, DrivingScenes("train", size=7, **SCENES), steps=4, batch_size=2, lr=2e-3,
                          warmup_steps=1, device="cpu", out_dir=tmp_path, log=lambda _: None)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="unknown nms argument"):
        _run(tmp_path, nms={"score": 0.1})
    with pytest.raises(HarnessError, match="trains FastBEV models"):
        train_detection3d(lambda: torch.nn.Linear(1, 1), TRAIN, steps=1, batch_size=1, lr=1.0, device="cpu",
                          out_dir=tmp_path, log=lambda _: None)


def test_outputs_of_a_finished_run_load_strictly(tmp_path: Path) -> None:
    result = _run(tmp_path, command="pytest")
    summary = json.loads(result.summary_path.read_text())
    assert summary["command"] == "pytest" and summary["steps"] == 4 and summary["val_size"] == 2
    assert 0.0 <= summary["val"]["NDS"] <= 1.0 and set(summary["val"]["AP"]) == set(CLASSES)
    assert summary["hardware"]["device"] == "cpu" and summary["step_time_s"] > 0
    assert summary["first_loss"] > 0 and summary["recipe"]["dataset"].startswith("DrivingScenes(")
    weights = torch.load(result.weights, weights_only=True)
    assert weights["bbox_head.conv_cls.weight"].dtype == torch.float16
    model = FACTORY()
    model.load_state_dict(weights, strict=True)
    # the reloaded inference model scores as the trainer's final validation did (fp16 rounding aside)
    again = evaluate_detection3d(model.float(), [VAL[i] for i in range(2)])
    assert abs(again.NDS - summary["val"]["NDS"]) < 0.05
    assert _run(tmp_path).summary == summary


def test_evaluate_scores_head_maps_that_encode_the_ground_truth() -> None:
    """Loss layout and decode layout agree: maps built from the anchor assignment (class logit,
    `encode`d deltas, direction class on every positive anchor) evaluate to the ground truth."""
    model = FACTORY()
    cfg = model.config
    samples = [VAL[0], VAL[1]]
    maps = []
    for sample in samples:
        seen_boxes = [b for b in sample.boxes if b.num_pts]  # unseen GT is dropped by the metric
        targets = model.loss_targets(GTBoxes.from_boxes(seen_boxes))
        pos = targets.assigned >= 0
        matched = targets.boxes[targets.assigned[pos]]
        cls = torch.full((cfg.num_anchors, 10), -12.0)
        cls[pos, targets.labels[targets.assigned[pos]]] = 12.0
        deltas = torch.zeros(cfg.num_anchors, 9)
        deltas[pos] = encode(model.anchors[pos], matched)
        dirs = torch.zeros(cfg.num_anchors, 2)
        dirs[pos, direction_target(matched[:, 6])] = 5.0
        y, x = cfg.head_xy[1], cfg.head_xy[0]
        maps.append([t.reshape(y, x, -1).permute(2, 0, 1) for t in (cls, deltas, dirs)])
    stacked = HeadOutputs(*(torch.stack([m[i] for m in maps]) for i in range(3)))
    model.head_forward = lambda volume: HeadOutputs(*(t[: volume.shape[0]] for t in stacked))  # type: ignore[method-assign, assignment]
    result = evaluate_detection3d(model, samples, batch_size=2)
    seen = [c for c, m in result.per_class.items() if m.num_gt > 0 and c not in ("traffic_cone", "barrier")]
    assert seen
    for c in seen:
        assert result.per_class[c].ap == pytest.approx(1.0), c
        assert result.per_class[c].trans_err < 1e-4 and result.per_class[c].orient_err < 1e-3, c
