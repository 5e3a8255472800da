"""Float ONNX export of a stage: torch.onnx.export, onnxslim, the ONNX checker."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import onnx
import torch
from torch.jit._trace import TracerWarning

from harness.atomic import write_bytes_atomic
from harness.errors import ExportError
from harness.program import Stage

OPSET = 17


def export_stage(stage: Stage, feeds: Mapping[str, torch.Tensor], path: Path, *, opset: int = OPSET,
                 simplify: bool = True) -> Path:
    """Export `stage` traced on `feeds` to `path` (atomically), slimmed and checker-clean.

    The first dimension of every input and output is dynamic when `stage.dynamic_batch`.
    Raises ExportError naming the stage when tracing, slimming or checking fails, when the tracer
    warned that the trace may be wrong (`tracer_warnings`), and when the graph does not read every
    declared input or computes an output from constants alone (`check_reads_inputs`).
    """
    module = stage.module.eval()
    args = tuple(feeds[n].detach().cpu() for n in stage.inputs)
    dynamic_axes = None
    if stage.dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in (*stage.inputs, *stage.outputs)}
    what = f"stage '{stage.name}'"
    try:
        with tempfile.TemporaryDirectory() as tmp, tracer_warnings(what), torch.no_grad():
            traced = Path(tmp) / "traced.onnx"
            torch.onnx.export(
                module, args, traced, input_names=list(stage.inputs), output_names=list(stage.outputs),
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
            model = onnx.load(str(traced))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{what}: torch.onnx.export failed: {exc}") from exc
    check_reads_inputs(model, stage.inputs, what)
    if simplify:
        model = slim(model, stage.name)
    check(model, stage.name)
    write_bytes_atomic(path, model.SerializeToString())
    return path


def slim(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Simplify with onnxslim (constant folding, dead-node and identity removal)."""
    import onnxslim

    try:
        slimmed = onnxslim.slim(model)
    except Exception as exc:
        raise ExportError(f"{what}: onnxslim failed: {exc}") from exc
    if not isinstance(slimmed, onnx.ModelProto):
        raise ExportError(f"{what}: onnxslim returned {type(slimmed).__name__}, not a model")
    return slimmed


def check(model: onnx.ModelProto, what: str) -> None:
    """Run the ONNX checker with shape inference; raise ExportError naming `what` on failure."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{what}: the exported ONNX is invalid: {exc}") from exc


@contextlib.contextmanager
def tracer_warnings(what: str) -> Iterator[None]:
    """Run a torch.onnx export, hiding its deprecation chatter but failing with ExportError (naming
    `what` and quoting them) when the tracer warned that the trace may not generalise: a tensor
    turned into a Python value or a constant, so the graph would replay the example input."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    tracer = [w for w in caught if issubclass(w.category, TracerWarning)]
    if tracer:
        shown = "\n".join(f"  {w.filename}:{w.lineno}: {str(w.message).strip()}" for w in tracer[:5])
        raise ExportError(f"{what}: the tracer warned that the exported graph may not follow its inputs "
                          f"({len(tracer)} TracerWarning(s)):\n{shown}")


def check_reads_inputs(model: onnx.ModelProto, declared: Sequence[str], what: str) -> None:
    """ExportError naming `what` when the graph lacks a declared input (the trace dropped it) or
    computes an output from constants alone (a graph that answers the same whatever it is fed)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise ExportError(f"{what}: the exported graph has no input(s) {missing} (it has {inputs}): "
                          "the traced code does not use them")
    producer = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        seen: set[str] = set()
        stack = [output.name]
        reads = False
        while stack and not reads:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in inputs:
                reads = True
            elif name in producer:
                node = producer[name]
                stack += [i for i in node.input if i]
                for attr in node.attribute:  # subgraphs (If / Loop) read outer names
                    for sub in [attr.g, *attr.graphs]:
                        stack += [i for n in sub.node for i in n.input if i]
        if not reads:
            raise ExportError(f"{what}: output '{output.name}' of the exported graph does not depend on any "
                              f"input (it is computed from constants: the model's forward was not traced "
                              "through, e.g. it converted tensors to Python values)")
