"""Golden folders: reference inputs/outputs as `.tensor`, and `meta.json` saying what made them.

Layout of `golden/<case>/`:
    inputs/<name>.tensor    stage inputs of the reference run (named as the ONNX inputs)
    outputs/<name>.tensor   stage outputs of the float reference (torch-fp32 on the CPU)
    meta.json               format, case, profile, config hash, checkpoint sha256, library versions,
                            creation command, sha256 of every tensor file, stage input/output
                            names, float metric, per-backend baseline metrics

A task may store a tensor under another file name and dtype (`GoldenFile`: the SCN case writes
NVIDIA's `in_features.torch.fp16.tensor` for its `features` input, so the C++ engine reads the
same files); meta.json's `tensor_files` then maps tensor names to file stems, and readers follow it.

Top-level files other than meta.json (a model's `golden_files()` such as FastBEV's `x.tensor`,
training checkpoints, profile subfolders) belong to the folder but not to the tensor set: a rewrite
carries them over; those meta.json lists are hash-checked too.

Writing (only on request, `--update-golden`) is atomic for the whole set: the new set is built in
a sibling `.<name>.new-<pid>` folder, the old folder is renamed to `.<name>.old-<pid>`, the new one
into place, then the old one is deleted. A kill or a full disk at any point leaves the old or the
new complete set; the next store that sees leftovers removes them and, when only the old set
survived the switch, restores it. A folder whose meta.json names another case is not overwritten
(unless `overwrite_other_case`), and references with NaN/Inf are refused (unless `allow_nonfinite`).

Reading is strict: `inputs/` and `outputs/` must hold exactly the `.tensor` files meta.json lists
(no missing, extra or unlisted file, e.g. an `.npy` next to a deleted `.tensor`), every listed file
must match its sha256, and meta.json must list at least one output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness import tensorfile
from harness.atomic import write_json_atomic
from harness.cache import file_sha256
from harness.errors import GoldenError, TensorFileError
from harness.locks import lock_for

FORMAT = 1
META = "meta.json"
KINDS = ("inputs", "outputs")
#: meta.json entries that survive regeneration of the tensors (written by their own commands)
KEPT_KEYS = ("float_metric", "baselines", "training", "qat_training")
#: of those, the ones that describe results of one model and data config (dropped when it changes)
RESULT_KEYS = ("float_metric", "baselines")
IDENTITY_KEYS = ("config_hash", "checkpoint_sha256")
#: keys of meta.json's `files`: `inputs/<file>`, `outputs/<file>` or a top-level `<file>`
_FILE_KEY = re.compile(r"^((inputs|outputs)/)?[^/\\.][^/\\]*$")


@dataclass(frozen=True)
class GoldenFile:
    """How one golden tensor is stored: file name without `.tensor`, and the dtype written
    (None: as produced, with bool -> uint8 and float64 -> float32)."""

    stem: str
    dtype: np.dtype[Any] | None = None


def _golden_array(array: np.ndarray) -> np.ndarray:
    """Arrays as the .tensor format can hold them (bool -> uint8, float64 -> float32)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


