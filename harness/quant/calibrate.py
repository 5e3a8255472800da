"""Calibration loop: feed batches through a quantizable model and set every quantizer's amax.

`calibrate(model, batches)` calibrates weight quantizers once from the weights, then runs the
batches (tuple / list / dict / tensor, see `call_model`) under `no_grad` in eval mode with
activation quantizers collecting and weights left float, computes each activation amax with its
quantizer's descriptor and switches every quantizer to `quantize`. Errors name the
quantizer(s): no batches, quantizers never reached, amax 0 / NaN / Inf.

The result is a plain `dict[name, tensor]` (`calibration_state`) that can be cached on disk and
loaded into a freshly quantized copy of the same model (`load_calibration_state`); the model's
`state_dict` carries the same amax buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]

from harness.errors import QuantError
from harness.quant.modules import weighted_modules
from harness.quant.rules import Batch, call_model
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer

_LISTED = 12


def quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """(name, quantizer) of every distinct quantizer, a shared one under its first name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def _names(qs: Iterable[TensorQuantizer]) -> str:
    labels = [q.label for q in qs]
    more = f" and {len(labels) - _LISTED} more" if len(labels) > _LISTED else ""
    return ", ".join(labels[:_LISTED]) + more


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    num_batches: int | None = None,
    progress: bool = True,
    desc: str = "calibrate",
) -> dict[str, torch.Tensor]:
    """Calibrate every enabled quantizer of `model` on `batches` (at most `num_batches`); returns the amax state.

    Disabled quantizers are left alone. The model's train/eval flag and, on error, the quantizer
    modes are restored.
    """
    named = quantizers(model)
    for name, q in named:
        q.name = q.name or name
    enabled = [q for _, q in named if q.mode is not QuantMode.DISABLED]
    if not enabled:
        raise QuantError("the model has no enabled quantizers to calibrate")
    weight_qs = [m.weight_quantizer for _, m in weighted_modules(model) if m.weight_quantizer.mode is not QuantMode.DISABLED]
    activation_qs = [q for q in enabled if all(q is not w for w in weight_qs)]
    for _, module in weighted_modules(model):
        module.calibrate_weight()

    previous = {id(q): q.mode for q in enabled}
    was_training = model.training
    seen = 0
    try:
        for q in weight_qs:
            q.set_mode(QuantMode.DISABLED)
        for q in activation_qs:
            q.reset_calibration()
            q.set_mode(QuantMode.CALIBRATE)
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, total=num_batches, desc=desc, disable=not progress, leave=False):
                call_model(model, batch)
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
    finally:
        model.train(was_training)
        for q in enabled:
            q.set_mode(previous[id(q)])

    if activation_qs and seen == 0:
        raise QuantError(f"no calibration batches: quantizers left uncalibrated: {_names(activation_qs)}")
    unreached = [q for q in activation_qs if q.collected == 0]
    if unreached:
        raise QuantError(f"quantizers never reached during calibration ({len(unreached)}): {_names(unreached)}")
    bad: list[str] = []
    for q in activation_qs:
        amax = q.compute_amax()
        if amax is None:
            bad.append(f"{q.label}: no statistics")
            continue
        q.load_amax(amax)
        try:
            q.check_amax()
        except QuantError as err:
            bad.append(str(err))
    if bad:
        raise QuantError("invalid amax after calibration:\n  " + "\n  ".join(bad))
    for q in enabled:
        q.reset_calibration()
        q.set_mode(QuantMode.QUANTIZE)
    return calibration_state(model)


def calibration_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{quantizer name: amax (CPU copy)} of every calibrated quantizer."""
    return {name: q.amax.detach().cpu().clone() for name, q in quantizers(model) if q.is_calibrated}


def load_calibration_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load amax values into the enabled quantizers and switch them to `quantize`.

    Every enabled quantizer must have an entry and every entry a quantizer (`QuantError` names
    the missing and unexpected ones); values are checked like fresh calibration results.
    """
    named = dict(quantizers(model))
    enabled = {n: q for n, q in named.items() if q.mode is not QuantMode.DISABLED}
    missing = sorted(set(enabled) - set(state))
    unexpected = sorted(set(state) - set(named))
    if missing or unexpected:
        raise QuantError(
            f"calibration state does not fit the model: missing {missing[:_LISTED]}, unexpected {unexpected[:_LISTED]}"
        )
    for name, q in enabled.items():
        q.name = q.name or name
        q.load_amax(state[name])
        q.check_amax()
        q.set_mode(QuantMode.QUANTIZE)


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as float inside the block (every quantizer disabled), restoring the modes after."""
    qs = [q for _, q in quantizers(model)]
    modes = [q.mode for q in qs]
    try:
        for q in qs:
            q.set_mode(QuantMode.DISABLED)
        yield model
    finally:
        for q, mode in zip(qs, modes, strict=True):
            q.set_mode(mode)
