"""One backend's run over the evaluation set, shared by the metric and fidelity checks.

`evaluate(ctx, backend)` runs `backend` end to end over the case's evaluation batches once and,
batch by batch, feeds everything that needs those outputs: the case metric (decoded predictions
against targets), the fidelity measures against the backend's fidelity reference (cosine of every
output and, per stage of a staged program, of every stage output with that stage fed the
reference's inputs; the task's prediction agreement), and keeps only what later checks need:
outputs, decoded predictions and stage feeds of a backend that another backend's fidelity names
as its reference. Memory stays bounded by the evaluation set's outputs of referenced backends;
nothing else outlives its batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from harness.compare import CosineAccumulator
from harness.errors import MetricError
from harness.metrics.base import MetricValues
from harness.tasks.base import Batch

if TYPE_CHECKING:
    from harness.context import CaseContext

StageIO = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
"""A stage's feeds and outputs in one run (CPU)."""


@dataclass
class Fidelity:
    """Agreement of a backend with its reference over the evaluation set."""

    reference: str
    cosine: dict[str, float]
    stages: dict[str, dict[str, float]] | None
    agreeing: int
    compared: int

    @property
    def agreement(self) -> float | None:
        """Share of task-level predictions that agree (None when the task has no such notion)."""
        return self.agreeing / self.compared if self.compared else None


@dataclass
class Evaluation:
    """What one backend's pass over the evaluation set produced."""

    backend: str
    metric: MetricValues | None
    fidelity: Fidelity | None
    seconds: float
    outputs: list[dict[str, torch.Tensor]] | None = None
    predictions: list[list[Any]] | None = None
    stages: list[dict[str, StageIO]] | None = None
    batches: int = 0
    samples: int = field(default=0)


def _check_finite(backend: str, outputs: dict[str, torch.Tensor], batch: Batch) -> None:
    for name, tensor in outputs.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MetricError(f"{backend}: output '{name}' has {bad} NaN/Inf values "
                              f"in samples {', '.join(batch.sample_ids)}")


def run_batches(ctx: CaseContext, backend: str, batches: Iterator[Batch], *,
                record_stages: bool) -> Iterator[tuple[Batch, dict[str, torch.Tensor], dict[str, StageIO]]]:
    """Run `backend` end to end on each batch; outputs come back on the CPU, with each stage's
    feeds and outputs when `record_stages`. NaN/Inf in a float output is a MetricError naming
    the backend, the output and the samples."""
    runner = ctx.runner(backend)
    program = ctx.program(ctx._float_model)
    for batch in batches:
        stages: dict[str, StageIO] = {}

        def call(stage: str, feeds: dict[str, torch.Tensor], stages: dict[str, StageIO] = stages) -> dict[str, torch.Tensor]:
            outputs = runner.run_stage(stage, feeds)
            stages[stage] = ({k: v.detach().cpu() for k, v in feeds.items()},
                             {k: v.detach().cpu() for k, v in outputs.items()})
            return outputs

        with torch.inference_mode():
            outputs = {k: v.detach().cpu() for k, v in program.run(batch.inputs, call if record_stages
                                                                     else runner.run_stage).items()}
        _check_finite(backend, outputs, batch)
        yield batch, outputs, stages


def evaluate(ctx: CaseContext, backend: str) -> Evaluation:
    """Run `backend` once over the evaluation set and compute all it is needed for (see module)."""
    started = time.perf_counter()
    adapter = ctx.adapter
    spec = ctx.case.spec.backends.get(backend)
    fidelity_spec = spec.fidelity if spec is not None else None
    reference = ctx.evaluation(fidelity_spec.reference) if fidelity_spec is not None else None
    keep = backend in ctx.fidelity_references
    metric = ctx.metric() if ctx.case.spec.metric is not None else None
    decodes = adapter.prediction_kind is not None and (metric is not None or keep or reference is not None)
    result = Evaluation(backend, None, None, 0.0)
    if keep:
        result.outputs, result.predictions, result.stages = [], [], []
    sums: dict[str, CosineAccumulator] = {}
    stage_sums: dict[str, dict[str, CosineAccumulator]] = {}
    agree = total = 0
    runner = ctx.runner(backend)
    for index, (batch, outputs, stages) in enumerate(run_batches(ctx, backend, ctx.eval_batches(),
                                                                 record_stages=keep and ctx.is_staged)):
        predictions = adapter.decode(outputs, batch) if decodes else None
        if metric is not None and predictions is not None:
            metric.update(predictions, adapter.targets(batch), batch.sample_ids)
        if reference is not None:
            assert reference.outputs is not None and reference.stages is not None and reference.predictions is not None
            expected = reference.outputs[index]
            for name, tensor in outputs.items():
                sums.setdefault(name, CosineAccumulator()).add(tensor.numpy(), expected[name].numpy())
            if predictions is not None and reference.predictions:
                counted = adapter.agreement(predictions, reference.predictions[index], batch)
                if counted is not None:
                    agree, total = agree + counted[0], total + counted[1]
            if ctx.is_staged:
                for stage, (feeds, stage_expected) in reference.stages[index].items():
                    actual = runner.run_stage(stage, feeds)
                    for name, tensor in stage_expected.items():
                        stage_sums.setdefault(stage, {}).setdefault(name, CosineAccumulator()).add(
                            actual[name].detach().cpu().numpy(), tensor.numpy())
        if keep:
            assert result.outputs is not None and result.predictions is not None and result.stages is not None
            result.outputs.append(outputs)
            result.predictions.append(predictions if predictions is not None else [])
            result.stages.append(stages)
        result.batches += 1
        result.samples += len(batch.sample_ids)
    if metric is not None:
        result.metric = metric.compute()
    if reference is not None and fidelity_spec is not None:
        result.fidelity = Fidelity(
            fidelity_spec.reference, {n: acc.value for n, acc in sums.items()},
            {s: {n: acc.value for n, acc in outs.items()} for s, outs in stage_sums.items()} if ctx.is_staged else None,
            agree, total)
    result.seconds = time.perf_counter() - started
    return result
