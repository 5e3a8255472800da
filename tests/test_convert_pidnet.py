"""Tests for harness/convert/pidnet.py: official PIDNet-S training checkpoints -> the zoo model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.convert.base import CheckpointError
from harness.convert.pidnet import convert
from harness.zoo.pidnet import pidnet_s


def _randomize_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def official_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The layout of the official files: PIDNet's FullModel wrapper (`model.` + the loss modules)."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["sem_loss.criterion.weight"] = torch.ones(19)
    return state


def test_official_checkpoint_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    trained = pidnet_s(19, augment=True)
    _randomize_bn(trained, 1)
    conversion = convert(official_state(trained))
    fresh = pidnet_s(19)
    fresh.load_state_dict(conversion.state, strict=True)
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trained(x)[1]
        assert not torch.equal(pidnet_s(19)(x), expected)
        assert torch.equal(fresh(x), expected)
    assert any("19 classes" in n for n in conversion.notes)


def test_class_count_comes_from_the_head() -> None:
    state = pidnet_s(11).state_dict()
    assert convert(state).state.keys() == state.keys()


def test_backbone_only_and_wrong_sizes_are_named() -> None:
    state = pidnet_s(19).state_dict()
    with pytest.raises(CheckpointError, match=r"final_layer\.conv2\.weight.*ImageNet"):
        convert({k: v for k, v in state.items() if not k.startswith("final_layer.")})
    state["conv1.0.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(CheckpointError, match=r"conv1.0.weight: expected \[32, 3, 3, 3\], found \[64, 3, 3, 3\]"):
        convert(state)
    with pytest.raises(CheckpointError, match="profile"):
        convert(pidnet_s(19).state_dict(), "ci")
