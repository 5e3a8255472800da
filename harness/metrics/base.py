"""The metric protocol and registry: every metric names its figures and each figure's direction.

A metric accumulates per-sample predictions (what a task's `decode` returns) against per-sample
targets and computes `MetricValues`. Its `figures` say which numbers it produces and whether
higher or lower is better, so gates compare in the right direction (NDS up, mATE down).
Metrics are looked up by name (`register_metric`, built-ins `miou` and `nds`) or given as
"module:Class".
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from harness.errors import MetricError
from harness.factory import FactoryError, resolve
from harness.registry import Registry

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Figure:
    """One number a metric produces and which way is better."""

    name: str
    direction: Direction = "higher"
    description: str = ""

    def worse_by(self, reference: float, value: float) -> float:
        """How much worse `value` is than `reference` (negative when better)."""
        return reference - value if self.direction == "higher" else value - reference

    def at_least_as_good(self, value: float, bound: float) -> bool:
        """True when `value` is as good as `bound` or better (NaN never is)."""
        if math.isnan(value) or math.isnan(bound):
            return False
        return value >= bound if self.direction == "higher" else value <= bound

    @property
    def relation(self) -> str:
        """">=" for higher-is-better figures, "<=" for lower-is-better ones."""
        return ">=" if self.direction == "higher" else "<="


@dataclass(frozen=True)
class MetricValues:
    """The figures of one metric run; `primary` names the headline figure in `values`."""

    values: dict[str, float]
    primary: str
    details: dict[str, Any] = field(default_factory=dict)


class MetricArgsError(MetricError):
    """A metric argument is unknown or invalid; `key` names it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class Metric(abc.ABC):
    """Accumulates predictions over a dataset and computes the figures.

    Subclasses set `name`, `figures`, `primary`, `consumes` (the kind of prediction a task
    must decode to, e.g. "label_map") and `ARGS` (accepted keyword arguments).
    """

    name: ClassVar[str]
    figures: ClassVar[tuple[Figure, ...]]
    primary: ClassVar[str]
    consumes: ClassVar[str]
    ARGS: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> None:
        """MetricArgsError naming the first unknown argument."""
        unknown = sorted(set(args) - cls.ARGS)
        if unknown:
            raise MetricArgsError(f"unknown argument '{unknown[0]}' of metric '{cls.name}'; known: "
                                  f"{', '.join(sorted(cls.ARGS)) or 'none'}", unknown[0])

    @classmethod
    def figure(cls, name: str) -> Figure:
        """The figure called `name`; MetricArgsError listing the figures otherwise."""
        for fig in cls.figures:
            if fig.name == name:
                return fig
        raise MetricArgsError(f"metric '{cls.name}' has no figure '{name}'; it has: "
                              f"{', '.join(f.name for f in cls.figures)}")

    @abc.abstractmethod
    def update(self, predictions: Sequence[Any], targets: Sequence[Any], sample_ids: Sequence[str]) -> None:
        """Add the decoded predictions and targets of some samples (same order, same length)."""

    @abc.abstractmethod
    def compute(self) -> MetricValues:
        """The figures over everything added so far."""


METRICS: Registry[type[Metric]] = Registry("metric")
METRICS.register("miou", "harness.metrics.miou:MeanIoUMetric")
METRICS.register("nds", "harness.metrics.nds:NDSMetric")


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make `cls` available to case files under `cls.name`."""
    METRICS.register(cls.name, cls)
    return cls


def metric_class(name: str) -> type[Metric]:
    """The metric registered as `name`, or the Metric subclass a "module:Class" spec names.

    Raises MetricArgsError for unknown names and specs that name something else.
    """
    if name in METRICS:
        return METRICS.get(name)
    if ":" in name:
        try:
            cls: Any = resolve(name)
        except FactoryError as exc:
            raise MetricArgsError(str(exc)) from exc
        if isinstance(cls, type) and issubclass(cls, Metric):
            return cls
        raise MetricArgsError(f"'{name}' is not a qharness Metric subclass")
    raise MetricArgsError(f"unknown metric '{name}'; known: {', '.join(METRICS.names())} (or 'module:Class')")
