"""Per-layer quantization error: which layer loses how much, alone and accumulated.

`layer_errors(model, batches)` takes a calibrated fake-quant model and measures, for every
layer of a quantizable type (quantized or left float) and every other leaf layer with
parameters, the error of its output against the float output of the same layer on the same
batches:

* alone: only this layer's quantizers (its input quantizers and weight quantizer; a shared
  input quantizer is enabled wherever it is used) are enabled, every other quantizer disabled;
* accumulated: the quantizers of this layer and of every quantized layer called before it (in
  the execution order of the float pass) are enabled.

The float reference is the same model with every quantizer disabled (BN folding and every
other transformation are kept, so the reference differs from the original float model only by
float rounding). Error figures are the SNR in dB (`10 log10(sum ref^2 / sum (out - ref)^2)`,
inf when equal) and the cosine similarity, both over every element of every call on every
batch, accumulated in float64. Layer outputs are captured with forward hooks; each pass stops
(a `BaseException` raised from the hook, caught here) once the measured layer has produced its
last output, so a layer early in the network costs a fraction of a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from harness.errors import QuantError
from harness.quant.calibrate import quantizers
from harness.quant.modules import QuantModule
from harness.quant.registry import quantizable
from harness.quant.rules import Batch, call_model
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer


@dataclass(frozen=True)
class LayerError:
    """One layer's quantization settings and output error against float.

    `order` is the position of the layer's first call in the float pass (None: never called);
    `reason` says why a layer is float (None for quantized layers); amax figures are the largest
    value over channels (`weight_amax_min` the smallest, where per channel); error figures are
    None for float layers and layers never called.
    """

    name: str
    type: str
    order: int | None
    quantized: bool
    reason: str | None
    input_amax: float | None
    input_calibrator: str | None
    weight_amax: float | None
    weight_amax_min: float | None
    alone_snr_db: float | None
    alone_cosine: float | None
    accumulated_snr_db: float | None
    accumulated_cosine: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (inf SNR becomes the string "inf")."""
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> LayerError:
        """Inverse of `to_dict`."""
        fields: dict[str, Any] = {k: (math.inf if v == "inf" else v) for k, v in data.items()}
        return LayerError(**fields)


class _Stop(BaseException):
    """Raised from a hook to end a forward pass once the measured layer is done."""


@dataclass
class _Acc:
    """Running sums for SNR and cosine over many tensors."""

    dot: float = 0.0
    ref2: float = 0.0
    out2: float = 0.0
    err2: float = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        o, r = out.detach().double().flatten(), ref.detach().double().flatten()
        self.dot += float(o @ r)
        self.ref2 += float(r @ r)
        self.out2 += float(o @ o)
        self.err2 += float((o - r) @ (o - r))

    def snr_db(self) -> float:
        if self.err2 == 0.0:
            return math.inf
        if self.ref2 == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref2 / self.err2)

    def cosine(self) -> float:
        if self.ref2 == 0.0 or self.out2 == 0.0:
            return 1.0 if self.ref2 == self.out2 else 0.0
        return self.dot / math.sqrt(self.ref2 * self.out2)


def snr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """SNR in dB of `out` against `ref` (inf when equal), computed in float64."""
    acc = _Acc()
    acc.add(out, ref)
    return acc.snr_db()


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a layer's output; a sparse tensor (spconv's SparseConvTensor) counts by
    its `features`."""
    if isinstance(value, torch.Tensor):
        return value
    features = getattr(value, "features", None)
    if isinstance(features, torch.Tensor):
        return features
    if isinstance(value, list | tuple):
        return next((t for v in value if (t := _first_tensor(v)) is not None), None)
    if isinstance(value, dict):
        return next((t for v in value.values() if (t := _first_tensor(v)) is not None), None)
    return None


def layer_quantizers(module: nn.Module) -> list[TensorQuantizer]:
    """The quantizers a quantized layer applies (inputs, then weight); empty for float layers."""
    if not isinstance(module, QuantModule):
        return []
    found = list(module.input_quantizers())
    weight = getattr(module, "weight_quantizer", None)
    if isinstance(weight, TensorQuantizer):
        found.append(weight)
    return found


def analysed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantized layers, layers of a quantizable type left float, and other leaf layers with
    parameters (BatchNorm that was not folded, Conv1d, embeddings), in module order."""
    found = []
    for name, module in model.named_modules():
        if not name or isinstance(module, TensorQuantizer):
            continue
        if isinstance(module, QuantModule) or quantizable(module) is not None or (not list(module.children()) and any(True for _ in module.parameters(recurse=False))):
            found.append((name, module))
    return found


def _amax(q: TensorQuantizer | None) -> tuple[float | None, float | None]:
    if q is None or not q.is_calibrated:
        return None, None
    a = q.amax.detach().float()
    return float(a.max()), float(a.min())


def _calibrator(q: TensorQuantizer | None) -> str | None:
    if q is None:
        return None
    d = q.descriptor
    return d.calibrator if d.method is None else f"{d.calibrator}/{d.method}"


