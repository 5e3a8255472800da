"""A model as a program of exportable stages plus the PyTorch glue between them.

A single-stage program is the whole model. A multi-stage program (CUDA-FastBEV's pre / post
around the view transform, CUDA-BEVFusion's camera backbone / vtransform / decoder) names
submodules of the model as stages; each stage is exported and run on the backend, and the model's
`run_stages(inputs, call)` method runs the glue between them in PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from harness.errors import HarnessError

StageCall = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
SINGLE_STAGE = "model"


@dataclass(frozen=True)
class Stage:
    """One exportable part: a module taking `inputs` positionally and returning `outputs`."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_batch: bool = True

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the module eagerly on named inputs and return named outputs."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise HarnessError(f"stage '{self.name}': missing inputs {missing}; got {sorted(feeds)}")
        result = self.module(*[feeds[n] for n in self.inputs])
        return name_outputs(self.name, self.outputs, result)


def name_outputs(stage: str, names: tuple[str, ...], result: object) -> dict[str, torch.Tensor]:
    """Pair a module's tensor / tuple / list / dict result with the declared output names."""
    if isinstance(result, torch.Tensor):
        values: list[object] = [result]
    elif isinstance(result, dict):
        values = [result[n] for n in names] if all(n in result for n in names) else list(result.values())
    elif isinstance(result, (tuple, list)):
        values = list(result)
    else:
        raise HarnessError(f"stage '{stage}': module returned {type(result).__name__}, expected tensor(s)")
    if len(values) != len(names):
        raise HarnessError(f"stage '{stage}': module returned {len(values)} outputs, the case names {len(names)}: {list(names)}")
    out = {}
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, torch.Tensor):
            raise HarnessError(f"stage '{stage}': output '{name}' is a {type(value).__name__}, not a tensor")
        out[name] = value
    return out


@runtime_checkable
class StagedModel(Protocol):
    """A model that runs its own stages through `call` and does the glue in between."""

    def run_stages(self, inputs: Mapping[str, torch.Tensor], call: StageCall) -> dict[str, torch.Tensor]: ...


class Program:
    """Stages of one model and the way to run them end to end."""

    def __init__(self, model: nn.Module, stages: Mapping[str, Stage]):
        self.model = model
        self.stages = dict(stages)

    @classmethod
    def single(cls, model: nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...],
               dynamic_batch: bool = True) -> Program:
        """The whole model as one stage named "model" (dim 0 a batch dimension if `dynamic_batch`)."""
        return cls(model, {SINGLE_STAGE: Stage(SINGLE_STAGE, model, inputs, outputs, dynamic_batch)})

    @classmethod
    def staged(cls, model: nn.Module, spec: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> Program:
        """Stages are submodules of `model` named by (dotted) attribute path; `model` must
        implement `run_stages`. Raises HarnessError naming a stage the model lacks."""
        if not isinstance(model, StagedModel):
            raise HarnessError(f"{type(model).__name__} declares stages but has no run_stages(inputs, call) method")
        stages = {}
        for name, (inputs, outputs) in spec.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise HarnessError(f"stage '{name}': the model has no submodule '{name}'") from None
            stages[name] = Stage(name, module, inputs, outputs, dynamic_batch=False)
        return cls(model, stages)

    @property
    def is_single(self) -> bool:
        """True when the program is the whole model as one stage."""
        return list(self.stages) == [SINGLE_STAGE]

    def run(self, inputs: Mapping[str, torch.Tensor], call: StageCall) -> dict[str, torch.Tensor]:
        """Run end to end, executing each stage through `call(stage_name, feeds)`."""
        if self.is_single:
            return call(SINGLE_STAGE, dict(inputs))
        assert isinstance(self.model, StagedModel)
        return self.model.run_stages(inputs, call)

    def run_eager(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run end to end with every stage in eager PyTorch."""
        return self.run(inputs, lambda name, feeds: self.stages[name](feeds))
