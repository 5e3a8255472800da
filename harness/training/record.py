"""Record how a case's checkpoint was trained in its golden meta.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.cache import file_sha256
from harness.cases import Case
from harness.context import regenerate_command
from harness.errors import HarnessError
from harness.golden import GoldenStore

_DROPPED = ("history",)


def record_training(case: Case, summary_path: Path, qat: bool = False) -> Path:
    """Copy `summary_path` (minus the per-step history) into meta.json's `training` entry, or
    with `qat` its `qat_training` entry (the golden files must exist: generate them first with
    --update-golden).

    The summary's `weights_sha256` must equal the sha256 of the case's checkpoint (with `qat`: of
    `quant.qat.checkpoint`), so the record always describes the weights the case uses. Returns the
    meta.json path.
    """
    try:
        summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{summary_path}: cannot read training summary: {exc}") from exc
    checkpoint = case.qat_checkpoint if qat else case.checkpoint
    if checkpoint is None:
        key = ("quant", "qat", "checkpoint") if qat else ("model", "checkpoint")
        raise case.error("the case has no checkpoint to record training for", *key)
    actual = file_sha256(checkpoint)
    if summary.get("weights_sha256") != actual:
        raise HarnessError(f"{summary_path}: weights_sha256 {summary.get('weights_sha256')} does not match "
                           f"{checkpoint} ({actual})")
    store = GoldenStore(case.golden_dir, regenerate_command(case))

    def change(meta: dict[str, Any]) -> None:
        meta["qat_training" if qat else "training"] = {k: v for k, v in summary.items() if k not in _DROPPED}

    store.update_meta(change)
    return store.meta_path
