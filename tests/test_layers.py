"""The layer picture of docs/architecture.md holds: no module imports a layer above its own.

Every `import harness.x` / `from harness.x import ...` in harness/ counts, also inside functions
and under TYPE_CHECKING (a lazy import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "harness"

# Top (1) to bottom (6); the zoo and datasets plug in between the context and the backends.
LAYERS: tuple[tuple[float, str, tuple[str, ...]], ...] = (
    (1, "plugin / CLI / reports / training", ("harness.plugin", "harness.cli", "harness.__main__", "harness.report",
                                              "harness.training", "harness.convert", "harness.localise")),
    (2, "checks", ("harness.checks",)),
    (3, "context", ("harness.context", "harness.evaluation", "harness.calibration",
                                 "harness.layerwise")),
    (3.5, "zoo and datasets (plug-ins)", ("harness.zoo", "harness.datasets")),
    (4, "backends / metrics / tasks / case schema", ("harness.backends", "harness.metrics", "harness.tasks",
                                                     "harness.cases", "harness.gates")),
    (5, "quantization and export library", ("harness.quant", "harness.export")),
    (6, "formats and primitives", ("harness.tensorfile", "harness.compare", "harness.atomic", "harness.errors",
                                   "harness.factory", "harness.cache", "harness.environment", "harness.program",
                                   "harness.records", "harness.golden", "harness.registry", "harness.fmt",
                                   "harness")),
)


def layer_of(module: str) -> tuple[float, str]:
    """(rank, name) of the most specific layer prefix of `module`."""
    best: tuple[int, float, str] | None = None
    for rank, name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, name)
    assert best is not None, module
    return best[1], best[2]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def harness_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a harness module in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("harness")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness") and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if (ROOT.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                      or (ROOT.parent / node.module.replace(".", "/") / a.name / "__init__.py").exists()]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        rank, name = layer_of(importer)
        for line, imported in harness_imports(path):
            other_rank, other_name = layer_of(imported)
            if other_rank < rank:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: {importer} ({name}) imports {imported} ({other_name})")
    return out


def test_no_module_imports_a_higher_layer() -> None:
    assert violations() == []


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    fake = tmp_path / "harness"
    (fake / "quant").mkdir(parents=True)
    (fake / "zoo").mkdir()
    (fake / "zoo" / "resnet.py").write_text("")
    (fake / "quant" / "rules.py").write_text("def f():\n    from harness.zoo.resnet import BasicBlock\n")
    global ROOT
    saved, ROOT = ROOT, fake
    try:
        assert violations() == ["harness/quant/rules.py:2: harness.quant.rules (quantization and export library) "
                                "imports harness.zoo.resnet (zoo and datasets (plug-ins))"]
    finally:
        ROOT = saved


def test_every_module_has_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))
