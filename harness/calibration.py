"""From a case's `quant:` section to the calibrated fake-quant model the int8 backends share.

This step sits beside the case context (it reads the case and its data); the quantization library
under it (`harness.quant`) knows nothing about cases.

The float model is copied, BN is folded, layers are swapped for quantized ones and rules make
quantizers shared (`harness.quant.transform`); activations are calibrated on the case's
calibration split through the whole program (multi-stage glue included), and the resulting amax
values are cached on disk keyed by model, quant settings and calibration data.

Models whose layers the dense quantizer does not know name their own in `quant.quantizer`
("module:callable" with `quantize_model`'s signature, e.g. `harness.quant.sparse:quantize_scn_model`
for spconv models); calibration, the amax cache and every int8 backend stay the same.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from harness.cases import DEFAULT_PROFILE, QuantSpec
from harness.errors import QuantError
from harness.factory import resolve
from harness.quant.calibrate import calibrate, load_calibration_state
from harness.quant.qat import load_qat_state, read_qat_checkpoint
from harness.quant.rules import Batch, ModelCall, QuantConfigError, get_rule
from harness.quant.tensor_quantizer import QuantDescriptor
from harness.quant.transform import QuantConfig, quantize_model

if TYPE_CHECKING:
    from harness.context import CaseContext

AMAX_FILE = "amax.pt"


class Quantizer(Protocol):
    """Makes the quantizable (uncalibrated) copy of a float model, as `quantize_model` does."""

    def __call__(self, model: nn.Module, config: QuantConfig, example_inputs: Batch | None = None) -> nn.Module: ...


def quantizer(spec: QuantSpec) -> Quantizer:
    """The case's `quant.quantizer` callable, or the dense `quantize_model` when none is named."""
    if spec.quantizer is None:
        return quantize_model
    chosen: Quantizer = resolve(spec.quantizer)
    return chosen


def quant_config(spec: QuantSpec) -> QuantConfig:
    """The library's QuantConfig for a case's quant section (QuantConfigError with the index of
    an unknown rule)."""
    act = spec.activations
    activations = QuantDescriptor(
        calibrator=act.calibrator, method=act.method if act.calibrator == "histogram" else None,
        percentile=act.percentile, num_bins=act.num_bins, start_bin=act.start_bin, stride=act.stride,
    )
    weights = QuantDescriptor(axis=0 if spec.weights.per_channel else None)
    rules = []
    for index, name in enumerate(spec.rules):
        try:
            rules.append(get_rule(name))
        except QuantConfigError as exc:
            raise QuantConfigError(str(exc), "rules", index) from exc
    return QuantConfig(
        activations=activations, weights=weights, include=tuple(spec.include), exclude=tuple(spec.exclude),
        keep_float=tuple(spec.keep_float), rules=tuple(rules), fold_bn=spec.fold_bn,
        functional_joins=spec.functional_joins,
    )


def program_call(run: CaseContext, inputs: Mapping[str, torch.Tensor]) -> ModelCall:
    """A batch for the quantization library that runs a model copy through the case's program."""
    def call(model: nn.Module) -> Any:
        return run.program(model).run_eager(inputs)
    return call


def calibration_calls(run: CaseContext) -> list[ModelCall]:
    """One program call per calibration batch (the case's calibration split)."""
    spec = run.case.spec.quant
    inputs = run.adapter.calibration_inputs(run.dataset("calibration"), spec.calibration_batch_size,
                                            spec.calibration_batches)
    return [program_call(run, batch) for batch in itertools.islice(inputs, spec.calibration_batches)]


def quantizable_model(run: CaseContext, calls: list[ModelCall]) -> nn.Module:
    """A fresh uncalibrated quantized copy of the case's float model, made by the case's
    quantizer with its quant settings (`calls[0]` as example inputs). CaseError naming the quant
    key and entry for bad settings and an empty calibration split."""
    spec = run.case.spec.quant
    if not calls:
        raise run.case.error("the calibration split gives no batches", "data", "calibration")
    try:
        model = quantizer(spec)(run.float_model(), quant_config(spec), example_inputs=calls[0])
    except QuantConfigError as exc:
        entry = [] if exc.index is None else [str(exc.index)]
        raise run.case.error(str(exc), "quant", exc.key, *entry) from exc
    except QuantError as exc:
        raise run.case.error(str(exc), "quant") from exc
    if not isinstance(model, nn.Module):
        raise run.case.error(f"{spec.quantizer} returned {type(model).__name__}, not an nn.Module", "quant", "quantizer")
    return model


