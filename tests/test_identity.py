"""Tests for harness/identity.py: model fingerprints of parameters and code."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.identity import (
    Fingerprint,
    canonical_tree,
    code_digest,
    fingerprint,
    model_modules,
    parameters_digest,
)

SOURCE = '''"""A module."""
import torch


def act(x):
    """Doc."""
    return torch.relu(x)
'''


def test_code_digest_ignores_comments_docstrings_and_formatting() -> None:
    same = SOURCE.replace('"""Doc."""', '"""Other words."""').replace("return torch.relu(x)",
                                                                       "return  torch.relu( x )  # a comment")
    assert code_digest(same) == code_digest(SOURCE)
    assert code_digest(SOURCE.replace("torch.relu", "torch.sigmoid")) != code_digest(SOURCE)


PINNED_DIGEST = "f1be77de3dff2665"
"""code_digest of `def f(x): return x + 1`, the same on Python 3.11, 3.12 and 3.13."""


def test_canonical_tree_leaves_out_empty_fields_that_newer_pythons_add() -> None:
    """Python 3.12 gives functions and classes an empty `type_params` field; 3.11 has none."""
    old = type("FunctionDef", (ast.AST,), {"_fields": ("name", "body")})
    new = type("FunctionDef", (ast.AST,), {"_fields": ("name", "body", "type_params")})
    assert canonical_tree(old(name="f", body=[ast.Pass()])) == canonical_tree(
        new(name="f", body=[ast.Pass()], type_params=[]))
    assert canonical_tree(new(name="f", body=[ast.Pass()], type_params=[ast.Pass()])) != canonical_tree(
        old(name="f", body=[ast.Pass()]))


def test_code_digest_is_pinned() -> None:
    """A change of the digest's definition invalidates every golden set: it must be deliberate."""
    assert code_digest("def f(x):\n    return x + 1\n")[:16] == PINNED_DIGEST


def test_parameters_digest_sees_every_tensor_and_its_layout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    base = parameters_digest(model)
    assert parameters_digest(model) == base
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-7
    assert parameters_digest(model) != base
    model2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model2.load_state_dict(model.state_dict())
    assert parameters_digest(model2) == parameters_digest(model)
    model2[1].running_mean.add_(1.0)  # buffers count too
    assert parameters_digest(model2) != parameters_digest(model)


def test_fingerprint_covers_project_modules_not_installed_packages(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fpmod.py").write_text("from torch import nn\n\nclass M(nn.Module):\n"
                                       "    def __init__(self):\n        super().__init__()\n"
                                       "        self.c = nn.Conv2d(1, 1, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fpmod

    model = fpmod.M()
    assert model_modules(model) == ["fpmod"]  # torch.nn's modules are installed: versions cover them
    fp = fingerprint(model)
    assert set(fp.code) == {"fpmod"} and fp.differences(fp.to_dict()) == []
    del sys.modules["fpmod"]


def test_differences_say_what_changed() -> None:
    old = Fingerprint("p1", {"a": "1", "b": "2"})
    new = Fingerprint("p2", {"a": "1", "b": "3", "c": "4"})
    assert new.differences(old.to_dict()) == ["the model's parameters or buffers changed",
                                              "the code of b changed", "module c now defines part of the model"]
    assert new.differences(None) == ["no model fingerprint was recorded (made by an older qharness)"]
    assert old.digest() != new.digest() and old.digest() == Fingerprint("p1", {"b": "2", "a": "1"}).digest()
