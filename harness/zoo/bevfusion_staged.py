"""BEVFusion's camera branch as a staged program: CUDA-BEVFusion's three engines and the BEV pool.

`BEVFusionStaged` wraps a `BEVFusionCamera` for `harness.program`: its stages are the stage
modules of `harness.zoo.bevfusion`, registered as

- `camera_backbone` (`BEVFusionCameraStage`, CUDA-BEVFusion's `camera.backbone.onnx`): `img`,
  `depth` -> `camera_feature`, `camera_depth_weights`;
- `camera_vtransform` (`BEVFusionVTransformStage`, `camera.vtransform.onnx`): `feat_in` ->
  `feat_out`;
- `fuser_decoder` (`BEVFusionFuserStage`, `fuser.onnx`): `camera`, `lidar` -> `middle`;

and `run_stages` runs the glue between them in PyTorch: the frustum geometry of each sample's
`lidar2img` and the BEV pool.

The wrapped model's own parts are registered first under their BEVFusion names (`encoders`,
`fuser`, `decoder`), so module names, quantization patterns and rules read as in the deployment
guide (`encoders.camera.backbone.layer3.0.conv1`, `decoder.neck.deblocks.1.0`); the stage
modules reach the same layers (PyTorch lists each module once, under its first name). The
stage modules' paths to those layers (`camera_backbone.model.encoders...`) are aliases: the
wrapper's `state_dict` leaves them out, and `load_state_dict` fills them from the BEVFusion
names, so the wrapper's state dict is exactly a `BEVFusionCamera`'s and a plain BEVFusion camera
state dict (e.g. from `qharness convert cuda-bevfusion-r50`) loads with `strict=True`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from harness.program import StageCall
from harness.zoo.bevfusion import (
    BEVFusionCamera,
    BEVFusionCameraStage,
    BEVFusionFuserStage,
    BEVFusionVTransformStage,
    bev_pool,
    bevfusion_camera_r50,
)

__all__ = ["INPUT_NAMES", "STAGE_NAMES", "BEVFusionStaged", "bevfusion_camera_staged"]

STAGE_NAMES = ("camera_backbone", "camera_vtransform", "fuser_decoder")
"""The stage modules; each reaches the wrapped model as `<stage>.model`."""
_MODEL_PARTS = ("encoders.", "fuser.", "decoder.")

INPUT_NAMES = ("img", "depth", "lidar2img", "lidar_bev")
"""Program inputs: img [B, N, 3, H, W], depth [B, N, 1, H, W], lidar2img [B, N, 4, 4] (image
pixels), lidar_bev [B, lidar_channels, X/2, Y/2] (the fuser's lidar input)."""


class BEVFusionStaged(nn.Module):
    """A BEVFusionCamera whose stages run through `run_stages(inputs, call)`; output `middle`."""

    def __init__(self, model: BEVFusionCamera) -> None:
        super().__init__()
        self.encoders = model.encoders
        self.fuser = model.fuser
        self.decoder = model.decoder
        self.camera_backbone = BEVFusionCameraStage(model)
        self.camera_vtransform = BEVFusionVTransformStage(model)
        self.fuser_decoder = BEVFusionFuserStage(model)
        self.train(model.training)
        self.register_state_dict_post_hook(_drop_stage_aliases)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_fill_stage_aliases)  # type: ignore[no-untyped-call]

    @property
    def model(self) -> BEVFusionCamera:
        """The wrapped BEVFusionCamera."""
        model = self.camera_backbone.model
        assert isinstance(model, BEVFusionCamera)
        return model

    def _check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in INPUT_NAMES if n not in inputs]
        if missing:
            raise HarnessError(f"BEVFusionStaged: missing inputs {missing}; got {sorted(inputs)}")
        cfg = self.model.config
        batch = inputs["img"].shape[0]
        expected = {
            "img": (batch, cfg.num_cams, 3, *cfg.image_hw),
            "depth": (batch, cfg.num_cams, 1, *cfg.image_hw),
            "lidar2img": (batch, cfg.num_cams, 4, 4),
            "lidar_bev": (batch, cfg.lidar_channels, *cfg.fused_xy),
        }
        wrong = [f"{n} {tuple(inputs[n].shape)} (expected {shape})" for n, shape in expected.items()
                 if tuple(inputs[n].shape) != shape]
        if wrong:
            raise HarnessError(f"BEVFusionStaged: input shapes do not fit the model: {', '.join(wrong)}")

    def run_stages(self, inputs: Mapping[str, torch.Tensor], call: StageCall) -> dict[str, torch.Tensor]:
        """camera_backbone -> BEV pool per sample (PyTorch) -> camera_vtransform -> fuser_decoder."""
        self._check_inputs(inputs)
        model = self.model
        cams = model.config.num_cams
        camera = call("camera_backbone", {"img": inputs["img"], "depth": inputs["depth"]})
        feature, weights = camera["camera_feature"], camera["camera_depth_weights"]
        pooled = []
        for b in range(inputs["img"].shape[0]):
            geometry = model.geometry(inputs["lidar2img"][b].to(feature.device))
            rows = slice(b * cams, (b + 1) * cams)
            pooled.append(bev_pool(feature[rows], weights[rows], geometry, model.config.bev_zxy))
        bev = call("camera_vtransform", {"feat_in": torch.cat(pooled)})
        out = call("fuser_decoder", {"camera": bev["feat_out"], "lidar": inputs["lidar_bev"]})
        return {"middle": out["middle"]}

    def forward(
        self, img: torch.Tensor, depth: torch.Tensor, lidar2img: torch.Tensor, lidar_bev: torch.Tensor
    ) -> torch.Tensor:
        """All stages eagerly -> `middle`."""
        inputs = {"img": img, "depth": depth, "lidar2img": lidar2img, "lidar_bev": lidar_bev}
        return self.run_stages(inputs, self._eager)["middle"]

    def _eager(self, name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stage = {"camera_backbone": self.camera_backbone, "camera_vtransform": self.camera_vtransform,
                 "fuser_decoder": self.fuser_decoder}[name]
        result = stage(*[feeds[n] for n in stage.input_names])
        values = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        return dict(zip(stage.output_names, values, strict=True))


def _drop_stage_aliases(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: remove the stage modules' aliases of the model's entries."""
    aliases = tuple(f"{prefix}{stage}." for stage in STAGE_NAMES)
    for key in [k for k in state_dict if k.startswith(aliases)]:
        del state_dict[key]


def _fill_stage_aliases(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """load_state_dict pre-hook: give each stage module's alias the entry of the model part it
    names (entries already present, as in state dicts written before the aliases were dropped,
    are kept)."""
    parts = tuple(prefix + part for part in _MODEL_PARTS)
    for key in [k for k in state_dict if k.startswith(parts)]:
        for stage in STAGE_NAMES:
            state_dict.setdefault(f"{prefix}{stage}.model.{key[len(prefix):]}", state_dict[key])


def bevfusion_camera_staged(profile: str = "full", seed: int = 0, **overrides: Any) -> BEVFusionStaged:
    """`bevfusion_camera_r50(profile, seed, **overrides)` wrapped as a staged program (eval mode)."""
    return BEVFusionStaged(bevfusion_camera_r50(profile, seed, **overrides)).eval()
