"""CenterPoint's sparse 3-D encoder (det3d `SpMiddleResNetFHD`) on spconv 2.x, with BN fusion.

The network follows det3d/CenterPoint's nuScenes backbone: `conv_input` (SubMConv3d + BN + ReLU),
four stages `conv1..conv4` of `SparseBasicBlock` residual blocks with stride-2 `SparseConv3d`
downsampling in front of stages 2-4, `extra_conv` (kernel (3,1,1), stride (2,1,1)) and a dense tail
that folds depth into channels: [N, 5] voxel features on a 41x1440x1440 (z, y, x) grid become a
[1, 256, 180, 180] BEV map. Widths and the grid are configurable so CI can run a small grid.

Module paths match det3d (`conv2.3.conv1.weight`) so det3d checkpoints load. `fuse_bn` folds
every BN into its sparse convolution and turns the ReLU that follows into the convolution's
activation, the form NVIDIA's SCN exporter expects; the fused model computes the same function.

spconv 2.3.8's CPU build refuses a bias or a fused activation in inference, so the convolutions
here (`SubMConv3d`, `SparseConv3d`) run spconv without them and add the bias and apply the
activation in torch (`conv_forward`), which gives the same numbers on CPU and CUDA. Its CPU
scatter-add kernel also races when OpenMP runs it on several threads (the loop shares its row
pointers between threads), so `conv_forward` runs spconv's CPU kernels on one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import spconv.pytorch as spconv
import torch
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from harness.datasets.lidar import LidarSweeps
from harness.errors import HarnessError
from harness.export.custom import SCN_SYMBOLICS, symbolic_add
from harness.quant.sparse import register_bn_folder
from harness.quant.spconv_ops import RELU, conv_forward
from harness.zoo.ops import Add

M = TypeVar("M", bound=nn.Module)


RANGE_LOW = (-54.0, -54.0, -5.0)
"""Lower corner (x, y, z) of nuScenes' point cloud range, which every grid here spans."""
FULL_GRID = (41, 1440, 1440)
CI_GRID = (41, 180, 180)
WIDTHS = (16, 32, 64, 128)


class SubMConv3d(spconv.SubMConv3d):  # type: ignore[misc]
    """spconv `SubMConv3d` whose bias and activation run in torch (see `conv_forward`)."""

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        return conv_forward(self, x)


class SparseConv3d(spconv.SparseConv3d):  # type: ignore[misc]
    """spconv `SparseConv3d` whose bias and activation run in torch (see `conv_forward`)."""

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        return conv_forward(self, x)


def _bn(channels: int, eps: float) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=eps, momentum=0.01)


class SparseBasicBlock(spconv.SparseModule):  # type: ignore[misc]
    """Residual block: subm conv-BN-ReLU, subm conv-BN, add the input, ReLU.

    The addition goes through `self.add` (a `harness.zoo.ops.Add` on the feature tensors) so
    quantization can give both summands one shared quantizer. After `fuse_bn`, `bn1`, `bn2` and
    `relu1` are None and `conv1` carries the ReLU.
    """

    def __init__(self, channels: int, indice_key: str, eps: float = 1e-3) -> None:
        super().__init__()
        self.conv1 = SubMConv3d(channels, channels, 3, padding=1, bias=True, indice_key=indice_key)
        self.bn1: nn.BatchNorm1d | None = _bn(channels, eps)
        self.relu1: nn.ReLU | None = nn.ReLU()
        self.conv2 = SubMConv3d(channels, channels, 3, padding=1, bias=True, indice_key=indice_key)
        self.bn2: nn.BatchNorm1d | None = _bn(channels, eps)
        self.add = Add()
        self.relu = nn.ReLU()

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = out.replace_feature(self.bn1(out.features))
        if self.relu1 is not None:
            out = out.replace_feature(self.relu1(out.features))
        out = self.conv2(out)
        if self.bn2 is not None:
            out = out.replace_feature(self.bn2(out.features))
        out = out.replace_feature(self.add(out.features, x.features))
        return out.replace_feature(self.relu(out.features))


@dataclass(frozen=True)
class ScnConfig:
    """Shape of the encoder: input channels, stage widths, and the (z, y, x) voxel grid."""

    in_channels: int = 5
    widths: tuple[int, int, int, int] = WIDTHS
    grid: tuple[int, int, int] = FULL_GRID
    bn_eps: float = 1e-3

    def output_grid(self) -> tuple[int, int, int]:
        """(z, y, x) extent after the four downsamplings and `extra_conv`."""
        z, y, x = self.grid
        for pad_z in (1, 1, 0):
            z = (z + 2 * pad_z - 3) // 2 + 1
            y = (y + 2 - 3) // 2 + 1
            x = (x + 2 - 3) // 2 + 1
        z = (z - 3) // 2 + 1
        return z, y, x

    def output_shape(self, batch_size: int = 1) -> tuple[int, int, int, int]:
        """Shape of the dense output, [B, C*D, H, W]."""
        d, h, w = self.output_grid()
        return batch_size, self.widths[3] * d, h, w


