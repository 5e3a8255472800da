"""Quantization-aware training in the library: straight-through gradients, learnable amax,
prepare / finish, the QAT state and checkpoint file, and export after training."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harness.errors import QuantError
from harness.quant.calibrate import calibrate, quantizers
from harness.quant.qat import (
    QAT_FORMAT,
    finish_qat,
    learnable_amax,
    load_qat_state,
    prepare_qat,
    qat_state_dict,
    read_qat_checkpoint,
    save_qat_checkpoint,
)
from harness.quant.tensor_quantizer import (
    QMAX,
    QMIN,
    QuantDescriptor,
    QuantMode,
    TensorQuantizer,
    fake_quantize,
    fake_quantize_ste,
)
from harness.quant.transform import QuantConfig, quantize_model

finite = st.floats(-50, 50, allow_nan=False, width=32)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def calibrated(model: nn.Module, x: torch.Tensor, config: QuantConfig | None = None) -> nn.Module:
    q = quantize_model(model, config or QuantConfig())
    calibrate(q, [lambda m: m(x)], num_batches=1, progress=False)
    return q


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.floats(0.0625, 20, allow_nan=False, width=32))
def test_ste_forward_is_the_exact_fake_quantization(values: list[float], amax: float) -> None:
    x = torch.tensor(values, requires_grad=True)
    a = torch.tensor(amax)
    out = fake_quantize_ste(x, a)
    assert torch.equal(out, fake_quantize(x.detach(), a))


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.floats(0.0625, 20, allow_nan=False, width=32))
def test_ste_gradient_passes_inside_the_range_and_stops_where_clipped(values: list[float], amax: float) -> None:
    x = torch.tensor(values, requires_grad=True)
    a = torch.tensor(amax)
    fake_quantize_ste(x, a).sum().backward()
    codes = torch.round(x.detach() / (a / QMAX))
    inside = ((codes >= QMIN) & (codes <= QMAX)).float()
    assert x.grad is not None and torch.equal(x.grad, inside)


def test_ste_per_channel_gradient_uses_each_channels_scale() -> None:
    x = torch.tensor([[0.5, 2.0], [0.5, 2.0]], requires_grad=True)   # channel axis 0
    amax = torch.tensor([1.0, 4.0])
    fake_quantize_ste(x, amax, axis=0).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_learnable_amax_gets_the_lsq_gradient() -> None:
    x = torch.tensor([0.3, -0.7, 5.0, -9.0])   # amax 1: two inside, two clipped (+127, -128)
    amax = torch.tensor(1.0, requires_grad=True)
    fake_quantize_ste(x, amax).sum().backward()
    s = 1.0 / QMAX
    y = x / s
    inside = (torch.round(y) - y)[:2].sum().item()
    expected = (inside + QMAX + QMIN) * QMAX / math.sqrt(x.numel() * QMAX)
    assert amax.grad is not None and amax.grad.item() == pytest.approx(expected, rel=1e-5)


def test_quantizer_uses_the_ste_only_when_gradients_are_wanted() -> None:
    q = TensorQuantizer(QuantDescriptor())
    q.load_amax(torch.tensor(1.0))
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert q(x).grad_fn is None


def test_prepare_train_finish_round_trip(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 16, 16)
    model = net()
    q = prepare_qat(calibrated(model, x), learn_amax=True)
    assert len(learnable_amax(q)) == len([1 for _, t in quantizers(q) if t.mode is not QuantMode.DISABLED])
    target = torch.randn_like(model(x))
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    q.train()
    losses = []
    for _ in range(15):
        loss = ((q(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    finish_qat(q)
    assert not learnable_amax(q) and not q.training
    path = tmp_path / "qat.pt"
    save_qat_checkpoint(path, q, {"case": "net"})
    state, origin = read_qat_checkpoint(path)
    assert origin == {"case": "net"}
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith(".amax"))
    assert state["0.weight"].dtype == torch.float16
    fresh = load_qat_state(quantize_model(model, QuantConfig()), state)
    expected = copy.deepcopy(q)
    expected.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        assert torch.equal(fresh(x), expected(x))


def test_fixed_amax_stays_as_calibrated() -> None:
    x = torch.randn(2, 3, 8, 8)
    q = prepare_qat(calibrated(net(), x))
    before = {n: t.amax.clone() for n, t in quantizers(q)}
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(x).square().mean().backward()
    opt.step()
    assert all(torch.equal(t.amax, before[n]) for n, t in quantizers(q))
    assert q[0].weight.grad is not None and q[0].weight.grad.abs().sum() > 0


def test_prepare_refuses_uncalibrated_and_unquantized_models() -> None:
    with pytest.raises(QuantError, match="quantizers without amax"):
        prepare_qat(quantize_model(net(), QuantConfig()))
    with pytest.raises(QuantError, match="no enabled quantizer"):
        prepare_qat(net())


def test_finish_names_an_amax_that_training_broke() -> None:
    x = torch.randn(2, 3, 8, 8)
    q = prepare_qat(calibrated(net(), x), learn_amax=True)
    with torch.no_grad():
        learnable_amax(q)[0].fill_(float("nan"))
    with pytest.raises(QuantError, match="invalid amax"):
        finish_qat(q)


def test_state_that_does_not_fit_names_keys_and_shapes() -> None:
    x = torch.randn(2, 3, 8, 8)
    state = qat_state_dict(calibrated(net(), x))
    target = quantize_model(net(), QuantConfig())
    with pytest.raises(QuantError, match=r"qat.pt does not fit.*missing \['0.bias'\]"):
        load_qat_state(target, {k: v for k, v in state.items() if k != "0.bias"}, source="qat.pt")
    wrong = dict(state, **{"0.weight": torch.zeros(8, 3, 1, 1)})
    with pytest.raises(QuantError, match="shapes differ"):
        load_qat_state(target, wrong)
    per_tensor = quantize_model(net(), QuantConfig(weights=QuantDescriptor()))
    with pytest.raises(QuantError, match="per tensor"):
        load_qat_state(per_tensor, state)


def test_checkpoint_reader_names_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(QuantError, match=r"cannot read QAT checkpoint .*garbage.pt"):
        read_qat_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(QuantError, match=f"plain.pt is not a QAT checkpoint.*{QAT_FORMAT}"):
        read_qat_checkpoint(plain)
    bad = tmp_path / "bad.pt"
    torch.save({"format": QAT_FORMAT, "state_dict": {"a": 1}, "origin": {}}, bad)
    with pytest.raises(QuantError, match="not a mapping of tensors"):
        read_qat_checkpoint(bad)


def test_trained_model_exports_to_qdq_onnx_that_onnxruntime_matches(tmp_path: Path) -> None:
    import onnxruntime as ort

    from harness.export.qdq import export_qdq

    x = torch.randn(2, 3, 16, 16)
    q = prepare_qat(calibrated(net(), x))
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(3):
        q(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    finish_qat(q)
    path = tmp_path / "qat.onnx"
    export_qdq(q, (x,), path, layout="tensorrt", input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = q(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
