"""Tests for harness/cache.py: content keys and once-only, crash-safe cache entries."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from harness.cache import Cache, content_key, file_sha256

KEY = content_key("model", {"width": 4})


def test_content_key_is_stable_and_order_insensitive_for_dict_keys() -> None:
    expected = hashlib.sha256(b'[{"a":1,"b":[1,2]},"x"]').hexdigest()
    assert content_key({"b": [1, 2], "a": 1}, "x") == expected
    assert content_key({"a": 1, "b": [1, 2]}, "x") == expected
    nested = content_key({"outer": {"y": 1, "x": 2}})
    assert nested == content_key({"outer": {"x": 2, "y": 1}})


def test_content_key_distinguishes_what_matters() -> None:
    base = content_key({"a": 1, "b": [1, 2]}, "x")
    assert content_key({"a": 2, "b": [1, 2]}, "x") != base
    assert content_key({"a": 1, "b": [2, 1]}, "x") != base  # list order matters
    assert content_key({"a": 1, "b": [1, 2]}, "y") != base
    assert content_key("x", {"a": 1, "b": [1, 2]}) != base  # part order matters
    assert content_key(1) != content_key("1")
    assert content_key(Path("/a/b")) == content_key("/a/b")  # non-JSON values go through str()


def test_file_sha256_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"one")
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert file_sha256(path) == hashlib.sha256(b"two!").hexdigest()


def test_entry_is_built_once(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "model.onnx").write_bytes(b"onnx")

    first = cache.entry("onnx", KEY, build)
    second = cache.entry("onnx", KEY, build)
    assert first == second == tmp_path / "cache" / "onnx" / KEY[:24]
    assert len(calls) == 1 and calls[0] != first  # built in a temporary folder, then renamed
    assert (first / "model.onnx").read_bytes() == b"onnx"
    other = cache.entry("onnx", content_key("other"), build)
    assert other != first and len(calls) == 2
    assert cache.entry("engines", KEY, build) != first  # namespaces are separate


def test_racing_threads_build_once(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    calls = 0
    lock = threading.Lock()
    start = threading.Barrier(4)

    def build(folder: Path) -> None:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.2)
        (folder / "value").write_text("done")

    results: list[Path] = []

    def worker() -> None:
        start.wait()
        results.append(cache.entry("ns", KEY, build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1
    assert len(results) == 4 and len(set(results)) == 1
    assert (results[0] / "value").read_text() == "done"


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def broken(folder: Path) -> None:
        (folder / "half.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cache.entry("onnx", KEY, broken)
    leftovers = [p.name for p in (tmp_path / "onnx").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    built = cache.entry("onnx", KEY, lambda folder: (folder / "ok").write_text("1"))
    assert (built / "ok").exists() and not (built / "half.onnx").exists()


def test_incomplete_entry_is_rebuilt(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    stale = tmp_path / "ns" / KEY[:24]
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed run")
    built = cache.entry("ns", KEY, lambda folder: (folder / "good").write_text("1"))
    assert built == stale
    assert sorted(p.name for p in built.iterdir()) == [".complete", "good"]


def test_json_value_computed_once(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    calls: list[int] = []

    def compute() -> dict[str, float]:
        calls.append(1)
        return {"miou": 0.5, "per_class": [1, 2]}

    assert cache.json_value("metric", KEY, compute) == {"miou": 0.5, "per_class": [1, 2]}
    assert cache.json_value("metric", KEY, compute) == {"miou": 0.5, "per_class": [1, 2]}
    assert len(calls) == 1


@pytest.mark.parametrize("corruption", ["{broken", '{"other": 1}', None])
def test_json_value_recomputes_corrupt_file_with_warning(tmp_path: Path, corruption: str | None) -> None:
    cache = Cache(tmp_path)
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return 42

    folder = cache.entry("metric", KEY, lambda f: None)  # an entry without value.json
    if corruption is not None:
        (folder / "value.json").write_text(corruption)
    with pytest.warns(UserWarning, match=f"qharness cache entry {folder} is unusable"):
        assert cache.json_value("metric", KEY, compute) == 42
    assert len(calls) == 1
    assert cache.json_value("metric", KEY, compute) == 42
    assert len(calls) == 1


def test_json_value_compute_error_propagates_and_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def compute() -> int:
        raise ValueError("metric failed")

    with pytest.raises(ValueError, match="metric failed"):
        cache.json_value("metric", KEY, compute)
    assert not (tmp_path / "metric" / KEY[:24]).exists()
