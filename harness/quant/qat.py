"""Quantization-aware training (QAT) of a calibrated fake-quant model, and its checkpoint file.

QAT fine-tunes the model that post-training quantization made (BN folded, layers swapped,
rules applied, amax calibrated: `harness.quant.transform` + `harness.quant.calibrate`) with the
quantizers in the forward pass and straight-through gradients through them
(`harness.quant.tensor_quantizer`). Nothing about the model's structure changes, so the shared
quantizers of the rules stay shared and the trained model exports to both Q/DQ layouts exactly
like a PTQ model.

By default every amax stays as calibrated (pytorch-quantization's advice: do not change the
quantization scale during training); `learn_amax=True` makes them parameters trained with the
LSQ gradient. `finish_qat` turns them back into buffers before evaluation or export.

    model = quantize_model(float_model, config, example_inputs=calls[0])
    calibrate(model, calls)
    prepare_qat(model)                        # weights trainable, quantizers in quantize mode
    ... train with the task's loss ...
    finish_qat(model)
    save_qat_checkpoint(path, model, origin)  # fp16 weights, fp32 amax, where it came from
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.atomic import write_bytes_atomic
from harness.errors import QuantError
from harness.quant.calibrate import quantizers
from harness.quant.tensor_quantizer import QuantMode

QAT_FORMAT = "qharness-qat/1"
"""`format` entry of QAT checkpoint files written by `save_qat_checkpoint`."""
_LISTED = 8


def prepare_qat(model: nn.Module, learn_amax: bool = False) -> nn.Module:
    """Make a calibrated fake-quant `model` trainable in place and return it: every parameter
    requires grad, every enabled quantizer fake-quantizes (mode `quantize`) with the straight-through
    estimator, and with `learn_amax` its amax becomes a parameter. QuantError naming the quantizers
    when some enabled quantizer has no amax, and when the model has no enabled quantizer at all."""
    enabled = [(n, q) for n, q in quantizers(model) if q.mode is not QuantMode.DISABLED]
    if not enabled:
        raise QuantError("prepare_qat: the model has no enabled quantizer (quantize and calibrate it first)")
    uncalibrated = [q.name or n for n, q in enabled if not q.is_calibrated]
    if uncalibrated:
        raise QuantError(f"prepare_qat: quantizers without amax (calibrate first): {uncalibrated[:_LISTED]}")
    for name, q in enabled:
        q.name = q.name or name
        q.check_amax()
        q.set_mode(QuantMode.QUANTIZE)
        if learn_amax:
            q.make_amax_learnable()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def finish_qat(model: nn.Module) -> nn.Module:
    """End training in place: learnable amax values become buffers again (QuantError naming any
    that training made invalid) and the model goes to eval mode. Returns `model`."""
    for _, q in quantizers(model):
        q.freeze_amax()
    return model.eval()


def learnable_amax(model: nn.Module) -> list[nn.Parameter]:
    """The amax parameters of `model` (empty unless `prepare_qat(..., learn_amax=True)`)."""
    return [q.amax for _, q in quantizers(model) if isinstance(q.amax, nn.Parameter)]


def qat_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state to store for a trained QAT model: parameters in fp16 (weights and biases, as the
    float checkpoints), buffers (amax included) in their own dtype, all on the CPU."""
    names = {name for name, _ in model.named_parameters()}
    out = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu()
        if key in names and tensor.is_floating_point() and not key.endswith(".amax"):
            tensor = tensor.to(torch.float16)
        out[key] = tensor.clone()
    return out


def load_qat_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "QAT state") -> nn.Module:
    """Load a `qat_state_dict` into a quantized (uncalibrated or calibrated) copy of the same model
    with the same quantization settings, in place: strict keys (QuantError naming the missing and
    unexpected ones, and `source`), amax checked for every enabled quantizer, quantizers set to
    `quantize`, eval mode. Returns `model`."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise QuantError(f"{source} does not fit the quantized model: missing {missing[:_LISTED]}, "
                         f"unexpected {unexpected[:_LISTED]}")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(shapes[k])}" for k in sorted(state)
             if not k.endswith(".amax") and tuple(state[k].shape) != tuple(shapes[k])]
    if wrong:
        raise QuantError(f"{source} does not fit the quantized model: shapes differ: {wrong[:_LISTED]}")
    for name, q in quantizers(model):
        if q.mode is QuantMode.DISABLED:
            continue
        amax = state[f"{name}.amax"]
        per_channel = q.axis is not None
        if amax.numel() == 0 or (not per_channel and amax.numel() != 1):
            raise QuantError(f"{source}: quantizer '{name}' has amax of shape {tuple(amax.shape)}; the model "
                             f"quantizes it {'per channel' if per_channel else 'per tensor'} (were the "
                             "quantization settings changed after training?)")
    converted = {k: v.to(model.state_dict()[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(converted, strict=True)
    for name, q in quantizers(model):
        if q.mode is QuantMode.DISABLED:
            continue
        q.name = q.name or name
        q.check_amax()
        q.set_mode(QuantMode.QUANTIZE)
    return model.eval()


def save_qat_checkpoint(path: Path, model: nn.Module, origin: Mapping[str, Any]) -> None:
    """Write `{"format", "state_dict": qat_state_dict(model), "origin": origin}` to `path`
    atomically; `origin` says what the model was trained from (JSON-like values only)."""
    buffer = io.BytesIO()
    torch.save({"format": QAT_FORMAT, "state_dict": qat_state_dict(model), "origin": dict(origin)}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def read_qat_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and origin of a QAT checkpoint written by `save_qat_checkpoint`
    (`torch.load(weights_only=True)`); QuantError naming the file when it is unreadable or no
    QAT checkpoint."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise QuantError(f"cannot read QAT checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != QAT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise QuantError(f"{path} is not a QAT checkpoint (format {found!r}, expected {QAT_FORMAT!r}; "
                         "write one with `qharness train CASE --qat`)")
    state, origin = data.get("state_dict"), data.get("origin")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QuantError(f"{path}: 'state_dict' is not a mapping of tensors")
    if not isinstance(origin, dict):
        raise QuantError(f"{path}: 'origin' is not a mapping")
    return state, origin
