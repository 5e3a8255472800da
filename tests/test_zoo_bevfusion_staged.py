"""BEVFusionStaged: the camera branch as CUDA-BEVFusion's three stages plus the BEV pool glue."""

from __future__ import annotations

import pytest
import torch

from harness.datasets.fusion import FusionInputs
from harness.errors import HarnessError
from harness.program import Program
from harness.zoo.bevfusion import BEVFusionCameraStage
from harness.zoo.bevfusion_staged import BEVFusionStaged, bevfusion_camera_staged

STAGES = {
    "camera_backbone": (("img", "depth"), ("camera_feature", "camera_depth_weights")),
    "camera_vtransform": (("feat_in",), ("feat_out",)),
    "fuser_decoder": (("camera", "lidar"), ("middle",)),
}
CI = {"image_height": 64, "image_width": 192, "beams": 16, "azimuth_steps": 720, "bev_range": 51.2,
      "bev_cells": 16, "bev_channels": 32}


@pytest.fixture(scope="module")
def model() -> BEVFusionStaged:
    return bevfusion_camera_staged("ci")


def _inputs(size: int = 1) -> dict[str, torch.Tensor]:
    data = FusionInputs(size=size, **CI)  # type: ignore[arg-type]
    return {k: torch.cat([torch.from_numpy(getattr(data[i], k)) for i in range(size)])
            for k in ("img", "depth", "lidar2img", "lidar_bev")}


def test_layers_keep_their_bevfusion_names(model: BEVFusionStaged) -> None:
    names = {n for n, _ in model.named_modules()}
    assert {"encoders.camera.backbone.layer3.0.conv1", "decoder.neck.deblocks.1.0", "fuser.conv"} <= names
    assert not any(n.startswith("camera_backbone.model.") for n in names)
    assert isinstance(model.get_submodule("camera_backbone"), BEVFusionCameraStage)
    assert model.camera_backbone.model.fuser is model.fuser


def test_stages_with_pytorch_glue_compute_the_whole_model(model: BEVFusionStaged) -> None:
    inputs = _inputs()
    calls: list[str] = []
    program = Program.staged(model, STAGES)

    def call(name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls.append(name)
        return program.stages[name](feeds)

    with torch.no_grad():
        staged = program.run(inputs, call)["middle"]
        whole = model.model(inputs["img"], inputs["depth"], inputs["lidar_bev"], model.model.geometry(inputs["lidar2img"][0]))
        direct = model(**inputs)
    assert calls == list(STAGES)
    assert staged.shape == (1, 64, 16, 16)
    assert torch.equal(staged, whole) and torch.equal(direct, whole)


def test_a_batch_pools_each_sample_with_its_own_rig(model: BEVFusionStaged) -> None:
    inputs = _inputs(2)
    with torch.no_grad():
        batch = model(**inputs)
        single = model(**{k: v[1:] for k, v in inputs.items()})
    assert torch.allclose(batch[1:], single, atol=1e-3, rtol=1e-4)


def test_inputs_that_do_not_fit_are_named(model: BEVFusionStaged) -> None:
    inputs = _inputs()
    inputs["lidar_bev"] = inputs["lidar_bev"][:, :16]
    with pytest.raises(HarnessError, match=r"lidar_bev \(1, 16, 16, 16\) \(expected \(1, 32, 16, 16\)\)"):
        model(**inputs)
    with pytest.raises(HarnessError, match="missing inputs"):
        model.run_stages({"img": inputs["img"]}, lambda name, feeds: {})


def test_state_dict_is_the_plain_model_state_dict(model: BEVFusionStaged) -> None:
    plain = model.model.state_dict()
    staged = model.state_dict()
    assert list(staged) == list(plain)
    other = bevfusion_camera_staged(profile="ci", seed=1)
    other.load_state_dict(plain, strict=True)
    for name, param in other.named_parameters(remove_duplicate=False):
        key = name.split(".model.", 1)[-1]
        assert torch.equal(param, plain[key]), name
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in plain.items() if not k.startswith("fuser.")})
