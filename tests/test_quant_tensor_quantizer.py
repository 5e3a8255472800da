"""TensorQuantizer: fake quantization equals ONNX Runtime's Q -> DQ bit for bit, modes, state_dict."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from harness.errors import QuantError
from harness.quant.tensor_quantizer import (
    QuantDescriptor,
    QuantMode,
    TensorQuantizer,
    amax_to_scale,
    fake_quantize,
    quantize_to_int8,
)


def _ort_qdq(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """Run QuantizeLinear -> DequantizeLinear (int8, zero point 0) in ONNX Runtime without graph optimizations."""
    zero = np.zeros(scale.shape, np.int8)
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale.astype(np.float32), "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def _near_ties(scale: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Values at and one ulp around (k + 0.5) * scale: where rounding formulas disagree."""
    k = rng.integers(-135, 135, n).astype(np.float32) + np.float32(0.5)
    t = (k * scale).astype(np.float32)
    return np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))])


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def test_per_tensor_equals_onnxruntime_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    amax = torch.tensor(2.3456)
    scale = amax_to_scale(amax).numpy()
    x = np.concatenate([rng.uniform(-3.5, 3.5, 300_000).astype(np.float32), _near_ties(scale, rng, 50_000)])
    ours = fake_quantize(torch.from_numpy(x), amax).numpy()
    theirs = _ort_qdq(x, scale, None)
    assert np.array_equal(_bits(ours), _bits(theirs))


def test_per_channel_equals_onnxruntime_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    amax = torch.from_numpy(rng.uniform(0.05, 4.0, 16).astype(np.float32))
    scale = amax_to_scale(amax).numpy()
    base = rng.uniform(-1.2, 1.2, (8, 16, 12, 10)).astype(np.float32) * amax.numpy()[None, :, None, None]
    ties = np.stack([_near_ties(scale[c], rng, 320)[:960] for c in range(16)], axis=1).reshape(8, 16, 12, 10)
    x = np.concatenate([base, ties])
    for axis in (1, -3):
        ours = fake_quantize(torch.from_numpy(x), amax.reshape(1, 16, 1, 1), axis).numpy()
        theirs = _ort_qdq(x, scale, axis % 4)
        assert np.array_equal(_bits(ours), _bits(theirs))


def test_torch_fake_quantize_and_modelopt_formulas_differ_from_onnxruntime() -> None:
    """Why the eager path divides itself: the alternatives round near-ties differently (documented)."""
    rng = np.random.default_rng(2)
    amax = np.float32(2.3456)
    scale = np.float32(amax / np.float32(127))
    x = _near_ties(np.array(scale), rng, 20_000)
    theirs = _ort_qdq(x, np.array(scale), None)
    torch_fq = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(scale), 0, -128, 127).numpy()
    mo_scale = np.float32(127) / amax
    modelopt = (np.clip(np.round(x * mo_scale), -128, 127) / mo_scale).astype(np.float32)
    assert (torch_fq != theirs).sum() > 0
    assert (_bits(modelopt) != _bits(theirs)).sum() > 0
    assert np.array_equal(_bits(fake_quantize(torch.from_numpy(x), torch.tensor(amax)).numpy()), _bits(theirs))


def test_rounding_half_to_even_and_full_int8_range() -> None:
    amax = torch.tensor(127.0)  # scale 1
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -2.5, 125.5, 126.5, 127.5, 300.0, -127.5, -128.5, -300.0])
    expected = torch.tensor([0.0, 2.0, 2.0, 4.0, 0.0, -2.0, 126.0, 126.0, 127.0, 127.0, -128.0, -128.0, -128.0])
    out = fake_quantize(x, amax)
    assert torch.equal(out, expected)
    assert not torch.signbit(out[4])  # -0.5 rounds to +0.0, as an int8 code dequantizes
    assert quantize_to_int8(x, amax).tolist() == expected.to(torch.int8).tolist()


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
amaxes = st.floats(min_value=2.0**-10, max_value=1024.0, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), amaxes)
def test_error_bound_saturation_idempotence(values: list[float], amax_value: float) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    amax = torch.tensor(amax_value, dtype=torch.float32)
    s = float(amax_to_scale(amax))
    out = fake_quantize(x, amax)
    inside = (x >= -128.5 * s) & (x <= 127.5 * s)
    err = (out.double() - x.double()).abs()
    assert bool((err[inside] <= s / 2 * (1 + 1e-5)).all())
    assert bool((out[x > 127.5 * s * (1 + 1e-6)] == float(torch.tensor(127.0) * amax_to_scale(amax))).all())
    assert bool((out[x < -128.5 * s * (1 + 1e-6)] == float(torch.tensor(-128.0) * amax_to_scale(amax))).all())
    assert torch.equal(fake_quantize(out, amax), out)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_per_channel_independence(channel: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, generator=g) * 3
    amax = torch.rand(4, generator=g) * 2 + 0.1
    out = fake_quantize(x, amax.reshape(1, 4, 1), axis=1)
    for c in range(4):
        assert torch.equal(out[:, c], fake_quantize(x[:, c], amax[c]))
    changed = x.clone()
    changed[:, channel] *= 10
    again = fake_quantize(changed, amax.reshape(1, 4, 1), axis=1)
    others = [c for c in range(4) if c != channel]
    assert torch.equal(again[:, others], out[:, others])


def test_modes_calibrate_quantize_disabled() -> None:
    q = TensorQuantizer(QuantDescriptor(), name="blk.input_quantizer")
    x = torch.linspace(-2, 3, 101)
    with pytest.raises(QuantError, match=r"blk\.input_quantizer"):
        q(x)
    q.set_mode(QuantMode.CALIBRATE)
    assert q(x) is x
    amax = q.compute_amax()
    assert amax is not None and float(amax) == 3.0
    q.load_amax(amax)
    q.set_mode("quantize")
    assert torch.equal(q(x), fake_quantize(x, amax))
    q.set_mode(QuantMode.DISABLED)
    assert q(x) is x


def test_state_dict_loads_into_uncalibrated_quantizer() -> None:
    src = TensorQuantizer(QuantDescriptor(axis=0))
    src.load_amax(torch.tensor([[0.5], [1.5], [2.5]]))
    dst = TensorQuantizer(QuantDescriptor(axis=0))
    assert not dst.is_calibrated
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 7) * 2
    assert torch.equal(dst(x), src(x))
    assert dst.amax.shape == (3, 1)
    fresh = TensorQuantizer(QuantDescriptor(axis=0))
    src.load_state_dict(fresh.state_dict())
    assert not src.is_calibrated


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_bits": 4}, "num_bits"),
        ({"calibrator": "minmax"}, "calibrator"),
        ({"calibrator": "histogram"}, "method"),
        ({"calibrator": "histogram", "method": "kl"}, "method"),
        ({"calibrator": "max", "method": "mse"}, "method"),
        ({"calibrator": "histogram", "method": "mse", "axis": 0}, "axis"),
        ({"percentile": 100.5}, "percentile"),
        ({"stride": 0}, "stride"),
    ],
)
def test_descriptor_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(QuantError, match=field):
        QuantDescriptor(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_check_amax_names_quantizer(bad: float) -> None:
    q = TensorQuantizer(name="head.input_quantizer")
    q.load_amax(torch.tensor(bad))
    with pytest.raises(QuantError, match=r"head\.input_quantizer"):
        q.check_amax()
