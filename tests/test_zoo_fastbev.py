"""Tests of harness.zoo.fastbev: view-transform tables, stages and export, decode, NMS, loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy.spatial import cKDTree

from harness.errors import HarnessError
from harness.zoo import fastbev
from harness.zoo.fastbev import (
    CLASSES,
    FastBEV,
    FastBEVConfig,
    FastBEVPost,
    FastBEVPre,
    GTBoxes,
    HeadOutputs,
    LossConfig,
    NMSConfig,
    assign_anchors,
    bev_iou,
    build_lookup_tables,
    decode,
    direction_target,
    encode,
    fastbev_r18,
    postprocess,
    view_transform,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export"
)

CAMERA_YAWS_DEG = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)  # nuScenes-like ring of six


def ring_lidar2img(image_hw: tuple[int, int], fov_deg: float = 70.0) -> torch.Tensor:
    """lidar2img [6, 4, 4] of six horizontal pinhole cameras 1.5 m above the lidar origin."""
    height, width = image_hw
    focal = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    k = np.array([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mats = []
    for yaw_deg in CAMERA_YAWS_DEG:
        yaw = math.radians(yaw_deg)
        forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        rot = np.stack((right, down, forward))
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = rot
        lidar2cam[:3, 3] = -rot @ np.array([0.0, 0.0, 1.5])
        mats.append(k @ lidar2cam)
    return torch.tensor(np.stack(mats), dtype=torch.float32)


def export_and_run(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    path: Path,
) -> list[np.ndarray]:
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=list(input_names),
        output_names=list(output_names),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(output_names)
    return list(session.run(None, {n: t.numpy() for n, t in zip(input_names, inputs, strict=True)}))


# --------------------------------------------------------------------------- lookup tables


def reference_tables(
    lidar2img: np.ndarray,
    feat_hw: tuple[int, int],
    grid: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    pcr: tuple[float, ...],
    stride: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-voxel loop, written from the seed's description of the projection."""
    ncam = lidar2img.shape[0]
    nx, ny, nz = grid
    xs = np.zeros((ncam, nx * ny * nz), np.int64)
    ys = np.zeros_like(xs)
    valid = np.zeros((ncam, nx * ny * nz), np.float32)
    origin = [(pcr[i] + pcr[i + 3]) / 2 for i in range(3)]
    for c in range(ncam):
        proj = lidar2img[c, :3].astype(np.float64).copy()
        proj[:2] /= stride
        for ix in range(nx):
            for iy in range(ny):
                for iz in range(nz):
                    point = [
                        origin[a] + (i - n / 2) * voxel_size[a]
                        for a, (i, n) in enumerate(((ix, nx), (iy, ny), (iz, nz)))
                    ]
                    u, v, d = proj @ np.array([*point, 1.0])
                    flat = ix * ny * nz + iy * nz + iz
                    if d == 0 or not (abs(u / d) < 2**31 and abs(v / d) < 2**31):
                        xs[c, flat] = ys[c, flat] = -(2**31)
                        continue
                    x, y = round(u / d), round(v / d)  # round half to even, as torch.round
                    xs[c, flat], ys[c, flat] = x, y
                    valid[c, flat] = float(
                        x >= 0 and y >= 0 and x < feat_hw[1] and y < feat_hw[0] and d > 0
                    )
    return xs, ys, valid


def test_lookup_tables_match_per_voxel_projection() -> None:
    image_hw, feat_hw = (64, 176), (16, 44)
    grid, voxel_size = (10, 8, 3), (10.0, 12.5, 8 / 3)
    pcr = (-50.0, -50.0, -5.0, 50.0, 50.0, 3.0)
    lidar2img = ring_lidar2img(image_hw)
    tables = build_lookup_tables(lidar2img, feat_hw, grid, voxel_size, pcr, stride=4)
    assert tables.x.dtype == tables.y.dtype == torch.int64
    assert tables.valid_c_idx.dtype == torch.float32
    assert tables.x.shape == (6, 240)
    xs, ys, valid = reference_tables(lidar2img.double().numpy(), feat_hw, grid, voxel_size, pcr, 4)
    behind = xs == -(2**31)
    np.testing.assert_array_equal(tables.valid_c_idx.numpy(), valid)
    np.testing.assert_array_equal(tables.x.numpy()[~behind], xs[~behind])
    np.testing.assert_array_equal(tables.y.numpy()[~behind], ys[~behind])
    # Every camera sees part of the ring, and voxels behind a camera are never valid.
    assert (valid.sum(axis=1) > 0).all()
    assert valid.sum() < valid.size


