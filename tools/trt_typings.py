"""Put TensorRT's type stubs where mypy finds them, without installing anything.

`pip install tensorrt-stubs` fails (it depends on a `tensorrt` sdist that downloads from NVIDIA),
and `--no-deps` leaves a `tensorrt/` folder of `.pyi` files that makes `import tensorrt` succeed
as an empty namespace package. So this tool downloads the stubs wheel (or takes one), extracts its
two `.pyi` trees (`tensorrt/`, `tensorrt_bindings/`) into `typings/`, which only mypy reads
(`mypy_path`), and repairs the few stub lines that are not valid Python:

- parameters named after a keyword (`in`) are renamed (`in_`);
- a required parameter after defaulted ones (`add_scale_nd(..., power=None, channel_axis)`) gets
  `= ...`, the stub spelling of "has a default" (the binding accepts it by keyword);
- imports of modules that no stub provides (`tensorrt_libs`) become a `types.ModuleType`
  annotation of the same name.

Usage: python tools/trt_typings.py [--wheel PATH] [--dest typings] [--version V] [--force]
"""

from __future__ import annotations

import argparse
import ast
import keyword
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

STUBS_VERSION = "10.13.0.35.1"
PACKAGES = ("tensorrt", "tensorrt_bindings")
MISSING_MODULES = frozenset({"tensorrt_libs"})
MARKER = ".tensorrt-stubs-version"

_KEYWORD_PARAM = re.compile(r"([(,]\s*)(" + "|".join(sorted(keyword.kwlist, key=len, reverse=True)) + r")(?=\s*[:=,)])")
_DEF = re.compile(r"^(\s*(?:async\s+)?def\s+\w+\s*\()(.*)(\)\s*(?:->.*)?:.*)$", re.DOTALL)


class StubError(Exception):
    """A stub cannot be repaired or a wheel does not hold the expected stubs."""


@dataclass(frozen=True)
class Change:
    """One repaired line: 1-based line number in the original text, before, after, and why."""

    line: int
    before: str
    after: str
    why: str


def sanitize_stub(text: str, missing_modules: frozenset[str] = MISSING_MODULES) -> tuple[str, list[Change]]:
    """Return `text` repaired so that `ast.parse` accepts it, and the list of changed lines.

    Pure: text in, text out. Lines are found by parsing with `ast` and fixed one syntax error at a
    time; then imports of `missing_modules` are replaced. Raises StubError for a syntax error that
    none of the repairs fixes. Valid stubs come back unchanged with no changes listed.
    """
    lines = text.splitlines(keepends=True)
    changes: list[Change] = []
    while True:
        try:
            tree = ast.parse("".join(lines))
            break
        except SyntaxError as err:
            index = (err.lineno or 1) - 1
            before = lines[index] if index < len(lines) else ""
            fixed, why = _fix_line(before)
            if fixed == before:
                raise StubError(f"line {index + 1}: {err.msg}: no repair applies to {before.strip()!r}") from None
            lines[index] = fixed
            changes.append(Change(index + 1, before.rstrip("\n"), fixed.rstrip("\n"), why))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in missing_modules for a in node.names):
            index = node.lineno - 1
            before = lines[index]
            indent = before[: len(before) - len(before.lstrip())]
            names = [a.asname or a.name.split(".")[0] for a in node.names]
            fixed = f"{indent}import types as _types\n" + "".join(f"{indent}{n}: _types.ModuleType\n" for n in names)
            lines[index] = fixed
            changes.append(Change(index + 1, before.rstrip("\n"), fixed.rstrip("\n"),
                                  f"no stub provides {', '.join(a.name for a in node.names)}"))
    result = "".join(lines)
    ast.parse(result)
    return result, changes


