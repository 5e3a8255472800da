"""FastBEV-R18 camera BEV detector, split into CUDA-FastBEV's deployment stages.

Stages (as CUDA-FastBEV's `ptq/export_onnx.py` splits the model):

- `FastBEVPre`: `image` [Ncam, 3, H, W] (normalised) -> ResNet18 -> FPN (4 levels) -> the 4 levels
  resized to stride 4, concatenated and fused by `neck_fuse` -> `mlvl_feat` [Ncam, C, H/4, W/4].
- view transform (PyTorch, between the graphs): `build_lookup_tables` projects every voxel into
  every camera's feature map once per calibration; `view_transform` gathers the features into
  `mlvl_volume` [1, C, X, Y, Z]. A voxel takes the feature of the *last* camera that sees it.
- `FastBEVPost` (the seed's post graph): `mlvl_volume` -> `neck_3d` (M2BEV neck, Z folded into
  channels) -> anchor head -> sigmoid -> top-k anchors by max class score -> decoded boxes:
  `cls_score` [K, 10], `bbox_pred` [K, 9], `dir_cls_preds` [K] (int64 from ArgMax; CUDA-FastBEV's
  C++ binds it as int32).
- `postprocess` (numpy, CPU): per-class scale-NMS as CUDA-FastBEV's `postprecess.cpp` -> boxes.

In the harness (`FastBEV.run_stages`, stages `pre` and `post`) the exported post graph is
`FastBEVPostDense` instead: it stops before the top-k and returns the dense per-anchor rows
`anchor_scores` [A, 10] (sigmoid), `anchor_deltas` [A, 9] (raw box deltas) and
`anchor_dir_logits` [A, 2], rows in the order of `anchors`. Top-k, the anchor gather, the seed's
9-dim decode and the direction ArgMax run in the PyTorch glue after the stage and give exactly
the seed graph's three outputs. The reason is the golden compare: near-equal scores swap places
in a top-k from one backend to the next (fp32 vs int8, ONNX Runtime vs PyTorch), so top-k rows
cannot be compared element by element, while the dense maps can. The view transform reads the
lookup tables the model holds (`set_lookup_tables`; the factory loads them from `tables_dir` or
computes them for the synthetic camera rig); `golden_files` hands them to `--update-golden`,
which writes them as `x.tensor`, `y.tensor`, `valid_c_idx.tensor` and `anchors.tensor` in
CUDA-FastBEV's example-data layout.

Box conventions (all in the lidar/ego frame, metres, radians):

- A box is (x, y, z, w, l, h, yaw, vx, vy) with `l` along the heading `yaw` (counter-clockwise from
  +x) and `w` across it, as the nuScenes devkit's (w, l, h) sizes.
- Anchors, regression targets and the post graph's `bbox_pred` use the box *bottom* z (as
  mmdet3d's anchor coder does); `GTBoxes` and `Detections` use the box centre z (devkit).
- Class labels are indices into `CLASSES`, the nuScenes devkit detection order. The per-class NMS
  parameters of the seed (given there in mmdet3d's class order) are reordered accordingly.

Voxel positions follow FastBEV exactly (so the lookup tables diff against CUDA-FastBEV's
`x/y/valid_c_idx.tensor`): with `origin` the centre of `point_cloud_range`, voxel `(ix, iy, iz)`
sits at `origin + (i - n/2) * voxel_size` per axis, flat index `ix*Ny*Nz + iy*Nz + iz`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from harness import tensorfile
from harness.datasets.scene3d import CLASSES
from harness.datasets.scenes import camera_rig
from harness.errors import HarnessError, TensorFileError
from harness.program import StageCall
from harness.tasks.detection3d import IMAGE_MEAN, IMAGE_STD, OUTPUT_NAMES, Detections
from harness.zoo.layers import ConvModule, init_kaiming
from harness.zoo.ops import Add, Concat
from harness.zoo.resnet import ResNet

__all__ = [
    "CLASSES",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "TABLE_NAMES",
    "AnchorHead",
    "AnchorRowDecoder",
    "Detections",
    "FastBEV",
    "FastBEVConfig",
    "FastBEVPost",
    "FastBEVPostDense",
    "FastBEVPre",
    "GTBoxes",
    "HeadOutputs",
    "LookupTables",
    "LossConfig",
    "LossTargets",
    "M2BevNeck",
    "NMSConfig",
    "assign_anchors",
    "bev_iou",
    "build_lookup_tables",
    "check_lookup_tables",
    "decode",
    "direction_target",
    "encode",
    "fastbev_r18",
    "grid_anchors",
    "limit_period",
    "load_lookup_tables",
    "loss_targets",
    "nms_config",
    "normalize_images",
    "postprocess",
    "rig_lookup_tables",
    "view_transform",
    "voxel_points",
]


"""RGB normalisation of FastBEV's `img_norm_cfg`; the pre stage takes normalised images."""

