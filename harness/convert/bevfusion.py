"""CUDA-BEVFusion's ResNet50 BEVFusion checkpoint -> `harness.zoo.bevfusion` (camera branch,
ConvFuser, SECOND decoder), loadable into `BEVFusionCamera` and the staged case wrapper."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from harness.convert.base import (
    CheckpointError,
    Conversion,
    check_fits,
    drop_prefixes,
    rename_prefix,
)
from harness.errors import HarnessError
from harness.zoo.bevfusion import BEVFusionCamera, BEVFusionConfig, bevfusion_config

VTRANSFORM = "encoders.camera.vtransform."
GEOMETRY = ("dx", "bx", "nx", "frustum")
"""The view transform's fixed geometry, stored as (non-trainable) parameters in BEVFusion."""
NOT_IN_ZOO = ("encoders.lidar.", "heads.")
RENAMES = {"fuser.0.": "fuser.conv.", "fuser.1.": "fuser.bn."}


def expected_geometry(config: BEVFusionConfig) -> dict[str, torch.Tensor]:
    """dx, bx, nx and the frustum shape BEVFusion derives from `config`'s bounds (x, y, z)."""
    bounds = (config.xbound, config.ybound, config.zbound)
    nz, nx, ny = config.bev_zxy
    return {
        "dx": torch.tensor([b[2] for b in bounds], dtype=torch.float64),
        "bx": torch.tensor([b[0] + b[2] / 2.0 for b in bounds], dtype=torch.float64),
        "nx": torch.tensor([nx, ny, nz], dtype=torch.int64),
        "frustum": torch.empty(config.num_depth_bins, *config.feature_hw, 3),
    }


def _check_geometry(state: Mapping[str, torch.Tensor], config: BEVFusionConfig, profile: str) -> int:
    expected = expected_geometry(config)
    found = 0
    for name in GEOMETRY:
        key = VTRANSFORM + name
        if key not in state:
            continue
        found += 1
        value = state[key]
        if name == "frustum":
            ok = tuple(value.shape) == tuple(expected[name].shape)
            shown_exp, shown_got = str(list(expected[name].shape)), str(list(value.shape))
        else:
            ok = value.numel() == 3 and torch.allclose(
                value.double().flatten(), expected[name].double(), atol=1e-4
            )
            shown_exp = str([round(float(v), 4) for v in expected[name].flatten()])
            shown_got = str([round(float(v), 4) for v in value.flatten()])
        if not ok:
            raise CheckpointError(
                f"cuda-bevfusion-r50: {key} is {shown_got}, profile {profile!r} expects {shown_exp} "
                "(image size, depth bins and BEV bounds must be those the checkpoint was trained with)"
            )
    return found


def convert(state: Mapping[str, torch.Tensor], profile: str | None = "full") -> Conversion:
    """Drop the lidar encoder and the heads (not in the zoo model), check and drop the view
    transform's fixed geometry (`dx`, `bx`, `nx`, `frustum`), rename `fuser.0` / `fuser.1` to
    `fuser.conv` / `fuser.bn`, check against the zoo model of `profile` (BN unfused)."""
    profile = profile or "full"
    try:
        config = bevfusion_config(profile)
    except HarnessError as exc:
        raise CheckpointError(f"cuda-bevfusion-r50: {exc}") from exc
    if any("_quantizer." in k for k in state):
        raise CheckpointError(
            "cuda-bevfusion-r50: the checkpoint holds quantizer state (*_quantizer._amax): it is "
            "a PTQ/QAT model; convert the float checkpoint (the harness calibrates itself)"
        )
    if any(k.startswith("encoders.camera.backbone.patch_embed.") for k in state):
        raise CheckpointError(
            "cuda-bevfusion-r50: encoders.camera.backbone.patch_embed.*: a SwinT backbone "
            "(mit-han-lab's release); the zoo builds CUDA-BEVFusion's ResNet50 model"
        )
    geometry = _check_geometry(state, config, profile)
    kept, dropped = drop_prefixes(state, (*NOT_IN_ZOO, *(VTRANSFORM + g for g in GEOMETRY)))
    renamed, count = rename_prefix(kept, RENAMES)
    with torch.random.fork_rng(devices=[]):
        expected = BEVFusionCamera(config).state_dict()
    check_fits(renamed, expected, f"cuda-bevfusion-r50 (BEVFusion camera + fuser + decoder, profile {profile!r})")
    notes = [f"dropped {n} entries under {p}" for p, n in dropped.items() if p in NOT_IN_ZOO]
    notes.append(f"checked and dropped {geometry} view-transform geometry entries {list(GEOMETRY)}")
    notes.append(f"renamed {count} entries fuser.0/1.* -> fuser.conv/bn.*")
    return Conversion(renamed, tuple(notes))
