"""Resolve "module:callable" strings from case files into Python objects."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


class FactoryError(ValueError):
    """A "module:callable" spec cannot be resolved; the message says which part failed."""


def resolve(spec: str, *, allow_stdlib: bool = False) -> Callable[..., Any]:
    """Import `module` and return `module.attr[.attr...]` for a spec "module:attr[.attr...]".

    Case files name factories this way, and a case file is code: it could name `os:system`. So
    callables from Python's standard library are refused unless `allow_stdlib` (model, dataset,
    task, metric and quantizer factories come from the project or an installed package).
    Raises FactoryError (a ValueError) when the spec is malformed, names the standard library,
    the module cannot be imported (with a hint about pytest's `pythonpath` when the module itself
    is not found) or the attribute does not exist or is not callable.
    """
    if spec.count(":") != 1:
        raise FactoryError(f"'{spec}' is not of the form 'package.module:callable'")
    module_name, attr_path = spec.split(":")
    if not module_name or not attr_path:
        raise FactoryError(f"'{spec}' is not of the form 'package.module:callable'")
    if not allow_stdlib and module_name.split(".")[0] in sys.stdlib_module_names:
        raise FactoryError(f"'{spec}' names Python's standard library; a case's factories must be model, dataset "
                           "or metric callables of the project or an installed package (case files are code: "
                           "docs/security.md)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and (module_name + ".").startswith(f"{exc.name}."):
            hint = (f"; if '{exc.name}' is part of your project, put the folder holding it on the path with "
                    "`pythonpath` in your pytest configuration (pyproject.toml: [tool.pytest.ini_options] "
                    "pythonpath = [\".\"]; docs/own-project.md)")
        raise FactoryError(f"cannot import module '{module_name}': {exc}{hint}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FactoryError(f"module '{module_name}' has no attribute '{attr_path}'") from None
    if not callable(obj):
        raise FactoryError(f"'{spec}' resolves to a {type(obj).__name__}, which is not callable")
    return obj  # type: ignore[no-any-return]