BOX_CODE_SIZE = 9


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FastBEVConfig:
    """Sizes and widths of a FastBEV model; the defaults are the seed's full profile."""

    image_hw: tuple[int, int] = (256, 704)
    num_cams: int = 6
    grid: tuple[int, int, int] = (200, 200, 4)
    voxel_size: tuple[float, float, float] = (0.5, 0.5, 1.5)
    point_cloud_range: tuple[float, float, float, float, float, float] = (
        -50.0,
        -50.0,
        -5.0,
        50.0,
        50.0,
        3.0,
    )
    base_channels: int = 64
    fpn_channels: int = 64
    neck3d_channels: int = 192
    neck3d_layers: int = 2
    num_classes: int = 10
    anchor_sizes: tuple[tuple[float, float, float], ...] = (
        (0.8660, 2.5981, 1.0),
        (0.5774, 1.7321, 1.0),
        (1.0, 1.0, 1.0),
        (0.4, 0.4, 1.0),
    )
    anchor_rotations: tuple[float, ...] = (0.0, 1.57)
    anchor_z: float = -1.8
    topk: int = 1000

    def __post_init__(self) -> None:
        checks = {
            "image_hw": len(self.image_hw) == 2 and min(self.image_hw) >= 32,
            "num_cams": self.num_cams >= 1,
            "grid": len(self.grid) == 3 and min(self.grid) >= 1,
            "voxel_size": len(self.voxel_size) == 3 and min(self.voxel_size) > 0,
            "point_cloud_range": len(self.point_cloud_range) == 6
            and all(self.point_cloud_range[i] < self.point_cloud_range[i + 3] for i in range(3)),
            "base_channels": self.base_channels >= 1,
            "fpn_channels": self.fpn_channels >= 1,
            "neck3d_channels": self.neck3d_channels >= 1,
            "neck3d_layers": self.neck3d_layers >= 0,
            "num_classes": self.num_classes >= 1,
            "anchor_sizes": len(self.anchor_sizes) >= 1
            and all(len(s) == 3 and min(s) > 0 for s in self.anchor_sizes),
            "anchor_rotations": len(self.anchor_rotations) >= 1,
            "topk": self.topk >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise HarnessError(f"FastBEVConfig: invalid {values}")

    @property
    def feat_hw(self) -> tuple[int, int]:
        """Size of `mlvl_feat` (stride 4 of the ResNet stem, rounded up as the convs do)."""
        return (math.ceil(self.image_hw[0] / 4), math.ceil(self.image_hw[1] / 4))

    @property
    def feat_stride(self) -> int:
        """The seed's projection stride: `ceil(image width / feature width)`."""
        return math.ceil(self.image_hw[1] / self.feat_hw[1])

    @property
    def head_xy(self) -> tuple[int, int]:
        """BEV size (X, Y) of the head features: the grid after the neck's stride-2 conv."""
        return (math.ceil(self.grid[0] / 2), math.ceil(self.grid[1] / 2))

    @property
    def num_anchors_per_cell(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_rotations)

    @property
    def num_anchors(self) -> int:
        x, y = self.head_xy
        return x * y * self.num_anchors_per_cell

    @property
    def volume_channels(self) -> int:
        """Channels of `mlvl_feat` and `mlvl_volume`."""
        return self.fpn_channels


_PROFILES: dict[str, FastBEVConfig] = {
    "full": FastBEVConfig(),
    "ci": FastBEVConfig(
        image_hw=(64, 176),
        grid=(50, 50, 4),
        voxel_size=(2.0, 2.0, 1.5),
        base_channels=16,
        fpn_channels=16,
        neck3d_channels=32,
        neck3d_layers=1,
        topk=500,
    ),
}


@dataclass(frozen=True)
class NMSConfig:
    """CPU scale-NMS of CUDA-FastBEV's postprocess; per-class lists in `CLASSES` order.

    `nms_type` 'rotate' suppresses by rotated BEV IoU >= `nms_thr`; 'circle' by squared centre
    distance <= `nms_radius_thr` (the seed compares the squared distance). BEV width and length
    are multiplied by `nms_rescale_factor` before NMS only. The seed's C++ uses `score_thr` 0.5;
    the default here is its Python test config's 0.05, which its mAP figures were measured with.
    """

    score_thr: float = 0.05
    max_num: int = 500
    dir_offset: float = 0.7854
    dir_limit_offset: float = 0.0
    nms_type: tuple[str, ...] = ("rotate",) * 9 + ("circle",)
    nms_thr: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2, 0.5, 0.2, 0.2, 0.5, 0.2)
    nms_radius_thr: tuple[float, ...] = (4.0, 12.0, 10.0, 10.0, 12.0, 0.175, 0.85, 0.85, 0.175, 1.0)
    nms_rescale_factor: tuple[float, ...] = (1.0, 0.7, 0.4, 0.55, 0.7, 4.5, 1.0, 1.0, 9.0, 1.0)

    def __post_init__(self) -> None:
        lists = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("nms_")}
        lengths = {len(v) for v in lists.values()}
        if len(lengths) != 1:
            raise HarnessError(
                f"NMSConfig: per-class lists differ in length: { {k: len(v) for k, v in lists.items()} }"
            )
        bad = [t for t in self.nms_type if t not in ("rotate", "circle")]
        if bad:
            raise HarnessError(f"NMSConfig: nms_type {bad[0]!r} is not 'rotate' or 'circle'")
        for name in ("nms_thr", "nms_radius_thr", "nms_rescale_factor"):
            if min(getattr(self, name)) <= 0:
                raise HarnessError(
                    f"NMSConfig: every {name} must be positive, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class LossConfig:
    """Anchor assignment and loss weights (the seed's mmdet3d train config where it has one)."""

    pos_iou_thr: float = 0.6
    neg_iou_thr: float = 0.3
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 1.0 / 9.0
    code_weight: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    cls_weight: float = 1.0
    bbox_weight: float = 0.8
    dir_weight: float = 0.8
    dir_offset: float = 0.7854


# --------------------------------------------------------------------------- geometry


def limit_period(val: torch.Tensor, offset: float = 0.5, period: float = math.pi) -> torch.Tensor:
    """`val - floor(val / period + offset) * period`: maps into [-offset*period, (1-offset)*period)."""
    return val - torch.floor(val / period + offset) * period


def voxel_points(
    grid: Sequence[int], voxel_size: Sequence[float], point_cloud_range: Sequence[float]
) -> torch.Tensor:
    """Voxel positions [X*Y*Z, 3] (float64) in flat order `ix*Y*Z + iy*Z + iz` (FastBEV's grid)."""
    nx, ny, nz = (int(g) for g in grid)
    origin = [(point_cloud_range[i] + point_cloud_range[i + 3]) / 2.0 for i in range(3)]
    axes = [
        torch.tensor(origin[i], dtype=torch.float64)
        + (torch.arange(n, dtype=torch.float64) - n / 2.0) * float(voxel_size[i])
        for i, n in enumerate((nx, ny, nz))
    ]
    gx, gy, gz = torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij")
    return torch.stack((gx, gy, gz), dim=-1).reshape(-1, 3)


class LookupTables(NamedTuple):
    """View-transform tables in CUDA-FastBEV's example-data layout, one row per camera."""

    x: torch.Tensor
    """int64 [Ncam, V]: `round(u/d)` in feature pixels (also for invalid voxels)."""
    y: torch.Tensor
    """int64 [Ncam, V]: `round(v/d)`."""
    valid_c_idx: torch.Tensor
    """float32 [Ncam, V]: 1.0 where `x>=0, y>=0, x<W, y<H, d>0`, else 0.0."""


_INT_LIMIT = float(2**31)


def build_lookup_tables(
    lidar2img: torch.Tensor,
    feat_hw: Sequence[int],
    grid: Sequence[int],
    voxel_size: Sequence[float],
    point_cloud_range: Sequence[float],
    stride: float = 4.0,
) -> LookupTables:
    """Project every voxel into every camera's feature map (FastBEV's nearest-pixel rule).

    `lidar2img` [Ncam, 4, 4] maps lidar points to image pixels; rows 0 and 1 are divided by
    `stride` to address the feature map. `(u, v, d) = P @ (p, 1)`, `x = round(u/d)`,
    `y = round(v/d)` (round half to even, as `torch.round`), computed in float64. Where `d` is 0
    or the quotient is huge, x/y are clamped to +-2**31 (such voxels are never valid).
    """
    if lidar2img.dim() != 3 or tuple(lidar2img.shape[1:]) != (4, 4):
        raise HarnessError(
            f"build_lookup_tables: lidar2img must be [Ncam, 4, 4], got {tuple(lidar2img.shape)}"
        )
    height, width = (int(v) for v in feat_hw)
    proj = lidar2img[:, :3, :].to(torch.float64).clone()
    proj[:, :2] /= float(stride)
    points = voxel_points(grid, voxel_size, point_cloud_range).to(proj.device)
    homo = torch.cat((points, torch.ones_like(points[:, :1])), dim=1)  # [V, 4]
    uvd = torch.einsum("cij,vj->civ", proj, homo)  # [Ncam, 3, V]
    depth = uvd[:, 2]
    coords = []
    for row in (uvd[:, 0], uvd[:, 1]):
        q = torch.round(row / depth)
        q = torch.nan_to_num(q, nan=-_INT_LIMIT, posinf=_INT_LIMIT, neginf=-_INT_LIMIT)
        coords.append(q.clamp(-_INT_LIMIT, _INT_LIMIT).to(torch.int64))
    x, y = coords
    valid = (x >= 0) & (y >= 0) & (x < width) & (y < height) & (depth > 0)
    return LookupTables(x, y, valid.to(torch.float32))


def view_transform(
    mlvl_feat: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    valid_c_idx: torch.Tensor,
    grid: Sequence[int],
) -> torch.Tensor:
    """Gather `mlvl_feat` [Ncam, C, H, W] into the volume [1, C, X, Y, Z] by the lookup tables.

    As CUDA-FastBEV's `vtransform.cu`: the volume starts at zero, cameras are visited in order and
    a voxel whose `valid_c_idx == 1.0` takes that camera's feature at (y, x), so the last valid
    camera wins. Differentiable with respect to `mlvl_feat`.
    """
    ncam, channels, height, width = mlvl_feat.shape
    nvox = int(np.prod([int(g) for g in grid]))
    for name, table in (("x", x), ("y", y), ("valid_c_idx", valid_c_idx)):
        if tuple(table.shape) != (ncam, nvox):
            raise HarnessError(
                f"view_transform: lookup table '{name}' has shape {tuple(table.shape)}, "
                f"expected [{ncam}, {nvox}] for {ncam} cameras and grid {tuple(grid)}"
            )
    device = mlvl_feat.device
    seen = valid_c_idx.to(device) == 1.0  # [Ncam, V]
    order = torch.arange(1, ncam + 1, device=device).unsqueeze(1)
    last = (seen * order).amax(dim=0)  # 1-based camera index of the last valid camera, 0 if none
    hit = last > 0
    cam = (last - 1).clamp(min=0)
    xs = x.to(device).gather(0, cam.unsqueeze(0)).squeeze(0)
    ys = y.to(device).gather(0, cam.unsqueeze(0)).squeeze(0)
    flat_index = torch.where(hit, cam * (height * width) + ys * width + xs, torch.zeros_like(cam))
    flat = mlvl_feat.permute(1, 0, 2, 3).reshape(channels, ncam * height * width)
    volume = flat.index_select(1, flat_index)
    volume = torch.where(
        hit.unsqueeze(0), volume, torch.zeros((), dtype=volume.dtype, device=device)
    )
    return volume.reshape(1, channels, *(int(g) for g in grid))


def grid_anchors(
    head_xy: Sequence[int],
    xy_range: Sequence[float],
    z: float,
    sizes: Sequence[Sequence[float]],
    rotations: Sequence[float],
) -> torch.Tensor:
    """Anchors [Y*X*S*R, 9] in the head's flattening order ((y*X + x)*S + s)*R + r.

    Centres at cell centres of `xy_range` (x0, y0, x1, y1) split into `head_xy` (X, Y) cells, as
    mmdet3d's `AlignedAnchor3DRangeGenerator`; `z` is the anchor bottom; velocity 0.
    """
    nx, ny = (int(v) for v in head_xy)
    x0, y0, x1, y1 = (float(v) for v in xy_range)
    xs = x0 + (torch.arange(nx, dtype=torch.float64) + 0.5) * (x1 - x0) / nx
    ys = y0 + (torch.arange(ny, dtype=torch.float64) + 0.5) * (y1 - y0) / ny
    size_t = torch.tensor(sizes, dtype=torch.float64)  # [S, 3]
    rot_t = torch.tensor(rotations, dtype=torch.float64)  # [R]
    ns, nr = size_t.shape[0], rot_t.shape[0]
    shape = (ny, nx, ns, nr)
    out = torch.zeros((*shape, BOX_CODE_SIZE), dtype=torch.float64)
    out[..., 0] = xs.view(1, nx, 1, 1).expand(shape)
    out[..., 1] = ys.view(ny, 1, 1, 1).expand(shape)
    out[..., 2] = z
    out[..., 3:6] = size_t.view(1, 1, ns, 1, 3).expand(*shape, 3)
    out[..., 6] = rot_t.view(1, 1, 1, nr).expand(shape)
    return out.reshape(-1, BOX_CODE_SIZE).to(torch.float32)


def decode(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """The seed's 9-dim box decode (mmdet3d `DeltaXYZWLHRBBoxCoder`), bottom-z boxes.

    Centres move by deltas scaled by the anchor's BEV diagonal (x, y) and height (z, between
    box centres), sizes scale by `exp`, yaw and velocity add.
    """
    xa, ya, za, wa, la, ha, ra, vxa, vya = anchors.unbind(-1)
    xt, yt, zt, wt, lt, ht, rt, vxt, vyt = deltas.unbind(-1)
    diagonal = torch.sqrt(la * la + wa * wa)
    hg = torch.exp(ht) * ha
    zg = zt * ha + (za + ha / 2) - hg / 2
    return torch.stack(
        (
            xt * diagonal + xa,
            yt * diagonal + ya,
            zg,
            torch.exp(wt) * wa,
            torch.exp(lt) * la,
            hg,
            rt + ra,
            vxt + vxa,
            vyt + vya,
        ),
        dim=-1,
    )


def encode(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Regression targets of bottom-z `boxes` [N, 9] against `anchors` [N, 9]: `decode`'s inverse."""
    xa, ya, za, wa, la, ha, ra, vxa, vya = anchors.unbind(-1)
    xg, yg, zg, wg, lg, hg, rg, vxg, vyg = boxes.unbind(-1)
    diagonal = torch.sqrt(la * la + wa * wa)
    return torch.stack(
        (
            (xg - xa) / diagonal,
            (yg - ya) / diagonal,
            ((zg + hg / 2) - (za + ha / 2)) / ha,
            torch.log(wg / wa),
            torch.log(lg / la),
            torch.log(hg / ha),
            rg - ra,
            vxg - vxa,
            vyg - vya,
        ),
        dim=-1,
    )


def direction_target(yaw: torch.Tensor, dir_offset: float = 0.7854) -> torch.Tensor:
    """Direction class 0/1: whether `yaw - dir_offset` lies in [0, pi) or [pi, 2*pi) (mod 2*pi)."""
    rot = limit_period(yaw - dir_offset, 0.0, 2 * math.pi)
    return torch.floor(rot / math.pi).clamp(0, 1).to(torch.int64)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """RGB images [..., 3, H, W] in 0..255 -> FastBEV's normalised float input."""
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.to(torch.float32) - mean) / std


# --------------------------------------------------------------------------- network


class FPN(nn.Module):
    """mmdet FPN: BN'd 1x1 laterals, nearest top-down additions (`adds`), BN'd 3x3 outputs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, act=False) for c in in_channels
        )
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, act=False) for _ in in_channels
        )
        self.adds = nn.ModuleList(Add() for _ in range(len(in_channels) - 1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
            laterals[i - 1] = self.adds[i - 1](laterals[i - 1], up)
        return tuple(conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True))


class ResModule2D(nn.Module):
    """M2BEV residual block: `activation(add(conv1(conv0(x)), x))` with 3x3 ConvModules."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = ConvModule(channels, channels, 3, padding=1)
        self.conv1 = ConvModule(channels, channels, 3, padding=1, act=False)
        self.add = Add()
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.activation(self.add(self.conv1(self.conv0(x)), x))
        return out


class M2BevNeck(nn.Module):
    """M2BEV 3D neck: fold Z into channels (`z*C + c`), 1x1 `fuse`, residual convs, stride 2."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        layers: list[nn.Module] = [
            ResModule2D(in_channels),
            ConvModule(in_channels, out_channels, 3, stride=2, padding=1),
        ]
        for _ in range(num_layers):
            layers += [
                ResModule2D(out_channels),
                ConvModule(out_channels, out_channels, 3, padding=1),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        n, c, x, y, z = volume.shape
        folded = volume.permute(0, 4, 1, 2, 3).reshape(n, z * c, x, y)
        out: torch.Tensor = self.model(self.fuse(folded))
        return out


class HeadOutputs(NamedTuple):
    """Raw anchor-head maps, BEV axes (Y, X) as mmdet3d's Anchor3DHead."""

    cls_score: torch.Tensor
    """[B, A*num_classes, Y, X] logits."""
    bbox_pred: torch.Tensor
    """[B, A*9, Y, X] deltas."""
    dir_cls_preds: torch.Tensor
    """[B, A*2, Y, X] direction logits."""


class AnchorHead(nn.Module):
    """1x1 convs for class logits, box deltas and direction logits per anchor (FreeAnchor3DHead)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.conv_cls = nn.Conv2d(in_channels, num_anchors * num_classes, 1)
        self.conv_reg = nn.Conv2d(in_channels, num_anchors * BOX_CODE_SIZE, 1)
        self.conv_dir_cls = nn.Conv2d(in_channels, num_anchors * 2, 1)
        prior = 0.01  # initial class probability, so the focal loss starts near its optimum
        for conv, bias in (
            (self.conv_cls, -math.log((1 - prior) / prior)),
            (self.conv_reg, 0.0),
            (self.conv_dir_cls, 0.0),
        ):
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, bias)

    def forward(self, x: torch.Tensor) -> HeadOutputs:
        x = x.transpose(-1, -2)  # (X, Y) -> (Y, X), the anchors' order
        return HeadOutputs(self.conv_cls(x), self.conv_reg(x), self.conv_dir_cls(x))


@dataclass(frozen=True)
class GTBoxes:
    """Ground-truth boxes of one sample: centre z, sizes (w, l, h), labels index `CLASSES`."""

    center: torch.Tensor
    """float [M, 3]"""
    size: torch.Tensor
    """float [M, 3]"""
    yaw: torch.Tensor
    """float [M]"""
    velocity: torch.Tensor
    """float [M, 2]"""
    labels: torch.Tensor
    """int64 [M]"""

    def __post_init__(self) -> None:
        m = self.labels.shape[0] if self.labels.dim() == 1 else -1
        expected = {
            "center": (m, 3),
            "size": (m, 3),
            "yaw": (m,),
            "velocity": (m, 2),
            "labels": (m,),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise HarnessError(
                    f"GTBoxes.{name}: shape {got}, expected {shape} (M = len(labels))"
                )
        if m > 0 and bool((self.size <= 0).any()):
            raise HarnessError("GTBoxes.size: every size must be positive")

    @classmethod
    def from_boxes(cls, boxes: Sequence[Any], classes: Sequence[str] = CLASSES) -> GTBoxes:
        """From box records with attributes `label` (class name), `center`, `size` (w, l, h),
        `yaw` and `velocity` (e.g. `harness.datasets.scene3d.Box3D`)."""
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({b.label for b in boxes if b.label not in index})
        if unknown:
            raise HarnessError(
                f"GTBoxes.from_boxes: unknown class name(s) {unknown}; known: {list(classes)}"
            )

        def column(values: list[Any], width: int) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).reshape(-1, width)

        return cls(
            center=column([list(b.center) for b in boxes], 3),
            size=column([list(b.size) for b in boxes], 3),
            yaw=column([float(b.yaw) for b in boxes], 1).reshape(-1),
            velocity=column([list(b.velocity) for b in boxes], 2),
            labels=torch.tensor([index[b.label] for b in boxes], dtype=torch.int64),
        )

    def to_tensor(self) -> torch.Tensor:
        """Bottom-z boxes [M, 9] in the anchors' layout (float32)."""
        center = self.center.to(torch.float32)
        size = self.size.to(torch.float32)
        bottom = center[:, 2:3] - size[:, 2:3] / 2
        return torch.cat(
            (
                center[:, :2],
                bottom,
                size,
                self.yaw.to(torch.float32).unsqueeze(1),
                self.velocity.to(torch.float32),
            ),
            dim=1,
        )


def _nearest_bev_aabb(boxes: torch.Tensor) -> torch.Tensor:
    """Axis-aligned BEV boxes [N, 4] (x0, y0, x1, y1), each box rotated to the nearest axis."""
    yaw = limit_period(boxes[:, 6], 0.5, math.pi)
    across = yaw.abs() > math.pi / 4
    ex = torch.where(across, boxes[:, 3], boxes[:, 4])
    ey = torch.where(across, boxes[:, 4], boxes[:, 3])
    return torch.stack(
        (boxes[:, 0] - ex / 2, boxes[:, 1] - ey / 2, boxes[:, 0] + ex / 2, boxes[:, 1] + ey / 2),
        dim=1,
    )


def _aabb_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix [N, M] of axis-aligned boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-8)


def assign_anchors(anchors: torch.Tensor, boxes: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Per anchor: index of its GT box (>= 0), -1 negative, -2 ignored; boxes are bottom-z [M, 9].

    Class-agnostic, as mmdet3d's MaxIoUAssigner with nearest-BEV IoU: an anchor is positive for
    its best GT if their axis-aligned BEV IoU (each box turned to the nearest axis) is
    >= `pos_iou_thr`, negative if its best IoU is < `neg_iou_thr`, ignored in between. Then each
    GT, in order, claims one anchor not claimed before: the one with the highest IoU, or the one
    nearest in BEV when it overlaps none, so every GT trains at least one anchor.
    """
    n = anchors.shape[0]
    if boxes.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=anchors.device)
    iou = _aabb_iou(_nearest_bev_aabb(anchors), _nearest_bev_aabb(boxes))
    best_iou, best_gt = iou.max(dim=1)
    assigned = torch.full((n,), -2, dtype=torch.int64, device=anchors.device)
    assigned[best_iou < config.neg_iou_thr] = -1
    pos = best_iou >= config.pos_iou_thr
    assigned[pos] = best_gt[pos]
    dist = torch.cdist(anchors[:, :2], boxes[:, :2])  # [n, M]
    # Overlapping anchors rank by IoU (keys > 1); others by closeness (keys in (-1, 0]).
    key = torch.where(iou > 0, 1 + iou, -dist / (dist.max() + 1))
    taken = torch.zeros(n, dtype=torch.bool, device=anchors.device)
    for j in range(boxes.shape[0]):
        best = key[:, j].masked_fill(taken, -2.0).argmax()
        assigned[best] = j
        taken[best] = True
    return assigned


def _sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return ce * (1 - p_t).pow(gamma) * alpha_t


@dataclass(frozen=True)
class LossTargets:
    """One sample's anchor assignment: what `FastBEV.loss_from_targets` trains against."""

    assigned: torch.Tensor
    """int [A]: index of the anchor's GT box (>= 0), -1 negative, -2 ignored."""
    labels: torch.Tensor
    """int64 [M]: class of each GT box."""
    boxes: torch.Tensor
    """float32 [M, 9]: bottom-z GT boxes in the anchors' layout."""


def loss_targets(
    anchors: torch.Tensor, gt: GTBoxes, config: LossConfig, num_classes: int
) -> LossTargets:
    """Assign `anchors` to the sample's GT boxes (`assign_anchors`), on the anchors' device.

    Depends only on the GT and the anchors, so a trainer may compute it once per sample, on the
    CPU, in DataLoader workers. Raises HarnessError for labels outside 0..num_classes-1.
    """
    labels = gt.labels.to(anchors.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise HarnessError(f"FastBEV.loss: GT labels outside 0..{num_classes - 1}: {labels.tolist()}")
    boxes = gt.to_tensor().to(anchors.device)
    return LossTargets(assign_anchors(anchors, boxes, config), labels, boxes)


class FastBEV(nn.Module):
    """FastBEV with a ResNet18 backbone; module names as the seed (`backbone`, `neck`,
    `neck_fuse`, `neck_3d`, `bbox_head`). Stage wrappers: `FastBEVPre`, `FastBEVPost`."""

    def __init__(self, config: FastBEVConfig, loss_config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.loss_config = loss_config or LossConfig()
        self.backbone = ResNet(18, out_indices=(0, 1, 2, 3), base_channels=config.base_channels)
        self.neck = FPN(self.backbone.out_channels, config.fpn_channels)
        self.fuse_concat = Concat(dim=1)
        self.neck_fuse = nn.Conv2d(4 * config.fpn_channels, config.fpn_channels, 3, padding=1)
        self.neck_3d = M2BevNeck(
            config.fpn_channels * config.grid[2], config.neck3d_channels, config.neck3d_layers
        )
        for part in (self.neck, self.neck_fuse, self.neck_3d):
            init_kaiming(part)
        self.bbox_head = AnchorHead(
            config.neck3d_channels, config.num_anchors_per_cell, config.num_classes
        )
        pcr = config.point_cloud_range
        anchors = grid_anchors(
            config.head_xy,
            (pcr[0], pcr[1], pcr[3], pcr[4]),
            config.anchor_z,
            config.anchor_sizes,
            config.anchor_rotations,
        )
        self.anchors: torch.Tensor
        self.register_buffer("anchors", anchors, persistent=False)
        # View-transform tables of a fixed camera rig (`set_lookup_tables`), not in state_dict.
        self.table_x: torch.Tensor | None
        self.table_y: torch.Tensor | None
        self.table_valid: torch.Tensor | None
        for name in ("table_x", "table_y", "table_valid"):
            self.register_buffer(name, None, persistent=False)

    # ---- stages
    def extract_image_features(self, image: torch.Tensor) -> torch.Tensor:
        """The pre stage: normalised images [N, 3, H, W] -> `mlvl_feat` [N, C, ceil(H/4), ceil(W/4)]."""
        levels = self.neck(self.backbone(image))
        size = levels[0].shape[2:]
        resized = [levels[0]] + [
            F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            for level in levels[1:]
        ]
        out: torch.Tensor = self.neck_fuse(self.fuse_concat(*resized))
        return out

    def lookup_tables(self, lidar2img: torch.Tensor) -> LookupTables:
        """`build_lookup_tables` for this model's grid and feature size."""
        cfg = self.config
        return build_lookup_tables(
            lidar2img, cfg.feat_hw, cfg.grid, cfg.voxel_size, cfg.point_cloud_range, cfg.feat_stride
        )

    def head_forward(self, mlvl_volume: torch.Tensor) -> HeadOutputs:
        """`mlvl_volume` [B, C, X, Y, Z] -> raw head maps."""
        out: HeadOutputs = self.bbox_head(self.neck_3d(mlvl_volume))
        return out

    def dense_rows(
        self, outputs: HeadOutputs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first sample's head maps as per-anchor rows in the order of `anchors`.

        Returns `anchor_scores` [A, num_classes] (sigmoid probabilities), `anchor_deltas` [A, 9]
        (raw box deltas) and `anchor_dir_logits` [A, 2]: the outputs of `FastBEVPostDense`.
        """
        num_classes = self.config.num_classes
        scores = outputs.cls_score[0].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        deltas = outputs.bbox_pred[0].permute(1, 2, 0).reshape(-1, BOX_CODE_SIZE)
        dir_logits = outputs.dir_cls_preds[0].permute(1, 2, 0).reshape(-1, 2)
        return scores, deltas, dir_logits

    def select_rows(
        self, scores: torch.Tensor, deltas: torch.Tensor, dir_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of dense rows by max class score, anchor gather, decode and direction ArgMax.

        Takes `dense_rows`' outputs; returns the seed post graph's `cls_score` [K, num_classes],
        `bbox_pred` [K, 9] (decoded, bottom z, yaw before the direction fix) and
        `dir_cls_preds` [K] (int64), K = min(topk, number of anchors).
        """
        anchors = self.anchors.to(deltas.device)
        k = min(self.config.topk, self.config.num_anchors)
        _, topk_inds = scores.max(dim=1)[0].topk(k)
        bboxes = decode(anchors[topk_inds], deltas[topk_inds])
        return scores[topk_inds], bboxes, dir_logits[topk_inds].argmax(dim=-1)

    def select_and_decode(
        self, outputs: HeadOutputs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The seed post graph's tail for the first sample: `select_rows(*dense_rows(outputs))`."""
        return self.select_rows(*self.dense_rows(outputs))

    # ---- deployment stages (harness.program protocol)
    @property
    def pre(self) -> FastBEVPre:
        """The exported `pre` stage (a fresh wrapper sharing this model's parameters)."""
        return FastBEVPre(self)

    @property
    def post(self) -> FastBEVPostDense:
        """The exported `post` stage: the dense head rows (see the module docstring)."""
        return FastBEVPostDense(self)

    def set_lookup_tables(self, tables: LookupTables, anchors: torch.Tensor | None = None) -> None:
        """Install the view-transform tables (and optionally anchors) `run_stages` uses.

        Raises HarnessError when a shape or dtype does not fit the configured cameras, grid and
        anchors, or a valid entry points outside the feature map.
        """
        cfg = self.config
        problems = check_lookup_tables(
            {"x": tables.x, "y": tables.y, "valid_c_idx": tables.valid_c_idx,
             **({} if anchors is None else {"anchors": anchors})},
            cfg,
        )  # fmt: skip
        if problems:
            raise HarnessError(f"FastBEV.set_lookup_tables: {'; '.join(problems.values())}")
        device = self.anchors.device
        self.table_x = tables.x.to(device)
        self.table_y = tables.y.to(device)
        self.table_valid = tables.valid_c_idx.to(device)
        if anchors is not None:
            self.anchors = anchors.to(device=device, dtype=torch.float32)

    @property
    def tables(self) -> LookupTables:
        """The installed lookup tables; HarnessError when none were set."""
        if self.table_x is None or self.table_y is None or self.table_valid is None:
            raise HarnessError(
                "FastBEV has no lookup tables: build it with fastbev_r18() or call set_lookup_tables()"
            )
        return LookupTables(self.table_x, self.table_y, self.table_valid)

    def golden_files(self) -> dict[str, npt.NDArray[Any]]:
        """The tables as CUDA-FastBEV's example data: `x`, `y` (int64 [Ncam, V]),
        `valid_c_idx` (float32 [Ncam, V]) and `anchors` (float32 [A, 9])."""
        tables = self.tables
        return {
            "x": tables.x.cpu().numpy().copy(),
            "y": tables.y.cpu().numpy().copy(),
            "valid_c_idx": tables.valid_c_idx.cpu().numpy().copy(),
            "anchors": self.anchors.cpu().numpy().copy(),
        }

    def run_stages(
        self, inputs: Mapping[str, torch.Tensor], call: StageCall
    ) -> dict[str, torch.Tensor]:
        """Run `pre`, the view transform, `post` and the top-k decode glue per sample.

        `inputs["image"]` holds B samples of Ncam normalised images, [B*Ncam, 3, H, W]; each
        sample goes through `call("pre", ...)` and `call("post", ...)` once. Returns
        `cls_score` [B, K, num_classes], `bbox_pred` [B, K, 9] and `dir_cls_preds` [B, K]
        (int64), as the seed's post graph for each sample.
        """
        image = inputs["image"]
        ncam = self.config.num_cams
        if image.dim() != 4 or image.shape[0] == 0 or image.shape[0] % ncam:
            raise HarnessError(
                f"FastBEV.run_stages: 'image' must be [B*{ncam}, 3, H, W], got {tuple(image.shape)}"
            )
        tables = self.tables
        results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, image.shape[0], ncam):
            feat = call("pre", {"image": image[start : start + ncam]})["mlvl_feat"]
            volume = view_transform(feat.float(), *tables, self.config.grid)
            dense = call("post", {"mlvl_volume": volume})
            rows = tuple(dense["anchor_scores"].shape)
            if rows != (self.config.num_anchors, self.config.num_classes):
                raise HarnessError(
                    f"FastBEV.run_stages: stage 'post' returned anchor_scores {list(rows)}, "
                    f"expected [{self.config.num_anchors}, {self.config.num_classes}]"
                )
            results.append(
                self.select_rows(
                    dense["anchor_scores"].float(),
                    dense["anchor_deltas"].float(),
                    dense["anchor_dir_logits"],
                )
            )
        names = ("cls_score", "bbox_pred", "dir_cls_preds")
        return {name: torch.stack([r[i] for r in results]) for i, name in enumerate(names)}

    # ---- training / full model
    def forward(self, images: torch.Tensor, lidar2img: torch.Tensor) -> HeadOutputs:
        """Full differentiable model: images [B, Ncam, 3, H, W] (or [Ncam, 3, H, W]) and
        lidar2img [B, Ncam, 4, 4] (or [Ncam, 4, 4]) -> raw head maps for `loss`."""
        if images.dim() == 4:
            images, lidar2img = images.unsqueeze(0), lidar2img.unsqueeze(0)
        batch, ncam = images.shape[:2]
        feats = self.extract_image_features(images.flatten(0, 1))
        feats = feats.reshape(batch, ncam, *feats.shape[1:])
        volumes = []
        for b in range(batch):
            with torch.no_grad():
                tables = self.lookup_tables(lidar2img[b])
            volumes.append(view_transform(feats[b], *tables, self.config.grid))
        return self.head_forward(torch.cat(volumes, dim=0))

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, lidar2img: torch.Tensor, nms: NMSConfig | None = None
    ) -> list[Detections]:
        """Boxes per sample: forward, top-k decode and `postprocess`."""
        outputs = self.forward(images, lidar2img)
        results = []
        for b in range(outputs.cls_score.shape[0]):
            single = HeadOutputs(*(t[b : b + 1] for t in outputs))
            scores, boxes, dirs = self.select_and_decode(single)
            results.append(
                postprocess(scores.cpu().numpy(), boxes.cpu().numpy(), dirs.cpu().numpy(), nms)
            )
        return results

    def loss_targets(self, gt: GTBoxes) -> LossTargets:
        """`loss_targets` of this model's anchors and loss configuration."""
        return loss_targets(self.anchors, gt, self.loss_config, self.config.num_classes)

    def loss(self, outputs: HeadOutputs, gt_boxes: Sequence[GTBoxes]) -> dict[str, torch.Tensor]:
        """Anchor-head losses for a batch: `loss_from_targets` of each sample's `loss_targets`."""
        batch = outputs.cls_score.shape[0]
        if len(gt_boxes) != batch:
            raise HarnessError(f"FastBEV.loss: {len(gt_boxes)} GT samples for a batch of {batch}")
        return self.loss_from_targets(outputs, [self.loss_targets(gt) for gt in gt_boxes])

    def loss_from_targets(
        self, outputs: HeadOutputs, targets: Sequence[LossTargets]
    ) -> dict[str, torch.Tensor]:
        """Anchor-head losses for a batch, normalised by the number of positive anchors.

        Losses over the whole batch at once: sigmoid focal loss over classes on every anchor that
        is not ignored; smooth-L1 on `encode`d deltas of positive anchors with the yaw term as
        sin(pred - target); cross-entropy on their direction class. Returns `loss_cls`,
        `loss_bbox`, `loss_dir`, `loss`. The targets may live on another device (e.g. computed
        in DataLoader workers); they are moved to the outputs' device.
        """
        cfg = self.loss_config
        batch = outputs.cls_score.shape[0]
        if len(targets) != batch:
            raise HarnessError(f"FastBEV.loss: {len(targets)} GT samples for a batch of {batch}")
        num_classes = self.config.num_classes
        cls = outputs.cls_score.permute(0, 2, 3, 1).reshape(batch, -1, num_classes)
        reg = outputs.bbox_pred.permute(0, 2, 3, 1).reshape(batch, -1, BOX_CODE_SIZE)
        dirs = outputs.dir_cls_preds.permute(0, 2, 3, 1).reshape(batch, -1, 2)
        anchors = self.anchors.to(cls.device)
        if cls.shape[1] != anchors.shape[0]:
            raise HarnessError(
                f"FastBEV.loss: head has {cls.shape[1]} anchors, the model's anchors are {anchors.shape[0]}"
            )
        device = cls.device
        assigned = torch.stack([t.assigned.to(device, torch.int64) for t in targets])  # [B, A]
        counts = [int(t.labels.shape[0]) for t in targets]
        offsets = torch.tensor([sum(counts[:b]) for b in range(batch)], device=device)
        labels = torch.cat([t.labels.to(device) for t in targets])
        boxes = torch.cat([t.boxes.to(device, torch.float32) for t in targets])
        pos = assigned >= 0
        valid = assigned >= -1
        b_idx, a_idx = pos.nonzero(as_tuple=True)
        gt_idx = assigned[b_idx, a_idx] + offsets[b_idx]
        target = torch.zeros_like(cls)
        target[b_idx, a_idx, labels[gt_idx]] = 1.0
        focal = _sigmoid_focal_loss(cls, target, cfg.focal_alpha, cfg.focal_gamma)
        loss_cls = (focal * valid.unsqueeze(2)).sum()
        matched = boxes[gt_idx]
        deltas = encode(anchors[a_idx], matched)
        pred = reg[b_idx, a_idx]
        pred_sin = torch.sin(pred[:, 6:7]) * torch.cos(deltas[:, 6:7])
        tgt_sin = torch.cos(pred[:, 6:7]) * torch.sin(deltas[:, 6:7])
        pred = torch.cat((pred[:, :6], pred_sin, pred[:, 7:]), dim=1)
        deltas = torch.cat((deltas[:, :6], tgt_sin, deltas[:, 7:]), dim=1)
        code_weight = torch.tensor(cfg.code_weight, dtype=pred.dtype, device=device)
        l1 = F.smooth_l1_loss(pred, deltas, reduction="none", beta=cfg.smooth_l1_beta)
        loss_bbox = (l1 * code_weight).sum()
        dir_t = direction_target(matched[:, 6], cfg.dir_offset)
        loss_dir = F.cross_entropy(dirs[b_idx, a_idx], dir_t, reduction="sum")
        norm = float(max(int(b_idx.shape[0]), 1))
        losses = {
            "loss_cls": cfg.cls_weight * loss_cls / norm,
            "loss_bbox": cfg.bbox_weight * loss_bbox / norm,
            "loss_dir": cfg.dir_weight * loss_dir / norm,
        }
        losses["loss"] = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_dir"]
        return losses


class FastBEVPre(nn.Module):
    """Exportable pre stage: `image` [Ncam, 3, H, W] -> `mlvl_feat` [Ncam, C, H/4, W/4]."""

    input_names: ClassVar[tuple[str, ...]] = ("image",)
    output_names: ClassVar[tuple[str, ...]] = ("mlvl_feat",)

    def __init__(self, model: FastBEV) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # export restores the wrapper's mode onto the whole model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.extract_image_features(image)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """Random inputs of the configured shape (seeded)."""
        cfg = self.model.config
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(cfg.num_cams, 3, *cfg.image_hw, generator=gen),)


class FastBEVPost(nn.Module):
    """Exportable post stage: `mlvl_volume` [1, C, X, Y, Z] -> `cls_score` [K, 10],
    `bbox_pred` [K, 9], `dir_cls_preds` [K] (the anchors are baked into the graph)."""

    input_names: ClassVar[tuple[str, ...]] = ("mlvl_volume",)
    output_names: ClassVar[tuple[str, ...]] = ("cls_score", "bbox_pred", "dir_cls_preds")

    def __init__(self, model: FastBEV) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # export restores the wrapper's mode onto the whole model

    def forward(self, mlvl_volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.select_and_decode(self.model.head_forward(mlvl_volume))

    def example_inputs(self) -> tuple[torch.Tensor]:
        """Random inputs of the configured shape (seeded)."""
        cfg = self.model.config
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(1, cfg.volume_channels, *cfg.grid, generator=gen),)


class FastBEVPostDense(nn.Module):
    """Exported post stage of the harness: `mlvl_volume` [1, C, X, Y, Z] -> `anchor_scores`
    [A, 10] (sigmoid), `anchor_deltas` [A, 9] (raw deltas), `anchor_dir_logits` [A, 2]; row i
    belongs to anchor i. The seed's top-k and decode follow in `FastBEV.select_rows`."""

    input_names: ClassVar[tuple[str, ...]] = ("mlvl_volume",)
    output_names: ClassVar[tuple[str, ...]] = (
        "anchor_scores",
        "anchor_deltas",
        "anchor_dir_logits",
    )

    def __init__(self, model: FastBEV) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # export restores the wrapper's mode onto the whole model

    def forward(self, mlvl_volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.dense_rows(self.model.head_forward(mlvl_volume))

    def example_inputs(self) -> tuple[torch.Tensor]:
        """Random inputs of the configured shape (seeded)."""
        cfg = self.model.config
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(1, cfg.volume_channels, *cfg.grid, generator=gen),)


# --------------------------------------------------------------------------- postprocess


FloatArray = npt.NDArray[np.float64]


def _corners(boxes: FloatArray) -> FloatArray:
    """BEV corners [N, 4, 2], counter-clockwise, of (x, y, w, l, yaw) boxes."""
    cos, sin = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
    heading = np.stack((cos, sin), axis=1) * (boxes[:, 3:4] / 2)
    across = np.stack((-sin, cos), axis=1) * (boxes[:, 2:3] / 2)
    centre = boxes[:, :2]
    return np.stack(
        (
            centre + heading + across,
            centre - heading + across,
            centre - heading - across,
            centre + heading - across,
        ),
        axis=1,
    )


def _cross(a: FloatArray, b: FloatArray) -> FloatArray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def bev_iou(box: FloatArray, boxes: FloatArray) -> FloatArray:
    """Rotated BEV IoU of one (x, y, w, l, yaw) box with each of `boxes` [M, 5] -> [M]."""
    return pair_iou(np.broadcast_to(box, boxes.shape), boxes)


_NEXT = np.array([1, 2, 3, 0])


def pair_iou(first: FloatArray, second: FloatArray) -> FloatArray:
    """Rotated BEV IoU of each pair of (x, y, w, l, yaw) boxes: `first[k]` with `second[k]` -> [M]."""
    m = second.shape[0]
    if m == 0:
        return np.zeros(0)
    a = _corners(first)
    b = _corners(second)
    eps = 1e-9

    def inside(points: FloatArray, poly: FloatArray) -> npt.NDArray[np.bool_]:
        edges = poly[:, _NEXT] - poly  # [M, 4, 2]
        rel = points[:, :, None, :] - poly[:, None, :, :]  # [M, P, 4, 2]
        result: npt.NDArray[np.bool_] = np.all(_cross(edges[:, None], rel) >= -eps, axis=2)
        return result

    a0, a1 = a, a[:, _NEXT]
    b0, b1 = b, b[:, _NEXT]
    da = (a1 - a0)[:, :, None, :]  # [M, 4, 1, 2]
    db = (b1 - b0)[:, None, :, :]  # [M, 1, 4, 2]
    offset = b0[:, None, :, :] - a0[:, :, None, :]  # [M, 4, 4, 2]
    denom = _cross(da, db)
    safe = np.where(np.abs(denom) > eps, denom, 1.0)
    t = _cross(offset, db) / safe
    u = _cross(offset, da) / safe
    hit = (np.abs(denom) > eps) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_points = (a0[:, :, None, :] + t[..., None] * da).reshape(m, 16, 2)
    points = np.concatenate((a, b, cross_points), axis=1)  # [M, 24, 2]
    valid = np.concatenate((inside(a, b), inside(b, a), hit.reshape(m, 16)), axis=1)
    count = valid.sum(axis=1)
    centre = (points * valid[..., None]).sum(axis=1) / np.maximum(count, 1)[:, None]
    angle = np.arctan2(points[..., 1] - centre[:, 1:2], points[..., 0] - centre[:, 0:1])
    angle = np.where(valid, angle, np.inf)
    order = np.argsort(angle, axis=1, kind="stable")
    ordered = np.take_along_axis(points, order[..., None], axis=1)
    rank = np.arange(points.shape[1])[None, :]
    ordered = np.where((rank < count[:, None])[..., None], ordered, ordered[:, :1])
    inter = np.abs(_cross(ordered, np.roll(ordered, -1, axis=1)).sum(axis=1)) / 2
    inter = np.where(count >= 3, inter, 0.0)
    area_a = first[:, 2] * first[:, 3]
    area_b = second[:, 2] * second[:, 3]
    result: FloatArray = inter / np.maximum(area_a + area_b - inter, 1e-8)
    return result


_PAIR_BLOCK = 1 << 20
"""Candidate pairs whose distances are screened at once in `_nms`."""


def _nms(bev: FloatArray, scores: FloatArray, kind: str, threshold: float) -> npt.NDArray[np.int64]:
    """Greedy NMS by descending score (stable); returns kept indices in score order.

    Which box would suppress which is computed for all pairs first (centre distance for
    'circle'; rotated IoU of the pairs whose bounding circles overlap for 'rotate', in one
    vectorised call), then the greedy pass walks the boxes by score.
    """
    order = np.argsort(-scores, kind="stable")
    bev = bev[order]
    n = len(order)
    reach = np.hypot(bev[:, 2], bev[:, 3]) / 2
    cos, sin = np.abs(np.cos(bev[:, 4])), np.abs(np.sin(bev[:, 4]))
    half = np.stack((bev[:, 3] * cos + bev[:, 2] * sin, bev[:, 3] * sin + bev[:, 2] * cos), axis=1) / 2 + 1e-6
    area = bev[:, 2] * bev[:, 3]
    first_parts, second_parts = [], []
    rows = np.arange(n)
    for start in range(0, n, max(1, _PAIR_BLOCK // max(n, 1))):
        i = np.repeat(rows[start:start + max(1, _PAIR_BLOCK // max(n, 1))], n)
        j = np.tile(rows, len(i) // n if n else 0)
        upper = j > i
        i, j = i[upper], j[upper]
        dist2 = (bev[j, 0] - bev[i, 0]) ** 2 + (bev[j, 1] - bev[i, 1]) ** 2
        if kind == "circle":
            hit = dist2 <= threshold
        else:
            # IoU >= threshold needs overlapping bounding circles and boxes and an area ratio
            # of at least `threshold` (IoU <= smaller area / larger area)
            near = dist2 < (reach[j] + reach[i]) ** 2
            near &= (np.abs(bev[j, 0] - bev[i, 0]) < half[j, 0] + half[i, 0])
            near &= (np.abs(bev[j, 1] - bev[i, 1]) < half[j, 1] + half[i, 1])
            near &= np.minimum(area[i], area[j]) >= threshold * np.maximum(area[i], area[j])
            i, j = i[near], j[near]
            hit = pair_iou(bev[i], bev[j]) >= threshold
        first_parts.append(i[hit])
        second_parts.append(j[hit])
    first = np.concatenate(first_parts) if first_parts else np.zeros(0, np.int64)
    second = np.concatenate(second_parts) if second_parts else np.zeros(0, np.int64)
    by_first = np.split(second, np.searchsorted(first, np.arange(1, n))) if n else []
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for k in range(n):
        if suppressed[k]:
            continue
        keep.append(int(order[k]))
        suppressed[by_first[k]] = True
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    cls_score: npt.ArrayLike,
    bbox_pred: npt.ArrayLike,
    dir_cls_preds: npt.ArrayLike,
    config: NMSConfig | None = None,
    classes: Sequence[str] = CLASSES,
) -> Detections:
    """The post stage's outputs -> final boxes, as CUDA-FastBEV's CPU scale-NMS.

    Per class: keep candidates with score > `score_thr`; NMS their BEV boxes (x, y, w, l, yaw)
    with w, l scaled by the class's `nms_rescale_factor` (rotated IoU or circle distance); a box
    may survive in several classes. Then yaw gets the direction fix
    `limit_period(yaw - dir_offset, dir_limit_offset, pi) + dir_offset + pi * dir`, z moves from
    the bottom to the centre, and the `max_num` best-scoring boxes are returned by descending
    score (the C++ truncates before sorting; mmdet3d sorts first, as here).
    """
    cfg = config or NMSConfig()
    scores = np.asarray(cls_score, dtype=np.float64)
    boxes = np.asarray(bbox_pred, dtype=np.float64)
    dirs = np.asarray(dir_cls_preds).astype(np.int64)
    num_classes = scores.shape[1] if scores.ndim == 2 else -1
    if (
        num_classes != len(cfg.nms_type)
        or boxes.shape != (scores.shape[0], BOX_CODE_SIZE)
        or dirs.shape != (scores.shape[0],)
    ):
        raise HarnessError(
            f"postprocess: shapes cls_score {scores.shape}, bbox_pred {boxes.shape}, dir_cls_preds {dirs.shape} "
            f"do not fit [K, {len(cfg.nms_type)}], [K, 9], [K]"
        )
    picked_rows: list[npt.NDArray[np.int64]] = []
    picked_labels: list[npt.NDArray[np.int64]] = []
    picked_scores: list[FloatArray] = []
    for c in range(num_classes):
        rows = np.nonzero(scores[:, c] > cfg.score_thr)[0]
        if rows.size == 0:
            continue
        bev = boxes[rows][:, [0, 1, 3, 4, 6]].copy()
        bev[:, 2:4] *= cfg.nms_rescale_factor[c]
        threshold = cfg.nms_radius_thr[c] if cfg.nms_type[c] == "circle" else cfg.nms_thr[c]
        kept = rows[_nms(bev, scores[rows, c], cfg.nms_type[c], threshold)]
        picked_rows.append(kept)
        picked_labels.append(np.full(kept.shape, c, dtype=np.int64))
        picked_scores.append(scores[kept, c])
    if picked_rows:
        rows_all = np.concatenate(picked_rows)
        labels = np.concatenate(picked_labels)
        score = np.concatenate(picked_scores)
    else:
        rows_all, labels, score = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    order = np.argsort(-score, kind="stable")[: cfg.max_num]
    rows_all, labels, score = rows_all[order], labels[order], score[order]
    sel = boxes[rows_all]
    yaw = sel[:, 6] - cfg.dir_offset
    dir_rot = yaw - np.floor(yaw / math.pi + cfg.dir_limit_offset) * math.pi
    yaw = dir_rot + cfg.dir_offset + math.pi * dirs[rows_all]
    center = sel[:, 0:3].copy()
    center[:, 2] += sel[:, 5] / 2
    return Detections(
        center=center,
        size=sel[:, 3:6].copy(),
        yaw=yaw,
        velocity=sel[:, 7:9].copy(),
        score=score,
        label=labels,
        classes=tuple(classes),
    )


# --------------------------------------------------------------------------- lookup-table files


TABLE_NAMES: tuple[str, ...] = ("x", "y", "valid_c_idx", "anchors")
"""Lookup tables as files `<name>.tensor`, CUDA-FastBEV's example-data names."""


def _table_spec(config: FastBEVConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    nvox = int(np.prod(config.grid))
    cams = (config.num_cams, nvox)
    return {
        "x": (cams, torch.int64),
        "y": (cams, torch.int64),
        "valid_c_idx": (cams, torch.float32),
        "anchors": ((config.num_anchors, BOX_CODE_SIZE), torch.float32),
    }


def check_lookup_tables(
    tables: Mapping[str, torch.Tensor], config: FastBEVConfig
) -> dict[str, str]:
    """Problems of the given tables (a subset of `TABLE_NAMES`) against `config`, by name.

    Shapes and dtypes must be those of `_table_spec`; `valid_c_idx` holds only 0 and 1; where it
    is 1, x and y lie inside the feature map (else the gather would read another pixel).
    """
    spec = _table_spec(config)
    height, width = config.feat_hw
    problems: dict[str, str] = {}
    for name, table in tables.items():
        shape, dtype = spec[name]
        if tuple(table.shape) != shape or table.dtype != dtype:
            what = f"{config.num_anchors} anchors" if name == "anchors" else (
                f"{config.num_cams} cameras and grid {tuple(config.grid)}"
            )
            problems[name] = (
                f"'{name}' is {str(table.dtype).removeprefix('torch.')} {list(table.shape)}, "
                f"expected {str(dtype).removeprefix('torch.')} {list(shape)} for {what}"
            )
    if problems or "valid_c_idx" not in tables:
        return problems
    valid = tables["valid_c_idx"]
    if not bool(((valid == 0) | (valid == 1)).all()):
        problems["valid_c_idx"] = "'valid_c_idx' holds values other than 0 and 1"
        return problems
    hit = valid == 1
    for name, limit in (("x", width), ("y", height)):
        if name in tables:
            values = tables[name][hit]
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
                problems[name] = (
                    f"'{name}' has valid entries outside 0..{limit - 1} "
                    f"(feature map {height}x{width})"
                )
    return problems


def load_lookup_tables(
    directory: str | os.PathLike[str], config: FastBEVConfig
) -> tuple[LookupTables, torch.Tensor] | None:
    """Tables and anchors from `<directory>/{x,y,valid_c_idx,anchors}.tensor`, checked
    against `config`; None when none of the four files exists.

    Raises HarnessError naming the file when only some exist, one cannot be read, or its shape,
    dtype or values do not fit the configured cameras, grid, feature map or anchors.
    """
    folder = Path(directory)
    paths = {name: folder / f"{name}.tensor" for name in TABLE_NAMES}
    present = {name for name, path in paths.items() if path.is_file()}
    if not present:
        return None
    if len(present) < len(paths):
        missing = ", ".join(str(paths[n]) for n in TABLE_NAMES if n not in present)
        raise HarnessError(f"lookup tables in {folder} are incomplete: missing {missing}")
    loaded: dict[str, torch.Tensor] = {}
    for name, path in paths.items():
        try:
            loaded[name] = torch.from_numpy(np.array(tensorfile.load(path)))
        except TensorFileError as exc:
            raise HarnessError(f"lookup table {path}: {exc}") from exc
    problems = check_lookup_tables(loaded, config)
    if problems:
        name = next(iter(problems))
        raise HarnessError(f"lookup table {paths[name]}: {problems[name]}")
    tables = LookupTables(loaded["x"], loaded["y"], loaded["valid_c_idx"])
    return tables, loaded["anchors"]


def rig_lookup_tables(config: FastBEVConfig) -> LookupTables:
    """The tables of `harness.datasets.scenes.camera_rig` at the configured image size."""
    if config.num_cams != 6:
        raise HarnessError(
            f"the synthetic camera rig has 6 cameras, the model {config.num_cams}; "
            "pass tables_dir with tables for your rig"
        )
    _, _, lidar2img = camera_rig(*config.image_hw)
    return build_lookup_tables(
        torch.from_numpy(lidar2img), config.feat_hw, config.grid, config.voxel_size,
        config.point_cloud_range, config.feat_stride,
    )  # fmt: skip


# --------------------------------------------------------------------------- factory


def _as_config_value(value: Any) -> Any:
    """YAML lists -> tuples (recursively) so they fit the frozen config."""
    if isinstance(value, list | tuple):
        return tuple(_as_config_value(v) for v in value)
    return value


PROFILES: tuple[str, ...] = tuple(sorted(_PROFILES))
"""Names of the built-in configurations."""


def fastbev_config(profile: str) -> FastBEVConfig:
    """The `FastBEVConfig` of a built-in profile ('full': the seed's sizes, 'ci': reduced)."""
    if profile not in _PROFILES:
        raise HarnessError(f"fastbev_r18: unknown profile {profile!r}; choose one of {list(PROFILES)}")
    return _PROFILES[profile]


def fastbev_r18(
    profile: str = "full",
    seed: int = 0,
    tables_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> FastBEV:
    """FastBEV-R18 in eval mode with seeded random weights and its view-transform tables.

    `profile` 'full' is the seed (6x3x256x704 images, 200x200x4 voxels of 0.5x0.5x1.5 m, FPN 64,
    neck 192, top-1000); 'ci' keeps the structure at 6x3x64x176, 50x50x4 voxels of 2x2x1.5 m
    and narrow widths so it runs on 2 CPU cores. Keyword overrides replace `FastBEVConfig` fields.
    The lookup tables and anchors come from `tables_dir/{x,y,valid_c_idx,anchors}.tensor` when
    those files exist (checked against the configuration: `load_lookup_tables`; a relative
    path is taken from the working directory), else from the synthetic camera rig
    (`rig_lookup_tables`) and `grid_anchors`.
    """
    base = fastbev_config(profile)
    known = {f.name for f in fields(FastBEVConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise HarnessError(
            f"fastbev_r18: unknown argument(s) {unknown}; FastBEVConfig fields are {sorted(known)}"
        )
    config = replace(base, **{k: _as_config_value(v) for k, v in overrides.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FastBEV(config)
    loaded = None if tables_dir is None else load_lookup_tables(tables_dir, config)
    if loaded is None:
        model.set_lookup_tables(rig_lookup_tables(config))
    else:
        model.set_lookup_tables(*loaded)
    return model.eval()


def nms_config(args: Mapping[str, Any]) -> NMSConfig:
    """`NMSConfig` from YAML-style keyword arguments (lists become tuples); ValueError names
    unknown keys, HarnessError invalid values."""
    known = {f.name for f in fields(NMSConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown nms argument(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return NMSConfig(**kwargs)


class AnchorRowDecoder:
    """The detection3d decoder of FastBEV's outputs: one sample's `cls_score` [K, 10],
    `bbox_pred` [K, 9] and `dir_cls_preds` [K] rows through `postprocess` with `nms` (fields of
    `NMSConfig`)."""

    def __init__(self, nms: Mapping[str, Any] | None = None) -> None:
        self.nms = nms_config(nms or {})

    def __call__(self, outputs: Mapping[str, np.ndarray], index: int) -> Detections:
        """Final boxes of sample `index`; HarnessError naming missing outputs."""
        missing = [n for n in OUTPUT_NAMES if n not in outputs]
        if missing:
            raise HarnessError(f"FastBEV decoder: the program produced no {missing} (got {sorted(outputs)})")
        cls_score, bbox_pred, dir_cls_preds = (np.asarray(outputs[n][index]) for n in OUTPUT_NAMES)
        return postprocess(cls_score, bbox_pred, dir_cls_preds, self.nms)
