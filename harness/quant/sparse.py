"""Quantized spconv layers for CenterPoint's SCN, as NVIDIA's `sparseconv_quantization.py` has them.

- `QuantSparseConvolution`: a spconv convolution whose input features pass through a per-tensor
  histogram quantizer (NVIDIA computes its amax with the MSE method) and whose weight, in spconv
  2.x's `[Cout, k0, k1, k2, Cin]` layout, through a per-output-channel max quantizer (axis 0).
- `ops.Add` becomes `QuantAdd` with one shared per-tensor **max** quantizer for both summands
  (NVIDIA's `QuantAdd` uses `QUANT_DESC_8BIT_PER_TENSOR`).

`quantize_scn` swaps them into a (BN-fused) copy of the model and disables the layers in
`keep_float`: by default the first layer, as NVIDIA's PTQ does after calibration, so PyTorch
fake quantization matches the exported graph, whose first layer reads fp16 features.
Calibrate with `harness.quant.calibrate.calibrate(model, [(features, indices), ...])`.
`quantize_scn_model` is the same with `quantize_model`'s signature, for a case's
`quant.quantizer`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import spconv.pytorch as spconv
import torch
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from harness.errors import QuantError
from harness.quant.modules import QuantAdd, _QuantWeighted
from harness.quant.rules import Batch
from harness.quant.tensor_quantizer import QuantDescriptor, QuantMode, TensorQuantizer
from harness.quant.transform import QuantConfig, name_quantizers
from harness.zoo import ops
from harness.zoo.centerpoint import CenterPointSCN, conv_forward, fuse_bn

SPARSE_INPUT_DESC = QuantDescriptor(calibrator="histogram", method="mse")
SPARSE_WEIGHT_DESC = QuantDescriptor(axis=0)
ADD_DESC = QuantDescriptor()

NVIDIA_CENTERPOINT_KEEP_FLOAT = ("conv_input", "conv1.0.conv1", "conv1.0.conv2", "conv1.0.add")
"""Layers NVIDIA's CenterPoint int8 export runs in fp16 (CUDA-CenterPoint `export-scn.py`)."""


class QuantSparseConvolution(SparseConvolution, _QuantWeighted):  # type: ignore[misc]
    """spconv convolution with a quantized input (per tensor) and weight (per output channel)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    @classmethod
    def from_float(
        cls, conv: SparseConvolution, input_desc: QuantDescriptor = SPARSE_INPUT_DESC,
        weight_desc: QuantDescriptor = SPARSE_WEIGHT_DESC,
    ) -> QuantSparseConvolution:
        """A quantized copy of `conv` sharing its parameters (activation and rulebook kept)."""
        if weight_desc.axis not in (None, 0):
            raise QuantError(f"sparse conv weights [Cout, k0, k1, k2, Cin] are per channel along "
                             f"axis 0, got axis {weight_desc.axis}")
        q = cls(
            conv.ndim, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None, subm=conv.subm,
            output_padding=conv.output_padding, transposed=conv.transposed, inverse=conv.inverse,
            indice_key=conv.indice_key, algo=conv.algo, fp32_accum=conv.fp32_accum,
            act_type=conv.act_type, act_alpha=conv.act_alpha, act_beta=conv.act_beta,
            name=conv.name,
        )
        q.weight = conv.weight
        q.bias = conv.bias
        if hasattr(conv, "output_bound"):
            q.output_bound = conv.output_bound
        q._init_quantizers(input_desc, weight_desc)
        q.train(conv.training)
        return q

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        xq = x.replace_feature(self.input_quantizer(x.features))
        weight: torch.Tensor = self.weight_quantizer(self.weight)
        return conv_forward(self, xq, weight=weight)


def quantize_scn(
    model: nn.Module,
    *,
    keep_float: Sequence[str] = ("conv_input",),
    input_desc: QuantDescriptor = SPARSE_INPUT_DESC,
    weight_desc: QuantDescriptor = SPARSE_WEIGHT_DESC,
    add_desc: QuantDescriptor = ADD_DESC,
) -> nn.Module:
    """A quantizable copy of a BN-fused SCN: sparse convs and adds swapped, `keep_float` disabled.

    Quantizers start uncalibrated; layers named in `keep_float` keep theirs disabled. Errors
    name a `keep_float` entry that is no sparse conv or add, and a model with BatchNorm left.
    """
    model = copy.deepcopy(model)
    if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise QuantError("quantize_scn: fuse BN into the sparse convs first "
                         "(harness.zoo.centerpoint.fuse_bn)")
    targets = [(n, m) for n, m in model.named_modules()
               if n and (isinstance(m, SparseConvolution) or type(m) is ops.Add)]
    unknown = set(keep_float) - {n for n, _ in targets}
    if unknown:
        raise QuantError(f"keep_float: no sparse conv or add named {sorted(unknown)}")
    for name, module in targets:
        if isinstance(module, SparseConvolution):
            quant: nn.Module = QuantSparseConvolution.from_float(module, input_desc, weight_desc)
        else:
            quant = QuantAdd(add_desc)
        if name in keep_float:
            for q in quant.modules():
                if isinstance(q, TensorQuantizer):
                    q.set_mode(QuantMode.DISABLED)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quant)
    name_quantizers(model)
    return model


def quantize_scn_model(model: nn.Module, config: QuantConfig, example_inputs: Batch | None = None) -> nn.Module:
    """`quantize_scn` driven by a case's quant section (the `quant.quantizer` protocol).

    Activations use `config.activations` (NVIDIA: histogram, MSE), weights `config.weights`
    (per output channel), adds `ADD_DESC`; `keep_float` names layers left in fp16. BN of a
    `CenterPointSCN` is fused first when `config.fold_bn`. The SCN quantizer quantizes every
    sparse conv and add, so include / exclude patterns and rules are errors naming the key;
    `example_inputs` is not needed.
    """
    if tuple(config.include) != ("*",) or config.exclude:
        key = "include" if tuple(config.include) != ("*",) else "exclude"
        raise QuantError(f"{key}: the SCN quantizer quantizes every sparse conv and add; "
                         "leave layers in fp16 with keep_float")
    if config.rules:
        raise QuantError(f"rules {[r.name for r in config.rules]}: the SCN quantizer shares the "
                         "quantizer of each add's summands itself and takes no rules")
    if config.fold_bn and isinstance(model, CenterPointSCN) and any(
            isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        model = fuse_bn(copy.deepcopy(model).eval())
    return quantize_scn(model, keep_float=config.keep_float, input_desc=config.activations,
                        weight_desc=config.weights, add_desc=ADD_DESC)
