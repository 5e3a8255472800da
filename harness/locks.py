"""File locks kept in a folder only the current user can write, so nobody else can block or hijack them."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from filelock import FileLock

from harness.errors import HarnessError


def private_dir(path: Path) -> Path:
    """`path` created with mode 0700 if absent; HarnessError unless it is a real folder (not a
    symlink) owned by the current user that no one else can write."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise HarnessError(f"cannot create the lock folder {path}: {exc.strerror or exc}; "
                           "point qharness at a writable cache folder") from exc
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise HarnessError(f"lock folder {path} is not a plain folder (a symlink?); remove it")
    if st.st_uid != os.getuid():
        raise HarnessError(f"lock folder {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                           "remove it or use another cache folder")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def default_lock_dir() -> Path:
    """The per-user lock folder under the temp folder (`qharness-locks-<uid>`), verified private."""
    return private_dir(Path(tempfile.gettempdir()) / f"qharness-locks-{os.getuid()}")


def lock_for(target: Path, lock_dir: Path | None = None) -> FileLock:
    """A lock guarding `target`, kept in `lock_dir` (verified private; default `default_lock_dir()`)."""
    folder = default_lock_dir() if lock_dir is None else private_dir(lock_dir)
    name = hashlib.sha256(str(Path(target).resolve()).encode()).hexdigest()[:32] + ".lock"
    return FileLock(str(folder / name))
