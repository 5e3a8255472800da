"""A tiny conv net and tensor dataset for harness tests (importable as `tiny` with tests/ on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from harness.zoo import ops


class Tiny(nn.Module):
    """conv-bn-relu, a residual add and a head: small enough for every backend in a second."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.add = ops.Add()
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.relu(self.add(self.body(y), y)))


def make(width: int = 8) -> Tiny:
    """Factory used by test case files."""
    return Tiny(width)


class Data:
    """Seeded samples {"input": (1, 3, 16, 16) float32}."""

    def __init__(self, size: int = 4, seed: int = 0) -> None:
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        return {"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}


CASE = """\
name: tiny
task: tensors
model: {factory: "tiny:make", args: {width: 8}}
data: {factory: "tiny:Data", args: {size: 4}, calibration: {args: {seed: 1}}, batch_size: 2}
golden: {dir: golden/tiny, samples: 2}
quant: {calibration_batches: 2, calibration_batch_size: 1}
backends:
  torch-fp32: {compare: {atol: 1.0e-5, rtol: 1.0e-4}}
  fakequant-int8: {compare: {cosine_min: 0.99}}
  ort-fp32: {compare: {atol: 1.0e-4, rtol: 1.0e-3}}
  ort-int8: {compare: {cosine_min: 0.99}, fidelity: {reference: fakequant-int8, cosine_min: 0.999}}
"""
