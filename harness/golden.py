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

Files are written only on request (`--update-golden`), each atomically, meta.json last; readers
verify every tensor against the hashes in meta.json, so a half-updated folder is detected.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from harness import tensorfile
from harness.atomic import write_json_atomic
from harness.errors import GoldenError, TensorFileError

FORMAT = 1
META = "meta.json"
KINDS = ("inputs", "outputs")
#: meta.json entries that survive regeneration of the tensors (written by their own commands)
KEPT_KEYS = ("float_metric", "baselines", "training")
#: of those, the ones that describe results of one model and data config (dropped when it changes)
RESULT_KEYS = ("float_metric", "baselines")
IDENTITY_KEYS = ("config_hash", "checkpoint_sha256")


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
    """Reads and (on request) writes one case's golden folder."""

    def __init__(self, directory: Path, regenerate_hint: str):
        self.dir = Path(directory)
        self.hint = regenerate_hint

    @property
    def meta_path(self) -> Path:
        """Path of meta.json."""
        return self.dir / META

    def exists(self) -> bool:
        """True when meta.json exists (the folder was generated)."""
        return self.meta_path.is_file()

    def meta(self) -> dict[str, Any]:
        """The parsed meta.json; GoldenError with the regeneration command if missing/corrupt."""
        if not self.exists():
            raise GoldenError(f"golden files are missing: {self.meta_path} does not exist.\n"
                              f"Generate them with: {self.hint}")
        try:
            meta: dict[str, Any] = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GoldenError(f"{self.meta_path} is not valid JSON ({exc}).\nRegenerate with: {self.hint}") from exc
        if meta.get("format") != FORMAT:
            raise GoldenError(f"{self.meta_path} has format {meta.get('format')!r}, expected {FORMAT}.\n"
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

    def read(self, kind: str, name: str, meta: Mapping[str, Any]) -> np.ndarray:
        """One golden tensor (`.tensor`, else `.npy`; under the file stem meta.json's
        `tensor_files` gives, else its name), verified against meta.json's sha256."""
        path = self.path_of(kind, name, meta)
        expected = meta.get("files", {}).get(f"{kind}/{path.name}")
        if expected is not None and _sha256(path) != expected:
            raise GoldenError(f"{path} does not match the sha256 in {self.meta_path} (partly updated or edited).\n"
                              f"Regenerate with: {self.hint}")
        try:
            return tensorfile.load(path)
        except TensorFileError as exc:
            raise GoldenError(f"{exc}\nRegenerate with: {self.hint}") from exc

    def path_of(self, kind: str, name: str, meta: Mapping[str, Any]) -> Path:
        """The file holding golden tensor `name` (`<stem>.tensor`, else `.npy`, the stem from
        meta.json's `tensor_files`, else the name); GoldenError with the hint when missing."""
        stem = meta.get("tensor_files", {}).get(kind, {}).get(name, name)
        for suffix in (".tensor", ".npy"):
            path = self.dir / kind / f"{stem}{suffix}"
            if path.is_file():
                return path
        shown = name if stem == name else f"{name}' ('{stem}.tensor"
        raise GoldenError(f"golden {kind[:-1]} '{shown}' is missing in {self.dir / kind}.\n"
                          f"Regenerate with: {self.hint}")

    def write(self, tensors: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping[str, Any],
              files: Mapping[str, GoldenFile] | None = None) -> None:
        """Write inputs/outputs tensors then meta.json. The training record is kept; the float
        metric and baselines are kept only when config hash and checkpoint are unchanged.

        `tensors` maps "inputs"/"outputs" to named arrays; `files` says how a tensor name is
        stored when not as `<name>.tensor` in its own dtype (recorded in meta.json's
        `tensor_files`; GoldenError for file names that are not plain or that collide). Tensor
        files that are no longer part of the golden set are removed after the new meta.json is
        in place.
        """
        files = files or {}
        stems = {kind: _stems(tensors.get(kind, {}), files, kind) for kind in KINDS}
        with _lock(self.meta_path):
            old = self._meta_or_empty()
            hashes: dict[str, str] = {}
            for kind in KINDS:
                for name, array in tensors.get(kind, {}).items():
                    path = self.dir / kind / f"{stems[kind][name]}.tensor"
                    stored = np.asarray(array)
                    dtype = files[name].dtype if name in files else None
                    stored = _golden_array(stored) if dtype is None else stored.astype(dtype)
                    tensorfile.save(path, stored)
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
            write_json_atomic(self.meta_path, new)
            for kind in KINDS:
                for path in (self.dir / kind).glob("*"):
                    if path.is_file() and f"{kind}/{path.name}" not in hashes:
                        path.unlink()

    def update_meta(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write meta.json under a file lock (safe with concurrent workers)."""
        with _lock(self.meta_path):
            meta = self.meta()
            change(meta)
            write_json_atomic(self.meta_path, meta)

    def _meta_or_empty(self) -> dict[str, Any]:
        try:
            return self.meta()
        except GoldenError:
            return {}


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


def _lock(path: Path) -> FileLock:
    """A lock for `path` kept outside the repository (in the temp folder), shared by workers."""
    folder = Path(tempfile.gettempdir()) / "qharness-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".lock")))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
