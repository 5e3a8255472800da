"""layer_errors: per-layer SNR / cosine agree with a hand-made measurement; a fragile layer ranks first."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harness.errors import QuantError
from harness.quant.analysis import LayerError, layer_errors, snr_db, worst
from harness.quant.calibrate import calibrate
from harness.quant.modules import QuantConv2d
from harness.quant.tensor_quantizer import QuantDescriptor, TensorQuantizer, fake_quantize
from harness.quant.transform import QuantConfig, quantize_model

ACT = QuantDescriptor(calibrator="max")


def chain(fragile: bool = False, seed: int = 0) -> nn.Sequential:
    """conv-relu x3 and an output conv; `fragile` scales channel 0 of conv 0's output by 100 and
    divides conv 2's weights reading it by 100 (the float function stays the same, but layer 2's
    input range gets a 100x outlier channel)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    if fragile:
        with torch.no_grad():
            first, second = model[0], model[2]
            assert isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d) and first.bias is not None
            first.weight[0] *= 100
            first.bias[0] *= 100
            second.weight[:, 0] /= 100
    return model


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 12, 12, generator=g) for _ in range(n)]


def quantized(model: nn.Module, keep_float: tuple[str, ...] = ()) -> nn.Module:
    q = quantize_model(model, QuantConfig(activations=ACT, keep_float=keep_float))
    calibrate(q, [(b,) for b in batches()], progress=False)
    return q


def _hand(model: nn.Sequential, q: nn.Module, x: torch.Tensor, upto: int, quantize: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float output of layer `upto` and its output with the conv layers in `quantize` quantized by
    hand (fake_quantize of input and per-channel weight with the calibrated amax values)."""
    ref, out = x, x
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d) and i in quantize:
            ql = q.get_submodule(str(i))
            assert isinstance(ql, QuantConv2d) and isinstance(ql.input_quantizer, TensorQuantizer)
            xin = fake_quantize(out, ql.input_quantizer.amax)
            w = fake_quantize(layer.weight, ql.weight_quantizer.amax, axis=0)
            out = F.conv2d(xin, w, layer.bias, layer.stride, layer.padding)
        else:
            out = layer(out)
        ref = layer(ref)
        if i == upto:
            return ref, out
    raise AssertionError(upto)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().flatten(), b.double().flatten()
    return float(a64 @ b64 / (a64.norm() * b64.norm()))


def test_figures_agree_with_a_hand_measurement() -> None:
    model = chain()
    q = quantized(model)
    xs = batches(2)
    errors = {e.name: e for e in layer_errors(q, [(x,) for x in xs])}
    convs = [0, 2, 4, 6]
    for k, index in enumerate(convs):
        e = errors[str(index)]
        assert e.quantized and e.order == k and e.input_calibrator == "max"
        with torch.no_grad():
            alone = [_hand(model, q, x, index, {index}) for x in xs]
            acc = [_hand(model, q, x, index, set(convs[: k + 1])) for x in xs]
        ref_a, out_a = torch.cat([r for r, _ in alone]), torch.cat([o for _, o in alone])
        ref_c, out_c = torch.cat([r for r, _ in acc]), torch.cat([o for _, o in acc])
        assert e.alone_snr_db == pytest.approx(snr_db(out_a, ref_a), abs=0.05)
        assert e.alone_cosine == pytest.approx(_cos(out_a, ref_a), abs=1e-6)
        assert e.accumulated_snr_db == pytest.approx(snr_db(out_c, ref_c), abs=0.05)
        assert e.accumulated_cosine == pytest.approx(_cos(out_c, ref_c), abs=1e-6)
    assert errors["0"].alone_snr_db == errors["0"].accumulated_snr_db
    # Accumulated error only grows along a chain of quantized layers here.
    assert errors["6"].accumulated_snr_db is not None and errors["6"].alone_snr_db is not None
    assert errors["6"].accumulated_snr_db < errors["6"].alone_snr_db


def test_fragile_layer_is_ranked_first() -> None:
    model = chain(fragile=True)
    q = quantized(model)
    errors = layer_errors(q, [(x,) for x in batches(2)])
    ranked = worst(errors)
    assert ranked[0].name == "2", [(e.name, e.alone_snr_db) for e in ranked]
    assert ranked[0].input_amax is not None and ranked[0].input_amax > 20 * (ranked[1].input_amax or math.inf) / 100


def test_float_layers_are_listed_with_their_reason_and_modes_restored() -> None:
    q = quantized(chain(), keep_float=("6",))
    modes = [m.mode for m in q.modules() if hasattr(m, "mode")]
    errors = {e.name: e for e in layer_errors(q, [(x,) for x in batches(1)], float_reasons={"6": "keep_float '6'"})}
    assert errors["6"].quantized is False and errors["6"].reason == "keep_float '6'"
    assert errors["6"].alone_snr_db is None and errors["6"].order == 3
    assert [m.mode for m in q.modules() if hasattr(m, "mode")] == modes
    assert LayerError.from_dict(errors["0"].to_dict()) == errors["0"]


def test_uncalibrated_model_is_an_error() -> None:
    with pytest.raises(QuantError, match="calibrated"):
        layer_errors(quantize_model(chain(), QuantConfig()), [(batches(1)[0],)])


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_snr_is_scale_invariant_and_infinite_for_equal(scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(50, generator=g, dtype=torch.float64)
    out = ref + 0.01 * torch.randn(50, generator=g, dtype=torch.float64)
    assert snr_db(ref, ref) == math.inf
    assert snr_db(out * scale, ref * scale) == pytest.approx(snr_db(out, ref), abs=1e-6)


def test_layers_whose_quantizers_start_disabled_count_as_float() -> None:
    """The SCN quantizer keeps a layer float by disabling its quantizers: the report must not
    enable (uncalibrated) quantizers to measure it, and must call it float."""
    from harness.quant.calibrate import calibrate
    from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer
    from harness.quant.transform import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)), QuantConfig())
    for q in model[0].modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode(QuantMode.DISABLED)
    x = torch.randn(2, 3, 8, 8)
    calibrate(model, [x], progress=False)
    errors = {e.name: e for e in layer_errors(model, [x])}
    assert not errors["0"].quantized and errors["0"].alone_snr_db is None
    assert errors["2"].quantized and errors["2"].alone_snr_db is not None
