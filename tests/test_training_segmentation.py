"""Segmentation trainer: losses, augmentation, loss decrease, exact resume, outputs."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.datasets.roads import CLASS_NAMES, RoadScenes
from harness.errors import HarnessError
from harness.training.segmentation import (
    TrainRecipe,
    augment,
    boundary_targets,
    cross_entropy,
    evaluate_segmentation,
    ohem_cross_entropy,
    pidnet_loss,
    train_segmentation,
    weighted_bce,
)
from harness.zoo.pidnet import pidnet_s


class Tiny(nn.Module):
    """PIDNet's output contract in miniature: (aux, main, boundary) logits at 1/8 resolution."""

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 24, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.seghead_p = nn.Conv2d(24, num_classes, 1)
        self.final_layer = nn.Conv2d(24, num_classes, 1)
        self.seghead_d = nn.Conv2d(24, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.stem(x)
        return self.seghead_p(f), self.final_layer(f), self.seghead_d(f)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAIN = RoadScenes("train", size=6, height=32, width=64)
VAL = RoadScenes("val", size=2, height=32, width=64)


def _run(out: Path, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        steps=6, batch_size=2, lr=0.05, crop=(32, 64), device="cpu", out_dir=out,
        val_dataset=VAL, log_every=1, val_every=3, checkpoint_every=100, eval_train_size=2,
        log=lambda _: None,
    )  # fmt: skip
    args.update(kw)
    return train_segmentation(Tiny, TRAIN, **args)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cross_entropy_ignores_and_never_nans() -> None:
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 255], [2, 255]]])
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, target, 255), ref)
    assert cross_entropy(logits, torch.full_like(target, 255), 255).item() == 0.0


def test_ohem_keeps_only_hard_pixels() -> None:
    # pixels 0-2 right with p(true) 0.9993, 0.995, 0.964; pixel 3 wrong; pixel 4 ignored
    logits = torch.tensor([[8.0, 0, 0], [0, 6.0, 0], [0, 0, 4.0], [8.0, 0, 0], [0, 0, 0]])
    logits = logits.T.reshape(1, 3, 1, 5)
    target = torch.tensor([[[0, 1, 2, 2, 255]]])
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[0, 0]
    # threshold max(0.9, 2nd smallest p = 0.964): only the wrong pixel is below it
    assert torch.allclose(ohem_cross_entropy(logits, target, 255, 0.9, min_kept=1), per_pixel[3])
    # min_kept beyond the pixel count: threshold is the largest p, kept strictly below it
    kept = per_pixel[[1, 2, 3]].mean()
    assert torch.allclose(ohem_cross_entropy(logits, target, 255, 0.9, min_kept=10), kept)


def test_boundary_targets_band() -> None:
    label = torch.zeros(1, 8, 12, dtype=torch.long)
    label[:, :, 6:] = 5
    edge = boundary_targets(label)
    # columns 5 | 6 differ; the 2-pixel edge dilated by 3x3 covers columns 4..7
    assert edge[0, 3].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert boundary_targets(torch.zeros(1, 4, 4, dtype=torch.long)).sum() == 0


def test_weighted_bce_balances_sides() -> None:
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    logits = torch.zeros(4)
    # positives weighted 3/4, negatives 1/4: mean of (0.75 + 3 * 0.25) * log 2 / 4
    assert weighted_bce(logits, target).item() == pytest.approx(1.5 * np.log(2) / 4)