def trained_qat_model(run: CaseContext) -> nn.Module:
    """The case's quantized model with the weights and amax of its QAT checkpoint
    (`quant.qat.checkpoint`), in eval mode.

    The checkpoint must say it was trained from this case's float model, quantization settings,
    calibration data and QAT recipe (`CaseContext.qat_origin`); CaseError naming
    `quant.qat.checkpoint` and each differing part otherwise, and for a missing, unreadable or
    ill-fitting file, with the command that trains a new one.
    """
    path = run.case.qat_checkpoint
    key = ("quant", "qat", "checkpoint")
    retrain = f"train a new one with `qharness train {run.case.display_path} --qat{profile_flag(run)}`"
    if path is None:
        raise run.case.error(f"the case has no QAT checkpoint; {retrain}", *key)
    if not path.is_file():
        raise run.case.error(f"QAT checkpoint {path} does not exist; {retrain}", *key)
    try:
        state, origin = read_qat_checkpoint(path)
    except QuantError as exc:
        raise run.case.error(str(exc), *key) from exc
    expected = run.qat_origin
    changed = [part for part in expected if part != "case" and origin.get(part) != expected[part]]
    if changed:
        parts = " / ".join(p.replace("_", " ") for p in changed)
        raise run.case.error(f"QAT checkpoint {path} is stale: it was trained with a different {parts} than "
                             f"the case has now; {retrain}", *key)
    model = quantizable_model(run, calibration_calls(run)[:1])
    try:
        return load_qat_state(model, state, source=str(path))
    except QuantError as exc:
        raise run.case.error(str(exc), *key) from exc


NOT_RECIPE = ("num_workers", "time_limit_s", "checkpoint_every", "val_every", "log_every", "stop_after", "cache",
              "device_cache_gb", "progress_bar")
"""Trainer arguments that change how a run proceeds, not what it trains."""


def qat_recipe(run: CaseContext, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The QAT recipe that decides the trained weights: `training:` then `quant.qat.training`
    (then `overrides`), without the arguments in NOT_RECIPE, with `learn_amax`."""
    qat = run.case.spec.quant.qat
    assert qat is not None
    merged = {**run.case.spec.training, **qat.training, **(overrides or {})}
    return {**{k: v for k, v in merged.items() if k not in NOT_RECIPE}, "learn_amax": qat.learn_amax}


def profile_flag(run: CaseContext) -> str:
    """` --profile NAME` for a case loaded with a profile other than the default, else ``."""
    return "" if run.case.profile == DEFAULT_PROFILE else f" --profile {run.case.profile}"


def calibrated_model(run: CaseContext) -> nn.Module:
    """The case's model quantized per its quant section (by its `quantizer`) and calibrated
    (amax cached on disk).

    Raises CaseError naming the quant key and entry (`quant.keep_float.1`, `quant.rules.0`) for
    unknown rules, patterns or rules that match nothing and rules that conflict with keep_float
    (the library's QuantConfigError carries the setting and the list index), and the library's
    QuantError naming quantizers for calibration problems.
    """
    calls = calibration_calls(run)
    model = quantizable_model(run, calls)

    def build(folder: Path) -> None:
        state = calibrate(model, calls, num_batches=len(calls), desc=f"calibrate {run.case.name}")
        torch.save({k: v.cpu() for k, v in state.items()}, folder / AMAX_FILE)

    namespace = f"{run.case.name}/calibration"
    for attempt in range(2):
        folder = run.cache.entry(namespace, run.quant_key, build)
        try:
            state = torch.load(folder / AMAX_FILE, map_location="cpu", weights_only=True)
            load_calibration_state(model, state)
            return model.eval()
        except (OSError, RuntimeError, QuantError) as exc:
            if attempt:
                raise
            run.cache.invalidate(namespace, run.quant_key, str(exc))
    raise AssertionError("unreachable")
