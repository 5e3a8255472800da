"""`qharness train CASE`: train a case's zoo model on its dataset's train split.

The recipe comes from the case's `training:` section (keyword arguments of the task's trainer),
overridden by command-line flags; the trainer writes checkpoints (resumable), the final fp16
state dict and a JSON summary into `--out`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import shlex
import sys
from typing import Any

import torch

from harness.cases import load_case
from harness.context import CaseContext, RunOptions
from harness.errors import HarnessError
from harness.factory import resolve


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def recipe(case_training: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's keyword arguments: the case's `training:` section, then the CLI flags."""
    kwargs = dict(case_training)
    for flag in ("steps", "batch_size", "lr", "time_limit_s"):
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[flag] = value
    if getattr(args, "workers", None) is not None:
        kwargs["num_workers"] = args.workers
    return kwargs


def train_case(args: argparse.Namespace) -> int:
    """Train the model of `args.case`; returns the process exit status."""
    case = load_case(args.case, profile=args.profile)
    run = CaseContext(case, RunOptions.default(case.root))
    model_spec = case.spec.model
    if model_spec.factory is None:
        raise case.error("the case's model is an ONNX file; training needs a PyTorch model factory", "model", "onnx")
    factory = resolve(model_spec.factory)
    qat = bool(getattr(args, "qat", False))
    cli = recipe({}, args)
    if qat:
        from harness.training import qat as qat_training

        qat_training.require_qat_section(run, args)
        kwargs = qat_training.qat_trainer_kwargs(run, cli)
        kwargs["save_weights"] = qat_training.checkpoint_writer(run, cli)
    else:
        kwargs = {**case.spec.training, **cli}
    kwargs.update(device=_device(args.device), out_dir=args.out, progress_bar=not getattr(args, "no_progress", False),
                  command=" ".join(shlex.quote(a) for a in ["qharness", *sys.argv[1:]]))
    model_args = dict(model_spec.args)
    if case.spec.task == "segmentation":
        from harness.training.segmentation import train_segmentation

        if not qat and "augment" in inspect.signature(factory).parameters:
            model_args["augment"] = True
        kwargs.setdefault("crop", tuple(run.dataset("train")[0].image.shape[:2]))
        kwargs.setdefault("class_names", getattr(run.adapter, "class_names", None))
        trainer: Any = train_segmentation
    elif case.spec.task == "detection3d":
        from harness.training.detection3d import train_detection3d

        trainer = train_detection3d
    else:
        raise HarnessError(f"{case.path}: no trainer for task '{case.spec.task}'")
    model_factory = functools.partial(qat_training.start_model, run) if qat else functools.partial(factory, **model_args)
    result = trainer(model_factory, run.dataset("train"), val_dataset=run.dataset(), **kwargs)
    print(result)
    if qat and result.finished and case.qat_checkpoint is not None:
        print(f"QAT checkpoint: {result.weights}; the case reads {case.qat_checkpoint} "
              f"(copy it there, then `qharness record-training {case.display_path} {result.summary_path} --qat"
              f"{'' if case.profile == 'default' else ' --profile ' + case.profile}`)")
    return 0
