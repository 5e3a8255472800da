"""Tests of harness.quant.sparse: quantized spconv layers and quantize_scn."""

from __future__ import annotations

import copy

import pytest
import torch
from spconv.pytorch.conv import SparseConvolution

from harness.errors import QuantError
from harness.quant.calibrate import calibrate, quantization_disabled
from harness.quant.modules import QuantAdd
from harness.quant.sparse import (
    ADD_DESC,
    NVIDIA_CENTERPOINT_KEEP_FLOAT,
    QuantSparseConvolution,
    quantize_scn,
)
from harness.quant.tensor_quantizer import (
    QuantDescriptor,
    QuantMode,
    TensorQuantizer,
    fake_quantize,
)
from harness.zoo import centerpoint as cp

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


def _conv(model: torch.nn.Module, name: str) -> QuantSparseConvolution:
    m = model.get_submodule(name)
    assert isinstance(m, QuantSparseConvolution)
    return m


def _add(model: torch.nn.Module, name: str) -> QuantAdd:
    m = model.get_submodule(name)
    assert isinstance(m, QuantAdd)
    return m


def _quantizer(m: torch.nn.Module) -> TensorQuantizer:
    assert isinstance(m, TensorQuantizer)
    return m


@pytest.fixture(scope="module")
def model() -> cp.CenterPointSCN:
    return cp.centerpoint_scn(widths=(8, 8, 16, 16), grid=cp.CI_GRID, seed=2, fit_voxels=1500,
                              fuse=True, fp16_params=True)


@pytest.fixture(scope="module")
def voxels() -> tuple[torch.Tensor, torch.Tensor]:
    return cp.random_voxels(cp.CI_GRID, 2000, seed=8)


def test_layers_swapped_with_nvidia_descriptors(model: cp.CenterPointSCN) -> None:
    q = quantize_scn(model)
    convs = [m for m in q.modules() if isinstance(m, SparseConvolution)]
    assert len(convs) == 21 and all(isinstance(c, QuantSparseConvolution) for c in convs)
    adds = [m for m in q.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 8
    conv = _conv(q, "conv2.1.conv1")
    assert _quantizer(conv.input_quantizer).descriptor == QuantDescriptor(calibrator="histogram", method="mse")
    assert conv.weight_quantizer.descriptor == QuantDescriptor(axis=0)
    assert conv.act_type == cp.RELU and conv.indice_key == "res1" and conv.subm
    original = model.get_submodule("conv2.1.conv1")
    assert isinstance(original, SparseConvolution)
    assert torch.equal(conv.weight, original.weight)
    direct = QuantSparseConvolution.from_float(original)
    assert direct.weight is original.weight  # from_float shares parameters
    add = adds[0]
    assert add.get_input_quantizer(0) is add.get_input_quantizer(1)
    assert _quantizer(add.input_quantizer).descriptor == ADD_DESC
    assert all(t.mode is QuantMode.DISABLED for t in q.get_submodule("conv_input").modules() if isinstance(t, TensorQuantizer))
    assert _conv(q, "conv_input").weight_quantizer.name == "conv_input.weight_quantizer"
    assert not any(isinstance(m, QuantSparseConvolution) for m in model.modules())  # copy


def test_calibrated_weight_ranges_are_per_output_channel(
        model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    q = quantize_scn(model)
    state = calibrate(q, [voxels], progress=False)
    conv = _conv(q, "conv3.0")
    w = conv.weight.detach()
    assert conv.weight_quantizer.amax.shape == (16, 1, 1, 1, 1)
    assert torch.equal(conv.weight_quantizer.amax.reshape(-1), w.abs().flatten(1).amax(1))
    add = _add(q, "conv2.1.add")
    assert _quantizer(add.input_quantizer).amax.numel() == 1
    assert "conv_input.input_quantizer" not in state
    assert "conv1.0.conv1.input_quantizer" in state


def test_fake_quant_forward(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    q = quantize_scn(model)
    calibrate(q, [voxels], progress=False)
    with torch.no_grad():
        ref = model(*voxels)
        out = q(*voxels)
        with quantization_disabled(q):
            floated = q(*voxels)
    assert torch.equal(floated, ref)
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    assert 0.95 < cos < 1.0
    conv = _conv(q, "conv1.0.conv1")
    feats = torch.randn(50, 8)
    qx = conv.input_quantizer(feats)
    assert torch.equal(qx, fake_quantize(feats, _quantizer(conv.input_quantizer).amax))


def test_keep_float_and_errors(model: cp.CenterPointSCN) -> None:
    q = quantize_scn(model, keep_float=NVIDIA_CENTERPOINT_KEEP_FLOAT)
    for name in NVIDIA_CENTERPOINT_KEEP_FLOAT:
        assert all(t.mode is QuantMode.DISABLED for t in q.get_submodule(name).modules()
                   if isinstance(t, TensorQuantizer))
    assert _quantizer(_conv(q, "conv1.1.conv1").input_quantizer).mode is QuantMode.QUANTIZE
    with pytest.raises(QuantError, match=r"keep_float pattern 'conv9' matches no sparse conv or add"):
        quantize_scn(model, keep_float=("conv9",))
    unfused = cp.centerpoint_scn(widths=(8, 8, 16, 16), grid=cp.CI_GRID, seed=2)
    with pytest.raises(QuantError, match="fold BN"):
        quantize_scn(unfused)
    with pytest.raises(QuantError, match="axis 0"):
        QuantSparseConvolution.from_float(copy.deepcopy(model.conv_input), weight_desc=QuantDescriptor(axis=4))


def test_state_dict_round_trip(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    q = quantize_scn(model)
    calibrate(q, [voxels], progress=False)
    fresh = quantize_scn(model)
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(*voxels), q(*voxels))
