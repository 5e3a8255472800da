"""On-disk cache of expensive artefacts keyed by content hashes; safe under pytest-xdist.

Entries live in `<root>/<namespace>/<key>/`. Builders write into a temporary folder that is
renamed into place under a file lock, so concurrent workers build an entry once and readers never
see half-written files. Each entry's `.complete` manifest records the sha256 of every file the
builder wrote; `entry` hands out a folder only after checking it still holds exactly those files
with those hashes, and rebuilds (with a warning naming the entry) one that was truncated, edited,
extended or emptied. An entry whose files cannot be parsed by their reader is rebuilt the same way
(`invalidate`). A cache folder that is a file or cannot be written is a HarnessError saying so.
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
from harness.errors import HarnessError
from harness.locks import private_dir

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

    @property
    def lock_dir(self) -> Path:
        """This user's private lock folder inside the cache (`<root>/.locks-<uid>`, mode 0700),
        for locks of things outside the cache such as golden folders (`GoldenStore(lock_dir=...)`)."""
        self._make_dir(self.root)
        return private_dir(self.root / f".locks-{os.getuid()}")

    def entry(self, namespace: str, key: str, build: Callable[[Path], None]) -> Path:
        """The folder for (namespace, key), built by `build(tmp_dir)` if absent; its files are
        verified against the manifest written when it was built (rebuilt with a warning if not).
        HarnessError naming the cache folder when it cannot be created or written."""
        final = self.root / namespace / key[:24]
        if _verify(final) is None:
            return final
        self._make_dir(final.parent)
        try:
            lock = FileLock(str(final) + ".lock")
            lock.acquire()
        except OSError as exc:
            raise self._unusable(exc) from exc
        try:
            problem = _verify(final)
            if problem is None:
                return final
            if final.exists():
                if (final / _COMPLETE).exists():
                    warnings.warn(f"qharness cache entry {final} is unusable ({problem}); rebuilding it",
                                  stacklevel=2)
                shutil.rmtree(final)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            except OSError as exc:
                raise self._unusable(exc) from exc
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a shared cache needs the usual mode
            try:
                build(tmp)
                manifest = {"key": key, "files": {rel: file_sha256(tmp / rel) for rel in _files(tmp)}}
                (tmp / _COMPLETE).write_text(json.dumps(manifest, sort_keys=True))
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        finally:
            lock.release()
        return final

    def _make_dir(self, folder: Path) -> None:
        """Create `folder` inside the cache; HarnessError naming the cache folder if it cannot."""
        if self.root.exists() and not self.root.is_dir():
            raise HarnessError(f"qharness cache folder {self.root} is a file, not a folder; remove it or point "
                               "--qharness-cache / $QHARNESS_CACHE at a writable folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unusable(exc) from exc

    def _unusable(self, exc: OSError) -> HarnessError:
        return HarnessError(f"qharness cache folder {self.root} is not writable ({exc.strerror or exc}); fix its "
                            "permissions or point --qharness-cache / $QHARNESS_CACHE at a writable folder")

    def invalidate(self, namespace: str, key: str, reason: str) -> None:
        """Remove an entry that turned out unreadable, warning with `reason`."""
        final = self.root / namespace / key[:24]
        warnings.warn(f"qharness cache entry {final} is unusable ({reason}); rebuilding it", stacklevel=2)
        with FileLock(str(final) + ".lock"):
            shutil.rmtree(final, ignore_errors=True)

    def json_value(self, namespace: str, key: str, compute: Callable[[], T]) -> T:
        """A JSON-serialisable value computed once per key; recomputed (with a warning) if its
        file was edited, is corrupt or is missing."""
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


def _files(folder: Path) -> list[str]:
    """Paths (relative, POSIX) of every file under `folder` except the manifest, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.name != _COMPLETE and not p.is_dir())


def _verify(folder: Path) -> str | None:
    """None when `folder` holds exactly the files of its manifest with their sha256, else why not."""
    try:
        text = (folder / _COMPLETE).read_text()
        if not text.lstrip().startswith("{"):
            return "it was built by an older qharness that recorded no file hashes"
        manifest = json.loads(text)
        recorded = manifest["files"]
        if not isinstance(recorded, dict):
            return "its manifest lists no files"
        present = _files(folder)
    except FileNotFoundError:
        return "it is incomplete"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest is unreadable: {exc}"
    if present != sorted(recorded):
        changed = sorted(set(present) ^ set(recorded))
        return f"file {changed[0]} was added or removed after it was built"
    for rel, digest in recorded.items():
        try:
            if file_sha256(folder / rel) != digest:
                return f"file {rel} changed after it was built"
        except OSError as exc:
            return f"file {rel} is unreadable: {exc}"
    return None
