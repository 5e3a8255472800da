"""The checkpoint converters by name, and the file-to-file conversion `qharness convert` runs."""

from __future__ import annotations

from pathlib import Path

from harness.convert import NAMES, bevfusion, centerpoint, fastbev, pidnet
from harness.convert.base import (
    CheckpointError,
    Conversion,
    Converter,
    read_state_dict,
    write_state_dict,
)
from harness.zoo import bevfusion as zoo_bevfusion
from harness.zoo import fastbev as zoo_fastbev

CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        Converter("pidnet", "harness.zoo.pidnet:pidnet_s", pidnet.convert),
        Converter("cuda-fastbev", "harness.zoo.fastbev:fastbev_r18", fastbev.convert, zoo_fastbev.PROFILES),
        Converter("cuda-bevfusion-r50", "harness.zoo.bevfusion_staged:bevfusion_camera_staged",
                  bevfusion.convert, zoo_bevfusion.PROFILES),
        Converter("centerpoint", "harness.zoo.centerpoint:centerpoint_scn", centerpoint.convert),
    )
}


def get_converter(name: str) -> Converter:
    """The converter called `name`; CheckpointError listing the known ones otherwise."""
    if name not in CONVERTERS:
        raise CheckpointError(f"no converter {name!r}; known: {sorted(CONVERTERS)}")
    return CONVERTERS[name]


def convert_file(name: str, source: Path, target: Path, profile: str | None = None) -> Conversion:
    """Read the official checkpoint `source`, convert it with converter `name` (checked against
    the zoo model of `profile` where the converter has profiles) and write the state dict to
    `target` atomically."""
    converter = get_converter(name)
    if profile is not None and not converter.profiles:
        raise CheckpointError(f"{name}: takes its sizes from the checkpoint; --profile does not apply")
    if converter.profiles and profile is None:
        profile = "full"
    state = read_state_dict(source)
    try:
        conversion = converter.convert(state, profile)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    write_state_dict(conversion.state, target)
    return conversion

if tuple(CONVERTERS) != NAMES:
    raise AssertionError(f"harness.convert.NAMES {NAMES} and the registry {tuple(CONVERTERS)} disagree")
