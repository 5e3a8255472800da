"""Rules that make quantizers shared, and the module tracer they use to see who reads what.

A rule is a small frozen object with a `name`, a `needs_trace` flag and
`apply(model, graph) -> int` returning how many places it matched; `quantize_model` runs the
configured rules in order after layers were replaced and reports a rule that matched nothing as
an error naming the rule. Sharing is global: merging quantizer B into A replaces B by A in every
quantized input of the model, so rules compose (e.g. `shared_input` then `shared_concat` gives a
concat the quantizer of every layer that reads any of its inputs).

A rule may also say which layers it acts on (`targets(model, graph)`, see `TargetedRule`),
quantized or not: `quantize_model` then reports a layer that a rule would share but a
`keep_float` pattern keeps float as a conflict naming the rule, the layer and the pattern.

Rules are looked up by `get_rule(name)` in `harness.quant.registry.RULES`; the library registers:

* `shared_input`: quantized inputs that read the same tensor share one quantizer (found by
  tracing the model with forward hooks that record tensor identity); a tensor read by quantized
  layers and by a layer kept float is a conflict (a group of readers that are all float is not);
* `shared_concat`: all inputs of each `QuantConcat` share one quantizer;
* `shared_add`: all inputs of each `QuantAdd` share one quantizer (an input a rule left
  unquantized, such as the branch of a residual add, stays unquantized).
Model libraries register their own (the zoo's ResNet `bottleneck_residual`, see
`harness.zoo.resnet`), built from `share`, `replace_quantizer` and the tracer here.

Tracing sees module calls only: a tensor consumed by a functional op (`x + y`) is invisible,
which is why models write joins through registered join modules (`harness.zoo.ops`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from harness.errors import QuantError
from harness.quant.modules import QuantAdd, QuantConcat, QuantModule, quant_modules
from harness.quant.registry import RULES, JoinKind, float_types, quantizable, register_rule
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer
from harness.registry import RegistryError

ModelCall = Callable[[nn.Module], Any]
Batch = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | ModelCall


class QuantConfigError(QuantError):
    """A quantization setting is at fault: `key` names it ("include", "exclude", "keep_float",
    "rules") and `index` the entry of that list (None: the setting as a whole)."""

    def __init__(self, message: str, key: str, index: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.index = index


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Run `model` on one batch: a tensor, a tuple/list of positional tensors, a dict of keyword
    tensors, or a callable that runs the model itself (e.g. a multi-stage program with glue)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, Sequence):
        return model(*batch)
    return batch(model)


@dataclass(frozen=True)
class Call:
    """One module call: its name, the ids of its positional tensor inputs (None: not a tensor), its output ids."""

    name: str
    inputs: tuple[int | None, ...]
    outputs: tuple[int, ...]


@dataclass
class TraceGraph:
    """Module calls of one forward pass, in execution order, with tensor identities."""

    calls: list[Call] = field(default_factory=list)

    def readers(self) -> dict[int, list[tuple[str, int]]]:
        """tensor id -> [(module name, positional input index)] of every call reading it."""
        found: dict[int, list[tuple[str, int]]] = {}
        for call in self.calls:
            for index, tid in enumerate(call.inputs):
                if tid is not None:
                    found.setdefault(tid, []).append((call.name, index))
        return found

    def producers(self) -> dict[int, str]:
        """tensor id -> name of the module call that returned it (the last one, if several)."""
        return {tid: call.name for call in self.calls for tid in call.outputs}

    def count(self, name: str) -> int:
        """How many times module `name` was called."""
        return sum(1 for call in self.calls if call.name == name)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def trace_modules(model: nn.Module, example_inputs: Batch, select: Callable[[nn.Module], bool]) -> TraceGraph:
    """Run `model` once under no_grad with forward hooks on the modules `select` accepts.

    Quantizers are disabled for the duration (uncalibrated quantizers would raise) and restored.
    Every tensor seen is kept alive until the pass ends, so ids are unique within the trace.
    """
    graph = TraceGraph()
    keep: list[torch.Tensor] = []
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            del module
            ins = tuple(id(a) if isinstance(a, torch.Tensor) else None for a in args)
            outs = _tensors(output)
            keep.extend(a for a in args if isinstance(a, torch.Tensor))
            keep.extend(outs)
            graph.calls.append(Call(name, ins, tuple(id(t) for t in outs)))

        return record

    for name, module in model.named_modules():
        if name and select(module):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with quantizers_disabled(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return graph


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Every quantizer of `model` disabled for the body (a float pass through a quantizable
    model), each restored to its mode afterwards, also on error."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    modes = [q.mode for q in quantizers]
    try:
        for q in quantizers:
            q.set_mode(QuantMode.DISABLED)
        yield
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.set_mode(mode)


class Rule(Protocol):
    """A quantizer-sharing rule: `apply` returns the number of places it matched (0 is an error)."""

    @property
    def name(self) -> str: ...

    @property
    def needs_trace(self) -> bool: ...

    def apply(self, model: nn.Module, graph: TraceGraph | None) -> int: ...


@runtime_checkable
class TargetedRule(Protocol):
    """A rule that can say which layers it would act on, quantized or kept float (for conflicts).

    `graph`, when given, traces every quantized layer and every layer of a quantizable type.
    """

    @property
    def name(self) -> str: ...

    def targets(self, model: nn.Module, graph: TraceGraph | None) -> list[str]: ...


def replace_quantizer(model: nn.Module, old: TensorQuantizer, new: TensorQuantizer) -> int:
    """Use `new` wherever an input of a quantized layer uses `old`; returns how many inputs changed."""
    if old is new:
        return 0
    changed = 0
    for _, module in quant_modules(model):
        changed += _replace_in(module, old, new)
    return changed


def _replace_in(module: QuantModule, old: TensorQuantizer, new: TensorQuantizer) -> int:
    changed = 0
    if getattr(module, "input_quantizer", None) is old:
        module.input_quantizer = new
        changed += 1
    overrides = getattr(module, "input_overrides", None)
    if isinstance(overrides, nn.ModuleDict):
        for key in list(overrides.keys()):
            if overrides[key] is old:
                overrides[key] = new
                changed += 1
    return changed


def share(model: nn.Module, quantizers: Iterable[TensorQuantizer]) -> TensorQuantizer | None:
    """Merge `quantizers` into the first of them (everywhere in `model`); returns it (None if empty)."""
    distinct: list[TensorQuantizer] = []
    for q in quantizers:
        if all(q is not d for d in distinct):
            distinct.append(q)
    if not distinct:
        return None
    for q in distinct[1:]:
        replace_quantizer(model, q, distinct[0])
    return distinct[0]


def _require_graph(rule: str, graph: TraceGraph | None) -> TraceGraph:
    if graph is None:
        raise QuantConfigError(f"rule '{rule}' needs example inputs to trace the model", "rules")
    return graph


@dataclass(frozen=True)
class SharedInput:
    """Quantized inputs that read the same tensor share one quantizer."""

    name: str = "shared_input"
    needs_trace: bool = True

    def apply(self, model: nn.Module, graph: TraceGraph | None) -> int:
        graph = _require_graph(self.name, graph)
        modules = dict(quant_modules(model))
        matched = 0
        for readers in graph.readers().values():
            slots = [(modules[n], i) for n, i in readers if n in modules]
            found = [q for m, i in slots if _has_input(m, i) and (q := m.get_input_quantizer(i)) is not None]
            if len(found) >= 2:
                matched += 1
                share(model, found)
        return matched

    def targets(self, model: nn.Module, graph: TraceGraph | None) -> list[str]:
        """Every reader of a tensor that quantized layers read and at least one other layer of a
        quantizable type reads too (quantized or float)."""
        graph = _require_graph(self.name, graph)
        modules = dict(model.named_modules())
        found: list[str] = []
        for readers in graph.readers().values():
            slots = [(n, modules[n], i) for n, i in readers if n in modules and _reads_quantizable(modules[n], i)]
            quantized = [m for _, m, i in slots if isinstance(m, QuantModule) and m.get_input_quantizer(i) is not None]
            if len(slots) >= 2 and quantized:
                found += [n for n, _, _ in slots if n not in found]
        return found


def _has_input(module: QuantModule, index: int) -> bool:
    return module.num_quantized_inputs is None or index < module.num_quantized_inputs


def _reads_quantizable(module: nn.Module, index: int) -> bool:
    """True when positional input `index` of `module` is (or would be, once quantized) quantized."""
    if isinstance(module, QuantModule):
        return _has_input(module, index)
    entry = quantizable(module)
    limit = 1 if entry is None else entry.quantized_inputs
    return limit is None or index < limit


@dataclass(frozen=True)
class _SharedJoin:
    name: str
    kind: type[QuantModule]
    join: JoinKind
    needs_trace: bool = False

    def apply(self, model: nn.Module, graph: TraceGraph | None) -> int:
        del graph
        matched = 0
        for _, module in quant_modules(model):
            if isinstance(module, self.kind):
                matched += 1
                share(model, module.input_quantizers())
        return matched

    def targets(self, model: nn.Module, graph: TraceGraph | None) -> list[str]:
        """Every join of this kind, quantized or float."""
        del graph
        kinds = (self.kind, *float_types(self.join))
        return [n for n, m in model.named_modules() if n and isinstance(m, kinds)]


def shared_concat() -> Rule:
    """All inputs of each QuantConcat share one quantizer."""
    return _SharedJoin("shared_concat", QuantConcat, "concat")


def shared_add() -> Rule:
    """All inputs of each QuantAdd share one quantizer."""
    return _SharedJoin("shared_add", QuantAdd, "add")


register_rule("shared_input", SharedInput)
register_rule("shared_concat", shared_concat)
register_rule("shared_add", shared_add)


def get_rule(name: str) -> Rule:
    """The registered rule called `name`; unknown names raise `QuantConfigError` (key "rules")
    listing the known ones (a model library's rules are known once its module is imported)."""
    try:
        factory = RULES.get(name)
    except RegistryError:
        raise QuantConfigError(f"unknown quantization rule '{name}' (known: {', '.join(sorted(RULES.names()))})",
                               "rules") from None
    return factory()