def test_lookup_tables_round_half_to_even_and_flat_order() -> None:
    # u = x_voxel + 52.5, v = y_voxel + 50.25, d = 1: voxels at -50 + 10*i give u = 2.5 + 10*i.
    lidar2img = torch.zeros(1, 4, 4)
    lidar2img[0, 0, 0] = lidar2img[0, 1, 1] = 1.0
    lidar2img[0, 0, 3], lidar2img[0, 1, 3], lidar2img[0, 2, 3] = 52.5, 50.25, 1.0
    grid = (10, 4, 2)
    tables = build_lookup_tables(
        lidar2img, (100, 100), grid, (10.0, 25.0, 4.0), (-50, -50, -5, 50, 50, 3), 1
    )
    x = tables.x.reshape(grid)
    y = tables.y.reshape(grid)
    assert (
        x[:, 0, 0].tolist()
        == [round(2.5 + 10 * i) for i in range(10)]
        == [2, 12, 22, 32, 42, 52, 62, 72, 82, 92]
    )
    assert y[0, :, 0].tolist() == [0, 25, 50, 75]  # -50.25 + 50.25 ... rounds away from .25
    assert torch.equal(x[:, :, 0], x[:, :, 1])  # z does not move u here


def test_lookup_tables_reject_bad_matrix() -> None:
    with pytest.raises(HarnessError, match="lidar2img"):
        build_lookup_tables(
            torch.zeros(6, 3, 4), (16, 44), (4, 4, 2), (1, 1, 1), (-2, -2, -1, 2, 2, 1)
        )


# --------------------------------------------------------------------------- view transform


def test_view_transform_matches_loop_and_last_camera_wins() -> None:
    gen = torch.Generator().manual_seed(1)
    ncam, channels, height, width = 3, 5, 4, 6
    grid = (3, 2, 2)
    nvox = 12
    feat = torch.randn(ncam, channels, height, width, generator=gen)
    x = torch.randint(0, width, (ncam, nvox), generator=gen)
    y = torch.randint(0, height, (ncam, nvox), generator=gen)
    valid = (torch.rand(ncam, nvox, generator=gen) > 0.4).float()
    valid[:, 0] = 0.0  # voxel 0 seen by nobody
    valid[:, 1] = torch.tensor([1.0, 1.0, 0.0])  # cameras 0 and 1: camera 1 must win
    valid[:, 2] = 1.0
    x[:, 3] = -7  # an invalid entry holding an out-of-range index must not be read
    valid[:, 3] = torch.tensor([1.0, 0.0, 0.0])
    x[0, 3] = 2
    volume = view_transform(feat, x, y, valid, grid)
    assert volume.shape == (1, channels, *grid)
    flat = volume.reshape(channels, nvox)
    expected = torch.zeros(channels, nvox)
    for c in range(ncam):  # the CUDA kernel's order: later cameras overwrite
        for v in range(nvox):
            if valid[c, v] == 1.0:
                expected[:, v] = feat[c, :, y[c, v], x[c, v]]
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)
    assert torch.equal(flat[:, 0], torch.zeros(channels))
    assert torch.equal(flat[:, 1], feat[1, :, y[1, 1], x[1, 1]])
    assert torch.equal(flat[:, 2], feat[2, :, y[2, 2], x[2, 2]])


def test_view_transform_is_differentiable_and_checks_shapes() -> None:
    feat = torch.randn(2, 3, 4, 4, requires_grad=True)
    x = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    valid = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    volume = view_transform(feat, x, x, valid, (2, 2, 1))
    torch.autograd.backward(volume.sum())
    assert feat.grad is not None
    assert float(feat.grad.abs().sum()) == 3 * 3  # three voxels filled, three channels
    with pytest.raises(HarnessError, match="'y'"):
        view_transform(feat, x, x[:, :3], valid, (2, 2, 1))


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def ci_model() -> FastBEV:
    return fastbev_r18("ci")