class GoldenStore:
    """Reads and (on request) writes one case's golden folder.

    Locks live in `lock_dir` (a private per-user folder, created 0700; default: one under the
    temp folder, see `harness.locks`); every process touching the same folder must use the same.
    """

    def __init__(self, directory: Path, regenerate_hint: str, *, lock_dir: Path | None = None):
        self.dir = Path(directory)
        self.hint = regenerate_hint
        self.lock_dir = lock_dir
        self._verified: dict[str, tuple[tuple[str, int, int], ...]] = {}

    @property
    def meta_path(self) -> Path:
        """Path of meta.json."""
        return self.dir / META

    def exists(self) -> bool:
        """True when meta.json exists (the folder was generated); an interrupted write is
        cleaned up first."""
        self._recover()
        return self.meta_path.is_file()

    def meta(self) -> dict[str, Any]:
        """The parsed meta.json; GoldenError with the regeneration command if missing/corrupt."""
        if not self.exists():
            raise GoldenError(f"golden files are missing: {self.meta_path} does not exist.\n"
                              f"Generate them with: {self.hint}")
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GoldenError(f"{self.meta_path} is not valid JSON ({exc}).\nRegenerate with: {self.hint}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise GoldenError(f"{self.meta_path} has format {found!r}, expected {FORMAT}.\n"
                              f"Regenerate with: {self.hint}")
        return meta

    def check_fresh(self, config_hash: str, checkpoint_sha256: str | None) -> dict[str, Any]:
        """meta.json if it was made from this config and checkpoint, else GoldenError (stale)."""
        meta = self.meta()
        stale = []
        if meta.get("config_hash") != config_hash:
            stale.append(f"case config hash {str(meta.get('config_hash'))[:12]} != current {config_hash[:12]}")
        if meta.get("checkpoint_sha256") != checkpoint_sha256:
            stale.append(f"checkpoint sha256 {str(meta.get('checkpoint_sha256'))[:12]} != current "
                         f"{str(checkpoint_sha256)[:12]}")
        if stale:
            raise GoldenError(f"golden files in {self.dir} are stale: " + "; ".join(stale)
                              + f".\nRegenerate with: {self.hint}")
        return meta

    def verify(self, meta: Mapping[str, Any]) -> None:
        """GoldenError with the hint unless the folder holds exactly the set meta.json lists:
        at least one output, no missing file, no extra file in inputs/ or outputs/, every listed
        file (top-level model files included) with its recorded sha256."""
        files = meta.get("files")
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in files.items()):
            raise GoldenError(f"{self.meta_path}: 'files' is not a mapping of file names to sha256.\n"
                              f"Regenerate with: {self.hint}")
        bad = sorted(k for k in files if not _FILE_KEY.match(k))
        if bad:
            raise GoldenError(f"{self.meta_path} lists '{bad[0]}', which is no file of a golden folder.\n"
                              f"Regenerate with: {self.hint}")
        if not any(k.startswith("outputs/") for k in files):
            raise GoldenError(f"{self.meta_path} lists no output files, so nothing would be compared.\n"
                              f"Regenerate with: {self.hint}")
        state = self._state(files)
        if self._verified.get(self.meta_path.as_posix()) == state:
            return
        for kind in KINDS:
            folder = self.dir / kind
            present = {f"{kind}/{p.name}" for p in folder.iterdir()} if folder.is_dir() else set()
            extra = sorted(present - set(files))
            if extra:
                raise GoldenError(f"{self.dir / extra[0]} is not listed in {self.meta_path} (golden data is the "
                                  f".tensor files meta.json lists; remove it or regenerate).\n"
                                  f"Regenerate with: {self.hint}")
        for key, digest in sorted(files.items()):
            path = self.dir / key
            if not path.is_file():
                raise GoldenError(f"{path} is listed in {self.meta_path} but missing.\n"
                                  f"Regenerate with: {self.hint}")
            if file_sha256(path) != digest:
                raise GoldenError(f"{path} does not match the sha256 in {self.meta_path} (partly updated or "
                                  f"edited).\nRegenerate with: {self.hint}")
        self._verified[self.meta_path.as_posix()] = state

    def read(self, kind: str, name: str, meta: Mapping[str, Any]) -> np.ndarray:
        """One golden tensor (`<stem>.tensor`, the stem from meta.json's `tensor_files`, else its
        name), after `verify(meta)` and a fresh check of the file's sha256."""
        self.verify(meta)
        path = self.path_of(kind, name, meta)
        expected = meta["files"].get(f"{kind}/{path.name}")
        if expected is None or _sha256(path) != expected:
            raise GoldenError(f"{path} does not match the sha256 in {self.meta_path} (partly updated or edited).\n"
                              f"Regenerate with: {self.hint}")
        try:
            return tensorfile.load(path)
        except TensorFileError as exc:
            raise GoldenError(f"{exc}\nRegenerate with: {self.hint}") from exc

    def path_of(self, kind: str, name: str, meta: Mapping[str, Any]) -> Path:
        """The file holding golden tensor `name` (`<stem>.tensor`, the stem from meta.json's
        `tensor_files`, else the name); GoldenError with the hint when missing."""
        stem = meta.get("tensor_files", {}).get(kind, {}).get(name, name)
        path = self.dir / kind / f"{stem}.tensor"
        if path.is_file() and Path(stem).name == stem:
            return path
        shown = name if stem == name else f"{name}' ('{stem}.tensor"
        raise GoldenError(f"golden {kind[:-1]} '{shown}' is missing in {self.dir / kind}.\n"
                          f"Regenerate with: {self.hint}")

    def write(self, tensors: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping[str, Any],
              files: Mapping[str, GoldenFile] | None = None, *, allow_nonfinite: bool = False,
              overwrite_other_case: bool = False, model_files: Mapping[str, np.ndarray] | None = None) -> None:
        """Replace the golden set with `tensors` and `meta`, atomically: afterwards (or after a
        kill or a full disk at any point) the folder holds the old or the new complete set.

        `tensors` maps "inputs"/"outputs" to named arrays; `files` says how a tensor name is
        stored when not as `<name>.tensor` in its own dtype (recorded in meta.json's
        `tensor_files`; GoldenError for file names that are not plain or that collide). Top-level
        files of the old folder are carried over (re-hashed when meta.json listed them);
        `model_files` (a model's `golden_files()`) are written as top-level `<name>.tensor` files
        of the new set and listed with their hashes, replacing carried files of the same name. The
        training record is kept; the float metric and baselines only when config hash and
        checkpoint are unchanged. GoldenError, before anything is written, for an output with
        NaN/Inf (unless `allow_nonfinite`), a folder whose meta.json names another case (unless
        `overwrite_other_case`) and an existing folder without meta.json holding subfolders other
        than inputs/ and outputs/ (it is no golden folder).
        """
        files = files or {}
        model_files = model_files or {}
        for name in model_files:
            if not name or Path(name).name != name or name.startswith(".") or name in (META, *KINDS):
                raise GoldenError(f"golden model file name '{name}' is not a plain file name")
        stems = {kind: _stems(tensors.get(kind, {}), files, kind) for kind in KINDS}
        stored = {kind: {name: _stored(array, files.get(name)) for name, array in tensors.get(kind, {}).items()}
                  for kind in KINDS}
        if not allow_nonfinite:
            _check_finite(stored["outputs"])
        with self._locked():
            old = self._meta_or_empty()
            self._check_replaceable(old, meta, overwrite_other_case)
            staging = self._real().parent / f".{self._real().name}.new-{os.getpid()}"
            try:
                staging.mkdir(parents=True)
                hashes = self._carry_top_level(staging, old)
                for name, array in model_files.items():
                    path = staging / f"{name}.tensor"
                    tensorfile.save(path, np.asarray(array))
                    hashes[path.name] = _sha256(path)
                for kind in KINDS:
                    (staging / kind).mkdir()
                    for name, array in stored[kind].items():
                        path = staging / kind / f"{stems[kind][name]}.tensor"
                        tensorfile.save(path, array)
                        hashes[f"{kind}/{path.name}"] = _sha256(path)
                same_identity = all(old.get(k) == meta.get(k) for k in IDENTITY_KEYS)
                new: dict[str, Any] = {key: old[key] for key in KEPT_KEYS
                                       if key in old and (same_identity or key not in RESULT_KEYS)}
                new.update(meta)
                new["format"] = FORMAT
                new["files"] = hashes
                renamed = {kind: {n: s for n, s in named.items() if s != n} for kind, named in stems.items()}
                if any(renamed.values()):
                    new["tensor_files"] = {kind: named for kind, named in renamed.items() if named}
                write_json_atomic(staging / META, new)
                _fsync_dir(staging)
                self._switch(staging)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def update_meta(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write meta.json under the lock (safe with concurrent workers), atomically."""
        with self._locked():
            meta = self.meta()
            change(meta)
            write_json_atomic(self.meta_path, meta)

    def _meta_or_empty(self) -> dict[str, Any]:
        try:
            return self.meta()
        except GoldenError:
            return {}

    def _state(self, files: Mapping[str, str]) -> tuple[tuple[str, int, int], ...]:
        """What a successful verify depends on: meta.json and every file of the set, by size and mtime."""
        paths = [self.meta_path, *(self.dir / k for k in files)]
        for kind in KINDS:
            if (self.dir / kind).is_dir():
                paths.append(self.dir / kind)
        out = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                return ()
            out.append((path.as_posix(), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _check_replaceable(self, old: Mapping[str, Any], meta: Mapping[str, Any], overwrite_other_case: bool) -> None:
        if not self.dir.exists():
            return
        if not self.dir.is_dir():
            raise GoldenError(f"golden folder {self.dir} is a file; remove it or choose another golden.dir")
        old_case, new_case = old.get("case"), meta.get("case")
        if old_case is not None and old_case != new_case and not overwrite_other_case:
            raise GoldenError(f"refusing to overwrite {self.dir}: its meta.json belongs to case '{old_case}', "
                              f"not '{new_case}'; give this case its own golden.dir (or force the overwrite: --overwrite-golden)")
        if not self.meta_path.is_file():
            foreign = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and p.name not in KINDS)
            if foreign:
                raise GoldenError(f"refusing to overwrite {self.dir}: it has no {META} and holds folder "
                                  f"'{foreign[0]}', so it is no golden folder; choose another golden.dir")

    def _carry_top_level(self, staging: Path, old: Mapping[str, Any]) -> dict[str, str]:
        """Hard-link (else copy) the old folder's top-level entries other than meta.json and the
        tensor folders into `staging`; returns fresh hashes of those meta.json listed."""
        hashes: dict[str, str] = {}
        if not self.dir.is_dir():
            return hashes
        listed = old.get("files", {}) if isinstance(old.get("files"), dict) else {}
        for entry in sorted(self.dir.iterdir()):
            if entry.name == META or entry.name in KINDS:
                continue
            target = staging / entry.name
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(target))
                if entry.name in listed and target.is_file():
                    hashes[entry.name] = _sha256(target)
        return hashes

    def _real(self) -> Path:
        """The folder itself, symlinks followed (a golden folder may be a link to another disk)."""
        return Path(os.path.realpath(self.dir))

    def _switch(self, staging: Path) -> None:
        """Rename the old folder aside, the new one into place, then delete the old one."""
        real = self._real()
        aside = real.parent / f".{real.name}.old-{os.getpid()}"
        had_old = real.exists()
        if had_old:
            os.rename(real, aside)
        try:
            os.rename(staging, real)
        except OSError:
            if had_old:
                os.rename(aside, real)
            raise
        _fsync_dir(real.parent)
        if had_old:
            shutil.rmtree(aside, ignore_errors=True)

    def _leftovers(self) -> list[Path]:
        real = self._real()
        if not real.parent.is_dir():
            return []
        prefixes = (f".{real.name}.new-", f".{real.name}.old-")
        return sorted(p for p in real.parent.iterdir() if p.name.startswith(prefixes))

    def _recover(self) -> None:
        """Finish what an interrupted write left: drop unfinished new sets and old sets that were
        replaced; restore the old set when the switch was cut between its two renames."""
        if self._leftovers():
            with self._locked():
                pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the folder's lock, cleaning up leftovers of interrupted writes first (a leftover
        seen under the lock belongs to a process that died)."""
        with lock_for(self.meta_path, self.lock_dir):
            real = self._real()
            for leftover in self._leftovers():
                if leftover.name.startswith(f".{real.name}.old-") and not real.exists():
                    os.rename(leftover, real)
                elif leftover.is_symlink() or not leftover.is_dir():
                    leftover.unlink()
                else:
                    shutil.rmtree(leftover, ignore_errors=True)
            yield


def _stored(array: np.ndarray, file: GoldenFile | None) -> np.ndarray:
    """The array as it is stored: the layout's dtype, else `_golden_array`."""
    arr = np.asarray(array)
    return _golden_array(arr) if file is None or file.dtype is None else arr.astype(file.dtype)


def _check_finite(outputs: Mapping[str, np.ndarray]) -> None:
    """GoldenError naming the first reference output holding NaN or Inf."""
    for name, array in outputs.items():
        if array.dtype.kind == "f":
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            if nan or inf:
                raise GoldenError(f"golden output '{name}' has {nan} NaN and {inf} Inf values; a reference must be "
                                  "finite (fix the float model, or pass allow_nonfinite=True to store it anyway)")


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link `src` to `dst` (same file system), else copy it with its metadata."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stems(named: Mapping[str, np.ndarray], files: Mapping[str, GoldenFile], kind: str) -> dict[str, str]:
    """File stem of each tensor name; GoldenError for a stem that is no plain file name or that
    two tensors share."""
    stems: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in named:
        stem = files[name].stem if name in files else name
        if name in files and (not stem or Path(stem).name != stem or stem.startswith(".")):
            raise GoldenError(f"golden file name '{stem}' of tensor '{name}' is not a plain file name")
        if stem in owner:
            raise GoldenError(f"golden {kind}: tensors '{owner[stem]}' and '{name}' would both be stored "
                              f"as {stem}.tensor")
        owner[stem] = name
        stems[name] = stem
    return stems


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
