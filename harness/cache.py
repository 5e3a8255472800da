"""On-disk cache of expensive artefacts keyed by content hashes; safe under pytest-xdist.

Entries live in `<root>/<namespace>/<key>/`. Builders write into a temporary folder that is
renamed into place under a file lock, so concurrent workers build an entry once and readers never
see half-written files. An entry whose files cannot be read is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from harness.atomic import write_json_atomic

T = TypeVar("T")
_COMPLETE = ".complete"


def content_key(*parts: Any) -> str:
    """A stable sha256 hex digest of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime)."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Cache:
    """Content-addressed folders under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, namespace: str, key: str, build: Callable[[Path], None]) -> Path:
        """The folder for (namespace, key), built by `build(tmp_dir)` if absent."""
        final = self.root / namespace / key[:24]
        if (final / _COMPLETE).exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if (final / _COMPLETE).exists():
                return final
            if final.exists():
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a shared cache needs the usual mode
            try:
                build(tmp)
                (tmp / _COMPLETE).write_text(key)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        return final

    def invalidate(self, namespace: str, key: str, reason: str) -> None:
        """Remove an entry that turned out unreadable, warning with `reason`."""
        final = self.root / namespace / key[:24]
        warnings.warn(f"qharness cache entry {final} is unusable ({reason}); rebuilding it", stacklevel=2)
        with FileLock(str(final) + ".lock"):
            shutil.rmtree(final, ignore_errors=True)

    def json_value(self, namespace: str, key: str, compute: Callable[[], T]) -> T:
        """A JSON-serialisable value computed once per key; recomputed if the file is corrupt."""
        def build(folder: Path) -> None:
            write_json_atomic(folder / "value.json", {"value": compute()})

        for attempt in range(2):
            folder = self.entry(namespace, key, build)
            try:
                value: T = json.loads((folder / "value.json").read_text())["value"]
                return value
            except (OSError, ValueError, KeyError) as exc:
                if attempt:
                    raise
                self.invalidate(namespace, key, str(exc))
        raise AssertionError("unreachable")
