"""CUDA-FastBEV's FastBEV-R18 checkpoint -> `harness.zoo.fastbev.fastbev_r18`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from harness.convert.base import CheckpointError, Conversion, check_fits, rename_prefix
from harness.errors import HarnessError
from harness.zoo.fastbev import FastBEV, fastbev_config


def convert(state: Mapping[str, torch.Tensor], profile: str | None = "full") -> Conversion:
    """Rename the single-level fuse conv `neck_fuse_0` to `neck_fuse`, check against the zoo
    FastBEV of `profile` (BN unfused, as the fastbev-r18 case loads it)."""
    profile = profile or "full"
    try:
        config = fastbev_config(profile)
    except HarnessError as exc:
        raise CheckpointError(f"cuda-fastbev: {exc}") from exc
    levels = sorted({k.split(".", 1)[0] for k in state if k.startswith("neck_fuse_")})
    if len(levels) > 1:
        raise CheckpointError(
            f"cuda-fastbev: fuse convs {levels}: the zoo builds FastBEV-R18 with one fused level "
            "(neck_fuse_0) as CUDA-FastBEV deploys it"
        )
    renamed, count = rename_prefix(state, {"neck_fuse_0.": "neck_fuse."})
    with torch.random.fork_rng(devices=[]):
        expected = FastBEV(config).state_dict()
    try:
        check_fits(renamed, expected, f"cuda-fastbev (FastBEV-R18, profile {profile!r})")
    except CheckpointError as exc:
        if "neck_3d." in str(exc):
            raise CheckpointError(
                f"{exc}; a neck_3d of other widths is a multi-frame Fast-BEV release (the zoo "
                "builds the single-frame model CUDA-FastBEV deploys)"
            ) from exc
        raise
    return Conversion(renamed, (f"renamed {count} entries neck_fuse_0.* -> neck_fuse.*",))
