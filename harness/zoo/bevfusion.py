"""BEVFusion camera branch (ResNet50, LSS-FPN, DepthLSS, BEV pool, ConvFuser, SECOND) in stages.

The stages are those CUDA-BEVFusion deploys as separate engines:

- `BEVFusionCameraStage` (`camera.backbone.onnx`): `img` [B, N, 3, H, W] and `depth`
  [B, N, 1, H, W] -> ResNet50 -> GeneralizedLSSFPN -> DepthLSSTransform's `dtransform` and
  `depthnet` -> `camera_feature` [B*N, fH, fW, C] and `camera_depth_weights` [B*N, D, fH, fW]
  (softmax over the D depth bins).
- BEV pool (PyTorch, between the graphs): `bev_pool` sums `depth_weight * feature` of every
  frustum point into its BEV cell, the cells given by `frustum_geometry` (precomputed per
  calibration) -> [1, Z*C, X, Y].
- `BEVFusionVTransformStage` (`camera.vtransform.onnx`): `feat_in` -> the vtransform's
  `downsample` -> `feat_out` (half resolution).
- `BEVFusionFuserStage` (`fuser.onnx`): `camera` and `lidar` BEV features -> ConvFuser ->
  SECOND -> SECONDFPN (with its ConvTranspose2d) -> `middle`.

Module names follow BEVFusion (`encoders.camera.backbone.layer3.0.conv1`,
`encoders.camera.neck.lateral_convs.0.conv`, `encoders.camera.vtransform.depthnet.0`,
`decoder.neck.deblocks.1.0`, ...) so quantization rules written against the deployment guide
match; the ConvFuser's layers are `fuser.conv` / `fuser.bn` (BEVFusion: `fuser.0` / `fuser.1`).
Every concat goes through `harness.zoo.ops.Concat` and every residual add through
`harness.zoo.ops.Add`, so quantization can share their input quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.zoo.layers import ConvModule, init_kaiming
from harness.zoo.ops import Concat
from harness.zoo.resnet import ResNet

__all__ = [
    "PROFILES",
    "SECOND",
    "SECONDFPN",
    "BEVFusionCamera",
    "BEVFusionCameraStage",
    "BEVFusionConfig",
    "BEVFusionFuserStage",
    "BEVFusionVTransformStage",
    "ConvFuser",
    "DepthLSSTransform",
    "GeneralizedLSSFPN",
    "bev_pool",
    "bevfusion_camera_r50",
    "bevfusion_config",
    "depth_bins",
    "frustum_geometry",
]

Bound = tuple[float, float, float]


def _bins(bound: Sequence[float]) -> int:
    """Number of cells of a (lo, hi, step) bound, as `torch.arange(lo, hi, step)` counts them."""
    return len(torch.arange(float(bound[0]), float(bound[1]), float(bound[2]), dtype=torch.float64))


def depth_bins(dbound: Sequence[float]) -> torch.Tensor:
    """Depth of each bin [D] (float64): `arange(lo, hi, step)`, as BEVFusion's frustum."""
    return torch.arange(float(dbound[0]), float(dbound[1]), float(dbound[2]), dtype=torch.float64)


