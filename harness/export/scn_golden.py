"""SCN golden tensors in NVIDIA's naming and layout, so the C++ engine can read the same files.

As in Lidar_AI_Solution's `3DSparseConvolution/workspace/centerpoint/`:

| name                              | dtype   | shape            |
|-----------------------------------|---------|------------------|
| `in_features.torch.fp16.tensor`   | float16 | [N, C]           |
| `in_indices_zyx.torch.int32.tensor` | int32 | [N, 4] (b,z,y,x) |
| `in_indices_xyz.torch.int32.tensor` | int32 | [N, 4] (b,x,y,z) |
| `out_dense.torch.fp16.tensor`     | float16 | [1, C*D, H, W]   |

`xyz == zyx[:, [0, 3, 2, 1]]`; the batch column is 0. `golden_inputs` / `golden_output` give
the arrays under these names (without the `.tensor` suffix, as `harness.golden.GoldenStore`
takes them); `save_*` / `load_*` read and write a folder directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from harness import tensorfile
from harness.errors import TensorFileError

IndexOrder = Literal["zyx", "xyz"]

FEATURES = "in_features.torch.fp16"
INDICES: dict[IndexOrder, str] = {
    "zyx": "in_indices_zyx.torch.int32",
    "xyz": "in_indices_xyz.torch.int32",
}
OUTPUT = "out_dense.torch.fp16"
SUFFIX = ".tensor"


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def swap_order(indices: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows (b,z,y,x) <-> (b,x,y,z): columns [0, 3, 2, 1], as int32."""
    ind = _numpy(indices)
    if ind.ndim != 2 or ind.shape[1] != 4:
        raise ValueError(f"indices must be [N, 4], got {list(ind.shape)}")
    return np.ascontiguousarray(ind[:, [0, 3, 2, 1]].astype(np.int32))


def golden_inputs(features: torch.Tensor | np.ndarray,
                  indices_zyx: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Features as fp16 [N, C] and indices as int32 [N, 4] in both orders, by golden name."""
    f = _numpy(features)
    zyx = _numpy(indices_zyx)
    if f.ndim != 2 or zyx.ndim != 2 or zyx.shape != (f.shape[0], 4):
        raise ValueError(f"features [N, C] and indices [N, 4] expected, got {list(f.shape)} and "
                         f"{list(zyx.shape)}")
    return {
        FEATURES: np.ascontiguousarray(f.astype(np.float16)),
        INDICES["zyx"]: np.ascontiguousarray(zyx.astype(np.int32)),
        INDICES["xyz"]: swap_order(zyx),
    }


def golden_output(dense: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """The dense output as fp16, by golden name."""
    return {OUTPUT: np.ascontiguousarray(_numpy(dense).astype(np.float16))}


def save_inputs(directory: str | Path, features: torch.Tensor | np.ndarray,
                indices_zyx: torch.Tensor | np.ndarray) -> list[Path]:
    """Write the three input files into `directory`; returns their paths."""
    return _save(Path(directory), golden_inputs(features, indices_zyx))


def save_output(directory: str | Path, dense: torch.Tensor | np.ndarray) -> Path:
    """Write `out_dense.torch.fp16.tensor` into `directory`; returns its path."""
    return _save(Path(directory), golden_output(dense))[0]


def _save(directory: Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    paths = []
    for name, array in arrays.items():
        path = directory / f"{name}{SUFFIX}"
        tensorfile.save(path, array)
        paths.append(path)
    return paths


def input_paths(directory: str | Path, order: IndexOrder) -> tuple[Path, Path]:
    """(features file, indices file) of `directory` for index `order`."""
    d = Path(directory)
    return d / f"{FEATURES}{SUFFIX}", d / f"{INDICES[order]}{SUFFIX}"


def load_features(path: str | Path) -> np.ndarray:
    """Features [N, C] float16/float32; TensorFileError naming the file otherwise."""
    f = tensorfile.load(path)
    if f.ndim != 2 or f.dtype not in (np.float16, np.float32):
        raise TensorFileError(path, f"features must be float16/float32 [N, C], got {f.dtype} "
                              f"{list(f.shape)}", field="dims")
    return f


def load_indices(path: str | Path) -> np.ndarray:
    """Indices [N, 4] int32; TensorFileError naming the file otherwise."""
    i = tensorfile.load(path)
    if i.ndim != 2 or i.shape[1] != 4 or i.dtype != np.int32:
        raise TensorFileError(path, f"indices must be int32 [N, 4], got {i.dtype} {list(i.shape)}",
                              field="dims")
    return i


def load_inputs(directory: str | Path, order: IndexOrder) -> tuple[np.ndarray, np.ndarray]:
    """(features, indices) from `directory`, indices in `order`."""
    f_path, i_path = input_paths(directory, order)
    features, indices = load_features(f_path), load_indices(i_path)
    if features.shape[0] != indices.shape[0]:
        raise TensorFileError(i_path, f"{indices.shape[0]} rows but {f_path.name} has "
                              f"{features.shape[0]}", field="dims")
    return features, indices


def load_output(directory: str | Path) -> np.ndarray:
    """The golden dense output of `directory`."""
    return tensorfile.load(Path(directory) / f"{OUTPUT}{SUFFIX}")