class _Capture:
    """Forward hooks that record layer outputs, optionally stopping after a layer's last call."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.first_call: dict[str, int] = {}
        self.record: set[str] = set()
        self.stop_after: tuple[str, int] | None = None

    def run(self, model: nn.Module, batch: Batch) -> None:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            with torch.no_grad():
                call_model(model, batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            del module, args
            self.first_call.setdefault(name, len(self.first_call))
            if name in self.record:
                t = _first_tensor(output)
                if t is not None:
                    self.outputs.setdefault(name, []).append(t.detach().clone())
            if self.stop_after is not None and self.stop_after[0] == name \
                    and len(self.outputs.get(name, ())) >= self.stop_after[1]:
                raise _Stop
        return hook


def layer_errors(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    float_reasons: Mapping[str, str] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> list[LayerError]:
    """Per-layer settings and output errors of calibrated `model` on `batches` (see the module
    docstring), in execution order (layers never called last).

    `float_reasons` maps names of float layers to why they are float (default: "kept float" for
    layers of a quantizable type, "not a quantizable type" otherwise). Quantizer modes are
    restored afterwards. Raises `QuantError` when the model has no calibrated quantizer or no
    batch is given.
    """
    if not batches:
        raise QuantError("layer_errors needs at least one batch")
    all_q = [q for _, q in quantizers(model)]
    if not any(q.is_calibrated for q in all_q):
        raise QuantError("layer_errors needs a calibrated model (no quantizer has an amax)")
    layers = analysed_layers(model)
    modules = dict(layers)
    modes = [q.mode for q in all_q]
    enabled_at_start = {id(q) for q, mode in zip(all_q, modes, strict=True) if mode is not QuantMode.DISABLED}

    def runs_int8(module: nn.Module) -> bool:
        """A quantized layer counts when one of its quantizers was enabled (the SCN quantizer
        keeps layers float by disabling their quantizers)."""
        return isinstance(module, QuantModule) and any(id(q) in enabled_at_start for q in layer_quantizers(module))

    reasons = dict(float_reasons or {})
    was_training = model.training
    model.eval()
    try:
        for q in all_q:
            q.set_mode(QuantMode.DISABLED)
        reference = _Capture(modules)
        reference.record = set(modules)
        refs: list[dict[str, list[torch.Tensor]]] = []
        for batch in batches:
            reference.outputs = {}
            reference.run(model, batch)
            refs.append(reference.outputs)
        order = reference.first_call
        quantized = [n for n, m in sorted(layers, key=lambda nm: order.get(nm[0], len(order)))
                     if runs_int8(m) and n in order]
        measured: dict[str, tuple[float, float, float, float]] = {}
        names: Iterable[str] = progress(quantized) if progress else quantized
        for index, name in enumerate(names):
            alone = _measure(model, batches, refs, modules, name, layer_quantizers(modules[name]))
            earlier = [q for n in quantized[: index + 1] for q in layer_quantizers(modules[n])]
            accumulated = _measure(model, batches, refs, modules, name, earlier)
            measured[name] = (alone.snr_db(), alone.cosine(), accumulated.snr_db(), accumulated.cosine())
    finally:
        model.train(was_training)
        for q, mode in zip(all_q, modes, strict=True):
            q.set_mode(mode)
    out = []
    for name, module in layers:
        is_q = runs_int8(module)
        qs = module.input_quantizers() if is_q and isinstance(module, QuantModule) else []
        found_wq = getattr(module, "weight_quantizer", None) if is_q else None
        wq = found_wq if isinstance(found_wq, TensorQuantizer) else None
        first = qs[0] if qs else None
        figures = measured.get(name)
        reason = None if is_q else reasons.get(
            name, "kept float" if quantizable(module) is not None else "not a quantizable type")
        out.append(LayerError(
            name=name, type=type(module).__name__, order=order.get(name), quantized=is_q, reason=reason,
            input_amax=_amax(first)[0], input_calibrator=_calibrator(first),
            weight_amax=_amax(wq)[0], weight_amax_min=_amax(wq)[1],
            alone_snr_db=figures[0] if figures else None, alone_cosine=figures[1] if figures else None,
            accumulated_snr_db=figures[2] if figures else None, accumulated_cosine=figures[3] if figures else None,
        ))
    return sorted(out, key=lambda e: (e.order is None, e.order if e.order is not None else 0))


def _measure(model: nn.Module, batches: Sequence[Batch], refs: Sequence[Mapping[str, list[torch.Tensor]]],
             modules: Mapping[str, nn.Module], name: str, enabled: Sequence[TensorQuantizer]) -> _Acc:
    """Error of layer `name`'s outputs with exactly the quantizers `enabled`, over all batches."""
    for q in enabled:
        q.set_mode(QuantMode.QUANTIZE)
    acc = _Acc()
    try:
        for batch, ref in zip(batches, refs, strict=True):
            capture = _Capture({name: modules[name]})
            capture.record = {name}
            capture.stop_after = (name, len(ref.get(name, [])))
            capture.run(model, batch)
            for out, r in zip(capture.outputs.get(name, []), ref.get(name, []), strict=False):
                acc.add(out, r)
    finally:
        for q in enabled:
            q.set_mode(QuantMode.DISABLED)
    return acc


def worst(errors: Sequence[LayerError], k: int | None = None) -> list[LayerError]:
    """Quantized layers sorted by alone SNR, worst (lowest) first; the first `k` when given."""
    ranked = sorted((e for e in errors if e.alone_snr_db is not None), key=lambda e: e.alone_snr_db or 0.0)
    return ranked if k is None else ranked[:k]
