"""Tests for harness/program.py: single and staged programs, stage calls and output naming."""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.program import SINGLE_STAGE, Program, Stage, StageCall, StagedModel, name_outputs


class Affine(nn.Module):
    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.scale + y, y - self.shift


class TwoStage(nn.Module):
    """pre -> glue (in PyTorch) -> post.head"""

    def __init__(self) -> None:
        super().__init__()
        self.pre = Affine(2.0, 1.0)
        self.post = nn.Module()
        self.post.head = nn.Identity()

    def run_stages(self, inputs: Mapping[str, torch.Tensor], call: StageCall) -> dict[str, torch.Tensor]:
        mid = call("pre", {"x": inputs["x"], "y": inputs["y"]})
        glued = mid["a"] + mid["b"]
        return call("post.head", {"z": glued})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.pre(x, y)
        return a + b


def feeds() -> dict[str, torch.Tensor]:
    return {"x": torch.arange(3.0), "y": torch.ones(3)}


def test_single_program_runs_the_whole_model() -> None:
    model = Affine(3.0, 0.5)
    program = Program.single(model, ("x", "y"), ("a", "b"))
    assert program.is_single and list(program.stages) == [SINGLE_STAGE]
    stage = program.stages[SINGLE_STAGE]
    assert stage.module is model and stage.dynamic_batch
    out = program.run_eager(feeds())
    assert list(out) == ["a", "b"]
    torch.testing.assert_close(out["a"], torch.tensor([1.0, 4.0, 7.0]))
    torch.testing.assert_close(out["b"], torch.full((3,), 0.5))


def test_run_goes_through_call() -> None:
    program = Program.single(Affine(1.0, 0.0), ("x", "y"), ("a", "b"))
    seen: list[tuple[str, list[str]]] = []

    def call(name: str, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append((name, sorted(f)))
        return {"a": f["x"], "b": f["y"]}

    out = program.run(feeds(), call)
    assert seen == [(SINGLE_STAGE, ["x", "y"])]
    torch.testing.assert_close(out["a"], feeds()["x"])


def test_staged_program() -> None:
    model = TwoStage()
    assert isinstance(model, StagedModel)
    program = Program.staged(model, {"pre": (("x", "y"), ("a", "b")), "post.head": (("z",), ("out",))})
    assert not program.is_single
    assert program.stages["post.head"].module is model.post.head
    assert not program.stages["pre"].dynamic_batch
    calls: list[str] = []

    def call(name: str, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls.append(name)
        return program.stages[name](f)

    out = program.run(feeds(), call)
    assert calls == ["pre", "post.head"]
    torch.testing.assert_close(out["out"], model(**feeds()))
    torch.testing.assert_close(program.run_eager(feeds())["out"], model(**feeds()))


def test_staged_needs_run_stages() -> None:
    with pytest.raises(HarnessError, match=r"Affine declares stages but has no run_stages\(inputs, call\) method"):
        Program.staged(Affine(1.0, 0.0), {"x": ((), ())})


def test_staged_names_missing_submodule() -> None:
    with pytest.raises(HarnessError, match=re.escape("stage 'post.neck': the model has no submodule 'post.neck'")):
        Program.staged(TwoStage(), {"pre": (("x", "y"), ("a", "b")), "post.neck": (("z",), ("out",))})


def test_stage_missing_inputs() -> None:
    stage = Stage("pre", Affine(1.0, 0.0), ("x", "y"), ("a", "b"))
    with pytest.raises(HarnessError, match=r"stage 'pre': missing inputs \['y'\]; got \['x'\]"):
        stage({"x": torch.zeros(1)})


def test_stage_passes_inputs_in_declared_order() -> None:
    stage = Stage("s", Affine(10.0, 0.0), ("y", "x"), ("a", "b"))
    out = stage({"x": torch.tensor([1.0]), "y": torch.tensor([2.0])})
    torch.testing.assert_close(out["a"], torch.tensor([21.0]))  # module's x is the feed 'y'


def test_name_outputs_accepts_tensor_tuple_list_dict() -> None:
    t1, t2 = torch.zeros(1), torch.ones(1)
    assert name_outputs("s", ("a",), t1)["a"] is t1
    assert list(name_outputs("s", ("a", "b"), (t1, t2)).values()) == [t1, t2]
    assert list(name_outputs("s", ("a", "b"), [t1, t2]).values()) == [t1, t2]
    by_name = name_outputs("s", ("a", "b"), {"b": t2, "a": t1})
    assert by_name["a"] is t1 and by_name["b"] is t2
    by_order = name_outputs("s", ("a", "b"), {"p": t1, "q": t2})  # other keys: dict order
    assert by_order["a"] is t1 and by_order["b"] is t2


def test_name_outputs_errors() -> None:
    t = torch.zeros(1)
    with pytest.raises(HarnessError, match=r"stage 's': module returned 2 outputs, the case names 1: \['a'\]"):
        name_outputs("s", ("a",), (t, t))
    with pytest.raises(HarnessError, match=re.escape("stage 's': module returned 1 outputs, the case names 2")):
        name_outputs("s", ("a", "b"), t)
    with pytest.raises(HarnessError, match=re.escape("stage 's': output 'b' is a int, not a tensor")):
        name_outputs("s", ("a", "b"), (t, 3))
    with pytest.raises(HarnessError, match=re.escape("stage 's': module returned NoneType, expected tensor")):
        name_outputs("s", ("a",), None)
    with pytest.raises(HarnessError, match=re.escape("module returned 1 outputs, the case names 2")):
        name_outputs("s", ("a", "b"), {"a": t})
