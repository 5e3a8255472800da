"""What the trainers share: file names, results, a deterministic sample schedule, helpers."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import Sampler

from harness.errors import HarnessError

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model_fp16.pt"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class TrainResult:
    """Where a (possibly partial) run stands. `weights` and `summary_path` exist once finished."""

    out_dir: Path
    step: int
    finished: bool
    checkpoint: Path
    weights: Path | None
    summary_path: Path | None
    summary: dict[str, object]


@dataclass
class Progress:
    """How far a run has come: what a checkpoint holds besides model, optimizer and RNG states."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0
    train_time_s: float = 0.0


def load_checkpoint(path: Path, recipe: dict[str, object], model: nn.Module, opt: torch.optim.Optimizer,
                    device: torch.device) -> Progress | None:
    """Restore model, optimizer and RNG states from the checkpoint at `path` and return its progress;
    None when there is no checkpoint. Raises `HarnessError` naming every recipe key that differs
    from `recipe` (a run resumes only with the recipe it started with)."""
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    saved = state["recipe"]
    diff = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {recipe.get(k)!r}" for k in diff)
        raise HarnessError(f"{path}: cannot resume, recipe differs ({detail})")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
    return Progress(int(state["step"]), list(state["history"]), float(state["elapsed_s"]), float(state["train_time_s"]))


def save_checkpoint(path: Path, recipe: dict[str, object], model: nn.Module, opt: torch.optim.Optimizer,
                    progress: Progress, device: torch.device) -> None:
    """Write everything `load_checkpoint` restores to `path`, atomically."""
    save_atomic(
        {
            "recipe": recipe,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": progress.step,
            "history": progress.history,
            "elapsed_s": progress.elapsed_s,
            "train_time_s": progress.train_time_s,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        path,
    )


def finished_run(out: Path, steps: int, step: int, log: Callable[[str], None]) -> TrainResult | None:
    """The result of a run in `out` that already finished all `steps` (weights and summary written),
    or None when there is work left."""
    summary_path, weights = out / SUMMARY, out / WEIGHTS
    if step != steps or not summary_path.exists() or not weights.exists():
        return None
    log(f"{out} already holds the finished run of {steps} steps")
    summary: dict[str, object] = json.loads(summary_path.read_text())
    return TrainResult(out, step, True, out / CHECKPOINT, weights, summary_path, summary)


class Schedule:
    """Which dataset index and which augmentation parameters global sample number g gets."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed = seed
        self.size = size
        self._epoch = -1
        self._perm: npt.NDArray[np.int64] = np.arange(size)

    def index(self, g: int) -> int:
        epoch, pos = divmod(g, self.size)
        if epoch != self._epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, epoch]))
            self._perm = rng.permutation(self.size)
            self._epoch = epoch
        return int(self._perm[pos])

    def params(self, g: int) -> npt.NDArray[np.float64]:
        """Four uniforms in [0, 1): scale, crop y, crop x, flip."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, 1, g])).random(4)


class RangeSampler(Sampler[int]):
    """Indices start..stop-1 in order (a resumable slice of the schedule)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start = start
        self.stop = stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def worker_init(_: int) -> None:
    """DataLoader workers render on one thread each (no oversubscription)."""
    torch.set_num_threads(1)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temp file, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def hardware(device: torch.device) -> dict[str, object]:
    """Machine facts recorded in training summaries."""
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def fp16_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with floating tensors in fp16, all on the CPU (how trained weights are stored)."""
    return {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


class StepBar:
    """A tqdm bar over training steps (or nothing when disabled) whose `log` prints above it."""

    def __init__(self, steps: int, start: int, enabled: bool, log: Callable[[str], None]) -> None:
        self._log = log
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, message: str) -> None:
        """Print `message` (through tqdm while the bar is shown, so the bar stays intact)."""
        if self._bar is not None and self._log is print:
            self._bar.write(message)
        else:
            self._log(message)

    def update(self) -> None:
        """One step done."""
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def step_bar(steps: int, start: int, enabled: bool, log: Callable[[str], None]) -> StepBar:
    """A `StepBar` from step `start` of `steps` (a plain pass-through of `log` when not `enabled`)."""
    return StepBar(steps, start, enabled, log)


def parameter_groups(model: nn.Module, amax_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the model's parameters, and (quantization-aware training with
    learnable amax) the amax parameters in a group of their own without weight decay whose
    learning rate is `amax_lr_scale` times the schedule's (`lr_scale`, read by `scheduled_lr`)."""
    from harness.quant.qat import learnable_amax

    amax = learnable_amax(model)
    ids = {id(p) for p in amax}
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr_scale": 1.0}]
    if amax:
        groups.append({"params": amax, "lr_scale": amax_lr_scale, "weight_decay": 0.0})
    return groups


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to `lr` times its `lr_scale` (default 1)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
