"""What the trainers share: file names, results, a deterministic sample schedule, helpers."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Sampler

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
