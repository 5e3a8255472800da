"""Validate an SCN ONNX file against NVIDIA's 3DSparseConvolution loader, node by node.

The attribute table below lists, per op, every attribute the C++ loader
(`libspconv/parser/onnx-parser.cpp`) reads plus those NVIDIA's exporter writes, with its ONNX
type and the values that make sense. Our exports write all of them explicitly, so a missing
one is a violation, and so is an unknown one (a misspelt name would silently fall back to the
loader's default). Beyond single attributes the validator checks initializers (FLOAT16, raw
data of the declared size, weight [Cout, k0, k1, k2, Cin], bias [Cout]), the graph (name "scn",
ai.onnx opset 11, one FLOAT16 input [N, C], definitions before use), shapes along the chain
(spatial shapes and channels from conv to conv, ScatterDense's output), shared rulebooks,
int8 ranges where a node computes in int8, and that each edge's writer and reader agree on
its precision.

`validate` returns the violations; `check` raises `ExportError` listing them, each naming the
node and the attribute at fault.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from onnx import AttributeProto, TensorProto, helper

from harness.errors import ExportError

Check = Callable[[Any], str | None]

INT, FLOAT, STRING = AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.STRING
INTS, FLOATS = AttributeProto.INTS, AttributeProto.FLOATS

PRECISIONS = ("int8", "fp16")
ACTIVATIONS = ("None", "ReLU", "Sigmoid", "LeakyReLU")
FORMATS = ("zyx", "xyz")
LAYOUTS = ("NCHW", "NCHW32", "NHWzC")


@dataclass(frozen=True)
class AttrRule:
    """One attribute: name, ONNX type, whether it must be present, and a value check."""

    name: str
    type: int
    check: Check | None = None
    required: bool = True


@dataclass(frozen=True)
class OpRule:
    """One op type: number of inputs and its attribute rules."""

    op_type: str
    inputs: int
    attributes: tuple[AttrRule, ...]


@dataclass(frozen=True)
class Violation:
    """A problem at one node (or "<graph>") and, where it applies, one attribute."""

    node: str
    op_type: str
    attribute: str | None
    message: str

    def __str__(self) -> str:
        where = f"node '{self.node}' ({self.op_type})" if self.op_type else self.node
        what = f" attribute '{self.attribute}'" if self.attribute else ""
        return f"{where}{what}: {self.message}"


def _one_of(options: Sequence[str]) -> Check:
    return lambda v: None if v in options else f"{v!r} is not one of {list(options)}"


def _equals(expected: int) -> Check:
    return lambda v: None if v == expected else f"{v} must be {expected}"


def _flag(v: int) -> str | None:
    return None if v in (0, 1) else f"{v} must be 0 or 1"


def _positive(v: int) -> str | None:
    return None if 0 < v < 2**31 else f"{v} must be in 1..2^31-1"


def _ints(length: int, low: int) -> Check:
    def check(v: Sequence[int]) -> str | None:
        if len(v) != length:
            return f"{list(v)} must have {length} values"
        if any(x < low for x in v):
            return f"{list(v)} must be >= {low}"
        return None

    return check


def _range(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else f"{v} must be finite and >= 0"


def _ranges(v: Sequence[float]) -> str | None:
    bad = [x for x in v if not (math.isfinite(x) and x >= 0)]
    return None if not bad else f"{bad[:3]} must be finite and >= 0"


_PRECISION = (AttrRule("precision", STRING, _one_of(PRECISIONS)),
              AttrRule("output_precision", STRING, _one_of(PRECISIONS)))
_COMMON = (AttrRule("fixed_launch_points", INT, _positive, required=False),)

SCHEMA: dict[str, OpRule] = {
    "SparseConvolution": OpRule("SparseConvolution", 3, (
        AttrRule("ndim", INT, _equals(3)),
        AttrRule("input_spatial_shape", INTS, _ints(3, 1)),
        AttrRule("output_spatial_shape", INTS, _ints(3, 1)),
        AttrRule("in_channels", INT, _positive),
        AttrRule("out_channels", INT, _positive),
        AttrRule("kernel_size", INTS, _ints(3, 1)),
        AttrRule("output_bound", INT, _positive),
        AttrRule("stride", INTS, _ints(3, 1)),
        AttrRule("dilation", INTS, _ints(3, 1)),
        AttrRule("padding", INTS, _ints(3, 0)),
        AttrRule("transposed", INT, _flag),
        AttrRule("inverse", INT, _flag),
        AttrRule("output_padding", INTS, _ints(3, 0)),
        AttrRule("groups", INT, _equals(1)),
        AttrRule("subm", INT, _flag),
        AttrRule("rulebook", STRING),
        AttrRule("activation", STRING, _one_of(ACTIVATIONS)),
        AttrRule("input_shape", INTS, _ints(2, 0)),
        AttrRule("output_shape", INTS, _ints(2, 0)),
        AttrRule("input_dynamic_range", FLOAT, _range),
        AttrRule("weight_dynamic_ranges", FLOATS, _ranges),
        *_PRECISION, *_COMMON,
    )),
    "Add": OpRule("Add", 2, (
        AttrRule("input0_dynamic_range", FLOAT, _range),
        AttrRule("input1_dynamic_range", FLOAT, _range),
        *_PRECISION, *_COMMON,
    )),
    "Relu": OpRule("Relu", 1, _COMMON),
    "ScatterDense": OpRule("ScatterDense", 1, (
        AttrRule("input_spatial_shape", INTS, _ints(3, 1)),
        AttrRule("format", STRING, _one_of(FORMATS)),
        AttrRule("output_shape", INTS, _ints(5, 1)),
        AttrRule("input_dynamic_range", FLOAT, _range),
        AttrRule("output_layout", STRING, _one_of(LAYOUTS)),
        *_COMMON,
    )),
    "Reshape": OpRule("Reshape", 1, (AttrRule("dims", INTS, lambda v: None if v and min(v) > 0
                                              else f"{list(v)} must be positive"), *_COMMON)),
    "Transpose": OpRule("Transpose", 1, (AttrRule("dims", INTS), *_COMMON)),
}


@dataclass
class _Tensor:
    """What is known about a tensor along the chain."""

    shape: list[int] | None = None
    spatial: list[int] | None = None
    channels: int | None = None
    precision: str | None = "fp16"
    writer: str = ""


def _value(a: AttributeProto) -> Any:
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, list):
        return [x.decode(errors="replace") if isinstance(x, bytes) else x for x in v]
    return v


def _conv_out(spatial: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int],
              d: Sequence[int]) -> list[int]:
    return [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
            for n, kk, ss, pp, dd in zip(spatial, k, s, p, d, strict=True)]


class _Validator:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.violations: list[Violation] = []
        self.inits = {i.name: i for i in self.graph.initializer}
        self.tensors: dict[str, _Tensor] = {}
        self.rulebooks: dict[str, tuple[str, list[int], list[int], list[int]]] = {}
        self.conv_rulebooks: set[str] = set()

    def add(self, node: onnx.NodeProto | None, attr: str | None, message: str) -> None:
        if node is None:
            self.violations.append(Violation("<graph>", "", attr, message))
        else:
            self.violations.append(Violation(node.name or "<unnamed>", node.op_type, attr, message))

    def run(self) -> list[Violation]:
        self.check_graph()
        names: set[str] = set()
        for node in self.graph.node:
            if not node.name or node.name in names:
                self.add(node, None, "node names must be unique and non-empty")
            names.add(node.name)
            rule = SCHEMA.get(node.op_type)
            if rule is None:
                self.add(node, None, f"op type is not one of {sorted(SCHEMA)}")
                continue
            attrs = self.check_attributes(node, rule)
            if attrs is not None:
                self.check_node(node, attrs)
            elif node.output:
                self.tensors[node.output[0]] = _Tensor(precision=None, writer=node.name)
        for out in self.graph.output:
            if out.name not in self.tensors:
                self.add(None, None, f"graph output '{out.name}' is not produced by any node")
        return self.violations

    def check_graph(self) -> None:
        if self.graph.name != "scn":
            self.add(None, None, f"graph name is {self.graph.name!r}, expected 'scn'")
        opsets = {(o.domain or "ai.onnx"): o.version for o in self.model.opset_import}
        if opsets.get("ai.onnx") != 11:
            self.add(None, None, f"opset imports {opsets}, expected ai.onnx 11")
        for init in self.graph.initializer:
            if init.data_type != TensorProto.FLOAT16:
                self.add(None, None, f"initializer '{init.name}' is "
                         f"{TensorProto.DataType.Name(init.data_type)}, the engine needs FLOAT16")
        inputs = [i for i in self.graph.input if i.name not in self.inits]
        if len(inputs) != 1:
            self.add(None, None, f"expected one graph input, found {len(inputs)}")
        for inp in inputs:
            tt = inp.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if tt.elem_type != TensorProto.FLOAT16 or len(dims) != 2:
                self.add(None, None, f"input '{inp.name}' must be FLOAT16 [N, C]")
            channels = dims[1] if len(dims) == 2 and dims[1] > 0 else None
            self.tensors[inp.name] = _Tensor(channels=channels, writer="<input>")
        for out in self.graph.output:
            if out.type.tensor_type.elem_type != TensorProto.FLOAT16:
                self.add(None, None, f"output '{out.name}' must be FLOAT16")

    def check_attributes(self, node: onnx.NodeProto, rule: OpRule) -> dict[str, Any] | None:
        known = {r.name: r for r in rule.attributes}
        values: dict[str, Any] = {}
        for a in node.attribute:
            r = known.get(a.name)
            if r is None:
                self.add(node, a.name, "unknown attribute (the loader ignores it)")
                continue
            if a.type != r.type:
                self.add(node, a.name, f"type {AttributeProto.AttributeType.Name(a.type)}, "
                         f"expected {AttributeProto.AttributeType.Name(r.type)}")
                continue
            v = _value(a)
            problem = r.check(v) if r.check else None
            if problem:
                self.add(node, a.name, problem)
                continue
            values[a.name] = v
        ok = True
        for r in rule.attributes:
            if r.required and not any(a.name == r.name for a in node.attribute):
                self.add(node, r.name, "missing")
                ok = False
        if len(node.input) != rule.inputs:
            self.add(node, None, f"{len(node.input)} inputs, expected {rule.inputs}")
            ok = False
        if len(node.output) != 1:
            self.add(node, None, f"{len(node.output)} outputs, expected 1")
            ok = False
        if not ok or any(r.required and r.name not in values for r in rule.attributes):
            return None
        return values

    def source(self, node: onnx.NodeProto, name: str) -> _Tensor | None:
        t = self.tensors.get(name)
        if t is None:
            self.add(node, None, f"input '{name}' is used before it is defined")
        return t

    def define(self, node: onnx.NodeProto, t: _Tensor) -> None:
        name = node.output[0]
        if name in self.tensors or name in self.inits:
            self.add(node, None, f"output '{name}' is defined twice")
        t.writer = node.name
        self.tensors[name] = t

    def expect_precision(self, node: onnx.NodeProto, src: _Tensor, precision: str) -> None:
        if src.precision is not None and src.precision != precision:
            self.add(node, "precision", f"{precision!r}, but its input from '{src.writer}' is "
                     f"written as {src.precision!r}")

    def check_node(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        getattr(self, "node_" + node.op_type)(node, a)

    def node_SparseConvolution(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        src = self.source(node, node.input[0])
        cin, cout = a["in_channels"], a["out_channels"]
        k = a["kernel_size"]
        self.check_initializer(node, node.input[1], "weight", [cout, *k, cin])
        self.check_initializer(node, node.input[2], "bias", [cout])
        if a["input_shape"][1] != cin:
            self.add(node, "input_shape", f"{a['input_shape']} disagrees with in_channels {cin}")
        if a["output_shape"][1] != cout:
            self.add(node, "output_shape", f"{a['output_shape']} disagrees with out_channels {cout}")
        spatial_in, spatial_out = a["input_spatial_shape"], a["output_spatial_shape"]
        if a["subm"]:
            if any(s != 1 for s in a["stride"]):
                self.add(node, "stride", f"{a['stride']}: a submanifold conv has stride 1")
            if any(x % 2 == 0 for x in k):
                self.add(node, "kernel_size", f"{k}: a submanifold conv needs odd kernels")
            if spatial_out != spatial_in:
                self.add(node, "output_spatial_shape", f"{spatial_out} != input {spatial_in} "
                         "for a submanifold conv")
        elif not a["transposed"] and not a["inverse"]:
            expect = _conv_out(spatial_in, k, a["stride"], a["padding"], a["dilation"])
            if spatial_out != expect:
                self.add(node, "output_spatial_shape", f"{spatial_out}, the conv gives {expect}")
        self.check_rulebook(node, a)
        ranges = a["weight_dynamic_ranges"]
        if len(ranges) not in (0, cout):
            self.add(node, "weight_dynamic_ranges", f"{len(ranges)} values, expected {cout}")
        if a["precision"] == "int8":
            if a["input_dynamic_range"] <= 0:
                self.add(node, "input_dynamic_range", "must be > 0 when precision is int8")
            if len(ranges) != cout or min(ranges, default=0) <= 0:
                self.add(node, "weight_dynamic_ranges",
                         f"int8 needs {cout} positive per-output-channel ranges")
        if src is not None:
            if src.channels is not None and src.channels != cin:
                self.add(node, "in_channels", f"{cin}, but '{src.writer}' gives {src.channels}")
            if src.spatial is not None and src.spatial != spatial_in:
                self.add(node, "input_spatial_shape",
                         f"{spatial_in}, but '{src.writer}' gives {src.spatial}")
            self.expect_precision(node, src, a["precision"])
        self.define(node, _Tensor(spatial=list(spatial_out), channels=cout,
                                  precision=a["output_precision"]))

    def check_initializer(self, node: onnx.NodeProto, name: str, what: str,
                          shape: list[int]) -> None:
        init = self.inits.get(name)
        if init is None:
            self.add(node, None, f"{what} initializer '{name}' is missing")
            return
        if list(init.dims) != shape:
            self.add(node, None, f"{what} '{name}' has shape {list(init.dims)}, expected {shape} "
                     "([Cout, k0, k1, k2, Cin] for weights)")
        if init.data_type != TensorProto.FLOAT16:
            return
        if len(init.raw_data) != 2 * int(np.prod(init.dims)):
            self.add(node, None, f"{what} '{name}' raw_data has {len(init.raw_data)} bytes, "
                     f"expected {2 * int(np.prod(init.dims))} (FLOAT16 raw data)")
            return
        if not np.isfinite(np.frombuffer(init.raw_data, dtype=np.float16)).all():
            self.add(node, None, f"{what} '{name}' holds NaN or Inf")

    def check_rulebook(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        key = a["rulebook"]
        if not key:
            if a["inverse"]:
                self.add(node, "rulebook", "an inverse conv needs the rulebook of its conv")
            return
        if a["subm"]:
            sig = (node.name, a["input_spatial_shape"], a["kernel_size"], a["dilation"])
            first = self.rulebooks.setdefault(key, sig)
            if first[1:] != sig[1:]:
                self.add(node, "rulebook", f"{key!r} is shared with '{first[0]}' but spatial "
                         "shape, kernel or dilation differ")
        elif a["inverse"]:
            if key not in self.conv_rulebooks:
                self.add(node, "rulebook", f"{key!r}: no earlier sparse conv wrote this rulebook")
        elif key in self.conv_rulebooks:
            self.add(node, "rulebook", f"{key!r} is written by two sparse convs")
        else:
            self.conv_rulebooks.add(key)

    def node_Add(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        srcs = [self.source(node, n) for n in node.input]
        if a["precision"] == "int8":
            for attr in ("input0_dynamic_range", "input1_dynamic_range"):
                if a[attr] <= 0:
                    self.add(node, attr, "must be > 0 when precision is int8")
        known = [s for s in srcs if s is not None]
        for s in known:
            self.expect_precision(node, s, a["precision"])
        if len(known) == 2 and (known[0].spatial, known[0].channels) != (known[1].spatial,
                                                                          known[1].channels):
            self.add(node, None, f"inputs differ: '{known[0].writer}' gives "
                     f"{known[0].spatial}x{known[0].channels}, '{known[1].writer}' "
                     f"{known[1].spatial}x{known[1].channels}")
        first = known[0] if known else _Tensor()
        self.define(node, _Tensor(spatial=first.spatial, channels=first.channels,
                                  precision=a["output_precision"]))

    def node_Relu(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        src = self.source(node, node.input[0]) or _Tensor()
        self.define(node, _Tensor(src.shape, src.spatial, src.channels, src.precision))

    def node_ScatterDense(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        src = self.source(node, node.input[0])
        spatial, shape = a["input_spatial_shape"], a["output_shape"]
        if shape[2:] != spatial:
            self.add(node, "output_shape", f"{shape} must be [B, C, *input_spatial_shape]")
        if src is not None:
            if src.spatial is not None and src.spatial != spatial:
                self.add(node, "input_spatial_shape",
                         f"{spatial}, but '{src.writer}' gives {src.spatial}")
            if src.channels is not None and src.channels != shape[1]:
                self.add(node, "output_shape", f"{shape}: '{src.writer}' gives {src.channels} "
                         "channels")
            if src.precision == "int8" and a["input_dynamic_range"] <= 0:
                self.add(node, "input_dynamic_range",
                         f"must be > 0: '{src.writer}' writes int8")
        formats = {str(_value(x)) for n in self.graph.node if n.op_type == "ScatterDense"
                   for x in n.attribute if x.name == "format"}
        if len(formats) > 1:
            self.add(node, "format", f"ScatterDense nodes disagree on the index order {formats}")
        self.define(node, _Tensor(shape=list(shape)))

    def node_Reshape(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        src = self.source(node, node.input[0])
        dims = list(a["dims"])
        if src is not None and src.shape is not None and np.prod(src.shape) != np.prod(dims):
            self.add(node, "dims", f"{dims} does not hold the {int(np.prod(src.shape))} "
                     f"elements of {src.shape}")
        self.define(node, _Tensor(shape=dims))

    def node_Transpose(self, node: onnx.NodeProto, a: dict[str, Any]) -> None:
        src = self.source(node, node.input[0])
        dims = list(a["dims"])
        if sorted(dims) != list(range(len(dims))):
            self.add(node, "dims", f"{dims} is not a permutation")
            self.define(node, _Tensor())
            return
        shape = None
        if src is not None and src.shape is not None:
            if len(src.shape) != len(dims):
                self.add(node, "dims", f"{dims} has rank {len(dims)}, input {src.shape}")
            else:
                shape = [src.shape[d] for d in dims]
        self.define(node, _Tensor(shape=shape))


def load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    """The model and a name for messages (the file path, or "<model>")."""
    if isinstance(model, onnx.ModelProto):
        return model, "<model>"
    path = Path(model)
    try:
        return onnx.load(str(path)), str(path)
    except (OSError, DecodeError) as e:
        raise ExportError(f"{path}: cannot read ONNX: {e}") from e


def validate(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """All schema violations of an SCN graph (empty when the engine can load it as intended)."""
    proto, _ = load(model)
    return _Validator(proto).run()


def check(model: onnx.ModelProto | str | Path) -> None:
    """Raise `ExportError` listing every violation, each naming node and attribute."""
    proto, source = load(model)
    violations = _Validator(proto).run()
    if violations:
        lines = "\n".join(f"  {v}" for v in violations)
        raise ExportError(f"{source}: {len(violations)} SCN schema violation(s):\n{lines}")

