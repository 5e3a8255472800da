"""Tests for harness/atomic.py: readers see the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from harness import atomic
from harness.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic


def test_write_creates_folders_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "f.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]


def test_text_and_json(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "t.txt", "grüße\n")
    assert (tmp_path / "t.txt").read_bytes() == "grüße\n".encode()
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "m.json").read_text()
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert json.loads(text) == {"a": [1, 2], "b": 1}


def test_failure_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="cross-device"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_unserialisable_json_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "m.json", {"x": object()})
    assert os.listdir(tmp_path) == []


def test_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
