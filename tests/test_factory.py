"""Tests for harness/factory.py: resolving "module:callable" strings."""

from __future__ import annotations

import os.path
import re
from pathlib import Path

import pytest

from harness.factory import FactoryError, resolve


def test_resolves_functions_classes_and_nested_attributes() -> None:
    assert resolve("os.path:join", allow_stdlib=True) is os.path.join
    assert resolve("collections:OrderedDict", allow_stdlib=True) is __import__("collections").OrderedDict
    assert resolve("harness.factory:FactoryError.__init__") is FactoryError.__init__


@pytest.mark.parametrize("spec", ["os.path.join", "os:path:join", ":join", "os.path:", "", ":"])
def test_malformed_specs(spec: str) -> None:
    with pytest.raises(FactoryError, match=re.escape("is not of the form 'package.module:callable'")):
        resolve(spec)


def test_module_that_does_not_import() -> None:
    with pytest.raises(FactoryError, match=re.escape("cannot import module 'harness.no_such_module'")):
        resolve("harness.no_such_module:build")


def test_missing_project_module_hints_at_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FactoryError, match=r"cannot import module 'qh_mymodels\.nets'.*`pythonpath` in your pytest"):
        resolve("qh_mymodels.nets:build")
    # a module that exists but imports a missing dependency gets no such hint
    (tmp_path / "qh_needs_dep.py").write_text("import qh_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FactoryError) as info:
        resolve("qh_needs_dep:build")
    assert "qh_missing_dependency" in str(info.value) and "pythonpath" not in str(info.value)


def test_missing_attribute_names_module_and_attribute() -> None:
    with pytest.raises(FactoryError, match=re.escape("module 'os.path' has no attribute 'joinn'")):
        resolve("os.path:joinn", allow_stdlib=True)
    with pytest.raises(FactoryError, match=re.escape("module 'harness.factory' has no attribute 'FactoryError.nope'")):
        resolve("harness.factory:FactoryError.nope")


def test_not_callable() -> None:
    with pytest.raises(FactoryError, match=re.escape("'math:pi' resolves to a float, which is not callable")):
        resolve("math:pi", allow_stdlib=True)


def test_factory_error_is_a_value_error() -> None:
    # pydantic turns ValueErrors raised in validators into validation errors with the key.
    assert issubclass(FactoryError, ValueError)


def test_import_error_inside_the_module_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qh_test_broken_factory.py").write_text("import qh_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FactoryError, match=re.escape("qh_missing_dependency_xyz")):
        resolve("qh_test_broken_factory:build")


@pytest.mark.parametrize("spec", ["os:system", "subprocess:run", "builtins:exec", "os.path:join", "shutil:rmtree"])
def test_the_standard_library_is_refused(spec: str) -> None:
    with pytest.raises(FactoryError, match=re.escape(f"'{spec}' names Python's standard library")):
        resolve(spec)
