"""A user's ONNX file as a model: its graph's inputs and outputs, and an eager module that runs it.

Cases whose model is an ONNX file (`model: {onnx: path}`) have no PyTorch model; their program is
one stage "model" over `OnnxModule`, which runs the file with ONNX Runtime on the CPU, so the
reference run (golden outputs under `--update-golden`) and the glue of the harness work as for
a PyTorch model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.errors import HarnessError

_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class GraphIO:
    """Names of an ONNX graph's inputs (initialisers excluded) and outputs, whether dim 0 of
    every input is symbolic (a free batch dimension), and the names of its nodes."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_batch: bool
    nodes: frozenset[str] = frozenset()


def graph_io(path: Path) -> GraphIO:
    """The inputs and outputs of the ONNX file `path`; HarnessError naming the file when it is
    not a readable ONNX model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise HarnessError(f"{path} is not a readable ONNX model: {exc}") from exc
    initialisers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    if not inputs or not model.graph.output:
        raise HarnessError(f"{path}: the ONNX graph has no inputs or no outputs")

    def free_batch(value: Any) -> bool:
        dims = value.type.tensor_type.shape.dim
        return bool(dims) and not dims[0].HasField("dim_value")

    return GraphIO(tuple(i.name for i in inputs), tuple(o.name for o in model.graph.output),
                   all(free_batch(i) for i in inputs), frozenset(n.name for n in model.graph.node if n.name))


class OnnxModule(nn.Module):
    """Runs an ONNX file with ONNX Runtime (CPU provider) as if it were a PyTorch module: inputs
    positionally in the graph's order, outputs as a tuple in the graph's order (CPU tensors)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.io = graph_io(self.path)
        self._session: Any = None

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph on `inputs` (cast to the graph's input types)."""
        import onnxruntime as ort

        if self._session is None:
            self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        feeds: dict[str, np.ndarray] = {}
        for spec, value in zip(self._session.get_inputs(), inputs, strict=True):
            feeds[spec.name] = np.ascontiguousarray(value.detach().cpu().numpy(), dtype=_NP_TYPES.get(spec.type, np.float32))
        outputs = self._session.run(list(self.io.outputs), feeds)
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModule:
        """A new module over the same file (sessions are not copied)."""
        return OnnxModule(self.path)
