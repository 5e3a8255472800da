"""Tests of harness.export.custom: the scoped tracer and NVIDIA's SCN schema export."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
import pytest
import spconv.pytorch as spconv
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from harness.errors import ExportError, QuantError
from harness.export import custom
from harness.export.custom import (
    SCN_SYMBOLICS,
    SymbolicRegistry,
    Tracer,
    attribute,
    export_scn,
    reorder,
)
from harness.quant.calibrate import calibrate
from harness.quant.sparse import (
    NVIDIA_CENTERPOINT_KEEP_FLOAT,
    QuantSparseConvolution,
    quantize_scn,
)
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer
from harness.zoo import centerpoint as cp

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

SMALL = (8, 8, 16, 16)
CONV_ATTRS = [
    "ndim", "input_spatial_shape", "output_spatial_shape", "in_channels", "out_channels",
    "kernel_size", "output_bound", "stride", "dilation", "padding", "transposed", "inverse",
    "output_padding", "groups", "subm", "rulebook", "activation", "input_shape", "output_shape",
    "input_dynamic_range", "weight_dynamic_ranges", "precision", "output_precision",
]


@pytest.fixture(scope="module")
def voxels() -> tuple[torch.Tensor, torch.Tensor]:
    f, i = cp.random_voxels(cp.CI_GRID, 2500, seed=3)
    return f.half().float(), i


@pytest.fixture(scope="module")
def unfused() -> cp.CenterPointSCN:
    return cp.centerpoint_scn(widths=SMALL, grid=cp.CI_GRID, seed=1, fit_voxels=2000)


@pytest.fixture(scope="module")
def fused(unfused: cp.CenterPointSCN) -> cp.CenterPointSCN:
    return cp.round_params_to_fp16(cp.fuse_bn(copy.deepcopy(unfused)))


@pytest.fixture(scope="module")
def exported(fused: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> custom.ScnExport:
    return export_scn(fused, *voxels)


def _patched_state(model: nn.Module) -> list[Any]:
    state: list[Any] = [("forward" in vars(m)) for m in model.modules()]
    for owner, name, _ in SCN_SYMBOLICS.methods():
        state.append((owner, name, vars(owner).get(name)))
    return state


def test_graph_header_follows_nvidia(exported: custom.ScnExport) -> None:
    m = exported.model
    assert m.graph.name == "scn"
    assert [(o.domain, o.version) for o in m.opset_import] == [("ai.onnx", 11)]
    (inp,) = m.graph.input
    assert inp.name == "0"
    assert inp.type.tensor_type.elem_type == TensorProto.FLOAT16
    assert inp.type.tensor_type.shape.dim[1].dim_value == 5
    (out,) = m.graph.output
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT16
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 32, 23, 23]


def test_node_sequence_and_counter_names(exported: custom.ScnExport) -> None:
    nodes = exported.model.graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("SparseConvolution") == 21
    assert ops.count("Add") == 8 and ops.count("Relu") == 8
    assert ops[-2:] == ["ScatterDense", "Reshape"]
    assert exported.num_nodes == 39
    outputs = [n.output[0] for n in nodes]
    assert outputs == [str(k) for k in range(1, 40)]
    assert nodes[0].input[0] == "0"
    assert [n.name for n in nodes[:5]] == ["conv0", "conv1", "conv2", "add0", "relu0"]
    assert nodes[3].input[:] == ["3", "1"]  # conv2 output + identity (conv_input output)
    assert nodes[1].doc_string == "conv1.0.conv1"
    assert attribute(nodes[-1], "dims") == [1, 32, 23, 23]


def test_sparse_convolution_attributes_explicit(exported: custom.ScnExport, fused: cp.CenterPointSCN) -> None:
    convs = [n for n in exported.model.graph.node if n.op_type == "SparseConvolution"]
    for node in convs:
        assert [a.name for a in node.attribute] == CONV_ATTRS
        assert len(node.input) == 3
        assert attribute(node, "precision") == "fp16" and attribute(node, "output_precision") == "fp16"
        assert attribute(node, "output_bound") == 200000
        assert attribute(node, "input_dynamic_range") == 0.0
        assert attribute(node, "weight_dynamic_ranges") == []
    first, down, last = convs[0], convs[5], convs[-1]
    assert attribute(first, "rulebook") == "res0" and attribute(first, "subm") == 1
    assert attribute(first, "activation") == "ReLU"
    assert attribute(convs[2], "activation") == "None"  # block conv2: add comes first
    assert attribute(down, "rulebook") == "" and attribute(down, "stride") == [2, 2, 2]
    assert attribute(down, "input_spatial_shape") == [41, 180, 180]
    assert attribute(down, "output_spatial_shape") == [21, 90, 90]
    assert attribute(last, "kernel_size") == [3, 1, 1] and attribute(last, "stride") == [2, 1, 1]
    assert attribute(last, "output_spatial_shape") == [2, 23, 23]
    inits = {i.name: i for i in exported.model.graph.initializer}
    w = inits["spconv0.weight"]
    assert w.data_type == TensorProto.FLOAT16 and list(w.dims) == [8, 3, 3, 3, 5]
    assert np.array_equal(numpy_helper.to_array(w), fused.conv_input.weight.detach().numpy().astype(np.float16))
    assert list(inits["spconv0.bias"].dims) == [8]
    scatter = exported.model.graph.node[-2]
    assert attribute(scatter, "format") == "zyx"
    assert attribute(scatter, "output_shape") == [1, 16, 2, 23, 23]
    assert attribute(scatter, "output_layout") == "NCHW"


def test_export_output_is_the_model_output(exported: custom.ScnExport, fused: cp.CenterPointSCN,
                                           voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        ref = fused(*voxels)
    assert torch.equal(exported.output, ref)
    assert exported.seconds > 0


def test_bias_always_present_and_output_bound_override(voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _TinyScn(bias=False)
    model.conv.output_bound = 12345
    proto = export_scn(model, *voxels).model
    conv = proto.graph.node[0]
    assert conv.input[2] == "spconv0.bias"
    bias = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "spconv0.bias"))
    assert bias.dtype == np.float16 and not bias.any()
    assert attribute(conv, "output_bound") == 12345
    model.conv.output_bound = 10
    with pytest.raises(ExportError, match=r"'conv': .* exceed output_bound 10"):
        export_scn(model, *voxels)


def test_fp16_overflow_names_the_layer(voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _TinyScn(bias=True)
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0, 0] = 1e6
    with pytest.raises(ExportError, match=r"'conv': initializer spconv0\.weight overflows float16"):
        export_scn(model, *voxels)


def test_unsupported_layer_names_module_path(unfused: cp.CenterPointSCN,
                                             voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    before = _patched_state(unfused)
    with pytest.raises(ExportError, match=r"'conv_input\.1': unsupported layer BatchNorm1d"):
        export_scn(unfused, *voxels)
    assert _patched_state(unfused) == before


def test_untraced_operation_names_module_path(voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _TinyScn(bias=True, scale_features=True)
    with pytest.raises(ExportError, match=r"'relu': input Tensor was not produced by a traced op"):
        export_scn(model, *voxels)


def test_tracer_restores_everything_even_on_error(fused: cp.CenterPointSCN,
                                                  voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    before = _patched_state(fused)
    original_view = torch.Tensor.view
    tracer = Tracer(fused, SCN_SYMBOLICS)
    with pytest.raises(RuntimeError, match="boom"), tracer:
        assert "forward" in vars(fused.conv_input)
        assert "view" in vars(torch.Tensor) and "dense" in vars(spconv.SparseConvTensor)
        raise RuntimeError("boom")
    assert _patched_state(fused) == before
    assert "view" not in vars(torch.Tensor)
    assert torch.Tensor.view is original_view
    assert spconv.SparseConvTensor.dense.__name__ == "dense"
    with torch.no_grad():
        fused(*voxels)  # runs untraced again


def test_tracer_state_is_scoped(fused: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    a = export_scn(fused, *voxels).model
    b = export_scn(fused, *voxels).model
    assert a.SerializeToString() == b.SerializeToString()
    tracer = Tracer(fused, SCN_SYMBOLICS)
    with tracer, pytest.raises(ExportError, match="already active"), tracer:
        pass
    other = cp.centerpoint_scn(widths=SMALL, grid=cp.CI_GRID, seed=2, fuse=True)
    with torch.no_grad(), Tracer(fused, SCN_SYMBOLICS) as t:
        t.mark_input(voxels[0])
        other(*voxels)  # another model: its calls are not recorded
        assert t.nodes == []


def test_registry_is_reusable_for_other_custom_ops() -> None:
    registry = SymbolicRegistry()

    @registry.module(nn.Linear)
    def linear(t: Tracer, m: nn.Linear, y: torch.Tensor, x: torch.Tensor) -> None:
        i = t.index("fc")
        w = t.add_initializer(f"fc{i}.weight", m.weight.detach().numpy(), TensorProto.FLOAT)
        t.add_node("MyLinear", [t.name(x), w], [t.define(y)], f"fc{i}", {"units": m.out_features})

    @registry.method(torch.Tensor, "tanh")
    def tanh(t: Tracer, x: torch.Tensor, y: torch.Tensor) -> None:
        t.add_node("MyTanh", [t.name(x)], [t.define(y)], f"tanh{t.index('tanh')}")

    registry.passthrough(nn.Identity)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.id = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.id(self.fc(x))
            return y.tanh()

    net = Net()
    x = torch.ones(2, 3)
    with torch.no_grad(), Tracer(net, registry) as t:
        t.mark_input(x)
        net(x)
    assert [(n.op_type, list(n.input), list(n.output)) for n in t.nodes] == [
        ("MyLinear", ["0", "fc0.weight"], ["1"]), ("MyTanh", ["1"], ["2"])]
    assert attribute(t.nodes[0], "units") == 4
    assert t.nodes[0].doc_string == "fc"
    assert "tanh" not in vars(torch.Tensor)
    assert SCN_SYMBOLICS.symbolic_for(nn.Linear(1, 1)) is None
    copied = registry.copy()
    copied.passthrough(nn.Dropout)
    assert not registry.is_passthrough(nn.Dropout())
    with pytest.raises(ExportError, match="has no method"):
        registry.method(torch.Tensor, "no_such_method")


def test_xyz_variant_inverts_like_nvidia(exported: custom.ScnExport, fused: cp.CenterPointSCN,
                                         voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    xyz = export_scn(fused, *voxels, order="xyz").model
    zyx = exported.model
    for a, b in zip(zyx.graph.node, xyz.graph.node, strict=False):
        if a.op_type != "SparseConvolution":
            continue
        for name in ("kernel_size", "stride", "padding", "dilation", "input_spatial_shape"):
            assert attribute(b, name) == attribute(a, name)[::-1]
    w_zyx = {i.name: numpy_helper.to_array(i) for i in zyx.graph.initializer}
    w_xyz = {i.name: numpy_helper.to_array(i) for i in xyz.graph.initializer}
    assert np.array_equal(w_xyz["spconv20.weight"], w_zyx["spconv20.weight"].transpose(0, 3, 2, 1, 4))
    tail = [(n.op_type, attribute(n, "format") or attribute(n, "dims")) for n in xyz.graph.node[-3:]]
    assert tail == [("ScatterDense", "xyz"), ("Transpose", [0, 1, 4, 3, 2]), ("Reshape", [1, 32, 23, 23])]
    assert attribute(xyz.graph.node[-3], "output_shape") == [1, 16, 23, 23, 2]
    assert xyz.graph.output[0].name == zyx.graph.output[0].name
    back = reorder(xyz, "zyx")
    assert back.SerializeToString() == zyx.SerializeToString()
    assert reorder(zyx, "zyx").SerializeToString() == zyx.SerializeToString()


def _quantized(model: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor],
               keep_float: tuple[str, ...] = ("conv_input",)) -> torch.nn.Module:
    q = quantize_scn(model, keep_float=keep_float)
    calibrate(q, [voxels], progress=False)
    return q


def _precisions(proto: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    return {n.doc_string: (attribute(n, "precision"), attribute(n, "output_precision"))
            for n in proto.graph.node if n.op_type in ("SparseConvolution", "Add")}


def test_int8_export_first_input_and_last_output_fp16(
        fused: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _quantized(fused, voxels)
    proto = export_scn(model, *voxels).model
    p = _precisions(proto)
    assert p["conv_input"] == ("fp16", "int8")
    assert p["extra_conv"] == ("int8", "fp16")
    assert all(v == ("int8", "int8") for k, v in p.items() if k not in ("conv_input", "extra_conv"))
    conv = proto.graph.node[1]
    q = model.get_submodule("conv1.0.conv1")
    assert isinstance(q, QuantSparseConvolution) and isinstance(q.input_quantizer, TensorQuantizer)
    assert attribute(conv, "input_dynamic_range") == pytest.approx(float(q.input_quantizer.amax))
    assert attribute(conv, "weight_dynamic_ranges") == pytest.approx(
        q.weight_quantizer.amax.reshape(-1).tolist())
    assert len(attribute(conv, "weight_dynamic_ranges")) == 8
    assert attribute(proto.graph.node[0], "input_dynamic_range") == 0.0  # never calibrated
    add = proto.graph.node[3]
    shared = model.get_submodule("conv1.0.add").input_quantizer
    assert isinstance(shared, TensorQuantizer)
    assert attribute(add, "input0_dynamic_range") == attribute(add, "input1_dynamic_range")
    assert attribute(add, "input0_dynamic_range") == pytest.approx(float(shared.amax))


def test_int8_export_nvidia_centerpoint_plan(
        fused: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _quantized(fused, voxels, NVIDIA_CENTERPOINT_KEEP_FLOAT)
    p = _precisions(export_scn(model, *voxels).model)
    # As NVIDIA's CUDA-CenterPoint export-scn.py sets them.
    assert p["conv_input"] == ("fp16", "fp16")
    assert p["conv1.0.conv1"] == ("fp16", "fp16")
    assert p["conv1.0.conv2"] == ("fp16", "fp16")
    assert p["conv1.0.add"] == ("fp16", "int8")
    assert p["conv1.1.conv1"] == ("int8", "int8")
    assert p["extra_conv"] == ("int8", "fp16")


def test_first_layer_reads_fp16_even_when_quantized(
        fused: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _quantized(fused, voxels, keep_float=())
    proto = export_scn(model, *voxels).model
    assert _precisions(proto)["conv_input"] == ("fp16", "int8")
    assert attribute(proto.graph.node[0], "input_dynamic_range") > 0


def test_half_quantized_layers_are_refused(
        fused: cp.CenterPointSCN, voxels: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _quantized(fused, voxels)
    conv = model.get_submodule("conv2.0")
    assert isinstance(conv, QuantSparseConvolution)
    conv.weight_quantizer.set_mode(QuantMode.DISABLED)
    with pytest.raises(ExportError, match=r"'conv2\.0': the engine runs a layer wholly in int8"):
        export_scn(model, *voxels)
    fresh = quantize_scn(fused)
    with pytest.raises(QuantError, match=r"'conv1\.0\.conv1\.input_quantizer' is not calibrated"):
        export_scn(fresh, *voxels)


class _TinyScn(nn.Module):
    """One sparse conv (optionally followed by an untraceable op) and the dense tail."""

    def __init__(self, bias: bool, scale_features: bool = False) -> None:
        super().__init__()
        self.conv = cp.SparseConv3d(5, 4, 3, 2, padding=1, bias=bias)
        self.relu = nn.ReLU()
        self.scale_features = scale_features
        self.eval()

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        x = spconv.SparseConvTensor(features, indices, list(cp.CI_GRID), 1)
        x = self.conv(x)
        f = x.features * 2 if self.scale_features else x.features
        x = x.replace_feature(self.relu(f))
        dense: torch.Tensor = x.dense()
        n, c, d, h, w = dense.shape
        out: torch.Tensor = dense.view(n, c * d, h, w)
        return out
