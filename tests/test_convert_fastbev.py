"""Tests for harness/convert/fastbev.py: CUDA-FastBEV's checkpoint names -> the zoo FastBEV."""

from __future__ import annotations

import pytest
import torch

from harness.convert.base import CheckpointError
from harness.convert.fastbev import convert
from harness.zoo.fastbev import fastbev_r18


def official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CUDA-FastBEV names the single fuse conv `neck_fuse_0`."""
    return {k.replace("neck_fuse.", "neck_fuse_0.", 1): v.clone() for k, v in state.items()}


def test_official_checkpoint_gives_the_same_outputs() -> None:
    source = fastbev_r18("ci", seed=3)
    official = official_state(source.state_dict())
    assert "neck_fuse_0.weight" in official
    conversion = convert(official, "ci")
    target = fastbev_r18("ci", seed=4)
    image = torch.randn(6, 3, 64, 176, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(target.extract_image_features(image), source.extract_image_features(image))
        target.load_state_dict(conversion.state, strict=True)
        assert torch.equal(target.extract_image_features(image), source.extract_image_features(image))


def test_multi_frame_and_unknown_profile_are_named() -> None:
    official = official_state(fastbev_r18("ci").state_dict())
    weight = official["neck_3d.fuse.weight"]
    official["neck_3d.fuse.weight"] = torch.zeros(weight.shape[0], weight.shape[1] * 4, *weight.shape[2:])
    with pytest.raises(CheckpointError, match=r"neck_3d.fuse.weight: expected .*multi-frame"):
        convert(official, "ci")
    with pytest.raises(CheckpointError, match="unknown profile 'tiny'"):
        convert(official, "tiny")
    official["neck_fuse_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="neck_fuse_0', 'neck_fuse_1"):
        convert(official, "ci")