def test_pidnet_loss_parts() -> None:
    recipe = TrainRecipe(steps=1, batch_size=1, lr=0.1, crop=(16, 16), num_classes=4)
    label = torch.randint(0, 4, (2, 16, 16))
    outputs = (torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(2, 1, 2, 2))
    loss, parts = pidnet_loss(outputs, label, recipe)
    assert set(parts) == {"loss", "main", "aux", "boundary", "boundary_sem"}
    expected = parts["main"] + 0.4 * parts["aux"] + parts["boundary"] + parts["boundary_sem"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    _, plain_parts = pidnet_loss(outputs[1], label, recipe)
    assert plain_parts["loss"] == pytest.approx(parts["main"], rel=1e-5)


def test_augment_is_a_function_of_its_parameters() -> None:
    recipe = TrainRecipe(steps=1, batch_size=2, lr=0.1, crop=(24, 40))
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    labels = torch.randint(0, 19, (2, 32, 64), dtype=torch.uint8)
    params = np.array([[0.0, 0.3, 0.7, 0.9], [0.99, 0.5, 0.5, 0.1]])
    x1, y1 = augment(images, labels, params, recipe)
    x2, y2 = augment(images, labels, params, recipe)
    assert x1.shape == (2, 3, 24, 40) and y1.shape == (2, 24, 40) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # scale 0.5 shrinks 32x64 to 16x32: the crop is padded with ignore / zero
    assert (y1[0, 16:] == 255).all() and (x1[0, :, 16:] == 0).all()
    # the second sample is flipped: no label value outside the source's
    assert set(np.unique(y1[1].numpy())) <= set(np.unique(labels[1].numpy()))


def test_loss_decreases(tmp_path: Path) -> None:
    # the x20 boundary BCE moves slowly on a model this small: leave it out here
    result = _run(
        tmp_path, steps=24, val_dataset=None, scale_range=(1.0, 1.0), flip=False, boundary=False
    )
    losses = [h["loss"] for h in result.summary["history"] if "loss" in h]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    straight = _run(tmp_path / "a")
    first = _run(tmp_path / "b", stop_after=3)
    assert not first.finished and first.step == 3 and first.weights is None
    resumed = _run(tmp_path / "b")
    assert resumed.finished and resumed.step == 6
    a = torch.load(straight.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert _states_equal(a["model"], b["model"])
    assert _states_equal(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert straight.summary["val_miou"] == resumed.summary["val_miou"]
    losses = [h.get("loss") for h in straight.summary["history"]]
    assert losses == [h.get("loss") for h in resumed.summary["history"]]


def test_streaming_equals_cached(tmp_path: Path) -> None:
    cached = _run(tmp_path / "a", steps=3, val_dataset=None)
    streamed = _run(tmp_path / "b", steps=3, val_dataset=None, cache=False)
    a = torch.load(cached.checkpoint, weights_only=True)["model"]
    b = torch.load(streamed.checkpoint, weights_only=True)["model"]
    assert _states_equal(a, b)


def test_resume_with_a_dataset_without_repr(tmp_path: Path) -> None:
    class Plain:
        def __len__(self) -> int:
            return len(TRAIN)

        def __getitem__(self, i: int) -> Any:
            return TRAIN[i]

    kw: dict[str, Any] = dict(
        steps=2, batch_size=2, lr=0.05, crop=(32, 64), device="cpu", out_dir=tmp_path,
        eval_train_size=2, log=lambda _: None,
    )  # fmt: skip
    assert not train_segmentation(Tiny, Plain(), stop_after=1, **kw).finished
    result = train_segmentation(Tiny, Plain(), **kw)
    assert result.finished and result.summary["recipe"]["dataset"] == "Plain(size=6)"  # type: ignore[index]


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path) -> None:
    result = _run(tmp_path, time_limit_s=0.0)
    assert not result.finished and result.step == 0 and result.checkpoint.exists()


def test_resume_refuses_a_different_recipe(tmp_path: Path) -> None:
    _run(tmp_path, stop_after=1)
    with pytest.raises(HarnessError, match=r"recipe differs \(lr: 0.05 -> 0.02\)"):
        _run(tmp_path, lr=0.02)


def test_outputs_of_a_finished_run(tmp_path: Path) -> None:
    result = _run(tmp_path, command="pytest", class_names=CLASS_NAMES)
    summary = json.loads(result.summary_path.read_text())
    assert summary["command"] == "pytest" and summary["steps"] == 6
    assert 0.0 <= summary["val_miou"] <= 1.0 and 0.0 <= summary["train_miou"] <= 1.0
    assert set(summary["val_iou"]) == set(CLASS_NAMES)
    assert summary["hardware"]["device"] == "cpu" and summary["step_time_s"] > 0
    weights = torch.load(result.weights, weights_only=True)
    assert not any(k.startswith(("seghead_p.", "seghead_d.")) for k in weights)
    assert weights["final_layer.weight"].dtype == torch.float16
    again = _run(tmp_path)
    assert again.finished and again.summary == summary


def test_evaluate_perfect_model() -> None:
    class Oracle(nn.Module):
        def __init__(self, labels: np.ndarray) -> None:
            super().__init__()
            self.labels = torch.from_numpy(np.where(labels == 255, 0, labels)).long()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.one_hot(self.labels, 19).permute(0, 3, 1, 2).float()

    samples = [(TRAIN[i].image, TRAIN[i].label) for i in range(2)]
    oracle = Oracle(np.stack([label for _, label in samples]))
    result = evaluate_segmentation(oracle, samples, 19, batch_size=2)
    assert result.miou == 1.0


@pytest.mark.slow
def test_pidnet_weights_load_strictly_for_inference(tmp_path: Path) -> None:
    result = train_segmentation(
        functools.partial(pidnet_s, augment=True), TRAIN, steps=2, batch_size=2, lr=0.01,
        crop=(32, 64), device="cpu", out_dir=tmp_path, eval_train_size=2, log=lambda _: None,
    )  # fmt: skip
    assert result.weights is not None
    model = pidnet_s(augment=False)
    model.load_state_dict(torch.load(result.weights, weights_only=True), strict=True)
