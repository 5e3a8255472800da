"""Trainer checkpoints: an exact round trip of model, optimizer, RNG and progress; refusal of another recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.training.common import Progress, finished_run, load_checkpoint, save_checkpoint

CPU = torch.device("cpu")


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_restores_everything(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path, {"lr": 0.01}, *_model_and_optimizer(0), CPU) is None
    model, opt = _model_and_optimizer(0)
    progress = Progress(7, [{"step": 5.0, "loss": 1.5}], 12.5, 3.25)
    save_checkpoint(path, {"lr": 0.01}, model, opt, progress, CPU)
    expected_draw = torch.rand(3)
    fresh, fresh_opt = _model_and_optimizer(1)
    restored = load_checkpoint(path, {"lr": 0.01}, fresh, fresh_opt, CPU)
    assert restored == progress
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the checkpoint left it


def test_another_recipe_is_refused_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"lr": 0.01, "steps": 10}, *_model_and_optimizer(0), Progress(), CPU)
    with pytest.raises(HarnessError, match=r"checkpoint\.pt: cannot resume, recipe differs \(lr: 0\.01 -> 0\.02\)"):
        load_checkpoint(path, {"lr": 0.02, "steps": 10}, *_model_and_optimizer(0), CPU)


def test_finished_run_needs_all_steps_weights_and_summary(tmp_path: Path) -> None:
    assert finished_run(tmp_path, 10, 10, print) is None
    (tmp_path / "model_fp16.pt").write_bytes(b"w")
    (tmp_path / "summary.json").write_text('{"steps": 10}')
    assert finished_run(tmp_path, 10, 9, print) is None
    done = finished_run(tmp_path, 10, 10, print)
    assert done is not None and done.finished and done.summary == {"steps": 10}
