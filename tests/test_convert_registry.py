"""Tests for harness/convert/registry.py and base.py: file round trip, errors, `qharness convert`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.convert import NAMES
from harness.convert.base import CheckpointError, check_fits, read_state_dict, unwrap
from harness.convert.registry import CONVERTERS, convert_file, get_converter
from harness.zoo.pidnet import pidnet_s


def test_registry_has_the_four_models() -> None:
    assert tuple(CONVERTERS) == NAMES == ("pidnet", "cuda-fastbev", "cuda-bevfusion-r50", "centerpoint")
    with pytest.raises(CheckpointError, match="no converter 'yolo'; known"):
        get_converter("yolo")


def test_unwrap_finds_nested_state_dicts_and_rejects_other_objects() -> None:
    weight = torch.ones(2)
    assert unwrap({"state_dict": {"a": weight}, "meta": {"epoch": 3}}, "x.pth") == {"a": weight}
    assert unwrap({"model": {"state_dict": {"a": weight}}}, "x.pth") == {"a": weight}
    with pytest.raises(CheckpointError, match=r"x\.pth: entries that are not tensors: \['b'\]"):
        unwrap({"a": weight, "b": 3}, "x.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        unwrap([weight], "x.pth")


def test_check_fits_names_every_kind_of_problem() -> None:
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(1), "c": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"m: 1 shape mismatch\(es\): a: expected \[2, 3\], found \[3, 2\]; "
                       r"1 key\(s\) missing: \['c'\]; 1 key\(s\) that do not map: \['d'\]"):
        check_fits({"a": torch.zeros(3, 2), "b": torch.zeros(1), "d": torch.zeros(1)}, expected, "m")


def test_cli_converts_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = pidnet_s(19)
    source, target = tmp_path / "PIDNet_S_Cityscapes_val.pt", tmp_path / "out" / "model.pt"
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, source)
    assert main(["convert", "pidnet", str(source), str(target)]) == 0
    assert "a state dict for harness.zoo.pidnet:pidnet_s" in capsys.readouterr().out
    loaded = read_state_dict(target)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert main(["convert", "pidnet", str(source), str(target), "--profile", "ci"]) == 2
    assert "--profile does not apply" in capsys.readouterr().err


def test_unreadable_and_unfitting_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        convert_file("pidnet", tmp_path / "missing.pt", tmp_path / "out.pt")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "meta": {"hook": object()}}, pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.pt: torch\.load\(weights_only=True\) refused"):
        convert_file("pidnet", pickled, tmp_path / "out.pt")
    wrong = tmp_path / "fastbev.pth"
    torch.save({"state_dict": {"neck_fuse_0.weight": torch.ones(1)}}, wrong)
    with pytest.raises(CheckpointError, match=r"fastbev\.pth: cuda-fastbev .*missing"):
        convert_file("cuda-fastbev", wrong, tmp_path / "out.pt", "ci")
    assert not (tmp_path / "out.pt").exists()
