"""Tests for harness/convert/bevfusion.py: CUDA-BEVFusion's ResNet50 checkpoint -> the zoo
camera branch, loaded into the staged case model."""

from __future__ import annotations

import pytest
import torch

from harness.convert.base import CheckpointError
from harness.convert.bevfusion import convert, expected_geometry
from harness.datasets.fusion import FusionInputs
from harness.zoo.bevfusion import BEVFusionCamera
from harness.zoo.bevfusion_staged import bevfusion_camera_staged

CI = {"image_height": 64, "image_width": 192, "beams": 16, "azimuth_steps": 720, "bev_range": 51.2,
      "bev_cells": 16, "bev_channels": 32}


def official_state(model: BEVFusionCamera) -> dict[str, torch.Tensor]:
    """BEVFusion's layout: `fuser.0/1`, the vtransform's fixed geometry, a lidar encoder, heads."""
    state = {k.replace("fuser.conv.", "fuser.0.").replace("fuser.bn.", "fuser.1."): v.clone()
             for k, v in model.state_dict().items()}
    for name, value in expected_geometry(model.config).items():
        state[f"encoders.camera.vtransform.{name}"] = value.float() if name != "nx" else value
    state["encoders.lidar.backbone.conv_input.0.weight"] = torch.randn(16, 3, 3, 3, 5)
    state["heads.object.heatmap_head.0.weight"] = torch.randn(10, 128, 3, 3)
    return state


def test_official_checkpoint_loads_strictly_into_the_staged_case_model() -> None:
    source = bevfusion_camera_staged("ci", seed=5)
    conversion = convert(official_state(source.model), "ci")
    target = bevfusion_camera_staged("ci", seed=6)
    data = FusionInputs(size=1, **CI)  # type: ignore[arg-type]
    inputs = {k: torch.from_numpy(getattr(data[0], k)) for k in ("img", "depth", "lidar2img", "lidar_bev")}
    with torch.no_grad():
        expected = source(**inputs)
        assert not torch.equal(target(**inputs), expected)
        target.load_state_dict(conversion.state, strict=True)
        assert torch.equal(target(**inputs), expected)
    assert any("encoders.lidar." in n for n in conversion.notes)


def test_geometry_swin_and_quantized_checkpoints_are_named() -> None:
    official = official_state(bevfusion_camera_staged("ci").model)
    with pytest.raises(CheckpointError, match=r"vtransform.dx is \[3.2, 3.2, 20.0\], profile 'full' expects \[0.3"):
        convert(official, "full")
    swin = dict(official, **{"encoders.camera.backbone.patch_embed.proj.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="SwinT"):
        convert(swin, "ci")
    ptq = dict(official, **{"fuser.0._input_quantizer._amax": torch.ones(1)})
    with pytest.raises(CheckpointError, match="PTQ/QAT"):
        convert(ptq, "ci")
