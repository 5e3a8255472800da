"""PIDNet-S: official parameter names and counts, output shapes, ops modules, ONNX export."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from harness.zoo.ops import Add, Concat
from harness.zoo.pidnet import TRAINING_ONLY_PREFIXES, inference_state_dict, pidnet_s


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small CPU inferences run fastest single-threaded, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Parameter counts of the official PIDNet-S (XuJiacong/PIDNet models/pidnet.py, m=2, n=3,
# planes=32, ppm_planes=96, head_planes=128, 19 classes), counted on a build of that code.
OFFICIAL_PARAMS_INFERENCE = 7_625_715
OFFICIAL_PARAMS_TRAINING = 7_720_935

# A sample of keys of the official state_dict, one per module family.
OFFICIAL_KEYS = [
    "conv1.0.weight",
    "conv1.0.bias",
    "conv1.4.running_var",
    "layer1.1.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight",
    "layer5.0.conv3.weight",
    "layer5.1.bn3.bias",
    "compression3.0.weight",
    "compression4.1.running_mean",
    "pag3.f_x.0.weight",
    "pag4.f_y.1.bias",
    "layer3_.1.conv2.weight",
    "layer5_.0.downsample.1.weight",
    "layer3_d.downsample.0.weight",
    "layer4_d.0.conv1.weight",
    "layer5_d.0.bn3.weight",
    "diff3.0.weight",
    "diff4.1.running_var",
    "spp.scale1.1.weight",
    "spp.scale4.3.weight",
    "spp.scale0.2.weight",
    "spp.scale_process.2.weight",
    "spp.compression.0.running_mean",
    "spp.shortcut.2.weight",
    "dfm.conv_p.0.weight",
    "dfm.conv_i.1.bias",
    "final_layer.bn1.weight",
    "final_layer.conv1.weight",
    "final_layer.conv2.weight",
    "final_layer.conv2.bias",
]
HEAD_KEYS = ["seghead_p.conv2.weight", "seghead_d.conv2.bias", "seghead_d.bn1.running_mean"]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_equal_official() -> None:
    assert _n_params(pidnet_s()) == OFFICIAL_PARAMS_INFERENCE
    assert _n_params(pidnet_s(augment=True)) == OFFICIAL_PARAMS_TRAINING


def test_state_dict_uses_official_names() -> None:
    inference = pidnet_s().state_dict()
    training = pidnet_s(augment=True).state_dict()
    for key in OFFICIAL_KEYS:
        assert key in inference, key
    for key in HEAD_KEYS:
        assert key in training and key not in inference, key
    assert inference["final_layer.conv2.weight"].shape == (19, 128, 1, 1)
    assert inference["spp.scale_process.2.weight"].shape == (384, 96, 3, 3)
    assert set(training) - set(inference) == {
        k for k in training if k.startswith(TRAINING_ONLY_PREFIXES)
    }


def test_official_checkpoint_layout_loads_strictly() -> None:
    trained = pidnet_s(augment=True)
    wrapped = {f"model.{k}": v for k, v in trained.state_dict().items()}
    wrapped["sem_loss.criterion.weight"] = torch.ones(19)
    fresh_training = pidnet_s(augment=True)
    fresh_training.load_state_dict({k[6:]: v for k, v in wrapped.items() if k.startswith("model.")})
    fresh_inference = pidnet_s(augment=False)
    fresh_inference.load_state_dict(inference_state_dict(wrapped), strict=True)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        main = fresh_training(x)[1]
        assert torch.equal(fresh_inference(x), main)


@pytest.mark.parametrize(("height", "width"), [(64, 128), (96, 160)])
def test_output_shapes(height: int, width: int) -> None:
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = pidnet_s(num_classes=7)(x)
        aux, main, boundary = pidnet_s(num_classes=7, augment=True)(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 7, height // 8, width // 8)
    assert aux.shape == main.shape == out.shape
    assert boundary.shape == (2, 1, height // 8, width // 8)


def test_factory_returns_eval_mode() -> None:
    assert not pidnet_s().training


class _JoinsAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Add | Concat) or super().is_leaf_module(m, module_qualified_name)


def test_every_join_goes_through_ops_modules() -> None:
    model = pidnet_s(augment=True)
    graph = _JoinsAsLeaves().trace(model)
    bare = [
        node
        for node in graph.nodes
        if node.op in ("call_function", "call_method")
        and node.target in (operator.add, operator.iadd, torch.add, torch.cat, "add", "add_")
    ]
    assert bare == []
    joins = {n.target for n in graph.nodes if n.op == "call_module"}
    adds = {name for name, m in model.named_modules() if isinstance(m, Add)}
    cats = {name for name, m in model.named_modules() if isinstance(m, Concat)}
    assert adds and cats
    assert adds | cats <= joins


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = pidnet_s()
    # Batch statistics from a few random batches make activations trained-like (O(1)) rather
    # than the exploding magnitudes of kaiming init with unit running variance.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 128, 256))
    model.eval()
    x = torch.randn(1, 3, 128, 256)
    path = tmp_path / "pidnet_s.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert isinstance(want, torch.Tensor)
    assert got.shape == (1, 19, 16, 32)
    assert float(want.abs().max()) > 1.0
    # fp32 rounding alone (torch fp32 against torch fp64) is about 1e-5 of the logit range here.
    scale = float(want.abs().max())
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5 * scale, rtol=0)
