"""Tests of harness.export.scn_schema: our exports pass, mutated files fail naming node/attribute."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from harness.errors import ExportError
from harness.export import scn_schema
from harness.export.custom import export_scn, set_attribute
from harness.quant.calibrate import calibrate
from harness.quant.sparse import quantize_scn
from harness.zoo import centerpoint as cp

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


@pytest.fixture(scope="module")
def exports() -> dict[str, onnx.ModelProto]:
    model = cp.centerpoint_scn(widths=(8, 8, 16, 16), grid=cp.CI_GRID, seed=1, fit_voxels=1500,
                               fuse=True, fp16_params=True)
    f, i = cp.random_voxels(cp.CI_GRID, 2000, seed=4)
    out = {order: export_scn(model, f, i, order=order).model for order in ("zyx", "xyz")}
    quant = quantize_scn(model)
    calibrate(quant, [(f, i)], progress=False)
    out["int8"] = export_scn(quant, f, i).model
    return out


def _mutated(model: onnx.ModelProto, change: Callable[[onnx.ModelProto], None]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    change(m)
    return m


def _node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    node: onnx.NodeProto = next(n for n in m.graph.node if n.name == name)
    return node


def _drop(m: onnx.ModelProto, node: str, attr: str) -> None:
    n = _node(m, node)
    keep = [a for a in n.attribute if a.name != attr]
    del n.attribute[:]
    n.attribute.extend(keep)


@pytest.mark.parametrize("kind", ["zyx", "xyz", "int8"])
def test_our_exports_have_no_violations(exports: dict[str, onnx.ModelProto], kind: str) -> None:
    assert scn_schema.validate(exports[kind]) == []
    scn_schema.check(exports[kind])


def test_check_reads_files_and_names_them(exports: dict[str, onnx.ModelProto], tmp_path: Path) -> None:
    good = tmp_path / "scn.onnx"
    onnx.save_model(exports["zyx"], str(good))
    scn_schema.check(good)
    bad = tmp_path / "bad.onnx"
    onnx.save_model(_mutated(exports["zyx"], lambda m: _drop(m, "conv3", "output_bound")), str(bad))
    with pytest.raises(ExportError) as e:
        scn_schema.check(bad)
    assert str(bad) in str(e.value)
    assert "node 'conv3' (SparseConvolution) attribute 'output_bound': missing" in str(e.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xff not onnx")
    with pytest.raises(ExportError, match="cannot read ONNX"):
        scn_schema.check(garbage)


def _retype_output_bound(m: onnx.ModelProto) -> None:
    n = _node(m, "conv2")
    for a in n.attribute:
        if a.name == "output_bound":
            a.CopyFrom(helper.make_attribute("output_bound", 2.0e5))


def _fp32_weight(m: onnx.ModelProto) -> None:
    w = next(i for i in m.graph.initializer if i.name == "spconv4.weight")
    arr = numpy_helper.to_array(w).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(arr, w.name))


def _short_raw(m: onnx.ModelProto) -> None:
    w = next(i for i in m.graph.initializer if i.name == "spconv1.bias")
    w.raw_data = w.raw_data[:-2]


def _wrong_weight_shape(m: onnx.ModelProto) -> None:
    w = next(i for i in m.graph.initializer if i.name == "spconv1.weight")
    arr = numpy_helper.to_array(w).reshape(8, 27, 8)
    w.CopyFrom(numpy_helper.from_array(arr, w.name))


def _no_bias(m: onnx.ModelProto) -> None:
    n = _node(m, "conv1")
    del n.input[2]


def _unknown_attr(m: onnx.ModelProto) -> None:
    _node(m, "conv1").attribute.append(helper.make_attribute("ouput_bound", 5))


def _bad_activation(m: onnx.ModelProto) -> None:
    set_attribute(_node(m, "conv1"), "activation", "Relu6")


def _bad_format(m: onnx.ModelProto) -> None:
    set_attribute(_node(m, "scatter0"), "format", "yxz")


def _bad_spatial(m: onnx.ModelProto) -> None:
    set_attribute(_node(m, "conv5"), "output_spatial_shape", [20, 90, 90])


def _bad_channels(m: onnx.ModelProto) -> None:
    set_attribute(_node(m, "conv1"), "in_channels", 16)


def _bad_reshape(m: onnx.ModelProto) -> None:
    set_attribute(_node(m, "reshape0"), "dims", [1, 32, 23, 24])


def _shared_rulebook(m: onnx.ModelProto) -> None:
    set_attribute(_node(m, "conv5"), "rulebook", "x")
    set_attribute(_node(m, "conv10"), "rulebook", "x")


def _unknown_op(m: onnx.ModelProto) -> None:
    _node(m, "relu0").op_type = "LeakyRelu"


def _use_before_define(m: onnx.ModelProto) -> None:
    _node(m, "conv1").input[0] = "99"


def _graph_name(m: onnx.ModelProto) -> None:
    m.graph.name = "main"
    m.opset_import[0].version = 13


MUTATIONS = [
    (lambda m: _drop(m, "conv3", "output_bound"), "node 'conv3' (SparseConvolution) attribute 'output_bound': missing"),
    (lambda m: _drop(m, "add0", "precision"), "node 'add0' (Add) attribute 'precision': missing"),
    (lambda m: _drop(m, "scatter0", "format"), "node 'scatter0' (ScatterDense) attribute 'format': missing"),
    (lambda m: _drop(m, "reshape0", "dims"), "node 'reshape0' (Reshape) attribute 'dims': missing"),
    (_retype_output_bound, "node 'conv2' (SparseConvolution) attribute 'output_bound': type FLOAT, expected INT"),
    (_fp32_weight, "initializer 'spconv4.weight' is FLOAT, the engine needs FLOAT16"),
    (_short_raw, "node 'conv1' (SparseConvolution): bias 'spconv1.bias' raw_data has 14 bytes, expected 16"),
    (_wrong_weight_shape, "node 'conv1' (SparseConvolution): weight 'spconv1.weight' has shape [8, 27, 8]"),
    (_no_bias, "node 'conv1' (SparseConvolution): 2 inputs, expected 3"),
    (_unknown_attr, "node 'conv1' (SparseConvolution) attribute 'ouput_bound': unknown attribute"),
    (_bad_activation, "node 'conv1' (SparseConvolution) attribute 'activation': 'Relu6' is not one of"),
    (_bad_format, "node 'scatter0' (ScatterDense) attribute 'format': 'yxz' is not one of"),
    (_bad_spatial, "node 'conv5' (SparseConvolution) attribute 'output_spatial_shape': [20, 90, 90], the conv gives [21, 90, 90]"),
    (_bad_channels, "node 'conv1' (SparseConvolution) attribute 'in_channels': 16, but 'conv0' gives 8"),
    (_bad_reshape, "node 'reshape0' (Reshape) attribute 'dims': [1, 32, 23, 24] does not hold"),
    (_shared_rulebook, "node 'conv10' (SparseConvolution) attribute 'rulebook': 'x' is written by two sparse convs"),
    (_unknown_op, "node 'relu0' (LeakyRelu): op type is not one of"),
    (_use_before_define, "node 'conv1' (SparseConvolution): input '99' is used before it is defined"),
    (_graph_name, "graph name is 'main', expected 'scn'"),
]


@pytest.mark.parametrize(("mutate", "message"), MUTATIONS, ids=[m[1][:40] for m in MUTATIONS])
def test_mutations_are_reported(exports: dict[str, onnx.ModelProto],
                                mutate: Callable[[onnx.ModelProto], None], message: str) -> None:
    violations = [str(v) for v in scn_schema.validate(_mutated(exports["zyx"], mutate))]
    assert any(message in v for v in violations), violations


def test_int8_rules(exports: dict[str, onnx.ModelProto]) -> None:
    def no_ranges(m: onnx.ModelProto) -> None:
        n = _node(m, "conv3")
        set_attribute(n, "input_dynamic_range", 0.0)
        n.attribute.remove(next(a for a in n.attribute if a.name == "weight_dynamic_ranges"))
        n.attribute.append(helper.make_attribute("weight_dynamic_ranges", [1.0, 2.0],
                                                 attr_type=AttributeProto.FLOATS))

    found = [str(v) for v in scn_schema.validate(_mutated(exports["int8"], no_ranges))]
    assert any("'conv3' (SparseConvolution) attribute 'input_dynamic_range': must be > 0" in v for v in found)
    assert any("'conv3' (SparseConvolution) attribute 'weight_dynamic_ranges': 2 values, expected 8" in v
               for v in found)

    def mismatch(m: onnx.ModelProto) -> None:
        set_attribute(_node(m, "conv1"), "precision", "fp16")

    found = [str(v) for v in scn_schema.validate(_mutated(exports["int8"], mismatch))]
    assert any("node 'conv1' (SparseConvolution) attribute 'precision': 'fp16', but its input from "
               "'conv0' is written as 'int8'" in v for v in found), found

    def int8_into_scatter(m: onnx.ModelProto) -> None:
        set_attribute(_node(m, "conv20"), "output_precision", "int8")

    found = [str(v) for v in scn_schema.validate(_mutated(exports["int8"], int8_into_scatter))]
    assert any("'scatter0' (ScatterDense) attribute 'input_dynamic_range': must be > 0" in v for v in found)


def test_nvidia_float_export_lacks_explicit_defaults(exports: dict[str, onnx.ModelProto]) -> None:
    # NVIDIA's float exporter writes no precision, ranges or output_layout: the loader falls
    # back to defaults, which our schema wants written out.
    def as_nvidia(m: onnx.ModelProto) -> None:
        for n in m.graph.node:
            keep = [a for a in n.attribute if a.name not in (
                "precision", "output_precision", "input_dynamic_range", "weight_dynamic_ranges",
                "input0_dynamic_range", "input1_dynamic_range", "output_layout")]
            del n.attribute[:]
            n.attribute.extend(keep)

    found = {(v.node, v.attribute) for v in scn_schema.validate(_mutated(exports["zyx"], as_nvidia))}
    assert ("conv0", "precision") in found and ("add0", "input0_dynamic_range") in found
    assert ("scatter0", "output_layout") in found


def test_graph_level_rules(exports: dict[str, onnx.ModelProto]) -> None:
    def fp32_input(m: onnx.ModelProto) -> None:
        m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT

    found = [str(v) for v in scn_schema.validate(_mutated(exports["zyx"], fp32_input))]
    assert "<graph>: input '0' must be FLOAT16 [N, C]" in found

    def dangling_output(m: onnx.ModelProto) -> None:
        m.graph.output[0].name = "1000"

    found = [str(v) for v in scn_schema.validate(_mutated(exports["zyx"], dangling_output))]
    assert "<graph>: graph output '1000' is not produced by any node" in found


def test_every_node_checked_against_the_table(exports: dict[str, onnx.ModelProto]) -> None:
    for node in exports["zyx"].graph.node:
        rule = scn_schema.SCHEMA[node.op_type]
        required = {r.name for r in rule.attributes if r.required}
        assert {a.name for a in node.attribute} == required, node.name
