"""LiDAR sparse-encoder task: one voxelised sweep in (features, indices), the dense BEV map out.

The program of a `lidar` case takes `features` [N, C] float32 (voxel means) and `indices` [N, 4]
int32 rows in the case's index order (`task_args: {index_order: zyx}`, the default, rows
(b, z, y, x); "xyz" rows (b, x, y, z)), and returns `dense` [1, C*D, H, W]. dim 0 counts voxels,
not samples: the SCN engine (NVIDIA's 3DSparseConvolution) takes one sweep at a time, so golden
inputs, calibration batches and evaluation batches hold exactly one sweep each.

Golden files are written in NVIDIA's naming and layout (`harness.export.scn_golden`), so the
same files feed the C++ engine and `tool/compare.py`:
`inputs/in_features.torch.fp16.tensor`, `inputs/in_indices_zyx.torch.int32.tensor` (or `_xyz`),
`outputs/out_dense.torch.fp16.tensor`. Golden features are rounded to fp16 before the float
reference runs, so the stored inputs are exactly what produced the stored output.

Indices are checked wherever they enter: dataset samples and golden input files must lie inside
the dataset's grid (`spatial_shape`) and hold no voxel twice; the error names the sample or the
file and the first bad row (spconv would silently sum or drop such voxels).

There is no metric (the case compares tensors); the SCN graph's custom ops cannot run on ONNX
Runtime or TensorRT, which are skipped with that reason.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
import torch

from harness.errors import HarnessError
from harness.export import scn_golden
from harness.export.scn_executor import ScnInputError, check_indices
from harness.factory import resolve
from harness.golden import GoldenFile
from harness.tasks.base import Batch, Dataset, TaskAdapter

if TYPE_CHECKING:
    from harness.backends.registry import BackendInfo
    from harness.cases import Case

IndexOrder = Literal["zyx", "xyz"]
INDEX_ORDERS: tuple[IndexOrder, ...] = ("zyx", "xyz")
_TASK_ARGS = frozenset({"index_order"})

CUSTOM_OPS = "the SCN graph uses NVIDIA's custom SparseConvolution/ScatterDense ops"


def index_order(case: Case) -> IndexOrder:
    """The case's `task_args.index_order` ("zyx" unless set); CaseError for other values."""
    order = case.spec.task_args.get("index_order", "zyx")
    if order not in INDEX_ORDERS:
        raise case.error(f"index_order must be one of {list(INDEX_ORDERS)}, got {order!r}",
                         "task_args", "index_order")
    return cast(IndexOrder, order)


def spconv_cpu_only() -> bool:
    """True when the installed spconv has no CUDA kernels (the `spconv` wheel, not `spconv-cu12x`)."""
    from spconv.core_cc.csrc.sparse.all import SpconvOps

    return bool(SpconvOps.is_cpu_only_build())


