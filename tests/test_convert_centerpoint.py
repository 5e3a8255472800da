"""Tests for harness/convert/centerpoint.py: det3d SpMiddleResNetFHD (spconv 1.x) -> the fused
zoo SCN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.convert.base import CheckpointError
from harness.convert.centerpoint import convert
from harness.zoo.centerpoint import CenterPointSCN, ScnConfig, fuse_bn, init_weights, random_voxels

CONFIG = ScnConfig(widths=(4, 8, 8, 16), grid=(41, 32, 32))


def _trained() -> CenterPointSCN:
    model = CenterPointSCN(CONFIG)
    init_weights(model, 0)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def det3d_state(model: CenterPointSCN) -> dict[str, torch.Tensor]:
    """det3d's file: the SCN under `backbone.`, spconv 1.x weights [k, k, k, Cin, Cout], plus the
    reader, neck and head."""
    state = {f"backbone.{k}": (v.permute(1, 2, 3, 4, 0).contiguous() if v.dim() == 5 else v.clone())
             for k, v in model.state_dict().items()}
    state["neck.blocks.0.1.weight"] = torch.randn(128, 256, 3, 3)
    state["bbox_head.tasks.0.hm.0.weight"] = torch.randn(64, 64, 3, 3)
    return state


def test_det3d_checkpoint_gives_the_fused_case_model_with_the_same_outputs() -> None:
    source = _trained()
    official = det3d_state(source)
    assert official["backbone.conv_input.0.weight"].shape == (3, 3, 3, 5, 4)
    conversion = convert(official)
    target = fuse_bn(CenterPointSCN(CONFIG).eval())
    target.load_state_dict(conversion.state, strict=True)
    features, indices = random_voxels(CONFIG.grid, 400, 2, 5)
    with torch.no_grad():
        expected = source(features, indices)
        actual = target(features, indices)
        fused_here = fuse_bn(copy.deepcopy(source))(features, indices)
    assert expected.abs().max() > 0
    assert torch.equal(actual, fused_here)  # the same folding as the zoo's own
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)  # folding rounds in fp32
    assert any("permuted 21 sparse conv weights" in n for n in conversion.notes)


def test_spconv2_weights_are_kept_and_bad_shapes_named() -> None:
    source = _trained()
    v2 = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    assert convert(v2).state.keys() == convert(det3d_state(source)).state.keys()
    bad = det3d_state(source)
    bad["backbone.conv2.0.weight"] = torch.zeros(3, 3, 3, 4, 9)
    with pytest.raises(CheckpointError, match=r"conv2.0.weight: expected \[8, 3, 3, 3, 4\], found \[3, 3, 3, 4, 9\]"):
        convert(bad)
    with pytest.raises(CheckpointError, match="missing"):
        convert({"backbone.conv_input.0.weight": torch.zeros(3, 3, 3, 5, 4)})