def test_ci_profile_shapes(ci_model: FastBEV) -> None:
    cfg = ci_model.config
    assert cfg.image_hw == (64, 176) and cfg.feat_hw == (16, 44) and cfg.feat_stride == 4
    (image,) = FastBEVPre(ci_model).example_inputs()
    with torch.no_grad():
        feat = FastBEVPre(ci_model)(image)
        assert feat.shape == (6, cfg.fpn_channels, 16, 44)
        tables = ci_model.lookup_tables(ring_lidar2img(cfg.image_hw))
        volume = view_transform(feat, *tables, cfg.grid)
        assert volume.shape == (1, cfg.fpn_channels, 50, 50, 4)
        cls_score, bbox_pred, dirs = FastBEVPost(ci_model)(volume)
    assert (
        cls_score.shape == (cfg.topk, 10)
        and bbox_pred.shape == (cfg.topk, 9)
        and dirs.shape == (cfg.topk,)
    )
    assert dirs.dtype == torch.int64
    assert ci_model.anchors.shape == (25 * 25 * 8, 9)


def test_full_profile_is_the_seed() -> None:
    cfg = FastBEVConfig()
    assert cfg.image_hw == (256, 704) and cfg.feat_hw == (64, 176) and cfg.grid == (200, 200, 4)
    assert cfg.num_anchors == 80000 and cfg.topk == 1000 and cfg.neck3d_channels == 192


def test_pre_stage_export_matches_onnxruntime(ci_model: FastBEV, tmp_path: Path) -> None:
    stage = FastBEVPre(ci_model)
    inputs = stage.example_inputs()
    (got,) = export_and_run(
        stage, inputs, stage.input_names, stage.output_names, tmp_path / "pre.onnx"
    )
    assert not ci_model.training  # export must leave the model in eval mode
    with torch.no_grad():
        want = stage(*inputs)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_post_stage_export_matches_onnxruntime(tmp_path: Path) -> None:
    # k = all anchors, so both runtimes return the same set; rows are matched by box because
    # near-equal scores may come out in a different order.
    model = fastbev_r18("ci", topk=5000)
    torch.nn.init.normal_(model.bbox_head.conv_reg.weight, std=0.05)
    stage = FastBEVPost(model)
    inputs = stage.example_inputs()
    got = export_and_run(
        stage, inputs, stage.input_names, stage.output_names, tmp_path / "post.onnx"
    )
    with torch.no_grad():
        want = [t.numpy() for t in stage(*inputs)]
    assert [g.shape for g in got] == [w.shape for w in want] == [(5000, 10), (5000, 9), (5000,)]
    assert got[2].dtype == np.int64
    np.testing.assert_allclose(
        np.sort(got[0].max(axis=1)), np.sort(want[0].max(axis=1)), rtol=1e-5, atol=1e-6
    )
    dist, idx = cKDTree(want[1]).query(got[1])
    assert dist.max() < 1e-3
    assert len(set(idx.tolist())) == 5000
    np.testing.assert_allclose(got[0], want[0][idx], rtol=1e-4, atol=1e-5)
    assert (got[2] == want[2][idx]).mean() > 0.999  # direction argmax may flip on exact ties only


def test_post_stage_layout_matches_reference_loop() -> None:
    """Head maps are (Y, X) after the transpose; anchors follow ((y*X + x)*S + s)*R + r."""
    model = fastbev_r18("ci", grid=(50, 40, 4), topk=7)
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    neck_out = torch.randn(1, cfg.neck3d_channels, 25, 20, generator=gen)  # (X, Y)
    for conv in (model.bbox_head.conv_cls, model.bbox_head.conv_reg, model.bbox_head.conv_dir_cls):
        torch.nn.init.normal_(conv.weight, std=0.1, generator=gen)
    torch.set_grad_enabled(False)
    try:
        outputs = model.bbox_head(neck_out)
        cls_score, bbox_pred, dirs = model.select_and_decode(outputs)
        rows = _reference_rows(model, neck_out)
    finally:
        torch.set_grad_enabled(True)
    for i, (_, scores, anchor, deltas, direction) in enumerate(rows[:7]):
        torch.testing.assert_close(cls_score[i], scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bbox_pred[i], decode(anchor, deltas), rtol=1e-4, atol=1e-4)
        assert int(dirs[i]) == direction


