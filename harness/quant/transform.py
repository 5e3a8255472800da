"""Turn a float model into a fake-quantizable one: fold conv+bn, swap layers, apply sharing rules.

`quantize_model(model, config, example_inputs=None)` returns a new model (the input is not
modified): BatchNorm2d layers that directly follow a Conv2d / ConvTranspose2d are folded into it
and replaced by Identity; every layer of a quantizable type (`harness.quant.registry`: torch's
Conv2d, ConvTranspose2d, Linear, and what model libraries register, such as the zoo's add and
concat modules) whose name is included, not excluded and not kept float is replaced by its
quantized version; then the configured rules run. With `functional_joins` the model is first traced with torch.fx
and its functional adds and concats become join modules (`harness.quant.functional`). Quantizers start uncalibrated (see `harness.quant.calibrate`).

Name patterns are fnmatch patterns matched against module names (`backbone.layer1.0.conv1`);
a pattern also matches every module below a matching module (`head` covers `head.cls.conv`).
`exclude` takes layers out of scope (rules ignore them); `keep_float` keeps layers in scope float,
so a rule that would share a kept-float layer's input quantizer (see `rules.TargetedRule`) is a
conflict. A pattern that matches no module, a rule that matches nothing and a conflict are
`QuantConfigError`s naming the rule and the pattern, with the setting and list index at fault.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from harness.errors import QuantError
from harness.quant.functional import JoinInsertion, insert_functional_joins
from harness.quant.modules import (
    DEFAULT_INPUT_DESC,
    DEFAULT_WEIGHT_DESC,
    QuantModule,
    quant_modules,
)
from harness.quant.registry import quantizable
from harness.quant.rules import (
    Batch,
    QuantConfigError,
    Rule,
    TargetedRule,
    TraceGraph,
    trace_modules,
)
from harness.quant.tensor_quantizer import QuantDescriptor, TensorQuantizer


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how: descriptors, name patterns, rules, conv+bn folding."""

    activations: QuantDescriptor = DEFAULT_INPUT_DESC
    weights: QuantDescriptor = DEFAULT_WEIGHT_DESC
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_float: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    fold_bn: bool = True
    functional_joins: bool = False
    """Trace the model with torch.fx and quantize functional adds / concats (`harness.quant.functional`)."""


@dataclass(frozen=True)
class QuantSummary:
    """What `quantize_model` did: quantized and float layers, shared quantizers, folded BNs."""

    quantized: tuple[str, ...]
    kept_float: tuple[str, ...]
    shared: dict[str, tuple[str, ...]] = field(default_factory=dict)


def quantize_model(model: nn.Module, config: QuantConfig, example_inputs: Batch | None = None) -> nn.Module:
    """A quantizable copy of `model` per `config`; `example_inputs` (one batch) enables traced folding and rules.

    Without example inputs, BN folding pairs a BatchNorm2d with the Conv registered just before it
    (matching channel count); rules that need tracing then raise `QuantError`.
    """
    model = copy.deepcopy(model)
    insertion: JoinInsertion | None = None
    if config.functional_joins:
        model, insertion = insert_functional_joins(model)
    names = [n for n, _ in model.named_modules() if n]
    check_patterns(names, config)
    if config.fold_bn:
        fold_conv_bn(model, example_inputs)
    kept: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        entry = quantizable(module) if name else None
        if entry is None:
            continue
        if not name_matches(name, config.include) or name_matches(name, config.exclude):
            continue
        keeping = keep_float_index(name, config.keep_float)
        if keeping is not None:
            kept[name] = keeping
            continue
        _set_submodule(model, name, entry.convert(module, config.activations, config.weights))
    graph: TraceGraph | None = None
    if any(rule.needs_trace for rule in config.rules) and example_inputs is not None:
        graph = trace_modules(model, example_inputs, lambda m: isinstance(m, QuantModule) or quantizable(m) is not None)
    for index, rule in enumerate(config.rules):
        with _rule_errors(index):
            _check_conflicts(model, graph, rule, kept, config.keep_float)
    for index, rule in enumerate(config.rules):
        with _rule_errors(index):
            if rule.apply(model, graph) == 0:
                raise QuantConfigError(f"rule '{rule.name}' matched nothing{_why_nothing(rule, insertion)}",
                                       "rules", index)
    name_quantizers(model)
    return model


def _why_nothing(rule: Rule, insertion: JoinInsertion | None) -> str:
    """Why a join-sharing rule found no join: functional joins off, or the modules fx could not trace."""
    join = getattr(rule, "join", None)
    if join not in ("add", "concat"):
        return ""
    if insertion is None:
        op = "x + y" if join == "add" else "torch.cat"
        return (f": no {join} join module in the model (a functional {op} gets a quantizer only with "
                "functional_joins: true)")
    return f": {insertion.why_none(join)}"


@contextlib.contextmanager
def _rule_errors(index: int) -> Iterator[None]:
    """Give a rule's own QuantConfigError (key "rules", no index) the rule's position."""
    try:
        yield
    except QuantConfigError as exc:
        if exc.key == "rules" and exc.index is None:
            raise QuantConfigError(str(exc), "rules", index) from exc
        raise


