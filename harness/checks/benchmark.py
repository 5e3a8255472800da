"""benchmark: GPU-correct timing of one stage on one backend through pytest-benchmark.

The timed callable comes from the runner's `timed_call`: inputs are bound on the device in
advance and the call returns only when the device work is done (CUDA synchronised). Rounds
rotate over several input sets so caches do not flatter, warm-up rounds come first, and a bare
loop over the same callables measures the harness overhead. Median / p90 / p99 and the machine
facts go into pytest-benchmark's `extra_info` and the record, so `--benchmark-json`,
`--benchmark-autosave`, `--benchmark-compare` and `--benchmark-compare-fail` work as usual.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.backends.registry import SPEEDUP_BASE, backend_with_role
from harness.checks.base import Check, ItemSpec, per_stage
from harness.environment import cpu_flags, cpu_name, library_versions, thread_count
from harness.records import Record

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case
    from harness.context import CaseContext

ROTATION = 4


def rotated_feeds(feeds: dict[str, torch.Tensor], batch_size: int | None, count: int = ROTATION,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` input sets of the same shapes: the given feeds and copies whose float inputs are
    perturbed by 1 % seeded noise. With `batch_size`, dim 0 is cycled to that size."""
    if batch_size is not None:
        feeds = {k: _cycle_batch(v, batch_size) for k, v in feeds.items()}
    gen = torch.Generator().manual_seed(seed)
    sets = [feeds]
    for _ in range(count - 1):
        sets.append({
            k: v * (1 + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point() else v
            for k, v in feeds.items()
        })
    return sets


def _cycle_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    if tensor.shape[0] == size:
        return tensor
    index = torch.arange(size) % tensor.shape[0]
    return tensor[index].contiguous()


def percentile_ms(samples_s: list[float], q: float) -> float:
    """The q-th percentile of timings given in seconds, in milliseconds (linear interpolation)."""
    return float(np.percentile(np.asarray(samples_s) * 1e3, q))


def bare_loop(calls: list[Callable[[], None]], rounds: int) -> list[float]:
    """Time `rounds` calls (rotating) with nothing but perf_counter around each."""
    timings = []
    for call in itertools.islice(itertools.cycle(calls), rounds):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return timings


def machine_facts(info: dict[str, str]) -> dict[str, Any]:
    """What decides speed: provider, device, CPU flags, threads, library versions."""
    return {
        "provider": info.get("provider", ""),
        "device": info.get("device", ""),
        "precision": info.get("precision", ""),
        "cpu": cpu_name(),
        "cpu_flags": list(cpu_flags()),
        "threads": thread_count(),
        "versions": library_versions(),
    }


def time_calls(benchmark: Any, calls: list[Callable[[], None]], *, rounds: int, warmup: int,
               extra: dict[str, Any]) -> dict[str, Any]:
    """Time `calls` (rotating) with the pytest-benchmark fixture and return the timing record.

    When benchmarking is disabled (--benchmark-disable, or under xdist) every call runs once and
    the record says so instead of carrying figures.
    """
    cycle = itertools.cycle(calls)
    current = calls[0]

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        nonlocal current
        current = next(cycle)
        return (), {}

    def target() -> None:
        current()

    benchmark.extra_info.update(extra)
    if "case" in extra:
        benchmark.group = f"{extra['case']}:{extra.get('stage', '')}"
        benchmark.name = f"{extra['case']}[{extra['backend']}]::{extra.get('stage', '')}"
    disabled = bool(getattr(benchmark, "disabled", False))
    # The bare loop runs half before and half after the benchmark so clock or cache drift
    # during the run does not show up as harness overhead.
    bare = [] if disabled else bare_loop(calls, max(1, rounds // 2))
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if disabled or benchmark.stats is None:
        return {"disabled": True, "rounds": 0, **extra}
    data = list(benchmark.stats.stats.data)
    bare += bare_loop(calls, max(1, rounds - rounds // 2))
    median_s = statistics.median(data)
    bare_median_s = statistics.median(bare)
    timing = {
        "median_ms": median_s * 1e3,
        "mean_ms": statistics.fmean(data) * 1e3,
        "min_ms": min(data) * 1e3,
        "max_ms": max(data) * 1e3,
        "p90_ms": percentile_ms(data, 90),
        "p99_ms": percentile_ms(data, 99),
        "rounds": len(data),
        "warmup": warmup,
        "bare_median_ms": bare_median_s * 1e3,
        "harness_overhead": median_s / bare_median_s - 1.0 if bare_median_s > 0 else 0.0,
        **extra,
    }
    benchmark.extra_info.update({k: timing[k] for k in ("p90_ms", "p99_ms", "bare_median_ms", "harness_overhead")})
    return timing


def benchmark_stage(ctx: CaseContext, backend: str, stage: str, benchmark: Any) -> Record:
    """Benchmark one stage of `backend` on the case context `ctx` and return its record."""
    started = time.perf_counter()
    spec = ctx.case.spec.benchmark
    runner = ctx.runner(backend)
    golden = ctx.stage_feeds()[stage]
    dynamic = ctx.stage_is_dynamic(stage)
    feeds_sets = rotated_feeds(golden, spec.batch_size if dynamic else None)
    calls = [runner.timed_call(stage, feeds) for feeds in feeds_sets]
    extra = {
        "case": ctx.case.name, "profile": ctx.case.profile, "backend": backend, "stage": stage,
        "batch_size": spec.batch_size if dynamic else None,
        "input_shapes": {name: list(t.shape) for name, t in feeds_sets[0].items()},
        **machine_facts(runner.info),
    }
    timing = time_calls(benchmark, calls, rounds=spec.rounds, warmup=spec.warmup, extra=extra)
    record = ctx.new_record(backend, "benchmark", stage, started, runner)
    record.artifacts = dict(runner.artifacts)
    record.sections["timing"] = timing
    if timing.get("disabled"):
        record.reason = "benchmarking disabled (--benchmark-disable or xdist): ran once, no figures"
    return record


def _median_ms(records: Sequence[Record]) -> float | None:
    medians = [float(r.section("timing")["median_ms"]) for r in records
               if r.section("timing") and "median_ms" in r.section("timing")]
    return sum(medians) if medians else None


class BenchmarkCheck(Check):
    """One item per stage, timed with pytest-benchmark's `benchmark` fixture."""

    kind = "benchmark"
    fixtures = ("benchmark",)
    summary_columns = ("median ms", "speedup")

    def items(self, case: Case, backend: BackendInfo, stages: Sequence[str]) -> Iterable[ItemSpec]:
        """benchmark (single stage) or benchmark[<stage>] per stage."""
        return per_stage(self.kind, stages)

    def run(self, ctx: CaseContext, backend: str, item: ItemSpec, fixtures: Mapping[str, Any]) -> Record:
        """Time the stage (the `benchmark` fixture comes from pytest)."""
        return benchmark_stage(ctx, backend, item.stage or "model", fixtures["benchmark"])

    def summary_cells(self, row: Sequence[Record], case: Sequence[Record]) -> dict[str, str]:
        """Summed median latency of the row's stages and the speedup over the speedup base."""
        median = _median_ms(row)
        base = _median_ms([r for r in case if r.backend == backend_with_role(SPEEDUP_BASE)])
        return {"median ms": f"{median:.3f}" if median is not None else "-",
                "speedup": f"{base / median:.2f}x" if median and base else "-"}

    def report_section(self, records: Sequence[Record], out_dir: Path) -> list[str]:
        """Nothing per case: the latency chart covers every case."""
        return []
