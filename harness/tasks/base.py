"""The task adapter protocol: model inputs from samples, metric from outputs, pictures."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.factory import resolve
from harness.golden import GoldenFile

if TYPE_CHECKING:
    from harness.cases import Case

TASKS: dict[str, str] = {
    "segmentation": "harness.tasks.segmentation:SegmentationTask",
    "detection3d": "harness.tasks.detection3d:Detection3DTask",
    "tensors": "harness.tasks.tensors:TensorTask",
    "lidar": "harness.tasks.lidar:LidarTask",
}


@dataclass(frozen=True)
class Batch:
    """Program inputs for a few samples plus what the metric needs to score them."""

    inputs: dict[str, torch.Tensor]
    targets: Any
    sample_ids: tuple[str, ...]


@dataclass(frozen=True)
class MetricValues:
    """The figures of one metric run; `primary` names the headline figure in `values`."""

    values: dict[str, float]
    primary: str
    details: dict[str, Any] = field(default_factory=dict)


class MetricAccumulator(abc.ABC):
    """Accumulates one backend's outputs over a dataset and computes the metric."""

    @abc.abstractmethod
    def update(self, outputs: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Add the program outputs of one batch."""

    @abc.abstractmethod
    def compute(self) -> MetricValues:
        """The metric over everything added so far."""


Dataset = Sequence[Any]


class TaskAdapter(abc.ABC):
    """Glue between a dataset, a model program and a metric for one task."""

    #: input / output names of a single-stage model of this task
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    #: whether dim 0 of a single-stage model's inputs is a batch dimension (False for LiDAR voxel
    #: lists, whose dim 0 counts voxels: exports and benchmarks then keep the shapes as they are)
    dynamic_batch: bool = True

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

    def unsupported_backends(self) -> Mapping[str, str]:
        """Backends that cannot run this task's models at all, with the skip reason (e.g. a
        graph of custom ops that ONNX Runtime has no kernels for). Default: none."""
        return {}

    def metric(self) -> MetricAccumulator | None:
        """A fresh accumulator for the case's metric, or None when the task has none."""
        return None

    def primary_metric(self) -> str | None:
        """Name of the headline figure of this task's metric (None without a metric)."""
        return None

    def agreement(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], batch: Batch) -> tuple[int, int] | None:
        """How many task-level predictions of two backends agree on `batch`, out of how many
        (e.g. argmax pixels); None when the task has no such notion."""
        return None

    def pictures(self, batch: Batch, outputs: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path,
                 prefix: str) -> list[Path]:
        """Write comparison pictures of `batch` for each backend's outputs (keyed by backend name,
        "float" for the float model) into `out_dir`, file names starting with `prefix`; return
        the files written. Default: none."""
        return []


def task_class(name: str) -> type[TaskAdapter]:
    """The adapter class for a task name ("segmentation", ...) or a "module:Class" spec."""
    cls = resolve(TASKS.get(name, name))
    if not (isinstance(cls, type) and issubclass(cls, TaskAdapter)):
        raise TypeError(f"task '{name}' does not name a TaskAdapter subclass")
    return cls