class CenterPointSCN(nn.Module):
    """CenterPoint's SpMiddleResNetFHD: voxel features + (b, z, y, x) indices -> dense BEV map."""

    def __init__(self, config: ScnConfig = ScnConfig()) -> None:
        super().__init__()
        if min(config.widths) < 1 or config.in_channels < 1:
            raise HarnessError(f"CenterPointSCN: channel counts must be positive, got {config}")
        if config.output_grid()[0] < 1:
            raise HarnessError(f"CenterPointSCN: grid {config.grid} is too shallow (need z >= 15)")
        self.config = config
        c0, c1, c2, c3 = config.widths
        eps = config.bn_eps
        self.conv_input = spconv.SparseSequential(
            SubMConv3d(config.in_channels, c0, 3, padding=1, bias=False, indice_key="res0"),
            _bn(c0, eps),
            nn.ReLU(),
        )
        self.conv1 = spconv.SparseSequential(
            SparseBasicBlock(c0, "res0", eps), SparseBasicBlock(c0, "res0", eps)
        )
        self.conv2 = self._stage(c0, c1, 1, "res1")
        self.conv3 = self._stage(c1, c2, 1, "res2")
        self.conv4 = self._stage(c2, c3, (0, 1, 1), "res3")
        self.extra_conv = spconv.SparseSequential(
            SparseConv3d(c3, c3, (3, 1, 1), (2, 1, 1), bias=False),
            _bn(c3, eps),
            nn.ReLU(),
        )

    def _stage(
        self, cin: int, cout: int, padding: int | tuple[int, int, int], key: str
    ) -> spconv.SparseSequential:
        eps = self.config.bn_eps
        return spconv.SparseSequential(
            SparseConv3d(cin, cout, 3, 2, padding=padding, bias=False),
            _bn(cout, eps),
            nn.ReLU(),
            SparseBasicBlock(cout, key, eps),
            SparseBasicBlock(cout, key, eps),
        )

    def forward(
        self, features: torch.Tensor, indices: torch.Tensor, batch_size: int = 1
    ) -> torch.Tensor:
        """features [N, C] float, indices [N, 4] int32 rows (b, z, y, x) -> [B, C*D, H, W]."""
        x = spconv.SparseConvTensor(features, indices, list(self.config.grid), batch_size)
        x = self.conv_input(x)
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.conv4(x)
        x = self.extra_conv(x)
        dense: torch.Tensor = x.dense()
        n, c, d, h, w = dense.shape
        return dense.view(n, c * d, h, w)


