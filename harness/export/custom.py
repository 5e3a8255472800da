"""Custom-op ONNX export by tracing: patch registered forwards, run the model, record nodes.

NVIDIA's SCN exporter intercepts spconv's forward while the model runs and turns each call into
a custom ONNX node. This module keeps that idea with scoped state:

- `SymbolicRegistry` maps module types (matched along the MRO) and class methods
  (`SparseConvTensor.dense`, `torch.Tensor.view`, ...) to symbolic functions
  `fn(tracer, receiver, output, *args, **kwargs)` that record nodes on the tracer.
- `Tracer` is a context manager: on entry it patches the forward of every submodule of the
  traced model (registered ones record, containers track the module path, unregistered leaves
  raise `ExportError` naming their path when called) and the registered class methods; on exit
  it restores every patched attribute, also when the model raised. Calls nested inside a
  recorded op are not recorded; methods record only on tensors the trace already knows.

`SCN_SYMBOLICS` and `export_scn` write NVIDIA's 3DSparseConvolution schema (graph "scn",
ai.onnx opset 11, tensor names as counters with input "0", FLOAT16 initializers
`spconv{i}.weight` [Cout, k0, k1, k2, Cin] and `spconv{i}.bias`), with every attribute the C++
loader reads written explicitly (its defaults made explicit). `reorder` converts between the
zyx and xyz index orders as NVIDIA's `inverse_model` does.

Precision comes from the model's quantizers (`harness.quant.sparse`): a conv or add whose
quantizers quantize runs in int8 and carries their amax as `input_dynamic_range` /
`weight_dynamic_ranges` (per output channel) / `input0/1_dynamic_range`; the first layer always
reads fp16 and a node writes int8 only for int8 readers (`assign_precisions`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import onnx
import spconv.pytorch as spconv
import torch
from cumm import tensorview as tv
from onnx import AttributeProto, TensorProto, helper
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from harness.errors import ExportError
from harness.quant.modules import QuantAdd, QuantModule
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer

SymbolicFn = Callable[..., None]
F = TypeVar("F", bound=SymbolicFn)
IndexOrder = Literal["zyx", "xyz"]

OPSET = 11
GRAPH_NAME = "scn"
DEFAULT_OUTPUT_BOUND = 200000
"""NVIDIA's exporter writes 200000 unless the module has `output_bound` (the loader's default
when the attribute is absent is 150000, so we always write it)."""


@dataclass(frozen=True)
class Floats:
    """A FLOATS attribute value, typed even when empty."""

    values: tuple[float, ...]


AttrValue = bool | int | float | str | Sequence[int] | Floats


def make_attribute(name: str, value: AttrValue) -> AttributeProto:
    """ONNX attribute with an explicit type: bool/int -> INT, float -> FLOAT, str -> STRING,
    int sequence -> INTS, `Floats` -> FLOATS."""
    if isinstance(value, Floats):
        return helper.make_attribute(name, [float(v) for v in value.values],
                                     attr_type=AttributeProto.FLOATS)
    if isinstance(value, bool | int | np.integer):
        return helper.make_attribute(name, int(value), attr_type=AttributeProto.INT)
    if isinstance(value, float):
        return helper.make_attribute(name, value, attr_type=AttributeProto.FLOAT)
    if isinstance(value, str):
        return helper.make_attribute(name, value, attr_type=AttributeProto.STRING)
    ints = [int(v) for v in value]
    if not ints:
        raise ExportError(f"attribute '{name}': empty integer list")
    return helper.make_attribute(name, ints, attr_type=AttributeProto.INTS)


class SymbolicRegistry:
    """Which module types and class methods a `Tracer` records, and how."""

    def __init__(self) -> None:
        self._modules: dict[type, SymbolicFn] = {}
        self._methods: dict[tuple[type, str], SymbolicFn] = {}
        self._passthrough: set[type] = set()

    def module(self, *types: type) -> Callable[[F], F]:
        """Decorator: record calls of modules of these types (and subclasses) with `fn`."""

        def deco(fn: F) -> F:
            for t in types:
                self._modules[t] = fn
            return fn

        return deco

    def method(self, owner: type, name: str) -> Callable[[F], F]:
        """Decorator: record calls of `owner.name` on traced receivers with `fn`."""
        if not callable(getattr(owner, name, None)):
            raise ExportError(f"{owner.__qualname__} has no method '{name}'")

        def deco(fn: F) -> F:
            self._methods[(owner, name)] = fn
            return fn

        return deco

    def passthrough(self, *types: type) -> None:
        """Modules of these types return their input unchanged and record nothing."""
        self._passthrough.update(types)

    def copy(self) -> SymbolicRegistry:
        """An independent registry with the same entries (to extend without touching this one)."""
        new = SymbolicRegistry()
        new._modules = dict(self._modules)
        new._methods = dict(self._methods)
        new._passthrough = set(self._passthrough)
        return new

    def symbolic_for(self, module: nn.Module) -> SymbolicFn | None:
        """The symbolic of the most derived registered type in `module`'s MRO, if any."""
        for t in type(module).__mro__:
            if t in self._modules:
                return self._modules[t]
        return None

    def is_passthrough(self, module: nn.Module) -> bool:
        """Whether `module` is registered as a no-op."""
        return isinstance(module, tuple(self._passthrough))

    def methods(self) -> Iterator[tuple[type, str, SymbolicFn]]:
        """The registered (owner, method name, symbolic) triples."""
        for (owner, name), fn in self._methods.items():
            yield owner, name, fn


