"""Tests of harness.zoo.centerpoint: shapes, BN fusion, the CPU conv path, the voxel generator."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
from torch import nn

from harness.datasets.lidar import LidarSweeps
from harness.errors import HarnessError
from harness.zoo import centerpoint as cp

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

SMALL = (8, 8, 16, 16)


@pytest.fixture(scope="module")
def voxels() -> tuple[torch.Tensor, torch.Tensor]:
    return cp.random_voxels(cp.CI_GRID, 2500, seed=3)


@pytest.fixture(scope="module")
def model() -> cp.CenterPointSCN:
    return cp.centerpoint_scn(widths=SMALL, grid=cp.CI_GRID, seed=1, fit_voxels=2000)


def test_output_shapes_follow_det3d_downsampling() -> None:
    assert cp.ScnConfig().output_grid() == (2, 180, 180)
    assert cp.ScnConfig().output_shape() == (1, 256, 180, 180)
    assert cp.ScnConfig(grid=cp.CI_GRID).output_shape() == (1, 256, 23, 23)


def test_forward_shape_on_ci_grid(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        y = model(*voxels)
    assert tuple(y.shape) == model.config.output_shape()
    assert torch.isfinite(y).all()
    assert 0.05 < (y > 0).float().mean() < 0.95


def test_forward_shape_on_full_grid() -> None:
    m = cp.centerpoint_scn(widths=(4, 4, 4, 4), seed=0)
    f, i = cp.random_voxels(cp.FULL_GRID, 300, seed=0)
    with torch.no_grad():
        y = m(f, i)
    assert tuple(y.shape) == (1, 8, 180, 180)


def test_det3d_module_paths(model: cp.CenterPointSCN) -> None:
    keys = set(model.state_dict())
    for key in ("conv_input.0.weight", "conv_input.1.running_var", "conv1.1.conv2.bias",
                "conv2.0.weight", "conv2.3.conv1.weight", "conv4.4.bn2.weight", "extra_conv.0.weight"):
        assert key in keys, key
    assert model.conv_input[0].weight.shape == (8, 3, 3, 3, 5)
    assert model.conv4[0].padding == [0, 1, 1]
    assert model.extra_conv[0].kernel_size == [3, 1, 1]
    assert model.extra_conv[0].stride == [2, 1, 1]


def test_fuse_bn_keeps_outputs(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    fused = cp.fuse_bn(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules())
    assert isinstance(fused.conv_input, cp.SubMConv3d)
    assert fused.conv_input.act_type == cp.RELU
    assert isinstance(fused.extra_conv, cp.SparseConv3d)
    assert len(fused.conv2) == 3
    with torch.no_grad():
        ref = model(*voxels)
        out = fused(*voxels)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_fold_formula() -> None:
    conv = cp.SubMConv3d(2, 3, 3, padding=1, bias=True)
    bn = nn.BatchNorm1d(3, eps=1e-3).eval()
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    cp._fold(conv, bn)
    scale = bn.weight / torch.sqrt(bn.running_var + 1e-3)
    assert torch.allclose(conv.weight, w0 * scale.view(3, 1, 1, 1, 1))
    assert torch.allclose(conv.bias, (b0 - bn.running_mean) * scale + bn.bias)


def test_fuse_bn_rejects_training_mode_and_double_fusion(model: cp.CenterPointSCN) -> None:
    m = copy.deepcopy(model).train()
    with pytest.raises(HarnessError, match="eval mode"):
        cp.fuse_bn(m)
    fused = cp.fuse_bn(copy.deepcopy(model))
    with pytest.raises(HarnessError, match="already fused"):
        cp.fuse_bn(fused)


def test_conv_forward_is_deterministic_on_cpu(voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    # spconv's CPU scatter-add races on several threads; keeping earlier outputs alive exposed it.
    torch.manual_seed(0)
    conv = cp.SparseConv3d(5, 8, 3, 2, padding=1, bias=True).eval()
    x = spconv.SparseConvTensor(voxels[0], voxels[1], list(cp.CI_GRID), 1)
    with torch.no_grad():
        outs = [conv(x) for _ in range(4)]
        dense = x.dense()
        ref = torch.nn.functional.conv3d(dense, conv.weight.permute(0, 4, 1, 2, 3), conv.bias,
                                         stride=2, padding=1)
    for o in outs:
        idx = o.indices.long()
        expect = ref[0][:, idx[:, 1], idx[:, 2], idx[:, 3]].T
        assert torch.allclose(o.features, expect, atol=1e-5)


def test_conv_forward_applies_bias_and_activation(voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    conv = cp.SubMConv3d(5, 4, 3, padding=1, bias=True).eval()
    x = spconv.SparseConvTensor(voxels[0], voxels[1], list(cp.CI_GRID), 1)
    with torch.no_grad():
        plain = cp.conv_forward(conv, x).features
        conv.act_type = cp.RELU
        relu = cp.conv_forward(conv, x).features
    assert torch.equal(relu, torch.relu(plain))
    assert (plain < 0).any()


def test_random_voxels_unique_in_grid_and_seeded() -> None:
    f, i = cp.random_voxels(cp.CI_GRID, 3000, seed=9)
    assert f.dtype == torch.float32 and i.dtype == torch.int32
    assert f.shape == (i.shape[0], 5) and 2500 < i.shape[0] <= 3000
    ind = i.numpy()
    assert (ind[:, 0] == 0).all()
    assert (ind[:, 1:] >= 0).all() and (ind[:, 1:] < np.array(cp.CI_GRID)).all()
    assert np.unique(ind, axis=0).shape[0] == ind.shape[0]
    f2, i2 = cp.random_voxels(cp.CI_GRID, 3000, seed=9)
    assert torch.equal(f, f2) and torch.equal(i, i2)
    f3, _ = cp.random_voxels(cp.CI_GRID, 3000, seed=10)
    assert not torch.equal(f[:100], f3[:100])


def test_factory_is_seeded_and_validates() -> None:
    a = cp.centerpoint_scn(widths=SMALL, grid=cp.CI_GRID, seed=4)
    b = cp.centerpoint_scn(widths=SMALL, grid=cp.CI_GRID, seed=4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not a.training
    with pytest.raises(HarnessError, match="4 widths"):
        cp.centerpoint_scn(widths=(8, 8))
    with pytest.raises(HarnessError, match="too shallow"):
        cp.centerpoint_scn(grid=(7, 64, 64))
    with pytest.raises(HarnessError, match="fit_sweeps: the LiDAR dataset has no grid"):
        cp.centerpoint_scn(grid=(41, 64, 64), fit_sweeps=1)


def test_ci_factory_fits_bn_on_lidar_sweeps() -> None:
    model = cp.centerpoint_scn_ci()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    w = model.conv_input.weight
    assert torch.equal(w, w.half().float())
    sample = LidarSweeps(split="val", size=1, grid="ci")[0]
    with torch.no_grad():
        y = model(torch.from_numpy(sample.features), torch.from_numpy(sample.indices))
    assert tuple(y.shape) == (1, 256, 23, 23)
    active = y[y != 0]
    assert 0.05 < active.numel() / y.numel() < 0.6
    assert 0.2 < float(active.mean()) < 20
