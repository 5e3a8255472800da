"""Typed task options (`task_args`): each known key parsed and checked, unknown keys are errors.

Every task adapter reads its `task_args` through `TaskOptions`, so a key that a task does not know
is a CaseError naming `task_args.<key>` instead of being silently ignored, and a value of the
wrong type names its key too. Image normalisation (`mean`, `std`, `channel_order`) is shared by
the image tasks (`Normalisation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.cases import Case

NORMALISATION_KEYS = frozenset({"mean", "std", "channel_order"})


class TaskOptions:
    """The `task_args` of one case for one task: typed accessors, unknown keys rejected."""

    def __init__(self, case: Case, task: str, known: frozenset[str]):
        """Raise CaseError naming `task_args.<key>` for the first key not in `known`."""
        self.case = case
        self.args: Mapping[str, Any] = case.spec.task_args
        unknown = sorted(set(self.args) - known)
        if unknown:
            listed = ", ".join(sorted(known)) or "none"
            raise case.error(f"unknown {task} task option '{unknown[0]}'; known options: {listed}",
                             "task_args", unknown[0])

    def floats(self, key: str, default: tuple[float, float, float],
               positive: bool = False) -> tuple[float, float, float]:
        """Three numbers under `key` (`default` when unset); CaseError naming the key otherwise."""
        value = self.args.get(key)
        if value is None:
            return default
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise self.case.error(f"task_args.{key} must be a list of 3 numbers (one per channel), got {value!r}",
                                  "task_args", key)
        if positive and not all(v > 0 for v in value):
            raise self.case.error(f"task_args.{key} must be positive, got {value!r}", "task_args", key)
        return (float(value[0]), float(value[1]), float(value[2]))

    def boolean(self, key: str, default: bool) -> bool:
        """A true/false option (`default` when unset)."""
        value = self.args.get(key, default)
        if not isinstance(value, bool):
            raise self.case.error(f"task_args.{key} must be true or false, got {value!r}", "task_args", key)
        return value

    def name(self, key: str) -> str | None:
        """A tensor name option (None when unset); CaseError for anything but a non-empty string."""
        value = self.args.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.case.error(f"task_args.{key} must be a tensor name, got {value!r}", "task_args", key)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        """One of `choices` (`default` when unset)."""
        value = self.args.get(key, default)
        if value not in choices:
            raise self.case.error(f"task_args.{key} must be one of {', '.join(choices)}, got {value!r}",
                                  "task_args", key)
        return str(value)

    def normalisation(self, mean: tuple[float, float, float], std: tuple[float, float, float],
                      scale: float) -> Normalisation:
        """The image normalisation from `mean`, `std`, `channel_order` (defaults: the arguments, rgb)."""
        order = self.choice("channel_order", ("rgb", "bgr"), "rgb")
        return Normalisation(self.floats("mean", mean), self.floats("std", std, positive=True),
                             "bgr" if order == "bgr" else "rgb", scale)


@dataclass(frozen=True)
class Normalisation:
    """uint8 RGB images -> model input: channels in `channel_order`, x / scale, minus `mean`,
    divided by `std` (mean and std per channel of the model's input, in that order)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0

    def apply(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 normalised model input."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise HarnessError(f"preprocess expects (N, H, W, 3) uint8 RGB images, got {images.dtype} {images.shape}")
        if self.channel_order == "bgr":
            images = images[..., ::-1]
        x = images.astype(np.float32)
        if self.scale != 1.0:
            x /= np.float32(self.scale)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def invert(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
        """Inverse of `apply` for pictures: (N, 3, H, W) -> (N, H, W, 3) uint8 RGB."""
        y = x.transpose(0, 2, 3, 1) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        out: npt.NDArray[np.uint8] = np.clip(np.round(y * np.float32(self.scale)), 0, 255).astype(np.uint8)
        return out[..., ::-1] if self.channel_order == "bgr" else out
