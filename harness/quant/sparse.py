"""Quantized spconv layers for CenterPoint's SCN, as NVIDIA's `sparseconv_quantization.py` has them.

- `QuantSparseConvolution`: a spconv convolution whose input features pass through a per-tensor
  histogram quantizer (NVIDIA computes its amax with the MSE method) and whose weight, in spconv
  2.x's `[Cout, k0, k1, k2, Cin]` layout, through a per-output-channel max quantizer (axis 0).
- `ops.Add` becomes `QuantAdd` with one shared per-tensor **max** quantizer for both summands
  (NVIDIA's `QuantAdd` uses `QUANT_DESC_8BIT_PER_TENSOR`).

`quantize_scn` swaps them into a (BN-fused) copy of the model and disables the layers in
`keep_float` (fnmatch patterns, matched like every quantizer's: a pattern covers the modules
below a matching name): by default the first layer, as NVIDIA's PTQ does after calibration, so
PyTorch fake quantization matches the exported graph, whose first layer reads fp16 features.
Sparse models fold their BatchNorm1d layers with the folder they register
(`register_bn_folder`; the zoo's CenterPoint SCN registers its `fuse_bn`).
Calibrate with `harness.quant.calibrate.calibrate(model, [(features, indices), ...])`.
`quantize_scn_model` is the same with `quantize_model`'s signature, for a case's
`quant.quantizer`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import spconv.pytorch as spconv
import torch
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from harness.errors import QuantError
from harness.quant.modules import QuantAdd, _QuantWeighted
from harness.quant.registry import quantizable
from harness.quant.rules import Batch, QuantConfigError
from harness.quant.spconv_ops import conv_forward
from harness.quant.tensor_quantizer import QuantDescriptor, QuantMode, TensorQuantizer
from harness.quant.transform import QuantConfig, keep_float_index, name_matches, name_quantizers

SPARSE_INPUT_DESC = QuantDescriptor(calibrator="histogram", method="mse")
SPARSE_WEIGHT_DESC = QuantDescriptor(axis=0)
ADD_DESC = QuantDescriptor()

NVIDIA_CENTERPOINT_KEEP_FLOAT = ("conv_input", "conv1.0.conv1", "conv1.0.conv2", "conv1.0.add")
"""Layers NVIDIA's CenterPoint int8 export runs in fp16 (CUDA-CenterPoint `export-scn.py`)."""

_BN_FOLDERS: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {}


def register_bn_folder(model_type: type[nn.Module], fold: Callable[[nn.Module], nn.Module]) -> None:
    """Say how BN is folded into the sparse convs of models of `model_type` (`fold(model)` folds
    in place or returns the folded model)."""
    _BN_FOLDERS[model_type] = fold


def fold_sparse_bn(model: nn.Module) -> nn.Module:
    """`model` with its BatchNorm1d folded by the folder registered for its type (the model as it
    is when it has none left); QuantConfigError (key "fold_bn") when BN is left and no folder is
    registered."""
    if not any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        return model
    for cls in type(model).__mro__:
        if cls in _BN_FOLDERS:
            return _BN_FOLDERS[cls](model)
    raise QuantConfigError(f"{type(model).__name__} has BatchNorm1d layers and no registered BN folder "
                           "(harness.quant.sparse.register_bn_folder); fold BN first or set fold_bn: false",
                           "fold_bn")


def _is_add(module: nn.Module) -> bool:
    entry = quantizable(module)
    return entry is not None and entry.join == "add"


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

    Quantizers start uncalibrated; layers that a `keep_float` pattern matches keep theirs
    disabled. QuantConfigError (key "keep_float" and index) for a pattern that matches no sparse
    conv or add, QuantError for a model with BatchNorm left.
    """
    model = copy.deepcopy(model)
    if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise QuantError("quantize_scn: fold BN into the sparse convs first (fold_sparse_bn)")
    targets = [(n, m) for n, m in model.named_modules()
               if n and (isinstance(m, SparseConvolution) or _is_add(m))]
    for index, pattern in enumerate(keep_float):
        if not any(name_matches(n, (pattern,)) for n, _ in targets):
            raise QuantConfigError(f"keep_float pattern '{pattern}' matches no sparse conv or add", "keep_float", index)
    for name, module in targets:
        if isinstance(module, SparseConvolution):
            quant: nn.Module = QuantSparseConvolution.from_float(module, input_desc, weight_desc)
        else:
            quant = QuantAdd(add_desc)
        if keep_float_index(name, keep_float) is not None:
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
    (per output channel), adds `ADD_DESC`; `keep_float` patterns name layers left in fp16. BN
    is folded first when `config.fold_bn` (`fold_sparse_bn`). The SCN quantizer quantizes every
    sparse conv and add, so include / exclude patterns and rules are QuantConfigErrors naming
    the setting and entry; `example_inputs` is not needed.
    """
    if tuple(config.include) != ("*",):
        raise QuantConfigError("the SCN quantizer quantizes every sparse conv and add; leave layers in fp16 "
                               "with keep_float", "include", 0)
    if config.exclude:
        raise QuantConfigError("the SCN quantizer quantizes every sparse conv and add; leave layers in fp16 "
                               "with keep_float", "exclude", 0)
    if config.rules:
        raise QuantConfigError(f"rule '{config.rules[0].name}': the SCN quantizer shares the quantizer of each "
                               "add's summands itself and takes no rules", "rules", 0)
    if config.fold_bn:
        model = fold_sparse_bn(copy.deepcopy(model))
    return quantize_scn(model, keep_float=config.keep_float, input_desc=config.activations,
                        weight_desc=config.weights, add_desc=ADD_DESC)
