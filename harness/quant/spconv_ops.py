"""spconv helpers shared by quantized sparse layers, the SCN executor and the zoo's SCN.

spconv 2.3.8's CPU build refuses a bias or a fused activation in inference, so convolutions run
spconv without them and add the bias and apply the activation in torch (`conv_forward`), which
gives the same numbers on CPU and CUDA. Its CPU scatter-add kernel also races when OpenMP runs it
on several threads (the loop shares its row pointers between threads), so `conv_forward` runs
spconv's CPU kernels on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import spconv.pytorch as spconv
import torch
from cumm import tensorview as tv
from spconv.pytorch.conv import SparseConvolution

from harness.errors import HarnessError

RELU = tv.gemm.Activation.ReLU
NO_ACT = tv.gemm.Activation.None_


def apply_activation(x: torch.Tensor, act_type: Any, alpha: float = 0.0) -> torch.Tensor:
    """Apply spconv's fused activation `act_type` (None_, ReLU, Sigmoid, LeakyReLU) to `x`."""
    if act_type == NO_ACT:
        return x
    if act_type == RELU:
        return torch.relu(x)
    if act_type == tv.gemm.Activation.Sigmoid:
        return torch.sigmoid(x)
    if act_type == tv.gemm.Activation.LeakyReLU:
        return torch.nn.functional.leaky_relu(x, alpha)
    raise HarnessError(f"unsupported spconv activation {act_type}")


@contextmanager
def _one_thread(on_cpu: bool) -> Iterator[None]:
    """Run the body with one intra-op thread when `on_cpu` (spconv's CPU scatter-add races)."""
    if not on_cpu:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def conv_forward(
    conv: SparseConvolution,
    x: spconv.SparseConvTensor,
    weight: torch.Tensor | None = None,
) -> spconv.SparseConvTensor:
    """Run spconv convolution `conv` on `x`, adding its bias and activation in torch.

    `weight` replaces `conv.weight` (a fake-quantized weight, for instance). The result equals
    spconv's own fused bias + activation, but also works on spconv's CPU-only build.
    """
    w = conv.weight if weight is None else weight
    with _one_thread(not x.features.is_cuda):
        y = conv._conv_forward(
            conv.training, x, w, None,
            name=conv.name, sparse_unique_name=conv._sparse_unique_name,
        )
    feats = y.features
    if conv.bias is not None:
        feats = feats + conv.bias
    return y.replace_feature(apply_activation(feats, conv.act_type, conv.act_alpha))
