"""det3d/CenterPoint nuScenes checkpoints (SpMiddleResNetFHD on spconv 1.x) -> the zoo's fused
`harness.zoo.centerpoint.CenterPointSCN`.

spconv 1.x stores a sparse convolution's weight as [kD, kH, kW, Cin, Cout] ("RSCK"); spconv 2.x
as [Cout, kD, kH, kW, Cin] ("KRSC", the layout NVIDIA's SCN exporter writes), so a 1.x weight
becomes `w.permute(4, 0, 1, 2, 3)`. Weights already in the 2.x layout (CUDA-CenterPoint's own
spconv 2.x training) are kept; a weight whose shape fits both layouts is read as 1.x (det3d).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from harness.convert.base import CheckpointError, Conversion, StateDict, check_fits
from harness.zoo.centerpoint import CenterPointSCN, ScnConfig, fuse_bn

PREFIX = "backbone."


def _widths(state: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, int, int, int]]:
    """(in_channels, stage widths) from the bias/BN vectors, whatever the weight layout."""
    keys = ("conv_input.1.weight", "conv1.0.bn1.weight", "conv2.1.weight", "conv3.1.weight",
            "conv4.1.weight", "conv_input.0.weight")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"centerpoint: not an SpMiddleResNetFHD backbone, missing {missing}")
    c0, _, c1, c2, c3 = (int(state[k].shape[0]) for k in keys[:5])
    first = state["conv_input.0.weight"]
    if first.dim() != 5:
        raise CheckpointError(f"centerpoint: conv_input.0.weight is {list(first.shape)}, not a 5-D sparse conv weight")
    cin = int(first.shape[3]) if int(first.shape[4]) == c0 else int(first.shape[4])
    return cin, (c0, c1, c2, c3)


def to_spconv2(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[StateDict, int]:
    """Permute every 5-D weight from spconv 1.x to 2.x layout where the 1.x reading fits the
    expected shape; (result, number permuted)."""
    out: StateDict = {}
    permuted = 0
    for key, value in state.items():
        target = expected.get(key)
        if value.dim() == 5 and target is not None:
            as_v2 = value.permute(4, 0, 1, 2, 3)
            if tuple(as_v2.shape) == tuple(target.shape):
                out[key] = as_v2.contiguous()
                permuted += 1
                continue
        out[key] = value
    return out, permuted


def convert(state: Mapping[str, torch.Tensor], profile: str | None = None) -> Conversion:
    """Keep the `backbone.` entries (the SCN; reader, neck and head are not in the zoo model),
    bring spconv 1.x weights to the 2.x layout, load them into an unfused CenterPointSCN of the
    checkpoint's widths and fold BN into the convolutions (`fuse_bn`), as the centerpoint-scn
    case's factory builds its model."""
    if profile is not None:
        raise CheckpointError(f"centerpoint: sizes come from the checkpoint; got profile {profile!r}")
    wrapped = any(k.startswith(PREFIX) for k in state)
    backbone = {k.removeprefix(PREFIX): v for k, v in state.items() if not wrapped or k.startswith(PREFIX)}
    in_channels, widths = _widths(backbone)
    model = CenterPointSCN(ScnConfig(in_channels=in_channels, widths=widths))
    expected = model.state_dict()
    converted, permuted = to_spconv2(backbone, expected)
    check_fits(converted, expected, f"centerpoint (SpMiddleResNetFHD, {in_channels} inputs, widths {widths})")
    model.load_state_dict(converted, strict=True)
    fused = fuse_bn(model.eval()).state_dict()
    notes = (
        f"kept {len(backbone)} of {len(state)} entries ({PREFIX}*: the sparse encoder)",
        f"permuted {permuted} sparse conv weights spconv 1.x [k,k,k,Cin,Cout] -> 2.x [Cout,k,k,k,Cin]",
        f"folded BN into the convolutions: {len(fused)} entries",
    )
    return Conversion(fused, notes)
