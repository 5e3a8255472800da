"""Reference executor for SCN ONNX graphs: runs the file node by node with spconv and torch.

It reads only what the file says (the attributes NVIDIA's loader reads, the FLOAT16
initializers, the graph's wiring), never the PyTorch model it came from, so comparing its output
with PyTorch's measures the fidelity of the export. Semantics, as the engine has them:

- `SparseConvolution`: spconv conv with kernel_size/stride/padding/dilation/subm/inverse, the
  rulebook key shared between layers, weight/bias from the initializers, `activation` fused;
  more than `output_bound` output voxels is an error (the engine's buffers would overflow).
- `Add` (same sparsity on both sides), `Relu`, `ScatterDense` -> [B, C, *input_spatial_shape]
  with index columns in the graph's `format` order, `Reshape` / `Transpose` by `dims`.
- fp16 (`precision="fp16"`): every tensor is stored in fp16 (inputs, weights, each node's
  output rounded), arithmetic accumulates in fp32.
- int8 (`int8=True`): a node whose `precision` is "int8" fake-quantizes what it reads with its
  ranges, with `harness.quant`'s quantize-dequantize (symmetric, scale amax/127, [-128, 127]):
  features with `input_dynamic_range` (Add: `input0/1_dynamic_range`), weights per output
  channel with `weight_dynamic_ranges`. An int8 output is quantized by its readers, as in
  fake-quant PyTorch, so the result matches `harness.quant.sparse` models.

Inputs are features [N, C] and indices [N, 4] int32 in the file's index order (rows (b,z,y,x)
for "zyx", (b,x,y,z) for "xyz"), batch 1; out-of-grid or repeated indices raise
`ScnInputError` naming the source and the first bad row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import spconv.pytorch as spconv
import torch
from cumm import tensorview as tv
from spconv.pytorch.conv import SparseConvolution

from harness.errors import ExportError, HarnessError
from harness.export.scn_golden import load_features, load_indices
from harness.export.scn_schema import load
from harness.quant.spconv_ops import conv_forward
from harness.quant.tensor_quantizer import fake_quantize

Precision = Literal["fp32", "fp16"]

_ACTIVATIONS = {
    "None": tv.gemm.Activation.None_,
    "ReLU": tv.gemm.Activation.ReLU,
    "Sigmoid": tv.gemm.Activation.Sigmoid,
    "LeakyReLU": tv.gemm.Activation.LeakyReLU,
}


class ScnInputError(HarnessError):
    """Executor input is invalid; the message names the source and the first bad row."""

    def __init__(self, source: str, message: str, row: int | None = None) -> None:
        self.source = source
        self.row = row
        where = f"{source}: row {row}: " if row is not None else f"{source}: "
        super().__init__(where + message)


def check_indices(indices: np.ndarray, grid: Sequence[int], source: str) -> None:
    """Indices [N, 4] of one batch: inside `grid` and without repeats, else `ScnInputError`."""
    if indices.ndim != 2 or indices.shape[1] != 4:
        raise ScnInputError(source, f"indices must be [N, 4], got {list(indices.shape)}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ScnInputError(source, f"indices must be integers, got {indices.dtype}")
    ind = indices.astype(np.int64)
    upper = np.array([1, *grid], dtype=np.int64)
    bad = np.nonzero(((ind < 0) | (ind >= upper)).any(axis=1))[0]
    if bad.size:
        r = int(bad[0])
        raise ScnInputError(source, f"index {ind[r].tolist()} is outside batch 1 x grid "
                            f"{list(grid)}", row=r)
    keys = ((ind[:, 1] * grid[1]) + ind[:, 2]) * grid[2] + ind[:, 3]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeat = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0] + 1
    if repeat.size:
        rows = order[repeat]
        r = int(rows.min())
        first = int(np.nonzero(keys == keys[r])[0][0])
        raise ScnInputError(source, f"index {ind[r].tolist()} repeats row {first}", row=r)


@dataclass(frozen=True)
class _Conv:
    module: SparseConvolution
    precision: str
    input_range: float
    weight_ranges: torch.Tensor
    output_bound: int


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class ScnExecutor:
    """Runs one SCN ONNX file; `executor(features, indices)` returns the dense output."""

    def __init__(
        self, model: onnx.ModelProto | str | Path, *, precision: Precision = "fp32",
        int8: bool = False, grid: Sequence[int] | None = None,
    ) -> None:
        proto, self.source = load(model)
        if precision not in ("fp32", "fp16"):
            raise ExportError(f"{self.source}: precision must be fp32 or fp16, got {precision!r}")
        self.precision = precision
        self.int8 = int8
        graph = proto.graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        self.nodes = list(graph.node)
        self.attrs = {n.name: _attrs(n) for n in self.nodes}
        inputs = [i.name for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ExportError(f"{self.source}: expected one input and one output")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.convs = {n.name: self._conv(n, inits) for n in self.nodes
                      if n.op_type == "SparseConvolution"}
        first = next((n for n in self.nodes if n.op_type == "SparseConvolution"), None)
        if first is None:
            raise ExportError(f"{self.source}: no SparseConvolution node")
        self.in_channels = int(self.convs[first.name].module.in_channels)
        self.grid = [int(g) for g in (grid if grid is not None
                                      else self.attrs[first.name]["input_spatial_shape"])]
        formats = {self.attrs[n.name].get("format") for n in self.nodes
                   if n.op_type == "ScatterDense"}
        if len(formats) != 1:
            raise ExportError(f"{self.source}: ScatterDense index formats {formats}")
        self.format = str(formats.pop())

    def _conv(self, node: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> _Conv:
        a = self.attrs[node.name]
        where = f"{self.source}: node '{node.name}'"
        if a.get("transposed", 0):
            raise ExportError(f"{where}: transposed convolution is not supported by the engine")
        try:
            weight, bias = inits[node.input[1]], inits[node.input[2]]
        except (KeyError, IndexError):
            raise ExportError(f"{where}: weight or bias initializer missing") from None
        cout, *k, cin = weight.shape
        if list(k) != list(a["kernel_size"]):
            raise ExportError(f"{where}: weight {list(weight.shape)} vs kernel {a['kernel_size']}")
        key = a.get("rulebook", "") or None
        conv = SparseConvolution(
            3, cin, cout, a["kernel_size"], a["stride"], a["padding"], a["dilation"],
            subm=bool(a["subm"]), inverse=bool(a.get("inverse", 0)), indice_key=key, bias=True,
        ).eval()
        conv.act_type = _ACTIVATIONS[a.get("activation", "None")]
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
            conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        c = _Conv(
            conv, a.get("precision", "fp16"), float(a.get("input_dynamic_range", 0.0)),
            torch.tensor(list(a.get("weight_dynamic_ranges", [])), dtype=torch.float32),
            int(a.get("output_bound", 150000)),
        )
        if c.precision == "int8" and (c.input_range <= 0 or c.weight_ranges.numel() != cout
                                      or bool((c.weight_ranges <= 0).any())):
            raise ExportError(f"{where}: int8 needs input_dynamic_range > 0 and {cout} positive "
                              "weight_dynamic_ranges")
        return c

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x.half().float() if self.precision == "fp16" else x

    def run_files(self, features_path: str | Path, indices_path: str | Path) -> torch.Tensor:
        """Dense output for a features file and an indices file (`.tensor` or `.npy`)."""
        return self(load_features(features_path), load_indices(indices_path),
                    features_source=str(features_path), indices_source=str(indices_path))

    def __call__(self, features: torch.Tensor | np.ndarray, indices: torch.Tensor | np.ndarray,
                 *, features_source: str = "<features>",
                 indices_source: str = "<indices>") -> torch.Tensor:
        """Dense output for features [N, C] and indices [N, 4] (file's index order).

        fp32 returns float32; fp16 returns float16. Errors name the source and first bad row.
        """
        ind = np.asarray(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices)
        check_indices(ind, self.grid, indices_source)
        feats = torch.as_tensor(np.asarray(features.cpu().numpy() if isinstance(
            features, torch.Tensor) else features)).float()
        if feats.ndim != 2 or feats.shape[0] != ind.shape[0] or feats.shape[1] != self.in_channels:
            raise ScnInputError(features_source, f"features {list(feats.shape)} must be "
                                f"[{ind.shape[0]}, {self.in_channels}] for {indices_source}")
        if not torch.isfinite(feats).all():
            row = int(torch.nonzero(~torch.isfinite(feats).all(dim=1))[0, 0])
            raise ScnInputError(features_source, "features hold NaN or Inf", row=row)
        x = spconv.SparseConvTensor(self._store(feats), torch.from_numpy(ind.astype(np.int32)),
                                    self.grid, 1)
        values: dict[str, Any] = {self.input_name: x}
        with torch.no_grad():
            for node in self.nodes:
                try:
                    args = [values[name] for name in node.input[:1 if node.op_type != "Add" else 2]]
                except KeyError as e:
                    raise ExportError(f"{self.source}: node '{node.name}' reads undefined "
                                      f"tensor {e}") from None
                values[node.output[0]] = getattr(self, "_op_" + node.op_type, self._unknown)(
                    node, *args)
        out = values[self.output_name]
        if not isinstance(out, torch.Tensor):
            raise ExportError(f"{self.source}: graph output is sparse; expected a dense tensor")
        return out.half() if self.precision == "fp16" else out

    def _unknown(self, node: onnx.NodeProto, *args: Any) -> Any:
        raise ExportError(f"{self.source}: node '{node.name}': op {node.op_type} is not "
                          "supported by the engine")

    def _op_SparseConvolution(self, node: onnx.NodeProto,
                              x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        c = self.convs[node.name]
        weight = self._store(c.module.weight)
        if self.int8 and c.precision == "int8":
            x = x.replace_feature(fake_quantize(x.features, torch.tensor(c.input_range)))
            weight = fake_quantize(weight, c.weight_ranges, axis=0)
        y = conv_forward(c.module, x, weight=weight)
        if not c.module.subm and y.features.shape[0] > c.output_bound:
            raise ExportError(f"{self.source}: node '{node.name}': {y.features.shape[0]} output "
                              f"voxels exceed output_bound {c.output_bound}")
        return y.replace_feature(self._store(y.features))

    def _op_Add(self, node: onnx.NodeProto, a: spconv.SparseConvTensor,
                b: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        if a.indices is not b.indices and not torch.equal(a.indices, b.indices):
            raise ExportError(f"{self.source}: node '{node.name}': inputs have different voxels")
        fa, fb = a.features, b.features
        attrs = self.attrs[node.name]
        if self.int8 and attrs.get("precision") == "int8":
            fa = fake_quantize(fa, torch.tensor(float(attrs["input0_dynamic_range"])))
            fb = fake_quantize(fb, torch.tensor(float(attrs["input1_dynamic_range"])))
        return a.replace_feature(self._store(fa + fb))

    def _op_Relu(self, node: onnx.NodeProto, x: Any) -> Any:
        if isinstance(x, spconv.SparseConvTensor):
            return x.replace_feature(torch.relu(x.features))
        return torch.relu(x)

    def _op_ScatterDense(self, node: onnx.NodeProto, x: spconv.SparseConvTensor) -> torch.Tensor:
        a = self.attrs[node.name]
        spatial = [int(s) for s in a["input_spatial_shape"]]
        shape = [int(s) for s in a["output_shape"]]
        if list(x.spatial_shape) != spatial or shape[2:] != spatial:
            raise ExportError(f"{self.source}: node '{node.name}': input spatial shape "
                              f"{list(x.spatial_shape)}, attribute {spatial}, output {shape}")
        feats = x.features
        if self.int8 and float(a.get("input_dynamic_range", 0.0)) > 0:
            feats = fake_quantize(feats, torch.tensor(float(a["input_dynamic_range"])))
        dense = torch.zeros([shape[0], *spatial, feats.shape[1]], dtype=feats.dtype)
        idx = x.indices.long()
        dense[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = feats
        return dense.permute(0, 4, 1, 2, 3).contiguous()

    def _op_Reshape(self, node: onnx.NodeProto, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([int(d) for d in self.attrs[node.name]["dims"]])

    def _op_Transpose(self, node: onnx.NodeProto, x: torch.Tensor) -> torch.Tensor:
        return x.permute([int(d) for d in self.attrs[node.name]["dims"]]).contiguous()