def _fix_line(line: str) -> tuple[str, str]:
    """Apply the known repairs to one `def` line; return (line, reason) (unchanged if none apply)."""
    match = _DEF.match(line)
    if match is None:
        return line, ""
    head, params, tail = match.groups()
    reasons = []
    renamed = _KEYWORD_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}_", "(" + params)[1:]
    if renamed != params:
        reasons.append("parameter named after a keyword renamed")
        params = renamed
    parts = _split_params(params)
    seen_default = False
    for i, part in enumerate(parts):
        bare = part.strip()
        if bare in ("*", "/") or bare.startswith("*"):
            if bare != "/":
                break
            continue
        if "=" in _strip_annotation_brackets(bare):
            seen_default = True
        elif seen_default and bare:
            parts[i] = f"{part.rstrip()} = ..."
            reasons.append(f"required parameter '{bare.split(':')[0].strip()}' after defaults given '= ...'")
    return head + ",".join(parts) + tail, "; ".join(reasons)


def _split_params(params: str) -> list[str]:
    """Split a parameter list at top-level commas (brackets in annotations kept together)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    parts.append(params[start:])
    return parts


def _strip_annotation_brackets(param: str) -> str:
    """The parameter with bracketed parts removed, so `=` inside annotations is not a default."""
    out, depth = [], 0
    for ch in param:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def extract_stubs(wheel: Path, dest: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Change]]:
    """Write the sanitised `.pyi` files of `packages` from `wheel` under `dest` (replacing any
    previous copy) and return the changes made per file. Raises StubError when the wheel lacks
    one of the packages or holds a path outside them."""
    changes: dict[str, list[Change]] = {}
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".pyi") and n.split("/")[0] in packages]
        for name in members:
            if name.startswith("/") or ".." in name.split("/"):
                raise StubError(f"{wheel}: unsafe member path {name!r}")
        missing = [p for p in packages if not any(n.startswith(p + "/") for n in members)]
        if missing:
            raise StubError(f"{wheel} holds no .pyi files for {', '.join(missing)}")
        staging = Path(tempfile.mkdtemp(prefix=".typings.", dir=dest.parent if dest.parent.exists() else None))
        try:
            for name in members:
                text, file_changes = sanitize_stub(zf.read(name).decode("utf-8"))
                if file_changes:
                    changes[name] = file_changes
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            dest.mkdir(parents=True, exist_ok=True)
            for package in packages:
                shutil.rmtree(dest / package, ignore_errors=True)
                shutil.move(str(staging / package), str(dest / package))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return changes


def download_wheel(version: str, folder: Path) -> Path:
    """`pip download --no-deps` the tensorrt-stubs wheel into `folder` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(folder), f"tensorrt-stubs=={version}"]
    subprocess.run(cmd, check=True)
    wheels = sorted(folder.glob("tensorrt_stubs-*.whl"))
    if not wheels:
        raise StubError(f"pip download left no tensorrt_stubs wheel in {folder}")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints what was extracted and every repaired line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a tensorrt_stubs wheel (default: pip download it)")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent.parent / "typings")
    parser.add_argument("--version", default=STUBS_VERSION)
    parser.add_argument("--force", action="store_true", help="extract again even if the version is in place")
    args = parser.parse_args(argv)
    marker = args.dest / MARKER
    present = all((args.dest / p).is_dir() for p in PACKAGES)
    if not args.force and args.wheel is None and present and marker.is_file() \
            and marker.read_text().strip() == args.version:
        print(f"tensorrt-stubs {args.version} already in {args.dest}")
        return 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = args.wheel or download_wheel(args.version, Path(tmp))
            changes = extract_stubs(wheel, args.dest)
    except (StubError, subprocess.CalledProcessError, zipfile.BadZipFile, OSError) as exc:
        print(f"trt_typings: {exc}", file=sys.stderr)
        return 1
    version = args.version if args.wheel is None else wheel.name.split("-")[1]
    marker.write_text(version + "\n")
    print(f"tensorrt-stubs {version}: {', '.join(PACKAGES)} stubs extracted to {args.dest}")
    for name, file_changes in sorted(changes.items()):
        for c in file_changes:
            after = c.after.strip().replace("\n", "\n      ")
            print(f"  {name}:{c.line}: {c.why}\n    - {c.before.strip()}\n    + {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
