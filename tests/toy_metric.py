"""A toy metric in one file with a lower-is-better figure: `error_rate` of label maps
(used by tests/test_extending.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.metrics.base import Figure, Metric, MetricValues


class ErrorRate(Metric):
    """Share of pixels whose predicted label differs from the target (lower is better), and
    its complement `accuracy` (higher is better)."""

    name = "error_rate"
    figures = (Figure("error_rate", "lower"), Figure("accuracy", "higher"))
    primary = "error_rate"
    consumes = "label_map"
    ARGS = frozenset({"ignore_index"})

    def __init__(self, **args: Any) -> None:
        self.check_args(args)
        self.ignore = int(args.get("ignore_index", 255))
        self.wrong = self.total = 0

    def update(self, predictions: Sequence[Any], targets: Sequence[Any], sample_ids: Sequence[str]) -> None:
        for pred, target in zip(predictions, targets, strict=True):
            keep = np.asarray(target) != self.ignore
            self.wrong += int((np.asarray(pred)[keep] != np.asarray(target)[keep]).sum())
            self.total += int(keep.sum())

    def compute(self) -> MetricValues:
        rate = self.wrong / self.total if self.total else float("nan")
        return MetricValues({"error_rate": rate, "accuracy": 1.0 - rate}, "error_rate")
