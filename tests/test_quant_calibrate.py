"""Calibration loop: amax per quantizer, errors naming quantizers, state round-trips."""

from __future__ import annotations

import pytest
import torch
from quant_nets import SmallNet, randomize_bn
from torch import nn

from harness.errors import QuantError
from harness.quant.calibrate import calibrate, calibration_state, load_calibration_state, quantizers
from harness.quant.tensor_quantizer import QuantDescriptor, QuantMode
from harness.quant.transform import QuantConfig, quantize_model

torch.manual_seed(0)
BATCHES = [(torch.randn(2, 3, 32, 32),) for _ in range(3)]


def _model(**kwargs: object) -> nn.Module:
    torch.manual_seed(1)
    return quantize_model(randomize_bn(SmallNet()), QuantConfig(keep_float=("head",), **kwargs))  # type: ignore[arg-type]


def test_calibrate_sets_every_amax_and_switches_to_quantize() -> None:
    q = _model()
    state = calibrate(q, iter(BATCHES), progress=False)
    named = dict(quantizers(q))
    assert set(state) == set(named)
    assert all(qz.mode is QuantMode.QUANTIZE and qz.is_calibrated for qz in named.values())
    assert torch.equal(state["stem.0.weight_quantizer"].reshape(-1), q.stem[0].weight.abs().amax(dim=(1, 2, 3)))
    manual = max(float(b[0].abs().max()) for b in BATCHES)
    max_model = _model(activations=QuantDescriptor())
    assert float(calibrate(max_model, BATCHES, progress=False)["stem.0.input_quantizer"]) == manual
    assert float(state["stem.0.input_quantizer"]) < manual  # percentile 99.99 clips


def test_num_batches_limits_the_loop() -> None:
    a, b = _model(activations=QuantDescriptor()), _model(activations=QuantDescriptor())
    first = calibrate(a, BATCHES, num_batches=1, progress=False)
    only = calibrate(b, BATCHES[:1], progress=False)
    assert all(torch.equal(first[k], only[k]) for k in first)


def test_state_round_trips_reproduce_outputs() -> None:
    q = _model()
    state = calibrate(q, BATCHES, progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = q(x)
        fresh = _model()
        load_calibration_state(fresh, state)
        assert torch.equal(fresh(x), ref)
        other = _model()
        other.load_state_dict(q.state_dict())
        assert torch.equal(other(x), ref)
    assert all(torch.equal(v, calibration_state(fresh)[k]) for k, v in state.items())


def test_zero_batches_names_the_quantizers() -> None:
    with pytest.raises(QuantError, match=r"no calibration batches: .*stem\.0\.input_quantizer"):
        calibrate(_model(), [], progress=False)


def test_unreached_quantizer_is_named() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 3, 1)
            self.spare = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.used(x)
            return out

    q = quantize_model(Unused(), QuantConfig())
    with pytest.raises(QuantError, match=r"never reached .*spare\.input_quantizer") as err:
        calibrate(q, BATCHES, progress=False)
    assert "used.input_quantizer" not in str(err.value)


@pytest.mark.parametrize(("fill", "what"), [(0.0, "invalid amax"), (float("nan"), "invalid amax"), (float("inf"), "invalid amax")])
def test_bad_amax_is_named(fill: float, what: str) -> None:
    q = quantize_model(nn.Sequential(nn.Conv2d(3, 3, 1)), QuantConfig(activations=QuantDescriptor()))
    with pytest.raises(QuantError, match=rf"(?s){what}.*0\.input_quantizer"):
        calibrate(q, [(torch.full((1, 3, 4, 4), fill),)], progress=False)


def test_disabled_quantizers_are_left_alone_and_state_must_fit() -> None:
    q = _model()
    q.fuse[0].input_quantizer.set_mode(QuantMode.DISABLED)
    state = calibrate(q, BATCHES, progress=False)
    assert "fuse.0.input_quantizer" not in state
    assert q.fuse[0].input_quantizer.mode is QuantMode.DISABLED
    with pytest.raises(QuantError, match=r"missing \['fuse\.0\.input_quantizer'\]"):
        load_calibration_state(_model(), state)
    with pytest.raises(QuantError, match="unexpected"):
        load_calibration_state(q, {**state, "nope.input_quantizer": torch.tensor(1.0)})


def test_dict_batches_and_training_flag_restored() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.conv(image)
            return out

    q = quantize_model(Kw(), QuantConfig()).train()
    calibrate(q, [{"image": torch.randn(1, 3, 4, 4)}], progress=False)
    assert q.training