class LidarTask(TaskAdapter):
    """Voxelised sweeps (`harness.datasets.lidar.LidarSweeps` samples: `features`, `indices` in
    (b, z, y, x) order, `boxes`) to the SCN's `features` / `indices` inputs, one sweep a batch."""

    input_names = ("features", "indices")
    output_names = ("dense",)
    dynamic_batch = False
    graphs: ClassVar[frozenset[str]] = frozenset({"torch", "scn"})

    def __init__(self, case: Case):
        super().__init__(case)
        spec = case.spec
        unknown = sorted(set(spec.task_args) - _TASK_ARGS)
        if unknown:
            raise case.error(f"unknown lidar task option(s) {unknown}; known: {sorted(_TASK_ARGS)}",
                             "task_args", unknown[0])
        self.index_order = index_order(case)
        if spec.metric is not None:
            raise case.error("the lidar task has no metric (SCN cases compare tensors only)", "metric")
        one_sweep = "the SCN takes one sweep at a time (batch 1, as NVIDIA's engine): set it to 1"
        for value, key in ((spec.golden.samples, ("golden", "samples")),
                           (spec.data.batch_size, ("data", "batch_size")),
                           (spec.quant.calibration_batch_size, ("quant", "calibration_batch_size"))):
            if value != 1:
                raise case.error(f"{value}: {one_sweep}", *key)

    @functools.cached_property
    def grid(self) -> tuple[int, ...] | None:
        """The voxel grid in the case's index order, from the dataset's `spatial_shape` (z, y, x);
        None when the dataset does not say."""
        data = self.case.spec.data
        shape: Sequence[int] | None = getattr(resolve(data.factory)(**data.args), "spatial_shape", None)
        if shape is None:
            return None
        zyx = tuple(int(v) for v in shape)
        return zyx[::-1] if self.index_order == "xyz" else zyx

    def check_inputs(self, inputs: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:
        """Indices [N, 4] inside the grid (batch 0) and unique, features [N, C] finite; ScnInputError
        naming the source of the offending tensor and its first bad row."""
        indices, features = np.asarray(inputs["indices"]), np.asarray(inputs["features"])
        where_i, where_f = sources.get("indices", "indices"), sources.get("features", "features")
        grid = self.grid
        if grid is None and indices.ndim == 2 and indices.shape[0]:
            grid = tuple(int(v) + 1 for v in indices[:, 1:].max(axis=0))
        check_indices(indices, grid or (1, 1, 1), where_i)
        if features.ndim != 2 or features.shape[0] != indices.shape[0]:
            raise ScnInputError(where_f, f"features {list(features.shape)} must be [{indices.shape[0]}, C] "
                                f"for the {indices.shape[0]} rows of {where_i}")
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            raise ScnInputError(where_f, "features hold NaN or Inf", row=int(np.argmin(finite)))

    def sweep_inputs(self, sample: Any, index: int) -> dict[str, torch.Tensor]:
        """Program inputs of one sample: float32 features and int32 indices in the case's order,
        checked (`check_inputs`, naming the sample)."""
        features = np.ascontiguousarray(np.asarray(sample.features), dtype=np.float32)
        indices = np.asarray(sample.indices)
        if self.index_order == "xyz" and indices.ndim == 2 and indices.shape[1] == 4:
            indices = scn_golden.swap_order(indices)
        name = f"sample {index} ({getattr(sample, 'token', index)})"
        self.check_inputs({"features": features, "indices": indices},
                          {"features": f"{name} features", "indices": f"{name} indices"})
        return {"features": torch.from_numpy(features),
                "indices": torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int32))}

    def golden_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor]:
        """The first sweep, its features rounded to fp16 (the golden file's dtype)."""
        if count != 1:
            raise HarnessError(f"the lidar task's golden inputs are one sweep, not {count}")
        inputs = self.sweep_inputs(dataset[0], 0)
        inputs["features"] = inputs["features"].half().float()
        return inputs

    def batches(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """One sweep per batch, its ground-truth boxes as targets."""
        if batch_size != 1:
            raise HarnessError(f"the lidar task runs one sweep per batch, not {batch_size}")
        for i in range(len(dataset)):
            sample = dataset[i]
            yield Batch(self.sweep_inputs(sample, i), getattr(sample, "boxes", None),
                        (str(getattr(sample, "token", i)),))

    def golden_layout(self) -> Mapping[str, GoldenFile]:
        """NVIDIA's names and dtypes: fp16 features, int32 indices (in the case's order), fp16 output."""
        return {
            "features": GoldenFile(scn_golden.FEATURES, np.dtype(np.float16)),
            "indices": GoldenFile(scn_golden.INDICES[self.index_order], np.dtype(np.int32)),
            "dense": GoldenFile(scn_golden.OUTPUT, np.dtype(np.float16)),
        }

    def unsupported_reason(self, backend: BackendInfo, device: torch.device) -> str | None:
        """Backends of standard ONNX graphs cannot run the custom ops; PyTorch on CUDA (a CUDA-only
        backend, or any under `--device cuda`) needs spconv's CUDA kernels, which the CPU-only
        spconv wheel lacks."""
        if backend.graph == "onnx":
            return (f"{CUSTOM_OPS}: {backend.name} has no kernels for them (NVIDIA's 3DSparseConvolution "
                    "engine runs them; qharness checks that graph with its scn backends)")
        if backend.graph == "torch" and (backend.needs_cuda or device.type == "cuda") and spconv_cpu_only():
            return (f"{backend.name} on CUDA needs spconv's CUDA kernels: the installed spconv is a CPU-only "
                    "build (pip install the spconv-cu1xx wheel matching your CUDA, or run with --device cpu)")
        return super().unsupported_reason(backend, device)
