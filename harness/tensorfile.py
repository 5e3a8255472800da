"""Read and write NVIDIA's `.tensor` files (the Lidar_AI_Solution / CUDA-FastBEV layout).

Layout (all little-endian, no padding):

| offset        | type          | field                                    |
|---------------|---------------|------------------------------------------|
| 0             | int32         | magic 0x33FF1101 (bytes 01 11 FF 33)     |
| 4             | int32         | ndim (1..16)                             |
| 8             | int32         | dtype code (table below)                 |
| 12            | int32 x ndim  | dims                                     |
| 12 + 4*ndim   | raw           | numel * itemsize bytes, C order          |

Codes: 1 int32, 2 float16, 3 float32, 4 int64, 5 uint64, 6 uint32, 7 int8, 8 uint8,
9 uint16, 10 int16 (9 and 10 exist only in the C++ BEVFusion/FastBEV enum; NVIDIA's Python
tools and libspconv know 1..8).

Choices that keep our files loadable by NVIDIA's tools: scalars are written as shape [1]
(both NVIDIA loaders fail on ndim 0), arrays are written C-contiguous little-endian, and dtypes
without a code (bool, float64, complex, ...) are refused rather than silently cast.
Reading is strict: bad magic, ndim outside 1..16, unknown codes, negative dims, payloads shorter
than the header promises, and (unless ``allow_trailing``) extra bytes are errors naming the file
and the field. Nothing larger than the file is ever allocated.
`load` also reads `.npy` files (for `qharness compare`), as strictly: the header is checked
against the file size before anything is allocated, and only plain numeric dtypes are accepted
(no pickled object arrays, no `.npz` archives under a `.npy` name).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from harness.atomic import write_bytes_atomic
from harness.errors import TensorFileError

MAGIC = 0x33FF1101
MAX_NDIM = 16
_HEADER = struct.Struct("<iii")

CODE_TO_DTYPE: dict[int, np.dtype[np.generic]] = {
    1: np.dtype("<i4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f4"),
    4: np.dtype("<i8"),
    5: np.dtype("<u8"),
    6: np.dtype("<u4"),
    7: np.dtype("i1"),
    8: np.dtype("u1"),
    9: np.dtype("<u2"),
    10: np.dtype("<i2"),
}
_KIND_TO_CODE: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in CODE_TO_DTYPE.items()
}


def dtype_code(dtype: np.dtype[np.generic] | type) -> int | None:
    """Return the `.tensor` dtype code for `dtype`, or None if the format has none."""
    dt = np.dtype(dtype)
    if dt.kind not in "iuf":
        return None
    return _KIND_TO_CODE.get((dt.kind, dt.itemsize))


def save(path: str | os.PathLike[str], array: np.ndarray | np.generic | float | int) -> None:
    """Write `array` to `path` in the `.tensor` layout, atomically (temp file + rename).

    Scalars and 0-d arrays are written with shape [1]. Raises TensorFileError for dtypes the
    format has no code for, more than 16 dims, or dims/element counts the C++ loader cannot hold.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    code = dtype_code(arr.dtype)
    if code is None:
        known = ", ".join(str(d) for d in CODE_TO_DTYPE.values())
        raise TensorFileError(
            path, f"dtype {arr.dtype} has no .tensor code (supported: {known}); cast the array first", field="dtype"
        )
    if arr.ndim > MAX_NDIM:
        raise TensorFileError(path, f"{arr.ndim} dims; the format holds at most {MAX_NDIM}", field="ndim")
    if any(d >= 2**31 for d in arr.shape) or arr.size >= 2**31:
        raise TensorFileError(path, f"shape {arr.shape} exceeds the int32 limits of the format", field="dims")
    data = np.ascontiguousarray(arr, dtype=CODE_TO_DTYPE[code])
    header = _HEADER.pack(MAGIC, data.ndim, code) + struct.pack(f"<{data.ndim}i", *data.shape)
    write_bytes_atomic(path, header + data.tobytes(order="C"))


