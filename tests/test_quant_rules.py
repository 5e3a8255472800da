"""Sharing rules: traced shared_input, shared_concat / shared_add, errors naming the rule."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from quant_nets import SmallNet
from torch import nn

from harness.errors import QuantError
from harness.quant.modules import QuantAdd
from harness.quant.rules import TraceGraph, get_rule, trace_modules
from harness.quant.transform import QuantConfig, quantize_model, summarize

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
