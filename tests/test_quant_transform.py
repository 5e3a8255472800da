"""quantize_model: conv+bn folding, replacement by type, include/exclude/keep_float patterns."""

from __future__ import annotations

import pytest
import torch
from quant_nets import SmallNet, randomize_bn
from torch import nn

from harness.errors import QuantError
from harness.quant.calibrate import quantization_disabled
from harness.quant.modules import QuantAdd, QuantConcat, QuantConv2d, QuantConvTranspose2d
from harness.quant.transform import QuantConfig, fold_conv_bn, quantize_model, summarize


@pytest.mark.parametrize("traced", [True, False])
def test_fold_conv_bn_keeps_outputs(traced: bool) -> None:
    model = randomize_bn(SmallNet())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_conv_bn(model, (x,) if traced else None)
        out = model(x)
    assert ("stem.0", "stem.1") in pairs and ("block.conv2", "block.bn2") in pairs
    assert len(pairs) == 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_fold_conv_transpose_with_groups() -> None:
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 6, 2, 2, groups=2), nn.BatchNorm2d(6)))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = model(x)
        assert fold_conv_bn(model, (x,)) == [("0", "1")]
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_traced_folding_skips_bn_not_fed_by_a_conv() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)  # registered before the conv, applied to the input
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.conv(self.bn(x))
            return out

    assert fold_conv_bn(randomize_bn(Odd()), (torch.randn(1, 3, 4, 4),)) == []


def test_quantize_model_replaces_by_type_and_leaves_input_alone() -> None:
    model = randomize_bn(SmallNet())
    q = quantize_model(model, QuantConfig(keep_float=("head",)))
    assert isinstance(q.stem[0], QuantConv2d) and isinstance(q.block.add, QuantAdd) and isinstance(q.cat, QuantConcat)
    assert type(q.head) is nn.Conv2d
    assert isinstance(model.stem[1], nn.BatchNorm2d) and type(model.stem[0]) is nn.Conv2d
    summary = summarize(q)
    assert summary.kept_float == ("head",)
    assert "block.add" in summary.quantized
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), quantization_disabled(q):
        assert torch.allclose(q(x), model(x), atol=1e-5)
    names = {m.name for m in q.modules() if hasattr(m, "calibrator")}
    assert "stem.0.input_quantizer" in names and "block.add.input_quantizer" in names


def test_include_exclude_patterns() -> None:
    q = quantize_model(SmallNet().eval(), QuantConfig(include=("block*", "left"), exclude=("block.conv2",)))
    assert isinstance(q.block.conv1[0], QuantConv2d) and isinstance(q.left[0], QuantConv2d)
    assert type(q.block.conv2) is nn.Conv2d and type(q.stem[0]) is nn.Conv2d
    deconv = quantize_model(nn.Sequential(nn.ConvTranspose2d(2, 2, 2)), QuantConfig())
    assert isinstance(deconv[0], QuantConvTranspose2d)


@pytest.mark.parametrize("field", ["include", "exclude", "keep_float"])
def test_unmatched_pattern_is_an_error_naming_it(field: str) -> None:
    with pytest.raises(QuantError, match=f"{field} pattern 'headz' matches no module"):
        quantize_model(SmallNet().eval(), QuantConfig(**{field: ("headz",)}))  # type: ignore[arg-type]
