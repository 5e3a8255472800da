"""Tests for harness/tensorfile.py: NVIDIA's `.tensor` layout, read strictly, written compatibly."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import atomic, tensorfile
from harness.errors import TensorFileError

MAGIC_BYTES = bytes.fromhex("0111ff33")
ALL_CODES = dict(tensorfile.CODE_TO_DTYPE)
# NVIDIA's Python tools (tensor.py) and libspconv know only codes 1..8.
NV_PY_CODES = {code: dt for code, dt in ALL_CODES.items() if code <= 8}

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- A re-implementation of NVIDIA's Python tensor.py, from the behaviour the spec describes. ---
# save: keys the code on str(dtype) (so bool, float64 and non-native byte orders are refused),
# writes magic/ndim/code and the dims as native int32, then `tobytes()` (always C order).
# load: reads 12 bytes as int32, rejects unknown codes, asserts the magic, reads ndim int32 dims,
# takes the last cumulative product as the element count and reads exactly that many elements.

_NV_NAME_TO_CODE = {"int32": 1, "float16": 2, "float32": 3, "int64": 4, "uint64": 5,
                    "uint32": 6, "int8": 7, "uint8": 8}
_NV_CODE_TO_TYPE = {1: np.int32, 2: np.float16, 3: np.float32, 4: np.int64, 5: np.uint64,
                    6: np.uint32, 7: np.int8, 8: np.uint8}


def nv_save(array: np.ndarray, path: Path) -> None:
    key = str(array.dtype)
    if key not in _NV_NAME_TO_CODE:
        raise RuntimeError(f"Unsupport dtype {array.dtype}")
    with open(path, "wb") as fh:
        fh.write(np.array([0x33FF1101, array.ndim, _NV_NAME_TO_CODE[key]], dtype=np.int32).tobytes())
        fh.write(np.array(array.shape, dtype=np.int32).tobytes())
        fh.write(array.tobytes())


def nv_load(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        magic, ndim, code = np.frombuffer(fh.read(12), dtype=np.int32)
        if code not in _NV_CODE_TO_TYPE:
            raise RuntimeError(f"Can not find match dtype for index {code}")
        assert magic == 0x33FF1101, "this file is not tensor file"
        dims = np.frombuffer(fh.read(int(ndim) * 4), dtype=np.int32)
        volume = int(np.cumprod(dims)[-1])
        dtype = np.dtype(_NV_CODE_TO_TYPE[int(code)])
        return np.frombuffer(fh.read(volume * dtype.itemsize), dtype=dtype).reshape(*dims)


# --- helpers ---

def header(ndim: int, code: int, dims: list[int], magic: int = 0x33FF1101) -> bytes:
    return struct.pack("<iii", magic, ndim, code) + struct.pack(f"<{len(dims)}i", *dims)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def expect_error(path: Path, field: str | None, *, allow_trailing: bool = False) -> TensorFileError:
    with pytest.raises(TensorFileError) as info:
        tensorfile.load(path, allow_trailing=allow_trailing)
    assert str(path) in str(info.value)
    assert info.value.path == path
    assert info.value.field == field
    if field is not None:
        assert f"[{field}]" in str(info.value)
    return info.value


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


shapes = hnp.array_shapes(min_dims=1, max_dims=6, min_side=0, max_side=4)


@st.composite
def any_tensor(draw: st.DrawFn, codes: dict[int, np.dtype[np.generic]] = ALL_CODES) -> np.ndarray:
    dtype = draw(st.sampled_from(sorted(codes.values(), key=str)))
    return draw(hnp.arrays(dtype, shapes))


# --- round trips ---

@SETTINGS
@given(array=any_tensor())
def test_round_trip_every_dtype_up_to_6d(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "t.tensor"
    tensorfile.save(path, array)
    loaded = tensorfile.load(path)
    assert same_bits(loaded, array)
    # The file is exactly header + dims + C-order little-endian payload, nothing else.
    code = tensorfile.dtype_code(array.dtype)
    assert code is not None
    expected = header(array.ndim, code, list(array.shape)) + array.astype(array.dtype.newbyteorder("<")).tobytes()
    assert path.read_bytes() == expected


@SETTINGS
@given(array=any_tensor(NV_PY_CODES))
def test_our_files_load_in_nvidia_python_loader(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "ours.tensor"
    tensorfile.save(path, array)
    assert same_bits(nv_load(path), array)


@SETTINGS
@given(array=any_tensor(NV_PY_CODES))
def test_nvidia_python_files_load_in_ours(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "theirs.tensor"
    nv_save(array, path)
    assert same_bits(tensorfile.load(path), array)
    # Our writer produces the very same bytes as theirs for every array they accept.
    ours = tmp_path / "ours.tensor"
    tensorfile.save(ours, array)
    assert ours.read_bytes() == path.read_bytes()


def test_codes_match_the_nvidia_table() -> None:
    expected = {1: "<i4", 2: "<f2", 3: "<f4", 4: "<i8", 5: "<u8", 6: "<u4", 7: "|i1", 8: "|u1",
                9: "<u2", 10: "<i2"}
    assert {code: dt.str for code, dt in tensorfile.CODE_TO_DTYPE.items()} == expected
    for code, dt in tensorfile.CODE_TO_DTYPE.items():
        assert tensorfile.dtype_code(dt) == code
        assert tensorfile.dtype_code(dt.newbyteorder(">")) == code
    for dt in (np.bool_, np.float64, np.complex64, np.complex128, np.longdouble, np.object_, np.str_,
               np.datetime64, np.void):
        assert tensorfile.dtype_code(dt) is None


def test_nvidia_centerpoint_in_features_header(tmp_path: Path) -> None:
    """LAS libraries/3DSparseConvolution/workspace/centerpoint/in_features.torch.fp16.tensor."""
    real_header = bytes.fromhex("0111ff33 02000000 02000000 81370100 05000000")
    rng = np.random.default_rng(0)
    payload = rng.standard_normal((79745, 5)).astype(np.float16)
    path = write(tmp_path / "in_features.torch.fp16.tensor", real_header + payload.tobytes())
    assert path.stat().st_size == 797_470
    loaded = tensorfile.load(path)
    assert loaded.shape == (79745, 5) and loaded.dtype == np.float16
    assert loaded.tobytes() == payload.tobytes()
    assert same_bits(nv_load(path), loaded)
    ours = tmp_path / "ours.tensor"
    tensorfile.save(ours, loaded)
    assert ours.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(np.float32(2.5), np.float32), (np.array(7, dtype=np.int32), np.int32), (np.uint8(200), np.uint8),
     (5, np.int64)],
)
def test_scalars_are_written_as_shape_1(tmp_path: Path, value: object, dtype: type) -> None:
    path = tmp_path / "s.tensor"
    tensorfile.save(path, value)  # type: ignore[arg-type]
    raw = path.read_bytes()
    assert raw[4:8] == struct.pack("<i", 1)  # ndim 1, never 0 (both NVIDIA loaders fail on 0)
    assert raw[12:16] == struct.pack("<i", 1)
    loaded = tensorfile.load(path)
    assert loaded.shape == (1,) and loaded.dtype == np.dtype(dtype)
    assert loaded[0] == np.asarray(value)
    assert nv_load(path).shape == (1,)


def test_python_float_scalar_is_float64_and_refused(tmp_path: Path) -> None:
    with pytest.raises(TensorFileError, match="float64"):
        tensorfile.save(tmp_path / "f.tensor", 2.5)


def test_non_contiguous_inputs_are_written_in_c_order(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for view in (base.T, base[:, ::2, 1:], np.asfortranarray(base)):
        path = tmp_path / "v.tensor"
        tensorfile.save(path, view)
        loaded = tensorfile.load(path)
        np.testing.assert_array_equal(loaded, view)
        assert path.read_bytes().endswith(np.ascontiguousarray(view).tobytes())


@pytest.mark.parametrize("dtype", [">f4", ">f2", ">i8", ">u2", ">i2", ">u4"])
def test_big_endian_arrays_are_byte_swapped_to_little_endian(tmp_path: Path, dtype: str) -> None:
    values = np.arange(-3, 9).reshape(3, 4)
    big = values.astype(dtype) if "u" not in dtype else np.abs(values).astype(dtype)
    little = big.astype(np.dtype(dtype).newbyteorder("<"))
    path_big, path_little = tmp_path / "big.tensor", tmp_path / "little.tensor"
    tensorfile.save(path_big, big)
    tensorfile.save(path_little, little)
    assert path_big.read_bytes() == path_little.read_bytes()
    loaded = tensorfile.load(path_big)
    assert loaded.dtype == little.dtype
    np.testing.assert_array_equal(loaded, big)


# --- refused dtypes and shapes on write ---

@pytest.mark.parametrize(
    "array",
    [np.array([True, False]), np.zeros(3, np.float64), np.zeros(2, np.complex64), np.zeros(2, np.complex128),
     np.zeros(2, np.longdouble), np.array(["a", "b"]), np.array([object()]),
     np.array(["2020-01-01"], dtype="datetime64[D]")],
    ids=lambda a: str(a.dtype),
)
def test_dtypes_without_a_code_are_refused(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "bad.tensor"
    with pytest.raises(TensorFileError) as info:
        tensorfile.save(path, array)
    assert info.value.field == "dtype"
    assert str(path) in str(info.value)
    assert str(array.dtype) in str(info.value)
    assert "cast" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_more_than_16_dims_refused(tmp_path: Path) -> None:
    tensorfile.save(tmp_path / "ok.tensor", np.zeros((1,) * 16, np.float32))
    assert tensorfile.load(tmp_path / "ok.tensor").shape == (1,) * 16
    with pytest.raises(TensorFileError) as info:
        tensorfile.save(tmp_path / "bad.tensor", np.zeros((1,) * 17, np.float32))
    assert info.value.field == "ndim" and "17" in str(info.value)


@pytest.mark.parametrize("shape", [(2**31,), (2**16, 2**15)])
def test_shapes_beyond_int32_refused_without_allocating(tmp_path: Path, shape: tuple[int, ...]) -> None:
    huge = np.broadcast_to(np.zeros(1, np.int8), shape)  # a view: no memory behind it
    with pytest.raises(TensorFileError) as info:
        tensorfile.save(tmp_path / "huge.tensor", huge)
    assert info.value.field == "dims"
    assert not (tmp_path / "huge.tensor").exists()


def test_largest_int32_dim_is_accepted_in_the_header(tmp_path: Path) -> None:
    # A zero-size tensor can carry a dim of 2**31-1 cheaply; it must round-trip.
    array = np.zeros((0, 2**31 - 1), np.uint8)
    path = tmp_path / "wide.tensor"
    tensorfile.save(path, array)
    assert tensorfile.load(path).shape == (0, 2**31 - 1)


# --- corrupt files: each names the file and the field ---

def test_wrong_magic(tmp_path: Path) -> None:
    good = header(1, 3, [2]) + np.zeros(2, np.float32).tobytes()
    bad = write(tmp_path / "m.tensor", b"\x01\x11\xff\x34" + good[4:])
    err = expect_error(bad, "magic")
    assert "0x34FF1101" in str(err) and "0x33FF1101" in str(err)
    # The CenterPoint funcs.py variant (same magic, other code table) is not distinguishable here;
    # a big-endian writer would be.
    swapped = write(tmp_path / "be.tensor", struct.pack(">iii", 0x33FF1101, 1, 3) + good[12:])
    expect_error(swapped, "magic")


@pytest.mark.parametrize("size", [0, 1, 4, 11])
def test_truncated_header(tmp_path: Path, size: int) -> None:
    path = write(tmp_path / "h.tensor", (header(1, 3, [1]) + b"\0" * 4)[:size])
    err = expect_error(path, "header")
    assert f"{size} bytes" in str(err)


def test_truncated_dims(tmp_path: Path) -> None:
    full = header(3, 3, [2, 3, 4])
    for cut in (12, 13, 19, 23):
        expect_error(write(tmp_path / f"d{cut}.tensor", full[:cut]), "dims")


def test_truncated_payload(tmp_path: Path) -> None:
    data = header(2, 3, [3, 4]) + np.zeros(12, np.float32).tobytes()
    for missing in (1, 4, 47, 48):
        err = expect_error(write(tmp_path / f"p{missing}.tensor", data[:-missing]), "data")
        assert "48 payload bytes" in str(err)


@pytest.mark.parametrize("ndim", [0, -1, 17, 2**31 - 1])
def test_ndim_out_of_range(tmp_path: Path, ndim: int) -> None:
    path = write(tmp_path / "n.tensor", struct.pack("<iii", 0x33FF1101, ndim, 3) + b"\0" * 64)
    err = expect_error(path, "ndim")
    assert f"ndim is {ndim}" in str(err)


def test_ndim_zero_file_from_nvidia_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scalar.tensor"
    nv_save(np.float32(1.5).reshape(()), path)  # their writer produces ndim 0 ...
    expect_error(path, "ndim")  # ... which neither NVIDIA loader nor ours accepts


@pytest.mark.parametrize("code", [0, 11, -1, 2**31 - 1])
def test_unknown_dtype_code(tmp_path: Path, code: int) -> None:
    path = write(tmp_path / "c.tensor", header(1, code, [1]) + b"\0" * 8)
    err = expect_error(path, "dtype")
    assert f"dtype code is {code}" in str(err)


def test_negative_dims(tmp_path: Path) -> None:
    path = write(tmp_path / "neg.tensor", header(2, 3, [-2, -2]) + np.zeros(4, np.float32).tobytes())
    err = expect_error(path, "dims")
    assert "[-2, -2]" in str(err)


@pytest.mark.parametrize("ndim", [2, 16])
def test_huge_dims_fail_fast_without_allocating(tmp_path: Path, ndim: int) -> None:
    path = write(tmp_path / "huge.tensor", header(ndim, 5, [2**31 - 1] * ndim))
    tracemalloc.start()
    try:
        start = time.perf_counter()
        expect_error(path, "data")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 1 << 20


def test_trailing_bytes_refused_unless_allowed(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3)
    path = write(tmp_path / "t.tensor", header(2, 1, [2, 3]) + array.tobytes() + b"\x07" * 5)
    err = expect_error(path, "data")
    assert "5 bytes after" in str(err)
    np.testing.assert_array_equal(tensorfile.load(path, allow_trailing=True), array)


def test_zero_element_tensor_with_payload_counts_as_trailing(tmp_path: Path) -> None:
    path = write(tmp_path / "z.tensor", header(2, 3, [0, 5]) + b"\0" * 4)
    expect_error(path, "data")
    assert tensorfile.load(path, allow_trailing=True).shape == (0, 5)


def test_missing_file_and_directory_name_the_path(tmp_path: Path) -> None:
    expect_error(tmp_path / "absent.tensor", None)
    folder = tmp_path / "dir.tensor"
    folder.mkdir()
    expect_error(folder, None)


def test_loaded_arrays_are_writable_copies(tmp_path: Path) -> None:
    path = tmp_path / "w.tensor"
    tensorfile.save(path, np.arange(4, dtype=np.float32))
    loaded = tensorfile.load(path)
    assert loaded.flags.writeable and loaded.flags.c_contiguous
    loaded[0] = 9


# --- .npy ---

def test_npy_accepted(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = tmp_path / "g.npy"
    np.save(path, array)
    assert same_bits(tensorfile.load(path), array)
    fortran = np.asfortranarray(array.astype(np.float16))
    np.save(path, fortran)
    np.testing.assert_array_equal(tensorfile.load(path), fortran)


def test_corrupt_or_pickled_npy_refused(tmp_path: Path) -> None:
    corrupt = write(tmp_path / "c.npy", b"\x93NUMPY garbage")
    err = expect_error(corrupt, "header")
    assert "not a valid .npy" in str(err)
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "pickle" in str(expect_error(pickled, "dtype"))
    expect_error(tmp_path / "absent.npy", None)


# --- atomic writes ---

def test_save_leaves_no_temp_files_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.tensor"
    tensorfile.save(path, np.ones(3, np.float32))
    tensorfile.save(path, np.zeros(5, np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["x.tensor"]
    assert tensorfile.load(path).shape == (5,)


def test_failed_write_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keep.tensor"
    tensorfile.save(path, np.arange(3, dtype=np.int32))
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        tensorfile.save(path, np.arange(1000, dtype=np.int32))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.tensor"]
    # A refused dtype does not touch the existing file either.
    monkeypatch.undo()
    with pytest.raises(TensorFileError):
        tensorfile.save(path, np.zeros(2, np.float64))
    assert path.read_bytes() == before