@dataclass
class _Patch:
    target: Any
    name: str
    had_own: bool
    old: Any


def _key(obj: Any) -> int:
    if isinstance(obj, spconv.SparseConvTensor):
        return id(obj.features)
    return id(obj)


@dataclass
class Tracer:
    """Scoped tracing state: use as `with Tracer(model, registry) as t: model(...)`.

    Symbolic functions call `name`, `define`, `add_initializer` and `add_node`. Tensor names are
    counters in order of definition, as NVIDIA's exporter writes them; `mark_input` names the
    first tensor "0".
    """

    model: nn.Module
    registry: SymbolicRegistry
    options: Mapping[str, Any] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list, init=False)
    initializers: list[TensorProto] = field(default_factory=list, init=False)
    _names: dict[int, str] = field(default_factory=dict, init=False)
    _count: int = field(default=0, init=False)
    _keep: list[Any] = field(default_factory=list, init=False)
    _indices: dict[str, int] = field(default_factory=dict, init=False)
    _stack: list[str] = field(default_factory=list, init=False)
    _depth: int = field(default=0, init=False)
    _patches: list[_Patch] = field(default_factory=list, init=False)
    _active: bool = field(default=False, init=False)

    def __enter__(self) -> Tracer:
        if self._active:
            raise ExportError("this tracer is already active")
        self._active = True
        try:
            self._install()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    # -- recording API for symbolic functions -------------------------------------------------

    @property
    def path(self) -> str:
        """Module path of the op being recorded ("" for the root)."""
        return self._stack[-1] if self._stack else ""

    def knows(self, obj: Any) -> bool:
        """Whether `obj` (a tensor or SparseConvTensor) has a name in the trace."""
        return _key(obj) in self._names

    def name(self, obj: Any) -> str:
        """The name of a traced tensor; ExportError naming the module path if it has none."""
        try:
            return self._names[_key(obj)]
        except KeyError:
            raise ExportError(
                f"'{self.path or '<root>'}': input {type(obj).__name__} was not produced by a "
                "traced op (an unregistered operation ran on it)"
            ) from None

    def define(self, obj: Any) -> str:
        """Give `obj` the next counter name and keep it alive (ids must not be reused)."""
        name = str(self._count)
        self._count += 1
        self._names[_key(obj)] = name
        self._keep.append(obj)
        return name

    def alias(self, new: Any, old: Any) -> None:
        """Make `new` carry the name of `old` (for ops that record no node)."""
        self._names[_key(new)] = self.name(old)
        self._keep.append(new)

    def mark_input(self, obj: Any) -> str:
        """Name the graph input; must come first."""
        if self._count:
            raise ExportError("mark_input must be called before anything is traced")
        return self.define(obj)

    def index(self, kind: str) -> int:
        """Next per-kind counter (conv0, conv1, ...)."""
        i = self._indices.get(kind, 0)
        self._indices[kind] = i + 1
        return i

    def add_initializer(self, name: str, array: np.ndarray, dtype: int = TensorProto.FLOAT16) -> str:
        """Store `array` as a raw initializer of ONNX type `dtype` (FLOAT16 by default)."""
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        a = np.asarray(array)
        with np.errstate(over="ignore"):
            converted = np.ascontiguousarray(a.astype(np_dtype))
        if np.issubdtype(np_dtype, np.floating) and np.isfinite(a).all() and not np.isfinite(converted).all():
            raise ExportError(f"'{self.path}': initializer {name} overflows {np_dtype.name}")
        self.initializers.append(
            helper.make_tensor(name, dtype, list(a.shape), converted.tobytes(), raw=True)
        )
        return name

    def add_node(
        self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
        attributes: Mapping[str, AttrValue] | None = None,
    ) -> onnx.NodeProto:
        """Append a node; its doc_string records the module path it came from."""
        node = helper.make_node(op_type, list(inputs), list(outputs), name, doc_string=self.path)
        node.attribute.extend(make_attribute(k, v) for k, v in (attributes or {}).items())
        self.nodes.append(node)
        return node

    # -- patching -------------------------------------------------------------------------------

    def _set(self, target: Any, name: str, value: Any) -> None:
        own = vars(target)
        self._patches.append(_Patch(target, name, name in own, own.get(name)))
        if isinstance(target, type):
            setattr(target, name, value)
        else:
            own[name] = value

    def _restore(self) -> None:
        while self._patches:
            p = self._patches.pop()
            try:
                if isinstance(p.target, type):
                    if p.had_own:
                        setattr(p.target, p.name, p.old)
                    else:
                        delattr(p.target, p.name)
                elif p.had_own:
                    vars(p.target)[p.name] = p.old
                else:
                    vars(p.target).pop(p.name, None)
            except (AttributeError, TypeError):
                continue
        self._stack.clear()
        self._depth = 0
        self._active = False

    def _install(self) -> None:
        for path, module in self.model.named_modules():
            fn = self.registry.symbolic_for(module)
            if fn is not None:
                wrapper = self._traced(module, path, fn)
            elif self.registry.is_passthrough(module):
                wrapper = self._passthrough(module, path)
            elif next(iter(module.children()), None) is not None or module is self.model:
                wrapper = self._container(module, path)
            else:
                wrapper = self._unsupported(module, path)
            self._set(module, "forward", wrapper)
        for owner, name, fn in self.registry.methods():
            self._set(owner, name, self._traced_method(getattr(owner, name), fn))

    @contextmanager
    def _scope(self, path: str) -> Iterator[None]:
        self._stack.append(path)
        try:
            yield
        finally:
            self._stack.pop()

    def _run_nested(self, call: Callable[[], Any]) -> Any:
        self._depth += 1
        try:
            return call()
        finally:
            self._depth -= 1

    def _traced(self, module: nn.Module, path: str, fn: SymbolicFn) -> Callable[..., Any]:
        forward = module.forward

        def traced_forward(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return forward(*args, **kwargs)
            with self._scope(path):
                y = self._run_nested(lambda: forward(*args, **kwargs))
                fn(self, module, y, *args, **kwargs)
            self._keep.extend((*args, y))
            return y

        return traced_forward

    def _passthrough(self, module: nn.Module, path: str) -> Callable[..., Any]:
        forward = module.forward

        def passthrough_forward(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return forward(*args, **kwargs)
            with self._scope(path):
                y = self._run_nested(lambda: forward(*args, **kwargs))
                if args and y is not args[0]:
                    self.alias(y, args[0])
            return y

        return passthrough_forward

    def _container(self, module: nn.Module, path: str) -> Callable[..., Any]:
        forward = module.forward

        def container_forward(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return forward(*args, **kwargs)
            with self._scope(path):
                return forward(*args, **kwargs)

        return container_forward

    def _unsupported(self, module: nn.Module, path: str) -> Callable[..., Any]:
        forward = module.forward

        def unsupported_forward(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return forward(*args, **kwargs)
            raise ExportError(
                f"'{path}': unsupported layer {type(module).__qualname__} met during tracing "
                "(no symbolic function is registered for it)"
            )

        return unsupported_forward

    def _traced_method(self, original: Callable[..., Any], fn: SymbolicFn) -> Callable[..., Any]:
        def traced_method(receiver: Any, *args: Any, **kwargs: Any) -> Any:
            if self._depth or not self.knows(receiver):
                return original(receiver, *args, **kwargs)
            y = self._run_nested(lambda: original(receiver, *args, **kwargs))
            fn(self, receiver, y, *args, **kwargs)
            self._keep.extend((receiver, y))
            return y

        return traced_method


# -- NVIDIA 3DSparseConvolution symbolics ---------------------------------------------------------

ACTIVATIONS = {
    tv.gemm.Activation.None_: "None",
    tv.gemm.Activation.ReLU: "ReLU",
    tv.gemm.Activation.Sigmoid: "Sigmoid",
    tv.gemm.Activation.LeakyReLU: "LeakyReLU",
}

SCN_SYMBOLICS = SymbolicRegistry()
SCN_SYMBOLICS.passthrough(nn.Identity, nn.Dropout)


def _ints(values: Iterable[Any]) -> list[int]:
    return [int(v) for v in values]


def _active(q: TensorQuantizer | None) -> bool:
    return q is not None and q.mode is QuantMode.QUANTIZE


def _amax(q: TensorQuantizer | None) -> list[float]:
    return [] if q is None or not q.is_calibrated else [float(v) for v in q.amax.reshape(-1)]


def _int8(t: Tracer, quantizers: Sequence[TensorQuantizer | None], what: str) -> bool:
    """Whether a layer runs in int8: all its quantizers quantize, or none does (else an error)."""
    active = [_active(q) for q in quantizers]
    if any(active) and not all(active):
        raise ExportError(f"'{t.path}': the engine runs a layer wholly in int8 or fp16, but only "
                          f"some of its {what} quantizers are enabled")
    return all(active)


def _conv_ranges(t: Tracer, conv: nn.Module) -> tuple[bool, float, list[float]]:
    """(int8, input range, per-output-channel weight ranges) from a quantized conv's quantizers.

    Ranges are written whenever a quantizer holds an amax (NVIDIA writes them for fp16 layers
    too); a float conv gives (False, 0, []).
    """
    if not isinstance(conv, QuantModule):
        return False, 0.0, []
    q_in, q_w = conv.get_input_quantizer(0), getattr(conv, "weight_quantizer", None)
    if q_in is not None and q_in.axis is not None:
        raise ExportError(f"'{t.path}': the engine takes one input range, not per channel")
    int8 = _int8(t, [q_in, q_w], "input and weight")
    inp = _amax(q_in)
    return int8, inp[0] if inp else 0.0, _amax(q_w)


@SCN_SYMBOLICS.module(SparseConvolution)
def symbolic_sparse_convolution(
    t: Tracer, conv: SparseConvolution, y: spconv.SparseConvTensor,
    x: spconv.SparseConvTensor, *rest: Any, **kwargs: Any,
) -> None:
    """SparseConvolution(x, weight, bias) with every attribute the loader reads, made explicit."""
    if rest or kwargs:
        raise ExportError(f"'{t.path}': sparse convolution with add_input is not supported")
    if conv.act_type not in ACTIVATIONS:
        raise ExportError(f"'{t.path}': activation {conv.act_type} has no engine name")
    if tuple(conv.weight.shape[1:-1]) != tuple(conv.kernel_size):
        raise ExportError(f"'{t.path}': weight {tuple(conv.weight.shape)} is not spconv 2.x's "
                          "[Cout, k0, k1, k2, Cin] layout")
    bound = int(getattr(conv, "output_bound", DEFAULT_OUTPUT_BOUND))
    n_out = int(y.features.shape[0])
    if not conv.subm and n_out > bound:
        raise ExportError(f"'{t.path}': {n_out} output voxels exceed output_bound {bound}; "
                          "set the module's output_bound attribute")
    i = t.index("conv")
    weight = t.add_initializer(f"spconv{i}.weight", conv.weight.detach().cpu().float().numpy())
    bias_t = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    bias = t.add_initializer(f"spconv{i}.bias", bias_t.detach().cpu().float().numpy())
    int8, input_range, weight_ranges = _conv_ranges(t, conv)
    if weight_ranges and len(weight_ranges) != conv.out_channels:
        raise ExportError(f"'{t.path}': {len(weight_ranges)} weight ranges for {conv.out_channels} "
                          "output channels (quantize the weight per channel along axis 0)")
    x_name = t.name(x)
    precision = "int8" if int8 else "fp16"
    t.add_node("SparseConvolution", [x_name, weight, bias], [t.define(y)], f"conv{i}", {
        "ndim": int(conv.ndim),
        "input_spatial_shape": _ints(x.spatial_shape),
        "output_spatial_shape": _ints(y.spatial_shape),
        "in_channels": int(conv.in_channels),
        "out_channels": int(conv.out_channels),
        "kernel_size": _ints(conv.kernel_size),
        "output_bound": bound,
        "stride": _ints(conv.stride),
        "dilation": _ints(conv.dilation),
        "padding": _ints(conv.padding),
        "transposed": bool(conv.transposed),
        "inverse": bool(conv.inverse),
        "output_padding": _ints(conv.output_padding),
        "groups": int(conv.groups),
        "subm": bool(conv.subm),
        "rulebook": conv.indice_key or "",
        "activation": ACTIVATIONS[conv.act_type],
        "input_shape": _ints(x.features.shape),
        "output_shape": _ints(y.features.shape),
        "input_dynamic_range": input_range,
        "weight_dynamic_ranges": Floats(tuple(weight_ranges)),
        "precision": precision,
        "output_precision": precision,
    })


@SCN_SYMBOLICS.module(nn.ReLU)
def symbolic_relu(t: Tracer, module: nn.ReLU, y: torch.Tensor, x: torch.Tensor) -> None:
    """Relu(x): no attributes."""
    x_name = t.name(x)
    t.add_node("Relu", [x_name], [t.define(y)], f"relu{t.index('relu')}")


@SCN_SYMBOLICS.module(QuantAdd)
def symbolic_add(
    t: Tracer, module: nn.Module, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> None:
    """Add(a, b) with each input's range (0 when float; a shared quantizer gives both the same).

    Registered for QuantAdd; a model library registers it for its float add module too
    (`SCN_SYMBOLICS.module(Add)(symbolic_add)`, as the zoo's CenterPoint does)."""
    names = [t.name(a), t.name(b)]
    ranges = [0.0, 0.0]
    int8 = False
    if isinstance(module, QuantAdd):
        qs = [module.get_input_quantizer(0), module.get_input_quantizer(1)]
        int8 = _int8(t, qs, "input")
        ranges = [(_amax(q) or [0.0])[0] for q in qs]
    precision = "int8" if int8 else "fp16"
    t.add_node("Add", names, [t.define(y)], f"add{t.index('add')}", {
        "input0_dynamic_range": ranges[0],
        "input1_dynamic_range": ranges[1],
        "precision": precision,
        "output_precision": precision,
    })


@SCN_SYMBOLICS.method(spconv.SparseConvTensor, "dense")
def symbolic_dense(
    t: Tracer, x: spconv.SparseConvTensor, y: torch.Tensor, channels_first: bool = True
) -> None:
    """ScatterDense(x) -> [B, C, *spatial] in the index order of the traced model."""
    if not channels_first:
        raise ExportError(f"'{t.path}': dense(channels_first=False) has no engine equivalent")
    x_name = t.name(x)
    t.add_node("ScatterDense", [x_name], [t.define(y)], f"scatter{t.index('scatter')}", {
        "input_spatial_shape": _ints(x.spatial_shape),
        "format": str(t.options.get("format", "zyx")),
        "output_shape": _ints(y.shape),
        "input_dynamic_range": 0.0,
        "output_layout": "NCHW",
    })


def _reshape(t: Tracer, x: torch.Tensor, y: torch.Tensor, *args: Any) -> None:
    x_name = t.name(x)
    t.add_node("Reshape", [x_name], [t.define(y)], f"reshape{t.index('reshape')}",
               {"dims": _ints(y.shape)})


SCN_SYMBOLICS.method(torch.Tensor, "view")(_reshape)
SCN_SYMBOLICS.method(torch.Tensor, "reshape")(_reshape)


@SCN_SYMBOLICS.method(torch.Tensor, "permute")
def symbolic_permute(t: Tracer, x: torch.Tensor, y: torch.Tensor, *dims: Any) -> None:
    """Transpose(x) with `dims` the permutation (NVIDIA's attribute, not ONNX's `perm`)."""
    perm = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], Sequence) else list(dims)
    x_name = t.name(x)
    t.add_node("Transpose", [x_name], [t.define(y)], f"transpose{t.index('transpose')}",
               {"dims": [int(d) % x.dim() for d in perm]})


# -- whole-model export ---------------------------------------------------------------------------


def attribute(node: onnx.NodeProto, name: str) -> Any:
    """Value of `node`'s attribute `name` (None if absent); strings decoded."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return None


def set_attribute(node: onnx.NodeProto, name: str, value: AttrValue) -> None:
    """Replace `node`'s attribute `name` where it stands, or append it."""
    new = make_attribute(name, value)
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(new)
            return
    node.attribute.append(new)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _input_precisions(name: str, consumers: Mapping[str, list[onnx.NodeProto]],
                      outputs: set[str]) -> list[str]:
    """Precision each reader of tensor `name` expects; Relu passes its input's through."""
    found = ["fp16"] if name in outputs else []
    for node in consumers.get(name, []):
        if node.op_type == "Relu":
            found += _input_precisions(node.output[0], consumers, outputs)
        elif node.op_type in ("SparseConvolution", "Add"):
            found.append(attribute(node, "precision"))
        else:
            found.append("fp16")
    return found


def assign_precisions(model: onnx.ModelProto) -> None:
    """Settle `precision` / `output_precision` on every conv and add, in place.

    A node computes in int8 when its quantizers say so, except the first SparseConvolution,
    which reads the fp16 voxel features (as NVIDIA's exports have it). A node writes int8 only
    when every reader computes in int8, so the last layer (read by ScatterDense) writes fp16 and
    every edge agrees on its precision.
    """
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type in ("SparseConvolution", "Add")]
    first = next((n for n in graph.node if n.op_type == "SparseConvolution"), None)
    if first is not None:
        set_attribute(first, "precision", "fp16")
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    for node in nodes:
        readers = _input_precisions(node.output[0], consumers, outputs)
        out = "int8" if readers and all(p == "int8" for p in readers) else "fp16"
        set_attribute(node, "output_precision", out)


_SPATIAL_ATTRS = ("kernel_size", "stride", "padding", "dilation", "output_padding",
                  "input_spatial_shape", "output_spatial_shape")


def _compose(p: Sequence[int], q: Sequence[int]) -> list[int]:
    """Permutation equal to permute(p) followed by permute(q)."""
    return [int(p[i]) for i in q]


def reorder(model: onnx.ModelProto, order: IndexOrder) -> onnx.ModelProto:
    """A copy of an SCN graph for indices in `order` ("zyx" rows (b,z,y,x), "xyz" rows (b,x,y,z)).

    As NVIDIA's `inverse_model`: spatial attributes reversed, weights [Cout,k0,k1,k2,Cin]
    permuted (0,3,2,1,4), ScatterDense's format and shapes switched; a Transpose after
    ScatterDense (merged with one that is already there, dropped if it becomes the identity)
    keeps the dense output identical.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    scatters = [n for n in graph.node if n.op_type == "ScatterDense"]
    if len(scatters) != 1:
        raise ExportError(f"reorder: expected one ScatterDense, found {len(scatters)}")
    current = attribute(scatters[0], "format")
    if current not in ("zyx", "xyz"):
        raise ExportError(f"reorder: unknown ScatterDense format {current!r}")
    if current == order:
        return out
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "SparseConvolution":
            continue
        for name in _SPATIAL_ATTRS:
            set_attribute(node, name, list(attribute(node, name))[::-1])
        w = inits[node.input[1]]
        arr = onnx.numpy_helper.to_array(w).transpose(0, 3, 2, 1, 4)
        w.CopyFrom(helper.make_tensor(w.name, w.data_type, list(arr.shape),
                                      np.ascontiguousarray(arr).tobytes(), raw=True))
    scatter = scatters[0]
    spatial = list(attribute(scatter, "input_spatial_shape"))[::-1]
    shape = list(attribute(scatter, "output_shape"))
    set_attribute(scatter, "format", order)
    set_attribute(scatter, "input_spatial_shape", spatial)
    set_attribute(scatter, "output_shape", shape[:2] + spatial)
    flip = [0, 1, 4, 3, 2]
    consumers = _consumers(graph)
    readers = consumers.get(scatter.output[0], [])
    nodes = list(graph.node)
    if len(readers) == 1 and readers[0].op_type == "Transpose":
        perm = _compose(flip, attribute(readers[0], "dims"))
        if perm == sorted(perm):
            _bypass(graph, nodes, readers[0])
        else:
            set_attribute(readers[0], "dims", perm)
    else:
        used = [int(n) for n in _tensor_names(graph) if n.isdigit()]
        new = str(max(used) + 1)
        k = sum(n.op_type == "Transpose" for n in nodes)
        transpose = helper.make_node("Transpose", [scatter.output[0]], [new], f"transpose{k}",
                                     doc_string=scatter.doc_string)
        transpose.attribute.append(make_attribute("dims", flip))
        for reader in readers:
            reader.input[:] = [new if i == scatter.output[0] else i for i in reader.input]
        for o in graph.output:
            if o.name == scatter.output[0]:
                o.name = new
        nodes.insert(nodes.index(scatter) + 1, transpose)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _tensor_names(graph: onnx.GraphProto) -> Iterator[str]:
    for i in graph.input:
        yield i.name
    for n in graph.node:
        yield from n.output


def _bypass(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], node: onnx.NodeProto) -> None:
    """Remove single-input `node`, wiring its readers (and graph outputs) to its input."""
    src, dst = node.input[0], node.output[0]
    for n in nodes:
        n.input[:] = [src if i == dst else i for i in n.input]
    for o in graph.output:
        if o.name == dst:
            o.name = src
    nodes.remove(node)


@dataclass(frozen=True)
class ScnExport:
    """An exported SCN graph with what the trace measured."""

    model: onnx.ModelProto
    output: torch.Tensor
    seconds: float

    @property
    def num_nodes(self) -> int:
        """Number of nodes in the graph."""
        return len(self.model.graph.node)

    def save(self, path: str | Path) -> Path:
        """Write the ONNX file (parent directories created) and return its path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.model, str(p))
        return p


def export_scn(
    model: nn.Module,
    features: torch.Tensor,
    indices: torch.Tensor,
    *,
    order: IndexOrder = "zyx",
    native_order: IndexOrder = "zyx",
    registry: SymbolicRegistry | None = None,
    producer: str = "qharness",
) -> ScnExport:
    """Trace `model(features, indices)` and return NVIDIA's SCN graph for indices in `order`.

    `features` [N, C] and `indices` [N, 4] (rows in `native_order`, the model's own order) drive
    the trace; the graph's input "0" is FLOAT16 [N, C] and its output the FLOAT16 dense map. A
    model quantized with `harness.quant.sparse.quantize_scn` and calibrated exports the int8
    precisions and dynamic ranges of its enabled quantizers (see `assign_precisions`).
    """
    start = time.perf_counter()
    tracer = Tracer(model, registry or SCN_SYMBOLICS, {"format": native_order})
    with torch.no_grad(), tracer:
        input_name = tracer.mark_input(features)
        y = model(features, indices)
        if not isinstance(y, torch.Tensor):
            raise ExportError(f"export_scn: model returned {type(y).__name__}, not a tensor")
        output_name = tracer.name(y)
    graph = helper.make_graph(
        tracer.nodes, GRAPH_NAME,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT16,
                                       ["num_voxels", int(features.shape[1])])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT16, _ints(y.shape))],
        initializer=tracer.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("ai.onnx", OPSET)],
                              producer_name=producer)
    proto.ir_version = 6
    assign_precisions(proto)
    if order != native_order:
        proto = reorder(proto, order)
    return ScnExport(proto, y.detach(), time.perf_counter() - start)