def load(path: str | os.PathLike[str], *, allow_trailing: bool = False) -> np.ndarray:
    """Read a `.tensor` (or `.npy`) file into a numpy array with the file's exact dtype and shape.

    Raises TensorFileError naming the file and the field for anything malformed; never allocates
    more than the file size.
    """
    path = Path(path)
    if path.suffix == ".npy":
        return _load_npy(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise TensorFileError(path, f"file has {size} bytes, shorter than the 12-byte header", field="header")
            magic, ndim, code = _HEADER.unpack(head)
            if magic != MAGIC:
                raise TensorFileError(
                    path, f"magic is 0x{magic & 0xFFFFFFFF:08X}, expected 0x{MAGIC:08X}", field="magic"
                )
            if not 1 <= ndim <= MAX_NDIM:
                raise TensorFileError(path, f"ndim is {ndim}, expected 1..{MAX_NDIM}", field="ndim")
            if code not in CODE_TO_DTYPE:
                raise TensorFileError(
                    path, f"dtype code is {code}, expected one of {sorted(CODE_TO_DTYPE)}", field="dtype"
                )
            dims_raw = fh.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise TensorFileError(path, f"file ends inside the {ndim} dims", field="dims")
            dims = struct.unpack(f"<{ndim}i", dims_raw)
            if any(d < 0 for d in dims):
                raise TensorFileError(path, f"negative dimension in {list(dims)}", field="dims")
            dtype = CODE_TO_DTYPE[code]
            numel = 1
            for d in dims:
                numel *= d
            expected = numel * dtype.itemsize
            available = size - _HEADER.size - 4 * ndim
            if expected > available:
                raise TensorFileError(
                    path,
                    f"shape {list(dims)} of {dtype} needs {expected} payload bytes, file holds {available}",
                    field="data",
                )
            if expected < available and not allow_trailing:
                raise TensorFileError(
                    path, f"{available - expected} bytes after the payload of shape {list(dims)}", field="data"
                )
            payload = fh.read(expected)
    except OSError as exc:
        raise TensorFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    return np.frombuffer(payload, dtype=dtype).reshape(dims).copy()


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_KINDS = "biuf"


def _load_npy(path: Path) -> np.ndarray:
    """Read a `.npy` file, checking its header before allocating: the magic (a `.npz` zip
    archive is named as such), the version, a numeric dtype (object arrays would need pickle,
    which stays disabled) and a shape whose payload the file really holds."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
            if magic[:4] == _ZIP_MAGIC:
                raise TensorFileError(path, "is a zip archive (.npz), not a .npy file; save one array with "
                                      "numpy.save", field="magic")
            if magic != _NPY_MAGIC:
                raise TensorFileError(path, f"not a valid .npy file: magic is {magic!r}, expected {_NPY_MAGIC!r}",
                                      field="magic")
            fh.seek(0)
            try:
                major, _ = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(fh)
            except (ValueError, SyntaxError, TypeError) as exc:
                raise TensorFileError(path, f"not a valid .npy file: {exc}", field="header") from exc
            if dtype.hasobject or dtype.kind not in _NPY_KINDS or dtype.fields is not None:
                raise TensorFileError(path, f"dtype {dtype} is not a plain numeric dtype (object arrays need "
                                      "pickle, which qharness never loads)", field="dtype")
            numel = 1
            for d in shape:
                numel *= int(d)
            expected = numel * dtype.itemsize
            available = size - fh.tell()
            if expected > available:
                raise TensorFileError(path, f"shape {list(shape)} of {dtype} needs {expected} payload bytes, "
                                      f"file holds {available}", field="data")
            if expected < available:
                raise TensorFileError(path, f"{available - expected} bytes after the payload of shape "
                                      f"{list(shape)}", field="data")
    except OSError as exc:
        raise TensorFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise TensorFileError(path, f"not a valid .npy file: {exc}") from exc