def _reference_rows(
    model: FastBEV, neck_out: torch.Tensor
) -> list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    cfg = model.config
    head = model.bbox_head
    assert head.conv_cls.bias is not None and head.conv_reg.bias is not None
    assert head.conv_dir_cls.bias is not None
    num_sizes, num_rots = len(cfg.anchor_sizes), len(cfg.anchor_rotations)
    rows: list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
    for yi in range(20):
        for xi in range(25):
            feature = neck_out[0, :, xi, yi]
            for s in range(num_sizes):
                for r in range(num_rots):
                    a = s * num_rots + r
                    w_cls = head.conv_cls.weight[a * 10 : (a + 1) * 10, :, 0, 0]
                    logits = w_cls @ feature + head.conv_cls.bias[a * 10 : (a + 1) * 10]
                    w_reg = head.conv_reg.weight[a * 9 : (a + 1) * 9, :, 0, 0]
                    deltas = w_reg @ feature + head.conv_reg.bias[a * 9 : (a + 1) * 9]
                    w_dir = head.conv_dir_cls.weight[a * 2 : (a + 1) * 2, :, 0, 0]
                    dir_logits = w_dir @ feature + head.conv_dir_cls.bias[a * 2 : (a + 1) * 2]
                    anchor = torch.tensor(
                        [
                            -50 + (xi + 0.5) * 4,
                            -50 + (yi + 0.5) * 5,
                            cfg.anchor_z,
                            *cfg.anchor_sizes[s],
                            cfg.anchor_rotations[r],
                            0,
                            0,
                        ]
                    )
                    rows.append(
                        (
                            float(torch.sigmoid(logits).max()),
                            torch.sigmoid(logits),
                            anchor,
                            deltas,
                            int(dir_logits.argmax()),
                        )
                    )
    rows.sort(key=lambda row: -row[0])
    return rows


# --------------------------------------------------------------------------- coder


def random_boxes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.rand(n, 9, generator=gen, dtype=torch.float64)
    boxes[:, :2] = boxes[:, :2] * 100 - 50
    boxes[:, 2] = boxes[:, 2] * 4 - 3
    boxes[:, 3:6] = boxes[:, 3:6] * 10 + 0.2
    boxes[:, 6] = boxes[:, 6] * 6 * math.pi - 3 * math.pi
    boxes[:, 7:] = boxes[:, 7:] * 20 - 10
    return boxes


@pytest.mark.parametrize("seed", range(3))
def test_decode_inverts_encode(seed: int) -> None:
    anchors, boxes = random_boxes(500, seed), random_boxes(500, seed + 100)
    torch.testing.assert_close(decode(anchors, encode(anchors, boxes)), boxes, rtol=1e-9, atol=1e-9)
    deltas = encode(anchors, boxes)
    torch.testing.assert_close(
        encode(anchors, decode(anchors, deltas)), deltas, rtol=1e-9, atol=1e-9
    )


