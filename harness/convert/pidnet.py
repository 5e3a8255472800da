"""Official PIDNet-S checkpoints (github.com/XuJiacong/PIDNet) -> `harness.zoo.pidnet.pidnet_s`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from harness.convert.base import CheckpointError, Conversion, check_fits
from harness.zoo.pidnet import TRAINING_ONLY_PREFIXES, inference_state_dict, pidnet_s

LOGITS = "final_layer.conv2.weight"


def convert(state: Mapping[str, torch.Tensor], profile: str | None = None) -> Conversion:
    """Strip the training wrapper's `model.` prefix, drop the loss modules and the training heads
    (`seghead_p`, `seghead_d`), check against `pidnet_s(num_classes)` (classes read from the
    final layer). BN stays unfused: the pidnet-s case loads an ordinary model."""
    if profile is not None:
        raise CheckpointError(f"pidnet: sizes come from the checkpoint; got profile {profile!r}")
    inference = inference_state_dict(state)
    if LOGITS not in inference:
        raise CheckpointError(
            f"pidnet: no '{LOGITS}' (the segmentation head); ImageNet-pretrained backbones "
            "(PIDNet_S_ImageNet.pth.tar) carry none, use a Cityscapes or CamVid model"
        )
    num_classes = int(inference[LOGITS].shape[0])
    check_fits(inference, pidnet_s(num_classes).state_dict(), f"pidnet (PIDNet-S, {num_classes} classes)")
    dropped = len(state) - len(inference)
    notes = (
        f"{num_classes} classes",
        f"dropped {dropped} entries (loss modules, training heads {list(TRAINING_ONLY_PREFIXES)})",
    )
    return Conversion(inference, notes)
