"""Tests for harness/export/onnx.py: float export of a stage and the sanity checks on its graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from harness.errors import ExportError
from harness.export.onnx import check_reads_inputs, export_stage
from harness.program import Stage


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class Untraceable(nn.Module):
    """Leaves the traced world: the result is a Python float turned back into a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(x.sum()))


class IgnoresSecond(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_export_runs_in_onnxruntime(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    path = export_stage(Stage("s", Scale(), ("x",), ("y",)), {"x": x}, tmp_path / "s.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], (x * 2 + 1).numpy(), rtol=1e-6)


def test_a_graph_computed_from_constants_fails_with_the_tracer_warning(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"stage 's': the tracer warned .*TracerWarning.*\n.*Converting a tensor"):
        export_stage(Stage("s", Untraceable(), ("x",), ("y",), dynamic_batch=False), {"x": torch.randn(4)},
                     tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_a_dropped_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"stage 's': the exported graph has no input\(s\) \['y'\]"):
        export_stage(Stage("s", IgnoresSecond(), ("x", "y"), ("z",)), {"x": torch.randn(1, 2), "y": torch.randn(1, 2)},
                     tmp_path / "s.onnx")


def test_an_output_of_constants_only_is_named() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    z = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1])
    const = onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
    graph = onnx.helper.make_graph([const, onnx.helper.make_node("Identity", ["c"], ["y"]),
                                    onnx.helper.make_node("Neg", ["x"], ["z"])], "g", [x], [y, z])
    with pytest.raises(ExportError, match="output 'y' of the exported graph does not depend on any input"):
        check_reads_inputs(onnx.helper.make_model(graph), ["x"], "stage 's'")
    good = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["x"], ["z"])], "g", [x], [z])
    check_reads_inputs(onnx.helper.make_model(good), ["x"], "stage 's'")
