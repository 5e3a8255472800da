"""Graph checks of Q/DQ ONNX (residual adds, shared adds, concats, unquantized convs) and the rule report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from quant_nets import randomize_bn
from torch import nn

from harness.export.inspect import RuleReport, inspect_qdq, node_modules, rule_report
from harness.export.qdq import export_qdq
from harness.quant.calibrate import calibrate
from harness.quant.modules import QuantAdd, QuantConv2d
from harness.quant.rules import get_rule
from harness.quant.tensor_quantizer import QuantDescriptor
from harness.quant.transform import QuantConfig, quantize_model, summarize
from harness.zoo import ops
from harness.zoo.bevfusion_staged import bevfusion_camera_staged
from harness.zoo.resnet import BasicBlock, ResNet

C = 4


class Graph:
    """A tiny ONNX graph under construction: input `x` [1, 4, 8, 8], Q/DQ, convs, joins."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def qdq(self, name: str, tensor: str, scale: float = 0.05, zero: int = 0) -> str:
        s = self.const(f"{name}_scale", np.array(scale, np.float32))
        z = self.const(f"{name}_zero", np.array(zero, np.int8))
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{name}_q"], name=f"/{name}/QuantizeLinear"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"],
                                           name=f"/{name}/DequantizeLinear"))
        return f"{name}_dq"

    def conv(self, name: str, tensor: str, scope: str = "/blk/conv") -> str:
        w = self.const(f"{name}_w", np.ones((C, C, 3, 3), np.int8))
        s = self.const(f"{name}_ws", np.full(C, 0.01, np.float32))
        z = self.const(f"{name}_wz", np.zeros(C, np.int8))
        self.nodes.append(helper.make_node("DequantizeLinear", [w, s, z], [f"{name}_wdq"], name=f"{scope}/wDQ", axis=0))
        self.nodes.append(helper.make_node("Conv", [tensor, f"{name}_wdq"], [name], name=f"{scope}/Conv", pads=[1] * 4))
        return name

    def op(self, op: str, inputs: list[str], out: str, scope: str, **attrs: int) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{scope}/{op}", **attrs))
        return out

    def model(self, *outputs: str, ints: tuple[str, ...] = ()) -> onnx.ModelProto:
        value = helper.make_tensor_value_info
        graph = helper.make_graph(self.nodes, "g", [value("x", TensorProto.FLOAT, [1, C, 8, 8])],
                                  [value(o, TensorProto.FLOAT, [1, C, 8, 8]) for o in outputs]
                                  + [value(o, TensorProto.INT64, [4]) for o in ints], self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(proto)
        return proto


def residual(identity_quantized: bool = True, branch_read_twice: bool = False) -> onnx.ModelProto:
    g = Graph()
    c = g.conv("c", g.qdq("x_in", "x"))
    identity = g.qdq("x_id", "x") if identity_quantized else "x"
    y = g.op("Add", [c, identity], "y", "/blk/add")
    if branch_read_twice:
        return g.model(y, g.op("Relu", [c], "r", "/blk/relu"))
    return g.model(y)


def test_residual_add_with_quantized_identity_is_fine() -> None:
    found = inspect_qdq(residual())
    (add,) = found.joins
    assert add.kind == "residual_add" and add.problems == ()
    assert found.qdq_pairs == 2 and found.weight_dequantizers == 1
    assert [(c.node, c.input_quantized, c.weight_quantized) for c in found.convs] == [("/blk/conv/Conv", True, True)]


def test_residual_add_problems_name_the_identity_and_the_branch_conv() -> None:
    (add,) = inspect_qdq(residual(identity_quantized=False)).joins
    assert add.kind == "residual_add"
    assert add.problems == ("identity (input 1, 'x' from graph input) does not arrive through Q/DQ",)
    (add,) = inspect_qdq(residual(branch_read_twice=True)).joins
    assert len(add.problems) == 1 and "'/blk/conv/Conv' is also read by ['/blk/relu/Relu']" in add.problems[0]


def test_concat_needs_every_input_quantized_with_one_scale() -> None:
    g = Graph()
    relu = g.op("Relu", ["x"], "r", "/blk/relu")
    same = g.op("Concat", [g.qdq("a", "x"), g.qdq("b", relu)], "same", "/cat_same", axis=0)
    differ = g.op("Concat", [g.qdq("c", "x"), g.qdq("d", relu, scale=0.1)], "differ", "/cat_differ", axis=0)
    raw = g.op("Concat", [g.qdq("e", "x"), relu], "raw", "/cat_raw", axis=0)
    checks = {j.node: j for j in inspect_qdq(g.model(same, differ, raw)).joins}
    assert checks["/cat_same/Concat"].problems == ()
    (problem,) = checks["/cat_differ/Concat"].problems
    assert problem.startswith("input 1 ('d_dq') has scale 0.1 / zero point 0, input 0 has 0.05 / 0")
    assert checks["/cat_raw/Concat"].problems == ("input 1 ('r', from Relu) is not quantized",)


def test_shared_mixed_and_float_adds() -> None:
    g = Graph()
    relu = g.op("Relu", ["x"], "r", "/blk/relu")
    shared = g.op("Add", [g.qdq("a", "x"), g.qdq("b", relu, scale=0.07)], "shared", "/shared")
    mixed = g.op("Add", [g.qdq("c", "x"), relu], "mixed", "/mixed")
    plain = g.op("Add", ["x", relu], "plain", "/plain")
    shape = g.op("Shape", ["x"], "shape", "/shape")
    ints = g.op("Add", [shape, g.op("Shape", [relu], "shape2", "/shape2")], "ints", "/ints")
    found = inspect_qdq(g.model(shared, mixed, plain, ints=(ints,)))  # integer (shape) adds are no joins
    kinds = {j.node: (j.kind, len(j.problems)) for j in found.joins}
    assert kinds == {"/shared/Add": ("shared_add", 1), "/mixed/Add": ("mixed_add", 1), "/plain/Add": ("float_add", 1)}


def test_unquantized_conv_is_a_violation_only_when_the_layer_is_quantized_in_pytorch() -> None:
    g = Graph()
    proto = g.model(g.conv("c", "x"))
    quantized, floating = nn.Module(), nn.Module()
    quantized.blk = nn.Module()
    quantized.blk.conv = QuantConv2d.from_float(nn.Conv2d(C, C, 3))
    floating.blk = nn.Module()
    floating.blk.conv = nn.Conv2d(C, C, 3)
    bad = rule_report({"model": (proto, quantized)})
    assert [(v.node, v.module, v.kind) for v in bad.violations] == [("/blk/conv/Conv", "blk.conv", "Conv")]
    good = rule_report({"model": (proto, floating)})
    assert good.passed and good.stages[0].unquantized_convs == (("/blk/conv/Conv", "blk.conv"),)


def test_joins_of_float_modules_are_intended_and_of_quantized_ones_violations() -> None:
    proto = residual(identity_quantized=False)
    root = nn.Module()
    root.blk = nn.Module()
    root.blk.conv = QuantConv2d.from_float(nn.Conv2d(C, C, 3))
    root.blk.add = ops.Add()
    assert rule_report({"s": (proto, root)}).stages[0].float_joins == (("/blk/add/Add", "blk.add"),)
    root.blk.add = QuantAdd()
    report = rule_report({"s": (proto, root)}, ["bottleneck_residual"])
    assert [(v.stage, v.node, v.module, v.kind) for v in report.violations] == [
        ("s", "/blk/add/Add", "blk.add", "residual_add")]
    assert "[s] residual_add '/blk/add/Add' (blk.add): identity" in report.failure_text()


def test_node_scopes_resolve_below_the_module_that_made_the_calls() -> None:
    model = bevfusion_camera_staged("ci")
    found = node_modules(model, [
        "/downsample/downsample.0/Conv", "/downsample/downsample.3/Conv",   # the vtransform's, not a block's
        "/backbone/layer1/layer1.0/downsample/downsample.0/Conv",
        "/neck/deblocks.1/deblocks.1.0/ConvTranspose", "/neck/lateral_convs.0/conv/Conv",
        "/backbone/layer2/layer2.1/relu_2/Relu", "/Concat", "/nowhere/Conv",
    ])
    assert {k: v[0] for k, v in found.items()} == {
        "/downsample/downsample.0/Conv": "encoders.camera.vtransform.downsample.0",
        "/downsample/downsample.3/Conv": "encoders.camera.vtransform.downsample.3",
        "/backbone/layer1/layer1.0/downsample/downsample.0/Conv": "encoders.camera.backbone.layer1.0.downsample.0",
        "/neck/deblocks.1/deblocks.1.0/ConvTranspose": "decoder.neck.deblocks.1.0",
        "/neck/lateral_convs.0/conv/Conv": "encoders.camera.neck.lateral_convs.0.conv",
        "/backbone/layer2/layer2.1/relu_2/Relu": "encoders.camera.backbone.layer2.1.relu",
        "/Concat": "",
    }


def _export_resnet(tmp_path: Path, rules: tuple[str, ...], break_block: str | None = None) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = randomize_bn(ResNet(18, base_channels=4))
    x = torch.randn(1, 3, 32, 32)
    config = QuantConfig(activations=QuantDescriptor(calibrator="max"), rules=tuple(get_rule(r) for r in rules))
    q = quantize_model(model, config, example_inputs=(x,))
    if break_block is not None:
        block = q.get_submodule(break_block)
        assert isinstance(block, BasicBlock) and isinstance(block.add, QuantAdd)
        block.add.set_input_quantizer(1, None)
    calibrate(q, [(x,)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_qdq(q, (x,), tmp_path / "resnet.onnx", input_names=["x"])
    return path, q


def test_exported_resnet_with_bottleneck_residual_obeys_the_rules(tmp_path: Path) -> None:
    path, q = _export_resnet(tmp_path, ("bottleneck_residual", "shared_input"))
    found = inspect_qdq(path)
    residuals = found.of_kind("residual_add")
    assert len(residuals) == 8 and all(not r.problems for r in residuals)
    assert len(found.convs) == 20 and all(c.input_quantized and c.weight_quantized for c in found.convs)
    report = rule_report({"model": (path, q)}, ["bottleneck_residual", "shared_input"], summarize(q))
    assert report.passed
    totals = report.totals()
    assert totals["residual_adds"] == 8 and totals["quantized_convs"] == 20 and totals["unquantized_convs"] == 0
    assert totals["qdq_pairs"] == found.qdq_pairs > 20
    data = json.loads(json.dumps(report.to_dict()))
    assert RuleReport.from_dict(data) == report
    text = "\n".join(report.markdown())
    assert "**0 violation(s)**" in text and "| model | " in text and "layer1.1.conv1.input_quantizer" in text


def test_exported_resnet_with_an_unquantized_identity_is_reported(tmp_path: Path) -> None:
    path, q = _export_resnet(tmp_path, (), break_block="layer1.1")
    report = rule_report({"model": (path, q)})
    (violation,) = report.violations
    assert violation.module == "layer1.1.add" and violation.kind == "mixed_add"
    assert "is float and not a conv output" in violation.problem
    adds = inspect_qdq(path).of_kind("shared_add")
    assert len(adds) == 7 and all(not a.problems for a in adds)  # QuantAdd's default: one quantizer for both


@pytest.mark.parametrize("broken", [False, True])
def test_report_markdown_lists_violations(tmp_path: Path, broken: bool) -> None:
    path, q = _export_resnet(tmp_path, (), break_block="layer2.1" if broken else None)
    text = "\n".join(rule_report({"model": (path, q)}, []).markdown())
    assert ("Violations:" in text) is broken
    assert ("`[model] /layer2/layer2.1/add/Add` (layer2.1.add, mixed_add)" in text) is broken