def _check_conflicts(
    model: nn.Module, graph: TraceGraph | None, rule: Rule, kept: dict[str, int], keep_float: Sequence[str]
) -> None:
    """QuantConfigError (key "keep_float") for the first layer `rule` would act on that keep_float keeps float."""
    if not kept or not isinstance(rule, TargetedRule):
        return
    for name in rule.targets(model, graph):
        if name in kept:
            index = kept[name]
            raise QuantConfigError(
                f"rule '{rule.name}' conflicts with keep_float pattern '{keep_float[index]}': the rule would share "
                f"the input quantizer of '{name}', which the pattern keeps float (narrow the pattern, or move the "
                "layer to `exclude` to take it out of the rules' scope)",
                "keep_float", index,
            )


def name_quantizers(model: nn.Module) -> None:
    """Label every quantizer with its (first) module name, for messages and calibration state."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            module.name = name


def summarize(model: nn.Module) -> QuantSummary:
    """Quantized layers, layers of quantizable type left float, and quantizers used by several inputs."""
    quantized = tuple(n for n, _ in quant_modules(model))
    kept = tuple(n for n, m in model.named_modules() if n and quantizable(m) is not None)
    users: dict[str, list[str]] = {}
    for name, module in quant_modules(model):
        count = module.num_quantized_inputs or 1
        for i in range(count):
            q = module.get_input_quantizer(i)
            if q is not None:
                users.setdefault(q.name, []).append(f"{name}:{i}")
    shared = {q: tuple(u) for q, u in users.items() if len(u) > 1}
    return QuantSummary(quantized, kept, shared)


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """True when a module name or one of its parent names matches an fnmatch pattern: the one
    meaning of include / exclude / keep_float patterns for every quantizer."""
    parts = name.split(".")
    prefixes = [".".join(parts[: k + 1]) for k in range(len(parts))]
    return any(fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def keep_float_index(name: str, keep_float: Sequence[str]) -> int | None:
    """Index of the first keep_float pattern that keeps `name` float, or None."""
    return next((i for i, p in enumerate(keep_float) if name_matches(name, (p,))), None)


def check_patterns(names: Sequence[str], config: QuantConfig) -> None:
    """QuantConfigError (setting and index) for an include / exclude / keep_float pattern that
    matches none of the module `names`."""
    for kind, patterns in (("include", config.include), ("exclude", config.exclude), ("keep_float", config.keep_float)):
        for index, pattern in enumerate(patterns):
            if not any(name_matches(n, (pattern,)) for n in names):
                raise QuantConfigError(f"{kind} pattern '{pattern}' matches no module", kind, index)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def fold_conv_bn(model: nn.Module, example_inputs: Batch | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm2d that consumes a conv's output into that conv (in place); returns (conv, bn) pairs.

    With `example_inputs` the pairs come from a traced forward pass: the BN's input must be the
    output of a Conv2d / ConvTranspose2d called once, read by no other traced module. Without,
    a BN is paired with the conv registered right before it when the channel counts match.
    The BN is replaced by `nn.Identity`; weights scale per output channel by `gamma/sqrt(var+eps)`.
    """
    convs = (nn.Conv2d, nn.ConvTranspose2d)
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    if example_inputs is not None:
        graph = trace_modules(model, example_inputs, lambda m: isinstance(m, (*convs, nn.BatchNorm2d)))
        producers = graph.producers()
        readers = graph.readers()
        for call in graph.calls:
            if not isinstance(modules[call.name], nn.BatchNorm2d) or call.inputs[0] is None:
                continue
            src = producers.get(call.inputs[0])
            if (
                src is not None
                and isinstance(modules[src], convs)
                and graph.count(src) == 1
                and graph.count(call.name) == 1
                and len(readers[call.inputs[0]]) == 1
            ):
                pairs.append((src, call.name))
    else:
        leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
        for (cname, conv), (bname, bn) in itertools.pairwise(leaves):
            if isinstance(conv, convs) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features:
                pairs.append((cname, bname))
    for cname, bname in pairs:
        conv = modules[cname]
        bn = modules[bname]
        assert isinstance(conv, nn.Conv2d | nn.ConvTranspose2d) and isinstance(bn, nn.BatchNorm2d)
        _fold(conv, bn, f"{cname} + {bname}")
        _set_submodule(model, bname, nn.Identity())
    return pairs


def _fold(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d, label: str) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise QuantError(f"cannot fold {label}: the BatchNorm has no running statistics")
    if conv.out_channels != bn.num_features:
        raise QuantError(f"cannot fold {label}: {conv.out_channels} conv channels vs {bn.num_features} BN features")
    with torch.no_grad():
        mean, var = bn.running_mean, bn.running_var
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        w = conv.weight
        if isinstance(conv, nn.ConvTranspose2d):
            g = conv.groups
            shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            new_w = (shaped * factor.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))).reshape(w.shape)
        else:
            new_w = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
        conv.weight = nn.Parameter(new_w.detach().clone(), requires_grad=w.requires_grad)
        conv.bias = nn.Parameter(((bias - mean) * factor + beta).detach().clone())