def test_decode_matches_seed_formulas() -> None:
    anchor = torch.tensor([1.0, 2.0, -1.8, 0.8660, 2.5981, 1.0, 1.57, 0.0, 0.0])
    deltas = torch.tensor(
        [0.1, -0.2, 0.3, math.log(2.0), math.log(0.5), math.log(1.5), 0.25, 1.0, -2.0]
    )
    diagonal = math.sqrt(0.8660**2 + 2.5981**2)
    # z: anchor centre -1.3, new centre -1.3 + 0.3 * 1.0 = -1.0, new height 1.5 -> bottom -1.75
    want = torch.tensor(
        [1 + 0.1 * diagonal, 2 - 0.2 * diagonal, -1.75, 1.732, 1.29905, 1.5, 1.82, 1.0, -2.0]
    )
    torch.testing.assert_close(decode(anchor, deltas), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- postprocess


def scores_for(label: int, score: float) -> np.ndarray:
    row = np.zeros(10)
    row[label] = score
    return row


def box(
    x: float,
    y: float,
    w: float = 2.0,
    length: float = 4.0,
    yaw: float = 0.0,
    z: float = -1.8,
    h: float = 1.5,
) -> list[float]:
    return [x, y, z, w, length, h, yaw, 0.5, -0.5]


def test_bev_iou_known_values() -> None:
    unit = np.array([0.0, 0.0, 1.0, 1.0, 0.0])
    others = np.array(
        [
            [0.0, 0.0, 1.0, 1.0, 0.0],
            [0.0, 0.0, 1.0, 1.0, math.pi / 2],
            [0.5, 0.0, 1.0, 1.0, 0.0],
            [0.0, 0.0, 1.0, 1.0, math.pi / 4],
            [3.0, 0.0, 1.0, 1.0, 0.3],
            [0.0, 0.0, 2.0, 2.0, 0.0],
        ]
    )
    octagon = 2 * (math.sqrt(2) - 1)
    want = [1.0, 1.0, 1 / 3, octagon / (2 - octagon), 0.0, 0.25]
    np.testing.assert_allclose(bev_iou(unit, others), want, atol=1e-9)


def test_bev_iou_against_point_sampling() -> None:
    rng = np.random.default_rng(5)
    boxes = np.column_stack(
        (
            rng.uniform(-1, 1, 15),
            rng.uniform(-1, 1, 15),
            rng.uniform(0.5, 2, 15),
            rng.uniform(0.5, 3, 15),
            rng.uniform(-4, 4, 15),
        )
    )
    ref = np.array([0.2, -0.1, 1.2, 2.5, 0.7])
    grid = np.stack(np.meshgrid(np.linspace(-4, 4, 801), np.linspace(-4, 4, 801)), -1).reshape(
        -1, 2
    )

    def inside(b: np.ndarray) -> np.ndarray:
        rel = grid - b[:2]
        along = rel @ np.array([math.cos(b[4]), math.sin(b[4])])
        across = rel @ np.array([-math.sin(b[4]), math.cos(b[4])])
        mask: np.ndarray = (np.abs(along) <= b[3] / 2) & (np.abs(across) <= b[2] / 2)
        return mask

    ref_in = inside(ref)
    sampled = [np.sum(ref_in & inside(b)) / np.sum(ref_in | inside(b)) for b in boxes]
    np.testing.assert_allclose(bev_iou(ref, boxes), sampled, atol=0.01)


def test_nms_suppresses_overlaps_within_a_class_only() -> None:
    scores = np.stack(
        [scores_for(0, 0.9), scores_for(0, 0.8), scores_for(0, 0.7), scores_for(1, 0.6)]
    )
    boxes = np.array([box(0, 0), box(0.3, 0.1), box(20, 0), box(0, 0)])
    dets = postprocess(scores, boxes, np.zeros(4, np.int64))
    assert [CLASSES[i] for i in dets.label] == ["car", "car", "truck"]
    np.testing.assert_allclose(dets.score, [0.9, 0.7, 0.6])
    np.testing.assert_allclose(dets.center[:, 0], [0, 20, 0])


def test_nms_rescale_factor_and_circle() -> None:
    ped, barrier = CLASSES.index("pedestrian"), CLASSES.index("barrier")
    scores = np.stack(
        [
            scores_for(ped, 0.9),
            scores_for(ped, 0.8),
            scores_for(barrier, 0.9),
            scores_for(barrier, 0.8),
            scores_for(barrier, 0.7),
        ]
    )
    boxes = np.array(
        [
            box(0, 0, 0.6, 0.6),
            box(0.7, 0, 0.6, 0.6),  # disjoint, but 4.5x rescaled boxes overlap with IoU 0.59 >= 0.5
            box(10, 0, 0.5, 2.0),
            box(
                10.9, 0.3, 0.5, 2.0
            ),  # 0.95 m away: within the 1 m circle (squared distance 0.9 <= 1)
            box(11.1, 0.3, 0.5, 2.0),  # 1.14 m from the first barrier: kept
        ]
    )
    dets = postprocess(scores, boxes, np.zeros(5, np.int64))
    assert sorted(zip(dets.label.tolist(), dets.score.tolist(), strict=True)) == [
        (ped, 0.9),
        (barrier, 0.7),
        (barrier, 0.9),
    ]
    no_rescale = NMSConfig(nms_rescale_factor=(1.0,) * 10)
    assert len(postprocess(scores, boxes, np.zeros(5, np.int64), no_rescale)) == 4


def test_postprocess_threshold_max_num_direction_and_centre() -> None:
    n = 30
    scores = np.stack([scores_for(0, 0.5 + i / 100) for i in range(n)])
    scores[0, 0] = 0.05  # exactly at the threshold: dropped
    boxes = np.array([box(5.0 * i, 0, yaw=0.1) for i in range(n)])
    dirs = np.arange(n) % 2
    dets = postprocess(scores, boxes, dirs, NMSConfig(max_num=10))
    assert len(dets) == 10
    np.testing.assert_allclose(dets.score, sorted(scores[:, 0], reverse=True)[:10])
    np.testing.assert_allclose(dets.center[:, 2], -1.8 + 0.75)  # bottom -> centre
    # The seed's fix: limit_period(0.1 - 0.7854, 0, pi) + 0.7854 + pi * dir = 0.1 + pi * (1 + dir)
    expected_yaw = np.where(dirs[n - 10 :][::-1] == 1, 0.1 + 2 * math.pi, 0.1 + math.pi)
    np.testing.assert_allclose(dets.yaw, expected_yaw)
    np.testing.assert_allclose(dets.velocity, [[0.5, -0.5]] * 10)
    assert len(postprocess(scores, boxes, dirs, NMSConfig(score_thr=0.99))) == 0
    first = dets.to_boxes()[0]
    assert first["label"] == "car" and first["attribute"] == "" and len(first["center"]) == 3


@pytest.mark.parametrize("seed", range(3))
def test_direction_class_recovers_heading(seed: int) -> None:
    rng = np.random.default_rng(seed)
    yaw = rng.uniform(-3 * math.pi, 3 * math.pi, 50)
    regressed = yaw + math.pi * rng.integers(-2, 3, 50)  # the sin-difference loss leaves yaw mod pi
    dirs = direction_target(torch.tensor(yaw)).numpy()
    scores = np.stack([scores_for(0, 0.9)] * 50)
    boxes = np.array([box(10.0 * i, 0, yaw=float(r)) for i, r in enumerate(regressed)])
    dets = postprocess(scores, boxes, dirs, NMSConfig(max_num=500))
    order = np.argsort(dets.center[:, 0])
    diff = np.angle(np.exp(1j * (dets.yaw[order] - yaw)))
    np.testing.assert_allclose(diff, 0.0, atol=1e-9)


def test_nms_config_validates() -> None:
    with pytest.raises(HarnessError, match="differ in length"):
        NMSConfig(nms_thr=(0.2,) * 9)
    with pytest.raises(HarnessError, match="nms_type 'square'"):
        NMSConfig(nms_type=("square",) * 10)
    with pytest.raises(HarnessError, match="nms_thr must be positive"):
        NMSConfig(nms_thr=(0.0,) * 10)


def test_postprocess_rejects_bad_shapes() -> None:
    with pytest.raises(HarnessError, match="postprocess"):
        postprocess(np.zeros((4, 10)), np.zeros((4, 7)), np.zeros(4))


# --------------------------------------------------------------------------- training


def random_gt(seed: int, count: int = 6) -> GTBoxes:
    gen = torch.Generator().manual_seed(seed)
    center = torch.rand(count, 3, generator=gen) * torch.tensor([60.0, 60.0, 1.0]) - torch.tensor(
        [30.0, 30.0, 1.5]
    )
    size = torch.rand(count, 3, generator=gen) * torch.tensor([1.5, 3.0, 1.0]) + torch.tensor(
        [0.5, 1.0, 0.8]
    )
    return GTBoxes(
        center=center,
        size=size,
        yaw=torch.rand(count, generator=gen) * 2 * math.pi - math.pi,
        velocity=torch.randn(count, 2, generator=gen),
        labels=torch.randint(0, 10, (count,), generator=gen),
    )


def test_gt_boxes_from_records() -> None:
    @dataclass(frozen=True)
    class Record:
        label: str
        center: tuple[float, float, float]
        size: tuple[float, float, float]
        yaw: float
        velocity: tuple[float, float]

    gt = GTBoxes.from_boxes(
        [
            Record("bus", (1, 2, -0.5), (2.5, 11, 3), 0.5, (1, 0)),
            Record("barrier", (3, 4, -1), (2, 0.5, 1), 0, (0, 0)),
        ]
    )
    assert gt.labels.tolist() == [2, 9]
    torch.testing.assert_close(gt.to_tensor()[0], torch.tensor([1, 2, -2.0, 2.5, 11, 3, 0.5, 1, 0]))
    empty = GTBoxes.from_boxes([])
    assert empty.labels.shape == (0,) and empty.center.shape == (0, 3)
    with pytest.raises(HarnessError, match="'tram'"):
        GTBoxes.from_boxes([Record("tram", (0, 0, 0), (1, 1, 1), 0, (0, 0))])


def test_gt_boxes_validate() -> None:
    gt = random_gt(0)
    with pytest.raises(HarnessError, match=r"GTBoxes\.yaw"):
        GTBoxes(gt.center, gt.size, gt.yaw[:2], gt.velocity, gt.labels)
    with pytest.raises(HarnessError, match="positive"):
        GTBoxes(gt.center, -gt.size, gt.yaw, gt.velocity, gt.labels)


def test_loss_finite_and_decreasing() -> None:
    torch.manual_seed(0)
    model = fastbev_r18("ci").train()
    cfg = model.config
    images = torch.randn(2, 6, 3, *cfg.image_hw)
    lidar2img = ring_lidar2img(cfg.image_hw).expand(2, 6, 4, 4)
    gts = [random_gt(1), random_gt(2, count=0)]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(4):
        outputs = model(images, lidar2img)
        assert isinstance(outputs, HeadOutputs) and outputs.cls_score.shape[0] == 2
        losses = model.loss(outputs, gts)
        assert all(torch.isfinite(v) for v in losses.values())
        assert float(losses["loss_bbox"].detach()) > 0 and float(losses["loss_dir"].detach()) > 0
        optimizer.zero_grad()
        torch.autograd.backward(losses["loss"])
        assert model.backbone.conv1.weight.grad is not None
        assert float(model.backbone.conv1.weight.grad.abs().sum()) > 0  # through the gather
        optimizer.step()
        history.append(float(losses["loss"].detach()))
    assert history[-1] < 0.9 * history[0], history


def test_loss_assigns_each_gt_an_anchor() -> None:
    model = fastbev_r18("ci")
    gt = random_gt(4, count=5)
    assigned = assign_anchors(model.anchors, gt.to_tensor(), LossConfig())
    assert set(assigned[assigned >= 0].tolist()) == set(range(5))
    with pytest.raises(HarnessError, match="GT samples"):
        model.loss(
            HeadOutputs(
                torch.zeros(2, 80, 25, 25), torch.zeros(2, 72, 25, 25), torch.zeros(2, 16, 25, 25)
            ),
            [gt],
        )


# --------------------------------------------------------------------------- factory


def test_factory_profiles_overrides_and_seed() -> None:
    a = fastbev_r18("ci", seed=3)
    b = fastbev_r18("ci", seed=3)
    assert not a.training
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = fastbev_r18("ci", grid=[40, 40, 2], voxel_size=[2.5, 2.5, 4.0], topk=10)
    assert c.config.grid == (40, 40, 2) and c.config.num_anchors == 20 * 20 * 8
    with pytest.raises(HarnessError, match="unknown profile"):
        fastbev_r18("tiny")
    with pytest.raises(HarnessError, match="unknown argument"):
        fastbev_r18("ci", grids=(1, 1, 1))
    with pytest.raises(HarnessError, match="topk"):
        fastbev_r18("ci", topk=0)


def test_predict_returns_detections() -> None:
    model = fastbev_r18("ci", topk=100)
    cfg = model.config
    images = torch.randn(6, 3, *cfg.image_hw)
    (dets,) = model.predict(images, ring_lidar2img(cfg.image_hw), NMSConfig(score_thr=0.0))
    assert 0 < len(dets) <= 500
    assert np.isfinite(dets.center).all() and (dets.size > 0).all()


def _greedy_nms(bev: np.ndarray, scores: np.ndarray, kind: str, threshold: float) -> list[int]:
    """The textbook greedy NMS, one box against the rest at a time (reference for `_nms`)."""
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for k, i in enumerate(order):
        if suppressed[k]:
            continue
        keep.append(int(i))
        rest = order[k + 1:]
        if kind == "circle":
            close = (bev[rest, 0] - bev[i, 0]) ** 2 + (bev[rest, 1] - bev[i, 1]) ** 2 <= threshold
        else:
            close = bev_iou(bev[i], bev[rest]) >= threshold
        suppressed[k + 1:] |= close
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_vectorised_nms_equals_greedy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    bev = np.column_stack([rng.uniform(-10, 10, n), rng.uniform(-10, 10, n), rng.uniform(0.3, 4, n),
                           rng.uniform(0.3, 10, n), rng.uniform(-3.2, 3.2, n)])
    bev[n // 2:] = bev[: n - n // 2] + rng.normal(0, 0.2, (n - n // 2, 5))
    bev[:, 2:4] = np.abs(bev[:, 2:4]) + 0.1
    scores = rng.random(n).round(2)
    for kind, threshold in (("rotate", 0.2), ("rotate", 0.5), ("circle", 2.0)):
        assert fastbev._nms(bev, scores, kind, threshold).tolist() == _greedy_nms(bev, scores, kind, threshold)
