"""The task adapter protocol: model inputs from samples, predictions decoded from outputs, pictures.

A task turns dataset samples into program inputs (`golden_inputs`, `batches`), and a batch's
program outputs into per-sample predictions (`decode`) of its `prediction_kind`, which the case's
metric (`harness.metrics`) scores against `targets(batch)`. Which backends can run the task's
models follows from capabilities (`graphs`), never from backend names.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from harness.errors import HarnessError
from harness.factory import FactoryError, resolve
from harness.golden import GoldenFile
from harness.registry import Registry

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case

TASKS: Registry[type[TaskAdapter]] = Registry("task")
for _name, _target in (("segmentation", "harness.tasks.segmentation:SegmentationTask"),
                       ("detection3d", "harness.tasks.detection3d:Detection3DTask"),
                       ("tensors", "harness.tasks.tensors:TensorTask"),
                       ("lidar", "harness.tasks.lidar:LidarTask")):
    TASKS.register(_name, _target)

_GRAPHS = {"torch": "the PyTorch model", "onnx": "a standard ONNX export",
           "scn": "NVIDIA's sparse-convolution (SCN) custom-op graph"}


@dataclass(frozen=True)
class Batch:
    """Program inputs for a few samples plus what the metric needs to score them."""

    inputs: dict[str, torch.Tensor]
    targets: Any
    sample_ids: tuple[str, ...]


Dataset = Sequence[Any]


class TaskAdapter(abc.ABC):
    """Glue between a dataset, a model program and a metric for one task."""

    #: input / output names of a single-stage model of this task
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    #: whether dim 0 of a single-stage model's inputs is a batch dimension (False for LiDAR voxel
    #: lists, whose dim 0 counts voxels: exports and benchmarks then keep the shapes as they are)
    dynamic_batch: bool = True
    #: the graphs this task's models can be run as (see `harness.backends.registry`)
    graphs: ClassVar[frozenset[str]] = frozenset({"torch", "onnx"})
    #: what `decode` returns per sample (a metric's `consumes`); None: no predictions, no metric
    prediction_kind: ClassVar[str | None] = None

    def __init__(self, case: Case):
        self.case = case

    @abc.abstractmethod
    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """Program inputs for the first `count` samples (the golden inputs)."""

    @abc.abstractmethod
    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Every sample of `dataset` in order, as batches of program inputs with targets."""

    def calibration_inputs(self, dataset: Dataset, batch_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """Program inputs for calibration: the first `max_batches` batches of `dataset`."""
        for i, batch in enumerate(self.batches(dataset, batch_size)):
            if i >= max_batches:
                break
            yield batch.inputs

    def check_inputs(self, inputs: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:  # noqa: B027 - optional hook
        """Raise a HarnessError naming the source (e.g. the golden file) and the first bad element
        for program inputs the model cannot take (e.g. repeated voxel indices). Default: no checks."""

    def golden_layout(self) -> Mapping[str, GoldenFile]:
        """How golden tensors are stored when not as `<tensor name>.tensor` in their own dtype,
        by tensor name (e.g. NVIDIA's `in_features.torch.fp16` for the SCN engine). Default: none."""
        return {}

    def unsupported_reason(self, backend: BackendInfo, device: torch.device) -> str | None:
        """Why `backend` cannot run this task's models on `device` (its graph kind is not one of
        `graphs`), or None. Tasks may add reasons of their own (e.g. a missing CUDA build of a
        library)."""
        if backend.graph not in self.graphs:
            runs = " or ".join(_GRAPHS.get(g, g) for g in sorted(self.graphs))
            return (f"{backend.name} runs {_GRAPHS.get(backend.graph, backend.graph)}; "
                    f"the {type(self).__name__} models run as {runs}")
        return None

    def decode(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> list[Any]:
        """Per-sample predictions (of `prediction_kind`) from a batch's program outputs."""
        raise HarnessError(f"{type(self).__name__} decodes no predictions (it has no metric)")

    def targets(self, batch: Batch) -> Sequence[Any]:
        """Per-sample targets of `batch`, in the order of `decode`'s predictions."""
        return list(batch.targets)

    def agreement(self, a: Sequence[Any], b: Sequence[Any], batch: Batch) -> tuple[int, int] | None:
        """How many task-level predictions of two backends agree on `batch` (`a`, `b`: their
        decoded per-sample predictions), out of how many (e.g. pixels); None when the task has
        no such notion."""
        return None

    def pictures(self, batch: Batch, outputs: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path,
                 prefix: str) -> list[Path]:
        """Write comparison pictures of `batch` for each backend's outputs (keyed by backend name,
        "float" for the float model) into `out_dir`, file names starting with `prefix`; return
        the files written. Default: none."""
        return []


def task_class(name: str) -> type[TaskAdapter]:
    """The adapter class for a task name ("segmentation", ...) or a "module:Class" spec.

    Raises ValueError naming the task for unknown names, TypeError for specs naming something else.
    """
    if name in TASKS:
        found: object = TASKS.get(name)
    else:
        try:
            found = resolve(name)
        except FactoryError as exc:
            raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS.names())}; or 'module:Class'): "
                             f"{exc}") from exc
    if not (isinstance(found, type) and issubclass(found, TaskAdapter)):
        raise TypeError(f"task '{name}' does not name a TaskAdapter subclass")
    return found
