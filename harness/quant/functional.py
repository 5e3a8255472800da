"""Functional joins: find `x + y`, `torch.add` and `torch.cat` with torch.fx and make them modules.

Forward hooks see module calls only, so a model that writes its residual adds and concats as
plain Python (`x + y`, `torch.cat([a, b], 1)`) gets no quantizer on them and the `shared_add` /
`shared_concat` rules match nothing. `insert_functional_joins(model)` traces the model with
`torch.fx.symbolic_trace` and replaces every such call whose inputs are all tensors produced in
the graph (not shapes, not Python numbers) by a call of a small join module (`FunctionalAdd`,
`FunctionalConcat`) inserted into the `GraphModule` under the fx node's name. Those modules are
registered as quantizable joins, so `quantize_model` turns them into `QuantAdd` / `QuantConcat`
exactly like the zoo's `Add` / `Concat` modules, and include / exclude / keep_float patterns
and rules apply to them.

A model fx cannot trace (data-dependent control flow, calls fx cannot symbolise) is handled
child by child: every submodule that can be traced is replaced by its GraphModule, the ones
that cannot are named with fx's reason in `JoinInsertion.untraced`. A traced module becomes a
`GraphModule` (same submodule names, same parameters, but not the original class: methods
other than `forward` are gone).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from harness.quant.modules import QuantModule, add_converter, concat_converter
from harness.quant.registry import quantizable, register_quantizable

_ADDS: tuple[Callable[..., Any], ...] = (operator.add, torch.add)
_CATS: tuple[Callable[..., Any], ...] = (torch.cat, torch.concat)
# Producers whose results are not tensors (or not activations): shapes, sizes, Python scalars.
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist"}


class FunctionalAdd(nn.Module):
    """`a + b` as a module: the float join an fx-found add becomes (quantized as `QuantAdd`)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class FunctionalConcat(nn.Module):
    """`torch.cat(xs, dim)` as a module with positional inputs (quantized as `QuantConcat`)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


register_quantizable(FunctionalAdd, add_converter, quantized_inputs=2, join="add")
register_quantizable(FunctionalConcat, concat_converter, quantized_inputs=None, join="concat")


@dataclass
class JoinInsertion:
    """What `insert_functional_joins` did: the new join modules by name, and the modules fx
    could not trace (name -> fx's reason) whose adds and concats therefore stay invisible."""

    adds: list[str] = field(default_factory=list)
    concats: list[str] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)

    def why_none(self, kind: str) -> str:
        """A sentence saying why no join of `kind` ("add" or "concat") was found."""
        op = "x + y / torch.add" if kind == "add" else "torch.cat"
        if self.untraced:
            names = ", ".join(f"'{n or '<model>'}' ({r})" for n, r in list(self.untraced.items())[:5])
            return f"no {kind} found: the model may use {op} inside modules that cannot be traced with torch.fx: {names}"
        return f"no {kind} found: the traced model has no {op} on tensors and no {kind} join module"


def _tensor_node(arg: Any) -> bool:
    """True for an fx node that can stand for an activation tensor (not a shape or a constant)."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target in _NON_TENSOR_METHODS:
        return False
    if arg.op == "call_function" and arg.target in (getattr, len, operator.getitem):
        # `x.shape[1]`, `len(x)`: getitem of a tensor-producing node is allowed only for tuples of tensors.
        if arg.target is operator.getitem and isinstance(arg.args[0], fx.Node):
            return _tensor_node(arg.args[0])
        return False
    if arg.op == "get_attr":
        return False
    return not (arg.op == "call_function" and arg.target is getattr)


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _rewrite(gm: fx.GraphModule, prefix: str, found: JoinInsertion) -> None:
    """Replace tensor adds and concats of `gm` by calls of inserted join modules (in place)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ADDS and len(node.args) == 2 and not node.kwargs \
                and all(_tensor_node(a) for a in node.args):
            module: nn.Module = FunctionalAdd()
            args: tuple[Any, ...] = tuple(node.args)
            bucket = found.adds
        elif node.target in _CATS and node.args and isinstance(node.args[0], list | tuple) \
                and len(node.args[0]) >= 2 and all(_tensor_node(a) for a in node.args[0]):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if not isinstance(dim, int) or set(node.kwargs) - {"dim"}:
                continue
            module = FunctionalConcat(dim)
            args = tuple(node.args[0])
            bucket = found.concats
        else:
            continue
        name = _unique_name(gm, node.name)
        gm.add_module(name, module)
        with graph.inserting_after(node):
            call = graph.call_module(name, args)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        bucket.append(f"{prefix}{name}")
    graph.lint()
    gm.recompile()


class _JoinTracer(fx.Tracer):
    """fx tracer that keeps torch's layers and every registered quantizable layer (the zoo's join
    modules included) as leaves, so their names and registrations survive."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return quantizable(m) is not None or isinstance(m, QuantModule) or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.GraphModule:
    graph = _JoinTracer().trace(module)
    return fx.GraphModule(module, graph, type(module).__name__)


def insert_functional_joins(model: nn.Module) -> tuple[nn.Module, JoinInsertion]:
    """`model` with its functional adds and concats turned into join modules, and what was done.

    The root is traced whole when fx can; otherwise each child in turn (recursively), children
    replaced in place by their GraphModules. Modules fx cannot trace are left as they are and
    named in the result. Leaf layers (torch's own and registered quantizable layers) are never
    traced into. `model` itself is not modified (a deep copy is rewritten).
    """
    found = JoinInsertion()
    model = copy.deepcopy(model)

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if quantizable(module) is not None or isinstance(module, QuantModule) or (
                not list(module.children()) and type(module).__module__.startswith("torch.")):
            return module
        try:
            gm = _trace(module)
        except Exception as exc:  # fx raises many kinds; the reason is reported
            detail = str(exc).splitlines()[0][:120] if str(exc) else ""
            found.untraced[prefix.rstrip(".")] = f"{type(module).__name__}: {type(exc).__name__} {detail}".rstrip()
            for name, child in list(module.named_children()):
                new = visit(child, f"{prefix}{name}.")
                if new is not child:
                    setattr(module, name, new)
            return module
        _rewrite(gm, prefix, found)
        return gm

    return visit(model, ""), found
