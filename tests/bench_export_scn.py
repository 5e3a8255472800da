"""Benchmarks of the SCN export path on the CI profile: trace + export, reference executor.

Run with `pytest tests/bench_export_scn.py`; prints figures, asserts no timings.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harness.export.custom import export_scn
from harness.export.scn_executor import Precision, ScnExecutor
from harness.zoo import centerpoint as cp

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


@pytest.fixture(scope="module")
def setup() -> tuple[cp.CenterPointSCN, torch.Tensor, torch.Tensor]:
    f, i = cp.random_voxels(cp.CI_GRID, 6000, seed=13)
    return cp.centerpoint_scn_ci(), f.half().float(), i


def test_bench_export(benchmark: Any, setup: tuple[cp.CenterPointSCN, torch.Tensor, torch.Tensor]) -> None:
    model, f, i = setup
    result = benchmark(export_scn, model, f, i)
    print(f"nodes: {result.num_nodes}, ONNX bytes: {result.model.ByteSize()}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bench_executor(benchmark: Any, setup: tuple[cp.CenterPointSCN, torch.Tensor, torch.Tensor],
                        precision: Precision) -> None:
    model, f, i = setup
    executor = ScnExecutor(export_scn(model, f, i).model, precision=precision)
    benchmark(executor, f, i)
