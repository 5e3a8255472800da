"""Sharing rules: traced shared_input, shared_concat / shared_add, bottleneck_residual, conflicts with
keep_float and errors naming the rule, the pattern and the setting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from quant_nets import SmallNet, randomize_bn
from torch import nn

from harness.errors import QuantError
from harness.quant.calibrate import calibrate, quantization_disabled
from harness.quant.modules import QuantAdd, QuantConv2d
from harness.quant.rules import QuantConfigError, TraceGraph, get_rule, trace_modules
from harness.quant.tensor_quantizer import QuantDescriptor
from harness.quant.transform import QuantConfig, quantize_model, summarize
from harness.zoo import ops
from harness.zoo.resnet import BasicBlock, Bottleneck, ResNet

X = (torch.randn(1, 3, 32, 32),)


def test_shared_input_merges_quantizers_of_modules_reading_one_tensor() -> None:
    q = quantize_model(SmallNet().eval(), QuantConfig(rules=(get_rule("shared_input"),)), example_inputs=X)
    assert q.left[0].input_quantizer is q.right[0].input_quantizer
    assert q.block.conv1[0].input_quantizer is q.block.add.get_input_quantizer(1)
    assert q.stem[0].input_quantizer is not q.left[0].input_quantizer
    assert summarize(q).shared["left.0.input_quantizer"] == ("left.0:0", "right.0:0")


def test_without_rules_nothing_is_shared_across_modules() -> None:
    q = quantize_model(SmallNet().eval(), QuantConfig())
    assert q.left[0].input_quantizer is not q.right[0].input_quantizer
    assert set(summarize(q).shared) == {"block.add.input_quantizer"}


def test_shared_add_restores_sharing_after_per_input_override() -> None:
    q = quantize_model(SmallNet().eval(), QuantConfig())
    add: QuantAdd = q.block.add
    add.set_input_quantizer(0, type(q.stem[0].input_quantizer)(name="extra"))
    assert add.get_input_quantizer(0) is not add.get_input_quantizer(1)
    assert get_rule("shared_add").apply(q, None) == 1
    assert add.get_input_quantizer(0) is add.get_input_quantizer(1)


def test_rules_compose_globally() -> None:
    cfg = QuantConfig(rules=(get_rule("shared_input"), get_rule("shared_concat")))
    q = quantize_model(SmallNet().eval(), cfg, example_inputs=X)
    assert q.cat.get_input_quantizer(0) is q.cat.get_input_quantizer(1)


def test_rule_matching_nothing_is_an_error_naming_it() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(QuantError, match="rule 'shared_concat' matched nothing"):
        quantize_model(plain, QuantConfig(rules=(get_rule("shared_concat"),)))
    with pytest.raises(QuantError, match="rule 'shared_input' matched nothing"):
        quantize_model(plain, QuantConfig(rules=(get_rule("shared_input"),)), example_inputs=(torch.randn(1, 3, 8, 8),))


def test_traced_rule_needs_example_inputs_and_unknown_rules_are_named() -> None:
    with pytest.raises(QuantError, match="rule 'shared_input' needs example inputs"):
        quantize_model(SmallNet().eval(), QuantConfig(rules=(get_rule("shared_input"),)))
    with pytest.raises(QuantError, match="unknown quantization rule 'residual'"):
        get_rule("residual")


def test_custom_rule_objects_plug_in() -> None:
    @dataclass(frozen=True)
    class IdentityOnly:
        name: str = "identity_only"
        needs_trace: bool = False

        def apply(self, model: nn.Module, graph: TraceGraph | None) -> int:
            model.block.add.set_input_quantizer(0, None)
            return 1

    q = quantize_model(SmallNet().eval(), QuantConfig(rules=(IdentityOnly(),)))
    assert q.block.add.get_input_quantizer(0) is None and q.block.add.get_input_quantizer(1) is not None


def test_trace_records_tensor_identity() -> None:
    model = SmallNet().eval()
    graph = trace_modules(model, X, lambda m: isinstance(m, nn.Conv2d))
    readers = graph.readers()
    shared = [r for r in readers.values() if len(r) > 1]
    assert sorted(shared[0]) == [("left.0", 0), ("right.0", 0)]
    assert graph.count("stem.0") == 1


# --------------------------------------------------------------------------- bottleneck_residual


def _resnet(depth: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = randomize_bn(ResNet(depth, base_channels=4))
    return model, (torch.randn(1, 3, 32, 32),)


@pytest.mark.parametrize("depth", [18, 50])
def test_bottleneck_residual_gives_every_block_a_residual_quantizer(depth: int) -> None:
    model, x = _resnet(depth)
    q = quantize_model(model, QuantConfig(rules=(get_rule("bottleneck_residual"),)), example_inputs=x)
    blocks = [m for m in q.modules() if isinstance(m, BasicBlock | Bottleneck)]
    assert len(blocks) == (8 if depth == 18 else 16)
    conv_quantizers = [m.input_quantizer for m in q.modules() if isinstance(m, QuantConv2d)]
    for block in blocks:
        shared = block.conv1.input_quantizer
        assert block.add.get_input_quantizer(0) is None  # the branch: TensorRT fuses the add into the last conv
        identity = block.add.get_input_quantizer(1)
        if block.downsample is None:
            assert identity is shared
        else:
            assert block.downsample[0].input_quantizer is shared  # both read the block input
            assert identity is not None and all(identity is not c for c in conv_quantizers)
    # the shared default quantizer of each add is gone: only the per-input ones are left
    assert all(type(b.add.input_quantizer) is nn.Identity for b in blocks)


def test_bottleneck_residual_model_calibrates_and_stays_float_when_disabled() -> None:
    model, x = _resnet(50)
    config = QuantConfig(activations=QuantDescriptor(calibrator="max"), rules=(get_rule("bottleneck_residual"),))
    q = quantize_model(model, config, example_inputs=x)
    calibrate(q, [x, (torch.randn(2, 3, 32, 32),)], progress=False)
    residual = q.layer2[0].add.get_input_quantizer(1)
    assert residual is not None and residual.is_calibrated
    with torch.no_grad():
        quantized = q(*x)
        with quantization_disabled(q):
            plain = q(*x)
        ref = model(*x)
    for a, b, c in zip(quantized, plain, ref, strict=True):
        assert torch.allclose(b, c, atol=1e-4, rtol=1e-4)
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), c.flatten(), dim=0)) > 0.98


def test_bottleneck_residual_composes_with_the_sharing_rules_in_any_order() -> None:
    model, x = _resnet(50)
    names = ["bottleneck_residual", "shared_input", "shared_add", "shared_concat"]
    forward = quantize_model(model, QuantConfig(rules=tuple(get_rule(n) for n in names[:3])), example_inputs=x)
    backward = quantize_model(model, QuantConfig(rules=tuple(get_rule(n) for n in names[2::-1])), example_inputs=x)
    for q in (forward, backward):
        for block in (m for m in q.modules() if isinstance(m, BasicBlock | Bottleneck)):
            assert block.add.get_input_quantizer(0) is None
            assert block.add.get_input_quantizer(1) is not None
    groups = {frozenset(users) for users in summarize(forward).shared.values()}
    assert groups == {frozenset(users) for users in summarize(backward).shared.values()}


def test_bottleneck_residual_matching_no_block_is_an_error_naming_rule_and_entry() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    rules = (get_rule("shared_add"), get_rule("bottleneck_residual"))
    with pytest.raises(QuantConfigError, match="rule 'shared_add' matched nothing") as err:
        quantize_model(plain, QuantConfig(rules=rules))
    assert (err.value.key, err.value.index) == ("rules", 0)
    with pytest.raises(QuantConfigError, match="rule 'bottleneck_residual' matched nothing") as err:
        quantize_model(plain, QuantConfig(rules=rules[1:]))
    assert (err.value.key, err.value.index) == ("rules", 0)


@pytest.mark.parametrize("pattern, layer", [
    ("layer1.0.conv1", "layer1.0.conv1"),              # no conv1 input quantizer to reuse
    ("layer2.0.downsample", "layer2.0.downsample.0"),  # cannot share conv1's input quantizer
    ("layer3.1.add", "layer3.1.add"),                  # the identity could not be quantized
    ("layer4", "layer4.0.conv1"),                      # the rule covers every block
])
def test_keep_float_layer_the_residual_rule_needs_is_a_conflict(pattern: str, layer: str) -> None:
    model, _ = _resnet(50)
    config = QuantConfig(keep_float=("head*", pattern), rules=(get_rule("bottleneck_residual"),))
    model.head = nn.Conv2d(3, 3, 1)  # a kept-float layer no rule touches
    with pytest.raises(QuantConfigError, match=(
        f"rule 'bottleneck_residual' conflicts with keep_float pattern '{pattern}'.*'{layer}'"
    )) as err:
        quantize_model(model, config)
    assert (err.value.key, err.value.index) == ("keep_float", 1)


def test_excluded_blocks_are_out_of_scope_but_half_excluded_ones_are_errors() -> None:
    model, x = _resnet(18)
    q = quantize_model(model, QuantConfig(exclude=("layer4",), rules=(get_rule("bottleneck_residual"),)), example_inputs=x)
    assert type(q.layer4[0].add) is ops.Add and q.layer3[1].add.get_input_quantizer(0) is None
    with pytest.raises(QuantConfigError, match=r"block 'layer2.1' is partly quantized \(layer2.1.conv1 float\)") as err:
        quantize_model(model, QuantConfig(exclude=("layer2.1.conv1",), rules=(get_rule("shared_input"),
                                                                               get_rule("bottleneck_residual"))),
                       example_inputs=x)
    assert (err.value.key, err.value.index) == ("rules", 1)


def test_keep_float_concat_with_shared_concat_is_a_conflict() -> None:
    with pytest.raises(QuantConfigError, match="rule 'shared_concat' conflicts with keep_float pattern 'cat'") as err:
        quantize_model(SmallNet().eval(), QuantConfig(keep_float=("head", "cat"), rules=(get_rule("shared_concat"),)))
    assert (err.value.key, err.value.index) == ("keep_float", 1)


def test_shared_input_conflicts_only_when_float_and_quantized_layers_read_one_tensor() -> None:
    # left.0 and right.0 read the same tensor: keeping one of them float contradicts sharing
    with pytest.raises(QuantConfigError, match=r"rule 'shared_input' conflicts with keep_float pattern 'right'.*'right\.0'"):
        quantize_model(SmallNet().eval(), QuantConfig(keep_float=("right",), rules=(get_rule("shared_input"),)),
                       example_inputs=X)
    # both float: nothing to share, no conflict (a float head with several branches is fine)
    q = quantize_model(SmallNet().eval(), QuantConfig(keep_float=("left", "right", "head"),
                                                      rules=(get_rule("shared_input"),)), example_inputs=X)
    assert type(q.left[0]) is nn.Conv2d and type(q.right[0]) is nn.Conv2d


def test_unknown_rule_and_unmatched_keep_float_carry_their_setting() -> None:
    with pytest.raises(QuantConfigError, match="unknown quantization rule 'residual'") as err:
        get_rule("residual")
    assert err.value.key == "rules"
    with pytest.raises(QuantConfigError, match=r"keep_float pattern 'decoder\.neck\.deblocks\.0\.0' matches no module") as err:
        quantize_model(SmallNet().eval(), QuantConfig(keep_float=("head", "decoder.neck.deblocks.0.0")))
    assert (err.value.key, err.value.index) == ("keep_float", 1)
