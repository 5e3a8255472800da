"""`qharness train CASE --qat`: quantization-aware fine-tuning of a case's calibrated model.

Starts from the case's float checkpoint and its PTQ calibration (the same cached calibrated model
the int8 backends use), makes it trainable (`harness.quant.qat.prepare_qat`: straight-through
gradients, amax fixed unless `quant.qat.learn_amax`) and trains it with the task's own trainer
and loss. The recipe is the case's `training:` section overridden by `quant.qat.training`, then by
the command-line flags; mixed precision is off (the quantizers compute in float32). The run is
resumable like float training; at the end `OUT/model_fp16.pt` is the QAT checkpoint (fp16
weights, fp32 amax, and the `origin` that `quant.qat.checkpoint` is checked against) and
`OUT/summary.json` the training record (`qharness record-training CASE OUT/summary.json --qat`).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from torch import nn

from harness.cache import content_key
from harness.calibration import qat_recipe
from harness.context import CaseContext
from harness.quant.qat import finish_qat, prepare_qat, save_qat_checkpoint

RECIPE_OVERRIDES = ("steps", "batch_size", "lr")
"""Command-line flags that change the trained weights (they enter the checkpoint's origin)."""
def qat_trainer_kwargs(run: CaseContext, cli_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments for QAT: `training:`, `quant.qat.training`, the CLI's; amp off."""
    qat = run.case.spec.quant.qat
    assert qat is not None
    return {**run.case.spec.training, **qat.training, **cli_kwargs, "amp": False}


def start_model(run: CaseContext) -> nn.Module:
    """A trainable copy of the case's calibrated (PTQ) model."""
    qat = run.case.spec.quant.qat
    assert qat is not None
    return prepare_qat(copy.deepcopy(run.quantized_model()), learn_amax=qat.learn_amax)


def checkpoint_writer(run: CaseContext, cli_kwargs: dict[str, Any]) -> Any:
    """`save_weights` for the trainers: the finished model as a QAT checkpoint whose origin is this
    case's (`CaseContext.qat_origin`) with the recipe actually used."""
    overrides = {k: cli_kwargs[k] for k in RECIPE_OVERRIDES if k in cli_kwargs}
    origin = {**run.qat_origin, "qat_recipe": content_key(qat_recipe(run, overrides))}

    def save(model: nn.Module, path: Path) -> None:
        finished = finish_qat(copy.deepcopy(model).cpu())
        save_qat_checkpoint(path, finished, origin)

    return save


def require_qat_section(run: CaseContext, args: argparse.Namespace) -> None:
    """CaseError naming `quant.qat` when the case has no QAT section to train for."""
    if run.case.spec.quant.qat is None:
        raise run.case.error("`--qat` trains the model of the case's quant.qat section; add "
                             "`quant: {qat: {checkpoint: PATH}}` (PATH: where the trained checkpoint will live)",
                             "quant", "qat")
