"""Rendering time of one road scene at the CI and at the Cityscapes resolution."""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.datasets.roads import RoadScenes


@pytest.mark.parametrize(("height", "width"), [(256, 512), (1024, 2048)])
def test_render(benchmark: BenchmarkFixture, height: int, width: int) -> None:
    ds = RoadScenes("train", size=1000, height=height, width=width)
    counter = iter(range(1000))
    rounds = 20 if height < 512 else 5
    benchmark.pedantic(lambda: ds[next(counter)], rounds=rounds, iterations=1)  # type: ignore[no-untyped-call]