@dataclass(frozen=True)
class BEVFusionConfig:
    """Sizes and widths; the defaults are CUDA-BEVFusion's ResNet50 model (0.075 m lidar voxels:
    a 360x360 camera BEV at 0.3 m, 180x180 after the downsample)."""

    image_hw: tuple[int, int] = (256, 704)
    num_cams: int = 6
    base_channels: int = 64
    neck_channels: int = 256
    camera_channels: int = 80
    dtransform_channels: tuple[int, int, int] = (8, 32, 64)
    dbound: Bound = (1.0, 60.0, 0.5)
    xbound: Bound = (-54.0, 54.0, 0.3)
    ybound: Bound = (-54.0, 54.0, 0.3)
    zbound: Bound = (-10.0, 10.0, 20.0)
    lidar_channels: int = 256
    fuser_channels: int = 256
    decoder_channels: tuple[int, ...] = (128, 256)
    decoder_layer_nums: tuple[int, ...] = (5, 5)
    decoder_layer_strides: tuple[int, ...] = (1, 2)
    decoder_out_channels: tuple[int, ...] = (256, 256)
    decoder_upsample_strides: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        decoder_lists = (
            self.decoder_channels,
            self.decoder_layer_nums,
            self.decoder_layer_strides,
            self.decoder_out_channels,
            self.decoder_upsample_strides,
        )
        checks = {
            "image_hw": len(self.image_hw) == 2 and all(v % 32 == 0 for v in self.image_hw),
            "num_cams": self.num_cams >= 1,
            "dbound": self._bound_ok(self.dbound) and self.dbound[0] > 0,
            "xbound": self._bound_ok(self.xbound),
            "ybound": self._bound_ok(self.ybound),
            "zbound": self._bound_ok(self.zbound),
            "decoder_channels": len({len(v) for v in decoder_lists}) == 1,
            "decoder_upsample_strides": all(s >= 1 for s in self.decoder_upsample_strides),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise HarnessError(
                f"BEVFusionConfig: invalid {values} (image sides must be multiples of 32, "
                "bounds (lo, hi, step) with lo < hi and step > 0, decoder lists of one length)"
            )

    @staticmethod
    def _bound_ok(bound: Sequence[float]) -> bool:
        return len(bound) == 3 and bound[0] < bound[1] and bound[2] > 0

    @property
    def feature_hw(self) -> tuple[int, int]:
        """Size of the camera features (stride 8)."""
        return (self.image_hw[0] // 8, self.image_hw[1] // 8)

    @property
    def num_depth_bins(self) -> int:
        return _bins(self.dbound)

    @property
    def bev_zxy(self) -> tuple[int, int, int]:
        """Cells of the camera BEV grid (Z, X, Y) before the downsample."""
        return (_bins(self.zbound), _bins(self.xbound), _bins(self.ybound))

    @property
    def bev_in_channels(self) -> int:
        """Channels of the pooled BEV (`feat_in`): Z folded into channels."""
        return self.bev_zxy[0] * self.camera_channels

    @property
    def fused_xy(self) -> tuple[int, int]:
        """BEV size after the vtransform downsample (the fuser's input size)."""
        _, nx, ny = self.bev_zxy
        return (math.ceil(nx / 2), math.ceil(ny / 2))


_PROFILES: dict[str, BEVFusionConfig] = {
    "full": BEVFusionConfig(),
    "ci": BEVFusionConfig(
        image_hw=(64, 192),
        base_channels=8,
        neck_channels=32,
        camera_channels=16,
        dtransform_channels=(4, 8, 16),
        dbound=(1.0, 60.0, 4.0),
        xbound=(-51.2, 51.2, 3.2),
        ybound=(-51.2, 51.2, 3.2),
        lidar_channels=32,
        fuser_channels=32,
        decoder_channels=(16, 32),
        decoder_out_channels=(32, 32),
    ),
}


# --------------------------------------------------------------------------- camera encoder


class GeneralizedLSSFPN(nn.Module):
    """BEVFusion's LSS-FPN: top-down, each level = fpn_conv(lateral_conv(concat(x, up(next)))).

    The topmost lateral takes the last two backbone levels; outputs the first `len(in) - 1`
    levels. Upsampling is bilinear without corner alignment; convs are ConvModules (BN, ReLU).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise HarnessError(
                f"GeneralizedLSSFPN: needs at least 2 input levels, got {list(in_channels)}"
            )
        self.num_ins = len(in_channels)
        last = self.num_ins - 2
        self.lateral_convs = nn.ModuleList(
            ConvModule(
                in_channels[i] + (in_channels[i + 1] if i == last else out_channels),
                out_channels,
                1,
            )
            for i in range(self.num_ins - 1)
        )
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1) for _ in range(self.num_ins - 1)
        )
        self.concats = nn.ModuleList(Concat(dim=1) for _ in range(self.num_ins - 1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        laterals = list(inputs)
        for i in range(self.num_ins - 2, -1, -1):
            up = F.interpolate(
                laterals[i + 1], size=laterals[i].shape[2:], mode="bilinear", align_corners=False
            )
            laterals[i] = self.fpn_convs[i](self.lateral_convs[i](self.concats[i](laterals[i], up)))
        return tuple(laterals[: self.num_ins - 1])


def _conv_bn_relu(
    cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class DepthLSSTransform(nn.Module):
    """DepthLSSTransform's learned parts: `dtransform` (depth image -> stride-8 features),
    `depthnet` (-> D depth logits + C features) and `downsample` (BEV, stride 2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_depth_bins: int,
        dtransform_channels: Sequence[int] = (8, 32, 64),
    ) -> None:
        super().__init__()
        self.D = num_depth_bins
        self.C = out_channels
        c1, c2, c3 = dtransform_channels
        self.dtransform = nn.Sequential(
            *_conv_bn_relu(1, c1, 1),
            *_conv_bn_relu(c1, c2, 5, stride=4),
            *_conv_bn_relu(c2, c3, 5, stride=2),
        )
        self.concat = Concat(dim=1)
        self.depthnet = nn.Sequential(
            *_conv_bn_relu(in_channels + c3, in_channels, 3),
            *_conv_bn_relu(in_channels, in_channels, 3),
            nn.Conv2d(in_channels, self.D + self.C, 1),
        )
        self.downsample = nn.Sequential(
            *_conv_bn_relu(out_channels, out_channels, 3, bias=False),
            *_conv_bn_relu(out_channels, out_channels, 3, stride=2, bias=False),
            *_conv_bn_relu(out_channels, out_channels, 3, bias=False),
        )

    def get_cam_feats(
        self, feat: torch.Tensor, depth: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feat [N, Cin, fH, fW], depth [N, 1, H, W] -> ([N, fH, fW, C], softmax depth [N, D, fH, fW])."""
        x = self.depthnet(self.concat(self.dtransform(depth), feat))
        weights = x[:, : self.D].softmax(dim=1)
        features = x[:, self.D : self.D + self.C].permute(0, 2, 3, 1)
        return features, weights


class CameraEncoder(nn.Module):
    """`backbone` (ResNet50, stages 2-4), `neck` (GeneralizedLSSFPN), `vtransform`."""

    def __init__(self, config: BEVFusionConfig) -> None:
        super().__init__()
        self.backbone = ResNet(50, out_indices=(1, 2, 3), base_channels=config.base_channels)
        self.neck = GeneralizedLSSFPN(self.backbone.out_channels[1:], config.neck_channels)
        self.vtransform = DepthLSSTransform(
            config.neck_channels,
            config.camera_channels,
            config.num_depth_bins,
            config.dtransform_channels,
        )


class Encoders(nn.Module):
    """Holds `camera` so names read `encoders.camera.*` as in BEVFusion."""

    def __init__(self, config: BEVFusionConfig) -> None:
        super().__init__()
        self.camera = CameraEncoder(config)


class ConvFuser(nn.Module):
    """Concat camera and lidar BEV features, then 3x3 conv (no bias), BN, ReLU."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.concat = Concat(dim=1)
        self.conv = nn.Conv2d(sum(in_channels), out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.bn(self.conv(self.concat(*inputs))))
        return out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class SECOND(nn.Module):
    """SECOND BEV backbone: per stage a strided 3x3 conv then `layer_num` 3x3 convs (BN, ReLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: Sequence[int],
        layer_nums: Sequence[int],
        layer_strides: Sequence[int],
    ) -> None:
        super().__init__()
        in_filters = [in_channels, *out_channels[:-1]]
        blocks = []
        for cin, cout, num, stride in zip(
            in_filters, out_channels, layer_nums, layer_strides, strict=True
        ):
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                _bn(cout),
                nn.ReLU(inplace=True),
            ]
            for _ in range(num):
                layers += [
                    nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                    _bn(cout),
                    nn.ReLU(inplace=True),
                ]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return tuple(outs)


class SECONDFPN(nn.Module):
    """SECONDFPN: per level a ConvTranspose2d (stride > 1) or a 1x1 conv (stride 1), BN, ReLU,
    all brought to the first level's size and concatenated (`concat`)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        upsample_strides: Sequence[int],
    ) -> None:
        super().__init__()
        deblocks = []
        for cin, cout, stride in zip(in_channels, out_channels, upsample_strides, strict=True):
            up: nn.Module
            if stride > 1:
                up = nn.ConvTranspose2d(cin, cout, stride, stride=stride, bias=False)
            else:
                up = nn.Conv2d(cin, cout, 1, bias=False)
            deblocks.append(nn.Sequential(up, _bn(cout), nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)
        self.concat = Concat(dim=1)

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        ups = [deblock(level) for deblock, level in zip(self.deblocks, x, strict=True)]
        out: torch.Tensor = self.concat(*ups) if len(ups) > 1 else ups[0]
        return out


class Decoder(nn.Module):
    """`backbone` (SECOND) and `neck` (SECONDFPN), as BEVFusion's `decoder`."""

    def __init__(self, config: BEVFusionConfig) -> None:
        super().__init__()
        self.backbone = SECOND(
            config.fuser_channels,
            config.decoder_channels,
            config.decoder_layer_nums,
            config.decoder_layer_strides,
        )
        self.neck = SECONDFPN(
            config.decoder_channels, config.decoder_out_channels, config.decoder_upsample_strides
        )


# --------------------------------------------------------------------------- BEV pool


def frustum_geometry(
    lidar2img: torch.Tensor,
    image_hw: Sequence[int],
    feature_hw: Sequence[int],
    dbound: Sequence[float],
    xbound: Sequence[float],
    ybound: Sequence[float],
    zbound: Sequence[float],
) -> torch.Tensor:
    """BEV cell of every frustum point: int64 [N, D, fH, fW], flat index `(iz*X + ix)*Y + iy`, -1
    outside the grid.

    Frustum points as BEVFusion's: feature column j sits at image x `j*(W-1)/(fW-1)` (rows
    likewise), at each depth of `depth_bins(dbound)`; lifted to the lidar frame by inverting
    `lidar2img` [N, 4, 4] (image pixels, any image augmentation folded in). Cells are
    `(p - lo) / step` truncated toward zero per axis, as BEVFusion's `.long()` and CUDA-BEVFusion's
    integer cast do: a point less than one cell below `lo` lands in cell 0 (flooring would drop
    it), so the first cell of each axis gathers up to twice the volume of the others.
    """
    if lidar2img.dim() != 3 or tuple(lidar2img.shape[1:]) != (4, 4):
        raise HarnessError(
            f"frustum_geometry: lidar2img must be [N, 4, 4], got {tuple(lidar2img.shape)}"
        )
    height, width = (int(v) for v in image_hw)
    fh, fw = (int(v) for v in feature_hw)
    device = lidar2img.device
    depths = depth_bins(dbound).to(device)
    us = torch.linspace(0, width - 1, fw, dtype=torch.float64, device=device)
    vs = torch.linspace(0, height - 1, fh, dtype=torch.float64, device=device)
    d, v, u = torch.meshgrid(depths, vs, us, indexing="ij")  # [D, fH, fW]
    pixels = torch.stack((u * d, v * d, d, torch.ones_like(d)), dim=-1)  # [D, fH, fW, 4]
    img2lidar = torch.linalg.inv(lidar2img.to(torch.float64))  # [N, 4, 4]
    points = torch.einsum("nij,dhwj->ndhwi", img2lidar, pixels)[..., :3]
    index = torch.zeros(points.shape[:-1], dtype=torch.int64, device=device)
    inside = torch.ones(points.shape[:-1], dtype=torch.bool, device=device)
    for axis, bound in ((2, zbound), (0, xbound), (1, ybound)):
        n = _bins(bound)
        cell = torch.trunc((points[..., axis] - float(bound[0])) / float(bound[2])).to(torch.int64)
        inside &= (cell >= 0) & (cell < n)
        index = index * n + cell.clamp(0, n - 1)
    return torch.where(inside, index, torch.full_like(index, -1))


def bev_pool(
    camera_feature: torch.Tensor,
    camera_depth_weights: torch.Tensor,
    geometry: torch.Tensor,
    bev_zxy: Sequence[int],
) -> torch.Tensor:
    """Sum `depth_weight * feature` of every frustum point into its cell -> [1, Z*C, X, Y].

    `camera_feature` [N, fH, fW, C], `camera_depth_weights` [N, D, fH, fW], `geometry` from
    `frustum_geometry`. Channels are z-major (`z*C + c`), as BEVFusion collapses Z. Computed as
    a sparse [cells, pixels] matrix of depth weights times the features (no N*D*fH*fW*C
    intermediate); differentiable in both inputs (through torch.sparse, whose backward is slow
    at full size: about a minute on 2 CPU cores).
    """
    n, fh, fw, channels = camera_feature.shape
    depth_bins_count = camera_depth_weights.shape[1]
    if tuple(camera_depth_weights.shape) != (n, depth_bins_count, fh, fw) or tuple(
        geometry.shape
    ) != (
        n,
        depth_bins_count,
        fh,
        fw,
    ):
        raise HarnessError(
            f"bev_pool: camera_feature {tuple(camera_feature.shape)}, camera_depth_weights "
            f"{tuple(camera_depth_weights.shape)} and geometry {tuple(geometry.shape)} disagree"
        )
    nz, nx, ny = (int(v) for v in bev_zxy)
    cells = nz * nx * ny
    feat = camera_feature.reshape(n * fh * fw, channels)
    geometry = geometry.to(camera_feature.device)
    # out = S @ feat with S[cell, pixel] = sum of the pixel's depth weights whose point is in cell
    kept = geometry >= 0
    pixel = torch.arange(n * fh * fw, device=geometry.device).reshape(n, 1, fh, fw)
    indices = torch.stack((geometry[kept], pixel.expand_as(geometry)[kept]))
    weights = torch.sparse_coo_tensor(
        indices, camera_depth_weights[kept], (cells, n * fh * fw), check_invariants=False
    )
    out: torch.Tensor = torch.sparse.mm(weights, feat)
    bev = out.reshape(nz, nx, ny, channels).permute(0, 3, 1, 2)
    return bev.reshape(1, nz * channels, nx, ny)


# --------------------------------------------------------------------------- model and stages


class BEVFusionCamera(nn.Module):
    """BEVFusion with the camera branch, ConvFuser and SECOND decoder (no lidar encoder, no head)."""

    def __init__(self, config: BEVFusionConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = Encoders(config)
        self.fuser = ConvFuser(
            (config.bev_in_channels, config.lidar_channels), config.fuser_channels
        )
        self.decoder = Decoder(config)
        for part in (
            self.encoders.camera.neck,
            self.encoders.camera.vtransform,
            self.fuser,
            self.decoder,
        ):
            init_kaiming(part)
        logits = self.encoders.camera.vtransform.depthnet[-1]
        if isinstance(logits, nn.Conv2d):  # depth logits: unit gain, so the softmax is not one-hot
            nn.init.kaiming_normal_(logits.weight, mode="fan_in", nonlinearity="linear")

    def camera_features(
        self, img: torch.Tensor, depth: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, N, 3, H, W], depth [B, N, 1, H, W] -> (camera_feature, camera_depth_weights)."""
        camera = self.encoders.camera
        b, n = img.shape[:2]
        levels = camera.backbone(img.reshape(b * n, *img.shape[2:]))
        feat = camera.neck(levels)[0]
        return camera.vtransform.get_cam_feats(feat, depth.reshape(b * n, *depth.shape[2:]))

    def geometry(self, lidar2img: torch.Tensor) -> torch.Tensor:
        """`frustum_geometry` for this model's sizes and bounds."""
        cfg = self.config
        return frustum_geometry(
            lidar2img, cfg.image_hw, cfg.feature_hw, cfg.dbound, cfg.xbound, cfg.ybound, cfg.zbound
        )

    def fuse_decode(self, camera_bev: torch.Tensor, lidar_bev: torch.Tensor) -> torch.Tensor:
        """ConvFuser + SECOND + SECONDFPN -> `middle`."""
        out: torch.Tensor = self.decoder.neck(
            self.decoder.backbone(self.fuser((camera_bev, lidar_bev)))
        )
        return out

    def forward(
        self,
        img: torch.Tensor,
        depth: torch.Tensor,
        lidar_bev: torch.Tensor,
        geometry: torch.Tensor,
    ) -> torch.Tensor:
        """All stages of one sample (B = 1) with the BEV pool between them -> `middle`."""
        feature, weights = self.camera_features(img, depth)
        pooled = bev_pool(feature, weights, geometry, self.config.bev_zxy)
        camera_bev = self.encoders.camera.vtransform.downsample(pooled)
        return self.fuse_decode(camera_bev, lidar_bev)


class _Stage(nn.Module):
    input_names: ClassVar[tuple[str, ...]]
    output_names: ClassVar[tuple[str, ...]]

    def __init__(self, model: BEVFusionCamera) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # export restores the wrapper's mode onto the whole model

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        raise NotImplementedError

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Random inputs of the configured shapes (seeded)."""
        gen = torch.Generator().manual_seed(0)
        return tuple(torch.randn(*shape, generator=gen) for shape in self.input_shapes())


class BEVFusionCameraStage(_Stage):
    """`img`, `depth` -> `camera_feature` [B*N, fH, fW, C], `camera_depth_weights` [B*N, D, fH, fW]."""

    input_names = ("img", "depth")
    output_names = ("camera_feature", "camera_depth_weights")

    def forward(self, img: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.camera_features(img, depth)

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        cfg = self.model.config
        return ((1, cfg.num_cams, 3, *cfg.image_hw), (1, cfg.num_cams, 1, *cfg.image_hw))


class BEVFusionVTransformStage(_Stage):
    """`feat_in` [1, Z*C, X, Y] -> the vtransform's `downsample` -> `feat_out`."""

    input_names = ("feat_in",)
    output_names = ("feat_out",)

    def forward(self, feat_in: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.encoders.camera.vtransform.downsample(feat_in)
        return out

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        cfg = self.model.config
        _, nx, ny = cfg.bev_zxy
        return ((1, cfg.bev_in_channels, nx, ny),)


class BEVFusionFuserStage(_Stage):
    """`camera`, `lidar` BEV features -> ConvFuser + SECOND + SECONDFPN -> `middle`."""

    input_names = ("camera", "lidar")
    output_names = ("middle",)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.model.fuse_decode(camera, lidar)

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        cfg = self.model.config
        return ((1, cfg.bev_in_channels, *cfg.fused_xy), (1, cfg.lidar_channels, *cfg.fused_xy))


def _as_config_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_as_config_value(v) for v in value)
    return value


PROFILES: tuple[str, ...] = tuple(sorted(_PROFILES))
"""Names of the built-in configurations."""


def bevfusion_config(profile: str) -> BEVFusionConfig:
    """The `BEVFusionConfig` of a built-in profile ('full': CUDA-BEVFusion's, 'ci': reduced)."""
    if profile not in _PROFILES:
        raise HarnessError(
            f"bevfusion_camera_r50: unknown profile {profile!r}; choose one of {list(PROFILES)}"
        )
    return _PROFILES[profile]


def bevfusion_camera_r50(profile: str = "full", seed: int = 0, **overrides: Any) -> BEVFusionCamera:
    """BEVFusion camera branch + fuser + decoder in eval mode with seeded random weights.

    'full': CUDA-BEVFusion's ResNet50 sizes (6x3x256x704 images, 118 depth bins, 360x360 BEV at
    0.3 m -> 180x180, fuser 80+256 -> 256, decoder output 512 channels). 'ci': the same
    structure at 6x3x64x192, 15 depth bins, 32x32 -> 16x16 BEV and narrow widths. Keyword
    overrides replace `BEVFusionConfig` fields.
    """
    base = bevfusion_config(profile)
    known = {f.name for f in fields(BEVFusionConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise HarnessError(
            f"bevfusion_camera_r50: unknown argument(s) {unknown}; BEVFusionConfig fields are {sorted(known)}"
        )
    config = replace(base, **{k: _as_config_value(v) for k, v in overrides.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BEVFusionCamera(config)
    return model.eval()
