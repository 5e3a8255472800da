"""Graph checks of an exported Q/DQ ONNX (TensorRT layout) and the quantization rule report.

TensorRT's explicit quantization runs a layer in int8 where the graph says so with
`QuantizeLinear -> DequantizeLinear` pairs, and fuses what it can around them. What the
deployment guides' rules are for, checked here on the graph itself (`inspect_qdq`):

* residual Add: one input comes straight from a Conv whose output nothing else reads and stays
  unquantized (TensorRT fuses the add into that conv), the other input, the identity, arrives
  through an activation Q/DQ (so the fused conv reads it as int8 without a reformat);
* shared Add (both inputs through Q/DQ) and Concat: every input arrives through a
  DequantizeLinear, all with the same scale and zero point (one int8 tensor, no requantization);
* Conv / ConvTranspose: listed with whether their input and weight are quantized.

Each Add and Concat gets a kind (`residual_add`, `shared_add`, `mixed_add`, `float_add`,
`concat`) and the list of rule problems it has; Q/DQ pairs, weight dequantizers and convs are
counted. Whether a problem is a violation depends on the layer's intent: `rule_report` maps
each node to its PyTorch module through the node's scope name (`node_modules`) and treats
joins and convs in float modules (kept float or excluded) as intended, anything else as a
violation. The report (`RuleReport`) also carries what `harness.quant.transform.summarize` says
was quantized, shared and kept float; it round-trips through plain dicts (records, report.json)
and renders as markdown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from harness.quant.modules import QuantModule
from harness.quant.tensor_quantizer import TensorQuantizer
from harness.quant.transform import QuantSummary

_CONVS = ("Conv", "ConvTranspose")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_LISTED = 40


@dataclass(frozen=True)
class JoinInput:
    """One input of an Add / Concat: its tensor, where it comes from, and its Q/DQ parameters."""

    tensor: str
    source: str
    node: str
    quantized: bool
    scale: tuple[float, ...] | None = None
    zero_point: tuple[int, ...] | None = None


@dataclass(frozen=True)
class JoinCheck:
    """An Add or Concat with its kind and the rule problems found (empty: fine)."""

    node: str
    op_type: str
    kind: str
    inputs: tuple[JoinInput, ...]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConvCheck:
    """A Conv / ConvTranspose: are its input and weight quantized?"""

    node: str
    op_type: str
    input_quantized: bool
    weight_quantized: bool


@dataclass(frozen=True)
class GraphInspection:
    """What `inspect_qdq` found in one graph."""

    qdq_pairs: int
    weight_dequantizers: int
    convs: tuple[ConvCheck, ...]
    joins: tuple[JoinCheck, ...]

    def of_kind(self, *kinds: str) -> list[JoinCheck]:
        """Joins of the given kinds, in graph order."""
        return [j for j in self.joins if j.kind in kinds]


class _Index:
    """Producers, consumers, constants and element types of one graph."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.constants: dict[str, np.ndarray] = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
        self.outputs = {o.name for o in graph.output}
        inferred = onnx.shape_inference.infer_shapes(proto).graph
        self.elem_type = {
            v.name: v.type.tensor_type.elem_type
            for v in (*inferred.value_info, *inferred.input, *inferred.output)
            if v.type.HasField("tensor_type")
        }

    def is_float(self, tensor: str) -> bool:
        return self.elem_type.get(tensor, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    def activation_dq(self, tensor: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing `tensor` from an activation QuantizeLinear, if any."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in self.constants:
            return None
        q = self.producer.get(dq.input[0])
        return dq if q is not None and q.op_type == "QuantizeLinear" else None

    def weight_dq(self, tensor: str) -> bool:
        dq = self.producer.get(tensor)
        return dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self.constants

    def qparams(self, dq: onnx.NodeProto) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
        scale = self.constants.get(dq.input[1])
        zero = self.constants.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, np.int8)
        return (
            None if scale is None else tuple(float(v) for v in scale.reshape(-1)),
            None if zero is None else tuple(int(v) for v in zero.reshape(-1)),
        )

    def join_input(self, tensor: str) -> JoinInput:
        dq = self.activation_dq(tensor)
        if dq is not None:
            scale, zero = self.qparams(dq)
            return JoinInput(tensor, "DequantizeLinear", dq.name, True, scale, zero)
        producer = self.producer.get(tensor)
        if producer is None:
            return JoinInput(tensor, "graph input", "", False)
        return JoinInput(tensor, producer.op_type, producer.name, False)


def inspect_qdq(model: onnx.ModelProto | str | Path) -> GraphInspection:
    """Check every Add, Concat and Conv of a TensorRT-layout Q/DQ graph (see the module docstring)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    g = _Index(proto)
    pairs = sum(1 for n in g.nodes if n.op_type == "DequantizeLinear" and g.activation_dq(n.output[0]) is not None)
    weights = sum(1 for n in g.nodes if n.op_type == "DequantizeLinear" and n.input[0] in g.constants)
    convs = tuple(
        ConvCheck(n.name, n.op_type, g.activation_dq(n.input[0]) is not None, len(n.input) > 1 and g.weight_dq(n.input[1]))
        for n in g.nodes if n.op_type in _CONVS
    )
    joins = []
    for node in g.nodes:
        if node.op_type not in ("Add", "Concat") or not g.is_float(node.output[0]):
            continue
        data = [i for i in node.input if i and i not in g.constants]
        if node.op_type == "Add" and len(data) != 2:
            continue
        inputs = tuple(g.join_input(t) for t in data)
        joins.append(_check_add(g, node, inputs) if node.op_type == "Add" else _check_concat(node, inputs))
    return GraphInspection(pairs, weights, convs, tuple(joins))


def _same_qparams(inputs: Sequence[JoinInput]) -> list[str]:
    first = inputs[0]
    return [
        f"input {k} ('{i.tensor}') has scale {_short(i.scale)} / zero point {_short(i.zero_point)}, input 0 has "
        f"{_short(first.scale)} / {_short(first.zero_point)}"
        for k, i in enumerate(inputs)
        if k and (i.scale != first.scale or i.zero_point != first.zero_point)
    ]


def _short(values: tuple[float, ...] | tuple[int, ...] | None) -> str:
    if values is None:
        return "?"
    shown = ", ".join(f"{v:.6g}" for v in values[:4])
    return shown if len(values) == 1 else f"[{shown}{', ...' if len(values) > 4 else ''}]"


def _check_concat(node: onnx.NodeProto, inputs: tuple[JoinInput, ...]) -> JoinCheck:
    problems = [f"input {k} ('{i.tensor}', from {i.source}) is not quantized" for k, i in enumerate(inputs) if not i.quantized]
    if not problems:
        problems = _same_qparams(inputs)
    return JoinCheck(node.name, node.op_type, "concat", inputs, tuple(problems))


def _check_add(g: _Index, node: onnx.NodeProto, inputs: tuple[JoinInput, ...]) -> JoinCheck:
    if all(i.quantized for i in inputs):
        return JoinCheck(node.name, node.op_type, "shared_add", inputs, tuple(_same_qparams(inputs)))
    convs = [k for k, i in enumerate(inputs) if i.source == "Conv"]
    if convs:
        branch = convs[0]
        identity = 1 - branch
        conv = g.producer[inputs[branch].tensor]
        problems = []
        if not inputs[identity].quantized:
            problems.append(f"identity (input {identity}, '{inputs[identity].tensor}' from {inputs[identity].source}) "
                            "does not arrive through Q/DQ")
        readers = [c.name for c in g.consumers.get(inputs[branch].tensor, []) if c is not node]
        if readers or inputs[branch].tensor in g.outputs:
            problems.append(f"the output of branch conv '{conv.name}' is also read by {readers or ['the graph output']}, "
                            "so TensorRT cannot fuse the add into it")
        if g.activation_dq(conv.input[0]) is None:
            problems.append(f"branch conv '{conv.name}' has a float input, so the fused conv + add cannot run in int8")
        return JoinCheck(node.name, node.op_type, "residual_add", inputs, tuple(problems))
    if any(i.quantized for i in inputs):
        raw = next(k for k, i in enumerate(inputs) if not i.quantized)
        return JoinCheck(node.name, node.op_type, "mixed_add", inputs, (
            f"input {raw} ('{inputs[raw].tensor}', from {inputs[raw].source}) is float and not a conv output: "
            "TensorRT can neither fuse the add into a conv nor run it in int8",
        ))
    return JoinCheck(node.name, node.op_type, "float_add", inputs, ("no input is quantized: the add runs in float",))


# --------------------------------------------------------------------------- nodes -> modules


def node_modules(root: nn.Module, node_names: Sequence[str]) -> dict[str, tuple[str, nn.Module]]:
    """(qualified name, module) of the module whose forward emitted each exported node, where found.

    The TorchScript exporter names nodes by the chain of module *calls* (`/backbone/layer1/
    layer1.0/conv1/Conv`): a component is a child's name, possibly prefixed by its parent's
    component (`layer1.0`, `deblocks.1.0` below `deblocks.1`) and suffixed `_k` for the k-th
    extra call, and the chain starts below the exported module when a method other than
    `forward` made the first calls. Nodes are therefore grouped by their first component and each
    group is resolved below the module of `root` (in module order) under which most of the
    group's nodes resolve completely (one graph calls one module by that name); a node that does
    not resolve there takes the first module below which it does. Nodes at the root scope map to
    `root`.
    """
    found: dict[str, tuple[str, nn.Module]] = {}
    groups: dict[str, list[tuple[str, list[str]]]] = {}
    for node in node_names:
        parts = node.strip("/").split("/")[:-1]
        if parts:
            groups.setdefault(parts[0], []).append((node, parts))
        else:
            found[node] = ("", root)
    for first, members in groups.items():
        heads = {first, re.sub(r"_\d+$", "", first)}
        candidates = []
        for prefix, sub in root.named_modules():
            if not any(name in heads for name, _ in sub.named_children()):
                continue
            hits = {}
            for node, parts in members:
                hit = _resolve_scope(sub, parts)
                if hit is not None:
                    hits[node] = (f"{prefix}.{hit[0]}" if prefix else hit[0], hit[1])
            candidates.append(hits)
        for hits in sorted(candidates, key=len, reverse=True):  # stable: module order among equals
            for node, hit in hits.items():
                found.setdefault(node, hit)
    return found


def _resolve_scope(root: nn.Module, parts: Sequence[str]) -> tuple[str, nn.Module] | None:
    path: list[str] = []
    module, previous = root, ""
    for part in parts:
        options = []
        for base in dict.fromkeys((part, re.sub(r"_\d+$", "", part))):
            last = path[-1].rpartition(".")[2] if path else ""
            options += [base[len(p) + 1 :] for p in (previous, last) if p and base.startswith(p + ".")]
            options.append(base)
        child = next(((o, c) for o in options if (c := _child(module, o)) is not None), None)
        if child is None:
            return None
        path.append(child[0])
        module, previous = child[1], part
    return ".".join(path), module


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _is_float_module(module: nn.Module) -> bool:
    """True for a layer left float on purpose: no quantized layer and no quantizer inside it."""
    return not any(isinstance(m, QuantModule | TensorQuantizer) for m in module.modules())


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Violation:
    """A rule broken in one stage's graph: the node, the module it comes from, what is wrong."""

    stage: str
    node: str
    module: str
    kind: str
    problem: str


@dataclass(frozen=True)
class StageSummary:
    """Counts of one stage's graph, its float convs and float joins (intended float), and every
    add / concat as (node, kind, verdict: "ok", "float" or "violation")."""

    stage: str
    qdq_pairs: int
    weight_dequantizers: int
    quantized_convs: int
    unquantized_convs: tuple[tuple[str, str], ...]
    residual_adds: int
    shared_adds: int
    concats: int
    float_joins: tuple[tuple[str, str], ...]
    joins: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class RuleReport:
    """Graph checks of every stage plus what quantization did; `violations` empty means all rules hold."""

    rules: tuple[str, ...]
    stages: tuple[StageSummary, ...]
    violations: tuple[Violation, ...]
    quantized: tuple[str, ...] = ()
    kept_float: tuple[str, ...] = ()
    shared: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no stage breaks a rule."""
        return not self.violations

    def totals(self) -> dict[str, int]:
        """Sums over stages: Q/DQ pairs, weight dequantizers, convs, joins, violations."""
        return {
            "qdq_pairs": sum(s.qdq_pairs for s in self.stages),
            "weight_dequantizers": sum(s.weight_dequantizers for s in self.stages),
            "quantized_convs": sum(s.quantized_convs for s in self.stages),
            "unquantized_convs": sum(len(s.unquantized_convs) for s in self.stages),
            "residual_adds": sum(s.residual_adds for s in self.stages),
            "shared_adds": sum(s.shared_adds for s in self.stages),
            "concats": sum(s.concats for s in self.stages),
            "violations": len(self.violations),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of lists, dicts, strings and numbers (`from_dict` reads it back)."""
        data = _plain(asdict(self))
        assert isinstance(data, dict)
        data["totals"] = self.totals()
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> RuleReport:
        """Inverse of `to_dict` (extra keys are ignored)."""
        stages = tuple(
            StageSummary(
                s["stage"], s["qdq_pairs"], s["weight_dequantizers"], s["quantized_convs"],
                tuple((a, b) for a, b in s["unquantized_convs"]), s["residual_adds"], s["shared_adds"], s["concats"],
                tuple((a, b) for a, b in s["float_joins"]), tuple((a, b, c) for a, b, c in s.get("joins", ())),
            )
            for s in data["stages"]
        )
        return RuleReport(
            rules=tuple(data["rules"]), stages=stages,
            violations=tuple(Violation(**v) for v in data["violations"]),
            quantized=tuple(data.get("quantized", ())), kept_float=tuple(data.get("kept_float", ())),
            shared={k: tuple(v) for k, v in data.get("shared", {}).items()},
        )

    def failure_text(self) -> str:
        """The violations as lines: stage, node (module), problem."""
        lines = [f"{len(self.violations)} quantization rule violation(s) in the exported Q/DQ graph (TensorRT layout):"]
        lines += [f"  [{v.stage}] {v.kind} '{v.node}' ({v.module or 'no module'}): {v.problem}" for v in self.violations]
        return "\n".join(lines)

    def markdown(self) -> list[str]:
        """Markdown lines: rules, per-stage counts, violations, float layers, shared quantizers."""
        totals = self.totals()
        out = [
            f"Rules: {', '.join(self.rules) or '-'}; exported Q/DQ graphs (TensorRT layout): "
            f"**{totals['violations']} violation(s)**, {totals['qdq_pairs']} activation Q/DQ pairs, "
            f"{totals['quantized_convs']} quantized / {totals['unquantized_convs']} unquantized convs.",
            "",
            "| stage | Q/DQ pairs | weight DQ | convs int8 | convs float | residual adds | shared adds | concats | violations |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            bad = sum(1 for v in self.violations if v.stage == s.stage)
            out.append(f"| {s.stage} | {s.qdq_pairs} | {s.weight_dequantizers} | {s.quantized_convs} | "
                       f"{len(s.unquantized_convs)} | {s.residual_adds} | {s.shared_adds} | {s.concats} | {bad} |")
        if self.violations:
            out += ["", "Violations:", ""]
            out += [f"- `[{v.stage}] {v.node}` ({v.module or 'no module'}, {v.kind}): {v.problem}"
                    for v in self.violations[:_LISTED]]
            if len(self.violations) > _LISTED:
                out.append(f"- ... and {len(self.violations) - _LISTED} more (report.json has all)")
        floats = [(s.stage, node, module) for s in self.stages for node, module in s.unquantized_convs]
        floats += [(s.stage, node, module) for s in self.stages for node, module in s.float_joins]
        if floats:
            out += ["", "Float by intent (kept float or excluded): " + ", ".join(
                f"`{module or node}` ({stage})" for stage, node, module in floats[:_LISTED])]
        listed = [f"- `[{s.stage}] {node}`: {kind}, {verdict}" for s in self.stages for node, kind, verdict in s.joins]
        if listed:
            out += ["", "<details><summary>adds and concats</summary>", "", *listed, "", "</details>"]
        users = sum(len(u) for u in self.shared.values())
        out += ["", f"Quantized layers: {len(self.quantized)}; layers of quantizable type left float: "
                f"{', '.join(f'`{n}`' for n in self.kept_float[:_LISTED]) or 'none'}; "
                f"{len(self.shared)} quantizers shared by {users} inputs."]
        if self.shared:
            out += ["", "<details><summary>shared quantizers</summary>", ""]
            out += [f"- `{q}`: {', '.join(u)}" for q, u in self.shared.items()]
            out += ["", "</details>"]
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def rule_report(
    stages: Mapping[str, tuple[onnx.ModelProto | str | Path, nn.Module]],
    rules: Sequence[str] = (),
    summary: QuantSummary | None = None,
) -> RuleReport:
    """Inspect each stage's TensorRT-layout graph (with the quantized module it was exported from)
    and decide which problems are violations: joins and convs of float modules are intended."""
    summaries, violations = [], []
    for stage, (graph, module) in stages.items():
        found = inspect_qdq(graph)
        owners = node_modules(module, [c.node for c in found.convs] + [j.node for j in found.joins])

        def owner(node: str, owners: dict[str, tuple[str, nn.Module]] = owners) -> tuple[str, bool]:
            hit = owners.get(node)
            return ("", False) if hit is None else (hit[0], _is_float_module(hit[1]))

        float_convs, float_joins, joins = [], [], []
        for conv in found.convs:
            if conv.input_quantized:
                continue
            name, intended = owner(conv.node)
            if intended:
                float_convs.append((conv.node, name))
            else:
                violations.append(Violation(stage, conv.node, name, conv.op_type,
                                            "the layer is quantized in PyTorch but its input reaches the conv unquantized"))
        for join in found.joins:
            if not join.problems:
                joins.append((join.node, join.kind, "ok"))
                continue
            name, intended = owner(join.node)
            if intended:
                float_joins.append((join.node, name))
            else:
                violations += [Violation(stage, join.node, name, join.kind, p) for p in join.problems]
            joins.append((join.node, join.kind, "float" if intended else "violation"))
        summaries.append(StageSummary(
            stage, found.qdq_pairs, found.weight_dequantizers, sum(1 for c in found.convs if c.input_quantized),
            tuple(float_convs), len(found.of_kind("residual_add")), len(found.of_kind("shared_add")),
            len(found.of_kind("concat")), tuple(float_joins), tuple(joins),
        ))
    return RuleReport(
        rules=tuple(rules), stages=tuple(summaries), violations=tuple(violations),
        quantized=summary.quantized if summary else (), kept_float=summary.kept_float if summary else (),
        shared=dict(summary.shared) if summary else {},
    )
