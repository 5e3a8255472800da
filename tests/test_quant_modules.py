"""Quantized layers: float-equivalent when disabled, weight axes, join quantizers shared or per input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.errors import QuantError
from harness.quant.calibrate import quantization_disabled
from harness.quant.modules import (
    QuantAdd,
    QuantConcat,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
)
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer, fake_quantize
from harness.zoo import ops


@pytest.mark.parametrize(
    ("layer", "make", "shape"),
    [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), QuantConv2d.from_float, (2, 4, 9, 9)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), QuantConvTranspose2d.from_float, (2, 4, 5, 5)),
        (nn.Linear(7, 3), QuantLinear.from_float, (5, 7)),
    ],
)
def test_disabled_quantizers_reproduce_float_layer(layer: nn.Module, make: object, shape: tuple[int, ...]) -> None:
    q = make(layer)  # type: ignore[operator]
    x = torch.randn(shape)
    with quantization_disabled(q):
        assert torch.equal(q(x), layer(x))
    assert q.input_quantizer.mode is QuantMode.QUANTIZE


def test_weight_axes_and_calibration() -> None:
    conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3))
    deconv = QuantConvTranspose2d.from_float(nn.ConvTranspose2d(8, 5, 2, 2))
    assert conv.weight_quantizer.axis == 0 and deconv.weight_quantizer.axis == 1
    conv.calibrate_weight()
    deconv.calibrate_weight()
    assert conv.weight_quantizer.amax.shape == (8, 1, 1, 1)
    assert deconv.weight_quantizer.amax.shape == (1, 5, 1, 1)
    assert torch.equal(deconv.weight_quantizer.amax.reshape(-1), deconv.weight.abs().amax(dim=(0, 2, 3)))


def test_quantized_conv_uses_fake_quantized_input_and_weight() -> None:
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1))
    conv.calibrate_weight()
    conv.input_quantizer.load_amax(torch.tensor(2.0))  # type: ignore[operator]
    x = torch.randn(1, 3, 6, 6)
    w = fake_quantize(conv.weight, conv.weight_quantizer.amax, 0)
    expected = nn.functional.conv2d(fake_quantize(x, torch.tensor(2.0)), w, conv.bias, padding=1)
    assert torch.equal(conv(x), expected)


def test_add_shares_one_quantizer_by_default_and_allows_per_input() -> None:
    add = QuantAdd.from_float(ops.Add())
    assert add.get_input_quantizer(0) is add.get_input_quantizer(1)
    residual = TensorQuantizer(name="residual")
    residual.load_amax(torch.tensor(1.0))
    add.set_input_quantizer(1, residual)
    add.set_input_quantizer(0, None)
    assert add.get_input_quantizer(0) is None and add.get_input_quantizer(1) is residual
    assert add.input_quantizers() == [residual]
    a, b = torch.randn(2, 3) * 3, torch.randn(2, 3) * 3
    assert torch.equal(add(a, b), a + fake_quantize(b, torch.tensor(1.0)))
    with pytest.raises(QuantError, match="no input 2"):
        add.set_input_quantizer(2, None)


def test_concat_any_number_of_inputs() -> None:
    cat = QuantConcat.from_float(ops.Concat(dim=0))
    cat.input_quantizer.load_amax(torch.tensor(0.5))  # type: ignore[operator]
    xs = [torch.randn(1, 4) for _ in range(3)]
    assert torch.equal(cat(*xs), fake_quantize(torch.cat(xs), torch.tensor(0.5)))
    cat.set_input_quantizer(2, None)
    assert torch.equal(cat(*xs)[2], xs[2][0])
    cat.set_shared_quantizer(None)
    assert cat.input_quantizers() == []
