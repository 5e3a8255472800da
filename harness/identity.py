"""What a model is, as a fingerprint: its parameters and buffers, and the code of its modules.

Caches and golden files must never outlive the model they were made from. The checkpoint's hash
does not see a model whose code changed (an activation swapped) or whose factory arguments build
other weights, so qharness fingerprints what actually runs:
- `parameters`: sha256 over every state-dict entry (name, dtype, shape, bytes), in name order;
- `code`: per Python module that defines one of the model's layer classes, or its factory, the
  sha256 of the module's syntax tree without docstrings (comments, formatting and docstrings do
  not count; any change of code does). Modules outside the project (installed packages such as
  torch or spconv) are left to the library versions recorded beside the fingerprint.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Fingerprint:
    """The identity of a model: parameter digest and code digest per module."""

    parameters: str
    code: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        """One sha256 over both parts (for cache keys)."""
        blob = json.dumps({"parameters": self.parameters, "code": self.code}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (golden meta.json's `model_fingerprint`)."""
        return {"parameters": self.parameters, "code": dict(sorted(self.code.items()))}

    def differences(self, recorded: Mapping[str, Any] | None) -> list[str]:
        """What changed since `recorded` (a `to_dict`), in words; empty when nothing did."""
        if not recorded:
            return ["no model fingerprint was recorded (made by an older qharness)"]
        changed = []
        if recorded.get("parameters") != self.parameters:
            changed.append("the model's parameters or buffers changed")
        old = recorded.get("code") or {}
        for module in sorted(set(old) | set(self.code)):
            if module not in self.code:
                changed.append(f"module {module} no longer defines part of the model")
            elif module not in old:
                changed.append(f"module {module} now defines part of the model")
            elif old[module] != self.code[module]:
                changed.append(f"the code of {module} changed")
        return changed


def parameters_digest(model: nn.Module) -> str:
    """sha256 over the state dict: names, dtypes, shapes and bytes of every tensor, by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(source: str) -> str:
    """sha256 of the syntax tree of `source` without docstrings (formatting and comments ignored),
    the same under every Python version that parses the code into the same tree (`canonical_tree`)."""
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(canonical_tree(tree).encode()).hexdigest()


def canonical_tree(node: object) -> str:
    """A text form of a syntax tree that names each node's type and its non-empty fields.

    `ast.dump` is not stable across Python versions: 3.12 added `type_params` (an empty list in
    code that declares none) to functions and classes, and 3.13 leaves empty fields out. Fields
    that are None or empty are left out here, so one source gives one digest on 3.11 to 3.13 (the
    GPU machines run 3.12, CI 3.11)."""
    if isinstance(node, ast.AST):
        parts = []
        for name in node._fields:
            value = getattr(node, name, None)
            if value is None or (isinstance(value, list) and not value):
                continue
            parts.append(f"{name}={canonical_tree(value)}")
        return f"{type(node).__name__}({', '.join(parts)})"
    if isinstance(node, list):
        return "[" + ", ".join(canonical_tree(v) for v in node) + "]"
    return repr(node)


def _installed_roots() -> tuple[Path, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(Path(p).resolve() for p in paths)


def project_module(module: ModuleType) -> Path | None:
    """The source file of `module` when it belongs to the project (not the standard library or
    an installed package; an editable install of the project counts as the project)."""
    try:
        source = inspect.getsourcefile(module)
    except TypeError:
        return None
    if source is None:
        return None
    path = Path(source).resolve()
    if any(path.is_relative_to(root) for root in _installed_roots()):
        return None
    return path


def model_modules(model: nn.Module, extra: Iterable[str] = ()) -> list[str]:
    """Names of the project modules that define `model`'s layer classes (and `extra` ones, such as
    the factory's module), sorted."""
    names = {type(m).__module__ for m in model.modules()} | set(extra)
    found = []
    for name in names:
        module = sys.modules.get(name)
        if module is not None and project_module(module) is not None:
            found.append(name)
    return sorted(found)


def fingerprint(model: nn.Module, extra_modules: Iterable[str] = ()) -> Fingerprint:
    """The fingerprint of `model` (see the module docstring); `extra_modules` adds modules by name
    (the factory's), counted when they belong to the project."""
    code = {}
    for name in model_modules(model, extra_modules):
        path = project_module(sys.modules[name])
        assert path is not None
        code[name] = code_digest(path.read_text(encoding="utf-8"))
    return Fingerprint(parameters_digest(model), code)
