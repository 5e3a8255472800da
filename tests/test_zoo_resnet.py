"""Tests of harness.zoo.resnet: mmdet structure and names, widths, the Add wiring, export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.zoo.ops import Add
from harness.zoo.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export"
)


@pytest.mark.parametrize(
    ("factory", "params"),
    # Parameter counts of torchvision's resnet18/34/50 without the fc layer.
    [(resnet18, 11_176_512), (resnet34, 21_284_672), (resnet50, 23_508_032)],
)
def test_parameter_count_matches_reference_architecture(
    factory: Callable[[], ResNet], params: int
) -> None:
    model = factory()
    assert sum(p.numel() for p in model.parameters()) == params


def test_mmdet_names() -> None:
    keys = set(resnet50().state_dict())
    for key in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv3.weight",
        "layer1.0.bn3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.5.conv2.weight",
        "layer4.2.bn3.bias",
    ]:
        assert key in keys, key
    keys18 = set(resnet18().state_dict())
    assert "layer2.0.downsample.0.weight" in keys18
    assert "layer1.0.downsample.0.weight" not in keys18  # same width and stride: no projection
    assert not any(".conv3." in k for k in keys18)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_shapes_strides_and_out_indices(depth: int) -> None:
    model = ResNet(depth, out_indices=(1, 3), base_channels=8).eval()
    expansion = 4 if depth == 50 else 1
    outs = model(torch.randn(2, 3, 64, 96))
    assert [o.shape for o in outs] == [
        (2, 16 * expansion, 8, 12),
        (2, 64 * expansion, 2, 3),
    ]
    assert model.out_channels == [8 * expansion * 2**i for i in range(4)]


def test_bottleneck_puts_stride_on_3x3() -> None:
    block = resnet50().layer2[0]
    assert isinstance(block, Bottleneck)
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample is not None and block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("depth", [18, 50])
def test_add_receives_branch_then_identity(depth: int) -> None:
    model = ResNet(depth, base_channels=4).eval()
    seen: list[tuple[str, bool]] = []

    def record(name: str, block: BasicBlock | Bottleneck) -> None:
        block_in: list[torch.Tensor] = []
        block.register_forward_pre_hook(lambda _m, args: block_in.append(args[0]))

        def on_add(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            out, identity = args
            x = block_in.pop()
            expected_identity = x if block.downsample is None else block.downsample(x)
            last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            seen.append(
                (name, torch.equal(identity, expected_identity) and out.shape == identity.shape)
            )
            assert last_bn.num_features == out.shape[1]

        block.add.register_forward_hook(on_add)

    for name, module in model.named_modules():
        if isinstance(module, BasicBlock | Bottleneck):
            assert isinstance(module.add, Add)
            record(name, module)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen and all(ok for _, ok in seen), seen


def test_bad_arguments() -> None:
    with pytest.raises(HarnessError, match="depth 101"):
        ResNet(101)
    with pytest.raises(HarnessError, match="out_indices"):
        ResNet(18, out_indices=(4,))


def test_onnx_export_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet50(out_indices=(1, 2, 3), base_channels=8).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "resnet50.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["img"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"img": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)
