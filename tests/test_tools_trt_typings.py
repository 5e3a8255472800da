"""Tests of tools/trt_typings.py: the stub repairs and the extraction from a wheel."""

from __future__ import annotations

import ast
import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "trt_typings.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trt_typings", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()

# The shapes of the invalid lines in tensorrt-stubs 10.13.0.35.1 (class bodies trimmed).
BROKEN = '''\
from __future__ import annotations
import typing
import tensorrt_libs as tensorrt_libs
class INetworkDefinition:
    def add_scale(self, input: ITensor, mode: ScaleMode, shift: Weights = None) -> IScaleLayer:
        ...
    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, scale: Weights = None, power: Weights = None, channel_axis: int) -> IScaleLayer:
        """
            Add a multi-dimension scale layer to the network.
        """
class IPluginV2DynamicExt:
    def get_workspace_size(self, in: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> int:
        ...
    def configure_plugin(self: IPluginV3, in: list[DynamicPluginTensorDesc], out: list[DynamicPluginTensorDesc]) -> None:
        ...
__all__ = ['INetworkDefinition', 'tensorrt_libs']
'''


def test_repairs_every_invalid_line_and_parses() -> None:
    with pytest.raises(SyntaxError):
        ast.parse(BROKEN)
    text, changes = tool.sanitize_stub(BROKEN)
    ast.parse(text)
    assert [c.line for c in changes] == [7, 12, 14, 3]
    lines = text.splitlines()  # one line longer from line 3 on: the import became two lines
    assert "power: Weights = None, channel_axis: int = ...) -> IScaleLayer:" in lines[7]
    assert lines[12] == "    def get_workspace_size(self, in_: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> int:"
    assert "(self: IPluginV3, in_: list[DynamicPluginTensorDesc]," in lines[14]
    assert lines[2:4] == ["import types as _types", "tensorrt_libs: _types.ModuleType"]
    assert "tensorrt_libs" in changes[-1].why and changes[-1].before == "import tensorrt_libs as tensorrt_libs"


def test_valid_stub_is_unchanged_and_repair_is_idempotent() -> None:
    valid = "class A:\n    def f(self, x: int = 1, *, y: int) -> None: ...\n    def g(self, d: dict[str, int] = {}) -> None: ...\n"
    assert tool.sanitize_stub(valid) == (valid, [])
    once, _ = tool.sanitize_stub(BROKEN)
    assert tool.sanitize_stub(once) == (once, [])


def test_other_keywords_and_positional_only_marker() -> None:
    text, changes = tool.sanitize_stub("def f(a, /, b: int = 0, c: int, lambda: str) -> None: ...\n")
    assert text == "def f(a, /, b: int = 0, c: int = ..., lambda_: str = ...) -> None: ...\n"
    assert len(changes) == 1 and "keyword" in changes[0].why and "'c'" in changes[0].why


def test_unrepairable_syntax_error_names_the_line() -> None:
    with pytest.raises(tool.StubError, match="line 2"):
        tool.sanitize_stub("x = 1\nclass (:\n")


def _wheel(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_extracts_the_two_stub_trees_only(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "tensorrt_stubs-10.13.0.35.1-py3-none-any.whl", {
        "tensorrt/__init__.pyi": "from tensorrt_bindings.tensorrt import Builder\n",
        "tensorrt_bindings/__init__.pyi": "import tensorrt_libs as tensorrt_libs\n",
        "tensorrt_bindings/tensorrt.pyi": BROKEN,
        "tensorrt_stubs/__init__.py": "from tensorrt import *\n",
        "tensorrt_stubs-10.13.0.35.1.dist-info/RECORD": "",
    })
    dest = tmp_path / "typings"
    (dest / "tensorrt").mkdir(parents=True)
    (dest / "tensorrt" / "stale.pyi").write_text("old\n")
    changes = tool.extract_stubs(wheel, dest)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi"]
    assert sorted(changes) == ["tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi"]
    for path in dest.rglob("*.pyi"):
        ast.parse(path.read_text())


def test_main_writes_the_version_marker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = _wheel(tmp_path / "tensorrt_stubs-10.13.0.35.1-py3-none-any.whl", {
        "tensorrt/__init__.pyi": "", "tensorrt_bindings/__init__.pyi": "", "tensorrt_bindings/tensorrt.pyi": BROKEN})
    dest = tmp_path / "typings"
    assert tool.main(["--wheel", str(wheel), "--dest", str(dest)]) == 0
    assert (dest / tool.MARKER).read_text().strip() == "10.13.0.35.1"
    assert "channel_axis" in capsys.readouterr().out
    assert tool.main(["--dest", str(dest)]) == 0
    assert "already in" in capsys.readouterr().out


def test_wheel_without_stubs_is_an_error(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "other.whl", {"tensorrt/__init__.pyi": ""})
    with pytest.raises(tool.StubError, match="tensorrt_bindings"):
        tool.extract_stubs(wheel, tmp_path / "typings")
