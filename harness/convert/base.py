"""Reading, checking and writing state dicts for the checkpoint converters."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.atomic import write_bytes_atomic
from harness.errors import HarnessError

StateDict = dict[str, torch.Tensor]

_WRAPPERS = ("state_dict", "model", "net")
"""Keys under which training frameworks store the state dict (mmcv / det3d, PIDNet, others)."""
_SHOWN = 8


class CheckpointError(HarnessError):
    """A checkpoint cannot be read or does not map onto the zoo model; the message names the
    file, the key and, for tensors, the expected and found shapes."""


@dataclass(frozen=True)
class Conversion:
    """A converted state dict and what the converter did to get it (one line per step)."""

    state: StateDict
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Converter:
    """One official checkpoint family -> one zoo model (`factory`, "module:callable").

    `convert(state, profile)` maps the official entries; `profiles` are the zoo profiles the
    result may be checked against (empty: the sizes are read from the checkpoint itself and
    `profile` must be None).
    """

    name: str
    factory: str
    convert: Callable[[Mapping[str, torch.Tensor], str | None], Conversion]
    profiles: tuple[str, ...] = field(default=())


def _shape(value: torch.Tensor) -> str:
    return f"[{', '.join(str(d) for d in value.shape)}]"


def unwrap(obj: object, source: str) -> StateDict:
    """The state dict inside a loaded checkpoint: the object itself or its "state_dict" /
    "model" / "net" entry, with every value a tensor."""
    state = obj
    while isinstance(state, Mapping):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: no state dict found (looked under {list(_WRAPPERS)})")
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:_SHOWN]}")
    return {str(k): v for k, v in state.items()}


def read_state_dict(path: Path) -> StateDict:
    """The state dict of the checkpoint at `path`, read with `torch.load(weights_only=True)`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused it ({exc}); save only its state dict "
            "in a trusted environment: torch.save(torch.load(IN)['state_dict'], OUT)"
        ) from exc
    return unwrap(obj, str(path))


def write_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save `state` (contiguous CPU tensors) to `path` atomically."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


def check_fits(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise CheckpointError unless `state` has exactly the keys of `expected` with its shapes;
    the message lists missing and unmapped keys and every shape mismatch (expected vs found)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: expected {_shape(expected[k])}, found {_shape(state[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:_SHOWN]))
    if missing:
        problems.append(f"{len(missing)} key(s) missing: {missing[:_SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) that do not map: {unexpected[:_SHOWN]}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def rename_prefix(
    state: Mapping[str, torch.Tensor], renames: Mapping[str, str]
) -> tuple[StateDict, int]:
    """`state` with each key starting with a `renames` prefix renamed; (result, count renamed)."""
    out: StateDict = {}
    count = 0
    for key, value in state.items():
        new = key
        for old_prefix, new_prefix in renames.items():
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix):]
                count += 1
                break
        out[new] = value
    return out, count


def drop_prefixes(
    state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]
) -> tuple[StateDict, dict[str, int]]:
    """`state` without the keys under `prefixes`; (result, count dropped per prefix present)."""
    out: StateDict = {}
    dropped: dict[str, int] = {}
    for key, value in state.items():
        hit = next((p for p in prefixes if key.startswith(p)), None)
        if hit is None:
            out[key] = value
        else:
            dropped[hit] = dropped.get(hit, 0) + 1
    return out, dropped