def _fold(conv: SparseConvolution, bn: nn.BatchNorm1d) -> None:
    """Fold eval-mode `bn` into `conv`: W*g/sqrt(v+eps) per output channel, b' = (b-m)*s + beta."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    w = conv.weight.detach()
    conv.weight = nn.Parameter(w * scale.reshape([-1] + [1] * (w.ndim - 1)))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())


def _fuse_conv_bn_relu(seq: spconv.SparseSequential, path: str) -> list[nn.Module]:
    conv, bn, relu, *rest = list(seq)
    if not (isinstance(conv, SparseConvolution) and isinstance(bn, nn.BatchNorm1d)
            and isinstance(relu, nn.ReLU)):
        raise HarnessError(f"fuse_bn: {path} does not start with conv, BN, ReLU")
    _fold(conv, bn)
    conv.act_type = RELU
    return [conv, *rest]


def fuse_bn(model: CenterPointSCN) -> CenterPointSCN:
    """Fold every BN into its sparse convolution and fuse the following ReLU, in place.

    As NVIDIA's exporter does: `conv_input` and `extra_conv` become bare convolutions with
    ReLU activation; `conv2..conv4` become SparseSequential(downsampling conv, block, block);
    each block's `conv1` takes bn1 and the inner ReLU, `conv2` takes bn2, and the residual
    add and the final ReLU stay. The model must be in eval mode. Returns `model`.
    """
    if model.training:
        raise HarnessError("fuse_bn: put the model in eval mode first (BN running statistics)")
    if not isinstance(model.conv_input, spconv.SparseSequential):
        raise HarnessError("fuse_bn: model is already fused")
    for block in model.modules():
        if isinstance(block, SparseBasicBlock):
            assert block.bn1 is not None and block.bn2 is not None
            _fold(block.conv1, block.bn1)
            _fold(block.conv2, block.bn2)
            block.conv1.act_type = RELU
            block.bn1 = None
            block.bn2 = None
            block.relu1 = None
    model.conv_input = _fuse_conv_bn_relu(model.conv_input, "conv_input")[0]
    model.extra_conv = _fuse_conv_bn_relu(model.extra_conv, "extra_conv")[0]
    for name in ("conv2", "conv3", "conv4"):
        setattr(model, name, spconv.SparseSequential(*_fuse_conv_bn_relu(getattr(model, name), name)))
    return model


def random_voxels(
    grid: Sequence[int],
    num_voxels: int,
    seed: int,
    in_channels: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded LiDAR-like voxels: float32 features [N, C] and unique int32 indices [N, 4] (b,z,y,x).

    About two thirds of the voxels lie on a gently sloped ground, the rest on the walls of a few
    boxes, so convolutions see surfaces rather than noise. Features are CenterPoint's
    (x, y, z, intensity, time lag) on the scale of `harness.datasets.lidar`: the grid spans
    nuScenes' range (x, y in [-54, 54] m, z in [-5, 3] m), intensity in [0, 100), time lag in
    [0, 0.5) (extra channels: uniform noise in [0, 1)). Only integer ops, + - * / and
    comparisons touch the per-voxel data, so the bytes are the same on every machine. N may
    come out slightly smaller than `num_voxels`. For generating test inputs without ray casting.
    """
    gz, gy, gx = (int(v) for v in grid)
    if num_voxels < 1 or min(gz, gy, gx) < 1:
        raise HarnessError(f"random_voxels: need a positive count and grid, got {num_voxels}, {grid}")
    rng = np.random.default_rng(seed)
    n_ground = num_voxels * 2 // 3
    yx = rng.integers(0, [gy, gx], size=(n_ground, 2))
    z_ground = 2 + (yx[:, 0] * 3) // max(gy, 1) + rng.integers(0, 2, size=n_ground)
    parts = [np.column_stack([z_ground, yx])]
    n_obj = num_voxels - n_ground
    n_boxes = max(1, n_obj // 200)
    centre = rng.integers(0, [gy, gx], size=(n_boxes, 2))
    half = rng.integers(2, 12, size=(n_boxes, 2))
    height = rng.integers(4, max(5, gz // 2), size=n_boxes)
    box = rng.integers(0, n_boxes, size=n_obj)
    hy, hx = half[box, 0], half[box, 1]
    sign = 1 - 2 * rng.integers(0, 2, size=n_obj)
    on_y_wall = rng.integers(0, 2, size=n_obj) == 0
    oy = np.where(on_y_wall, sign * hy, rng.integers(-hy, hy + 1))
    ox = np.where(on_y_wall, rng.integers(-hx, hx + 1), sign * hx)
    zo = 3 + rng.integers(0, height[box])
    parts.append(np.column_stack([zo, centre[box, 0] + oy, centre[box, 1] + ox]))
    zyx = np.concatenate(parts)
    zyx = np.clip(zyx, 0, [gz - 1, gy - 1, gx - 1])
    flat = (zyx[:, 0] * gy + zyx[:, 1]) * gx + zyx[:, 2]
    _, first = np.unique(flat, return_index=True)
    zyx = zyx[np.sort(first)]
    n = zyx.shape[0]
    jitter = rng.random((n, 3))
    low = np.array([RANGE_LOW[2], RANGE_LOW[1], RANGE_LOW[0]])
    size = np.array([8.0 / max(gz - 1, 1), 108.0 / gy, 108.0 / gx])
    metres = low + (zyx + jitter) * size
    feats = np.zeros((n, in_channels), dtype=np.float64)
    xyz = metres[:, ::-1]
    k = min(3, in_channels)
    feats[:, :k] = xyz[:, :k]
    if in_channels > 3:
        feats[:, 3:] = rng.random((n, in_channels - 3))
    if in_channels > 3:
        feats[:, 3] = feats[:, 3] * 100
    if in_channels > 4:
        feats[:, 4] = feats[:, 4] / 2
    indices = np.column_stack([np.zeros(n, dtype=np.int64), zyx]).astype(np.int32)
    return torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(indices)


def init_weights(model: CenterPointSCN, seed: int) -> None:
    """Seeded He-style weights scaled for sparse fan-in, and random BN affine parameters.

    BN shifts are drawn around +0.6 so most activations survive the ReLUs: with zero-mean
    shifts a random network's sparse activations are heavy-tailed (max/rms up to ~50) and int8
    loses far more than trained networks do (output cosine ~0.96 on synthetic LiDAR sweeps,
    0.98 with shifts around +0.3, 0.998 around +0.6, where the Pearson correlation of the
    non-zero outputs is 0.994, so it is not a constant offset that makes the cosine high).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseConvolution):
                cout, *k, cin = module.weight.shape
                fan_in = cin * int(np.prod(k)) / 3.0
                std = (2.0 / fan_in) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(cout, generator=gen) * 0.05)
            elif isinstance(module, nn.BatchNorm1d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.6 + torch.randn(c, generator=gen) * 0.1)


def fit_bn_statistics(
    model: CenterPointSCN, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Set every BN's running mean/variance to its input statistics over `batches`, then eval.

    Gives a randomly initialised network normalised activations (as a trained one has), which
    keeps fp16 and int8 comparisons meaningful.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for features, indices in batches:
            model(features, indices)
    for bn in bns:
        bn.momentum = 0.01
    model.eval()


def round_params_to_fp16(model: M) -> M:
    """Round every sparse convolution's weight and bias to fp16-representable values, in place.

    The SCN engine stores fp16 weights, so a float reference that is compared with an exported
    graph (run in fp32 by the reference executor) should use exactly those weights.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseConvolution):
                for p in (module.weight, module.bias):
                    if p is not None:
                        p.copy_(p.half().float())
    return model


def centerpoint_scn(
    in_channels: int = 5,
    widths: Sequence[int] = WIDTHS,
    grid: Sequence[int] = FULL_GRID,
    seed: int = 0,
    fit_voxels: int = 0,
    fit_sweeps: int = 0,
    fuse: bool = False,
    fp16_params: bool = False,
) -> CenterPointSCN:
    """Zoo factory: CenterPoint SCN in eval mode with seeded weights.

    BN statistics are fitted (`fit_bn_statistics`) on `fit_sweeps` training sweeps of
    `harness.datasets.lidar.LidarSweeps` (grid "ci" or "full", which must match `grid`) and on
    one seeded `random_voxels` sweep of `fit_voxels` voxels; a checkpoint, when loaded,
    replaces all of it. `fuse` applies `fuse_bn`; `fp16_params` then `round_params_to_fp16`,
    so the model computes with the weights an export holds.
    """
    if len(widths) != 4 or len(grid) != 3:
        raise HarnessError(f"centerpoint_scn: need 4 widths and a 3-D grid, got {widths}, {grid}")
    w0, w1, w2, w3 = (int(w) for w in widths)
    gz, gy, gx = (int(g) for g in grid)
    model = CenterPointSCN(ScnConfig(in_channels, (w0, w1, w2, w3), (gz, gy, gx)))
    init_weights(model, seed)
    batches = _lidar_batches((gz, gy, gx), fit_sweeps, seed) if fit_sweeps > 0 else []
    if fit_voxels > 0:
        batches.append(random_voxels(grid, fit_voxels, seed + 1, in_channels))
    if batches:
        fit_bn_statistics(model, batches)
    model.eval()
    if fuse:
        fuse_bn(model)
    if fp16_params:
        round_params_to_fp16(model)
    return model


def _lidar_batches(
    grid: tuple[int, int, int], sweeps: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    profile = {CI_GRID: "ci", FULL_GRID: "full"}.get(grid)
    if profile is None:
        raise HarnessError(f"fit_sweeps: the LiDAR dataset has no grid {list(grid)} "
                           f"(ci {list(CI_GRID)}, full {list(FULL_GRID)})")
    data = LidarSweeps(split="train", size=sweeps, seed=seed, grid=profile)
    return [(torch.from_numpy(s.features), torch.from_numpy(s.indices)) for s in data]


def centerpoint_scn_ci(seed: int = 0, fuse: bool = True, fp16_params: bool = True) -> CenterPointSCN:
    """Zoo factory: the CI profile, full widths on the reduced 41x180x180 grid -> [1,256,23,23].

    BN statistics from 4 synthetic LiDAR training sweeps; fused with fp16-representable weights
    by default: the form that is exported and compared.
    """
    return centerpoint_scn(grid=CI_GRID, seed=seed, fit_sweeps=4, fuse=fuse,
                           fp16_params=fp16_params)


register_bn_folder(CenterPointSCN, lambda model: fuse_bn(model.eval()))  # type: ignore[arg-type]
SCN_SYMBOLICS.module(Add)(symbolic_add)
