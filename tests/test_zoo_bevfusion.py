"""Tests of harness.zoo.bevfusion: stage shapes, BEVFusion names, BEV pool, export to ORT."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.zoo.bevfusion import (
    BEVFusionCamera,
    BEVFusionCameraStage,
    BEVFusionConfig,
    BEVFusionFuserStage,
    BEVFusionVTransformStage,
    bev_pool,
    bevfusion_camera_r50,
    depth_bins,
    frustum_geometry,
)
from harness.zoo.ops import Add, Concat

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export",
    "ignore:Sparse invariant checks",
)


def ring_lidar2img(image_hw: tuple[int, int]) -> torch.Tensor:
    """Six horizontal pinhole cameras (70 deg FOV) 1.5 m above the lidar, 60 deg apart."""
    height, width = image_hw
    focal = (width / 2) / math.tan(math.radians(35))
    k = np.array([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mats = []
    for i in range(6):
        yaw = math.radians(60 * i)
        rot = np.array(
            [[math.sin(yaw), -math.cos(yaw), 0], [0, 0, -1], [math.cos(yaw), math.sin(yaw), 0]]
        )
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = rot
        lidar2cam[:3, 3] = -rot @ np.array([0.0, 0.0, 1.5])
        mats.append(k @ lidar2cam)
    return torch.tensor(np.stack(mats), dtype=torch.float32)


@pytest.fixture(scope="module")
def model() -> BEVFusionCamera:
    return bevfusion_camera_r50("ci")


def test_full_profile_sizes_are_cuda_bevfusion() -> None:
    cfg = BEVFusionConfig()
    assert cfg.feature_hw == (32, 88)
    assert cfg.num_depth_bins == 118
    assert cfg.bev_zxy == (1, 360, 360) and cfg.fused_xy == (180, 180)
    assert cfg.bev_in_channels == 80 and cfg.lidar_channels == 256
    assert sum(cfg.decoder_out_channels) == 512


def test_module_names_follow_bevfusion(model: BEVFusionCamera) -> None:
    modules = dict(model.named_modules())
    for name in [
        "encoders.camera.backbone.layer3.0.conv1",
        "encoders.camera.backbone.layer3.0.downsample.0",
        "encoders.camera.neck.lateral_convs.0.conv",
        "encoders.camera.neck.fpn_convs.1.conv",
        "encoders.camera.vtransform.dtransform.0",
        "encoders.camera.vtransform.depthnet.6",
        "encoders.camera.vtransform.downsample.6",
        "fuser.conv",
        "decoder.backbone.blocks.1.0",
    ]:
        assert isinstance(modules[name], nn.Conv2d), name
    assert isinstance(modules["decoder.neck.deblocks.1.0"], nn.ConvTranspose2d)
    first = modules["decoder.neck.deblocks.0.0"]
    assert isinstance(first, nn.Conv2d) and first.kernel_size == (1, 1)  # use_conv_for_no_stride
    concats = [n for n, m in modules.items() if isinstance(m, Concat)]
    assert concats == [
        "encoders.camera.neck.concats.0",
        "encoders.camera.neck.concats.1",
        "encoders.camera.vtransform.concat",
        "fuser.concat",
        "decoder.neck.concat",
    ]
    assert sum(isinstance(m, Add) for m in modules.values()) == 16  # one per ResNet50 bottleneck


def test_lss_fpn_channels(model: BEVFusionCamera) -> None:
    modules = dict(model.encoders.camera.neck.named_modules())
    widths = model.encoders.camera.backbone.out_channels[1:]  # 64, 128, 256 in the CI profile
    top, bottom = modules["lateral_convs.1.conv"], modules["lateral_convs.0.conv"]
    assert isinstance(top, nn.Conv2d) and isinstance(bottom, nn.Conv2d)
    assert top.in_channels == widths[1] + widths[2]
    assert bottom.in_channels == widths[0] + model.config.neck_channels


def test_stage_shapes_and_pipeline(model: BEVFusionCamera) -> None:
    cfg = model.config
    camera = BEVFusionCameraStage(model)
    img, depth = camera.example_inputs()
    assert img.shape == (1, 6, 3, 64, 192) and depth.shape == (1, 6, 1, 64, 192)
    with torch.no_grad():
        feature, weights = camera(img, depth)
        assert feature.shape == (6, 8, 24, cfg.camera_channels)
        assert weights.shape == (6, cfg.num_depth_bins, 8, 24)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(6, 8, 24))
        geometry = model.geometry(ring_lidar2img(cfg.image_hw))
        pooled = bev_pool(feature, weights, geometry, cfg.bev_zxy)
        assert pooled.shape == (1, cfg.camera_channels, 32, 32)
        down = BEVFusionVTransformStage(model)(pooled)
        assert down.shape == (1, cfg.camera_channels, 16, 16)
        lidar = torch.randn(1, cfg.lidar_channels, 16, 16)
        middle = BEVFusionFuserStage(model)(down, lidar)
        assert middle.shape == (1, 64, 16, 16)
        torch.testing.assert_close(model(img, depth, lidar, geometry), middle)


@pytest.mark.parametrize(
    "stage_type", [BEVFusionCameraStage, BEVFusionVTransformStage, BEVFusionFuserStage]
)
def test_stage_export_matches_onnxruntime(
    model: BEVFusionCamera,
    stage_type: type[BEVFusionCameraStage | BEVFusionVTransformStage | BEVFusionFuserStage],
    tmp_path: Path,
) -> None:
    stage = stage_type(model)
    inputs = stage.example_inputs()
    path = tmp_path / "stage.onnx"
    torch.onnx.export(
        stage,
        inputs,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=list(stage.input_names),
        output_names=list(stage.output_names),
    )
    assert not model.training
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(stage.input_names)
    assert [o.name for o in session.get_outputs()] == list(stage.output_names)
    got = session.run(None, {n: t.numpy() for n, t in zip(stage.input_names, inputs, strict=True)})
    with torch.no_grad():
        want = stage(*inputs)
    wants = (want,) if isinstance(want, torch.Tensor) else want
    for g, w in zip(got, wants, strict=True):
        scale = float(w.abs().max())
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_export_graph_keeps_conv_transpose(model: BEVFusionCamera, tmp_path: Path) -> None:
    import onnx

    stage = BEVFusionFuserStage(model)
    path = tmp_path / "fuser.onnx"
    torch.onnx.export(stage, stage.example_inputs(), str(path), dynamo=False, opset_version=17)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("ConvTranspose") == 1 and ops.count("Concat") == 2


# --------------------------------------------------------------------------- geometry / pool


def test_frustum_geometry_matches_per_point_loop() -> None:
    image_hw, feature_hw = (32, 64), (4, 8)
    # Cell borders off the round coordinates that the ring's optical axes hit exactly.
    dbound, xbound, ybound, zbound = (
        (1.0, 40.0, 6.0),
        (-30.37, 29.63, 5.0),
        (-30.1, 29.9, 7.5),
        (-3.1, 2.9, 2.0),
    )
    lidar2img = ring_lidar2img(image_hw)
    geometry = frustum_geometry(lidar2img, image_hw, feature_hw, dbound, xbound, ybound, zbound)
    depths = depth_bins(dbound).tolist()
    assert geometry.shape == (6, len(depths), 4, 8) and geometry.dtype == torch.int64
    inv = np.linalg.inv(lidar2img.double().numpy())
    nx, ny, nz = 12, 8, 3
    expected = np.full(geometry.shape, -1, dtype=np.int64)
    for n in range(6):
        for di, d in enumerate(depths):
            for h in range(4):
                for w in range(8):
                    u, v = w * (64 - 1) / (8 - 1), h * (32 - 1) / (4 - 1)
                    x, y, z, _ = inv[n] @ np.array([u * d, v * d, d, 1.0])
                    ix, iy, iz = (
                        math.trunc((p - b[0]) / b[2])
                        for p, b in ((x, xbound), (y, ybound), (z, zbound))
                    )
                    if 0 <= ix < nx and 0 <= iy < ny and 0 <= iz < nz:
                        expected[n, di, h, w] = (iz * nx + ix) * ny + iy
    np.testing.assert_array_equal(geometry.numpy(), expected)
    assert (expected >= 0).any() and (expected < 0).any()


def test_bev_pool_matches_naive_sum_and_is_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, fh, fw, c = 2, 3, 2, 4, 5
    zxy = (2, 3, 4)
    feature = torch.randn(n, fh, fw, c, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(n, d, fh, fw, generator=gen, dtype=torch.float64, requires_grad=True)
    geometry = torch.randint(-1, 24, (n, d, fh, fw), generator=gen)
    geometry[0, :, 0, 0] = 5  # several depth bins of one pixel in one cell
    out = bev_pool(feature, weights, geometry, zxy)
    assert out.shape == (1, 2 * c, 3, 4)
    expected = torch.zeros(24, c, dtype=torch.float64)
    for i in range(n):
        for j in range(d):
            for h in range(fh):
                for w in range(fw):
                    cell = int(geometry[i, j, h, w])
                    if cell >= 0:
                        expected[cell] += weights[i, j, h, w] * feature[i, h, w]
    # cell index (z*X + x)*Y + y; channels z-major
    expected = expected.reshape(2, 3, 4, c).permute(0, 3, 1, 2).reshape(1, 2 * c, 3, 4)
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(
        lambda f, w: bev_pool(f, w, geometry, zxy),
        (feature, weights),
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,
    )


def test_bev_pool_rejects_mismatched_inputs() -> None:
    with pytest.raises(HarnessError, match="bev_pool"):
        bev_pool(
            torch.zeros(2, 2, 4, 5),
            torch.zeros(2, 3, 2, 4),
            torch.zeros(2, 3, 2, 5, dtype=torch.int64),
            (1, 2, 2),
        )


# --------------------------------------------------------------------------- factory


def test_factory_seed_overrides_and_errors() -> None:
    a = bevfusion_camera_r50("ci", seed=1)
    b = bevfusion_camera_r50("ci", seed=1)
    assert not a.training
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = bevfusion_camera_r50("ci", dbound=[1.0, 60.0, 8.0], decoder_layer_nums=[1, 1])
    assert c.config.num_depth_bins == 8 and c.config.decoder_layer_nums == (1, 1)
    assert c.encoders.camera.vtransform.depthnet[-1].out_channels == 8 + c.config.camera_channels
    with pytest.raises(HarnessError, match="unknown profile"):
        bevfusion_camera_r50("huge")
    with pytest.raises(HarnessError, match="unknown argument"):
        bevfusion_camera_r50("ci", xbounds=(0, 1, 1))
    with pytest.raises(HarnessError, match="image_hw"):
        bevfusion_camera_r50("ci", image_hw=(60, 192))


def test_points_less_than_a_cell_below_the_grid_land_in_cell_zero() -> None:
    """BEVFusion's `.long()` truncates toward zero: (p - lo) / step in (-1, 0) is cell 0."""
    image_hw, feature_hw = (32, 64), (4, 8)
    bounds = ((1.0, 40.0, 6.0), (-30.37, 29.63, 5.0), (-30.1, 29.9, 7.5), (-3.1, 2.9, 2.0))
    lidar2img = ring_lidar2img(image_hw)
    geometry = frustum_geometry(lidar2img, image_hw, feature_hw, *bounds)
    # the z grid moved up one cell: points of the old z cell 0 are now less than a cell below
    # `lo`, so they are kept in the new z cell 0 (flooring would drop every one of them)
    shifted = frustum_geometry(lidar2img, image_hw, feature_hw, bounds[0], bounds[1], bounds[2],
                               (-1.1, 4.9, 2.0))
    z_cell = torch.where(geometry >= 0, geometry // (12 * 8), -1)
    below = (z_cell == 0) & (shifted >= 0)
    assert below.any()
    assert bool(((shifted[below] // (12 * 8)) == 0).all())
