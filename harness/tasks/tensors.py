"""Generic task: samples are mappings of input names to arrays; golden compares only, no metric.

Each sample already carries its batch dimension (shape [1, ...] or the engine's natural shape);
golden inputs and batches concatenate samples along dim 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.errors import HarnessError
from harness.tasks.base import Batch, Dataset, TaskAdapter
from harness.tasks.options import TaskOptions

if TYPE_CHECKING:
    from harness.cases import Case


def sample_arrays(sample: Any, index: int) -> dict[str, np.ndarray]:
    """The named arrays of a sample given as a mapping or a dataclass-like object."""
    items = sample.items() if isinstance(sample, Mapping) else vars(sample).items()
    arrays = {str(k): np.asarray(v) for k, v in items if isinstance(v, (np.ndarray, torch.Tensor))}
    if not arrays:
        raise HarnessError(f"sample {index} has no array fields")
    return arrays


class TensorTask(TaskAdapter):
    """Feeds sample arrays straight to the program (input names: the samples' array fields, or
    the case's `stages`); no metric, no task options."""

    def __init__(self, case: Case):
        super().__init__(case)
        TaskOptions(case, "tensors", frozenset())

    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """The first `count` samples concatenated along dim 0."""
        return self._concat([sample_arrays(dataset[i], i) for i in range(min(count, len(dataset)))])

    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Consecutive samples concatenated along dim 0, with no targets."""
        for start in range(0, len(dataset), batch_size):
            idx = range(start, min(start + batch_size, len(dataset)))
            yield Batch(self._concat([sample_arrays(dataset[i], i) for i in idx]), None, tuple(str(i) for i in idx))

    @staticmethod
    def _concat(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise HarnessError("the dataset is empty")
        return {k: torch.from_numpy(np.concatenate([s[k] for s in samples], axis=0)) for k in samples[0]}
