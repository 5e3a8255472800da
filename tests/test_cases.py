"""Tests for harness/cases.py: strict case YAML, errors naming file/line/key, profiles, schema."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.backends.registry import known_backends
from harness.cases import DEFAULT_PROFILE, deep_merge, find_root, json_schema, load_case
from harness.errors import CaseError

FACTORY_MODULE = "qh_test_case_factories"

BASE = """\
name: tiny
description: a small case
task: tensors
model:
  factory: qh_test_case_factories:make_model
  args: {width: 4}
data:
  factory: qh_test_case_factories:Data
  args:
    size: 2
    seed: 7
golden: golden/tiny
metric:
  name: miou
  float_min: 0.5
backends:
  torch-fp32:
    compare:
      atol: 1.0e-5
      rtol: 1.0e-4
      outputs:
        logits: {cosine_min: 0.999}
  ort-fp32:
    compare: {cosine_min: 0.99}
    metric: {min_ratio: 0.99}
profiles:
  fast:
    data:
      args: {size: 1}
    backends:
      torch-fp32:
        compare: {atol: 1.0e-3}
  own-golden:
    golden: {dir: golden/elsewhere, samples: 2}
"""


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("factories")
    (folder / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent("""\
        NOT_CALLABLE = 3


        def make_model(width=1):
            return ("model", width)


        class Data:
            def __init__(self, size=1, seed=0):
                self.size = size
        """))
    return folder


@pytest.fixture
def root(tmp_path: Path, factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(factory_dir))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    yield tmp_path
    sys.modules.pop(FACTORY_MODULE, None)


def write_case(root: Path, text: str, name: str = "tiny.yaml") -> Path:
    path = root / "cases" / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the `occurrence`-th line containing `needle`."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[occurrence - 1]


def case_error(root: Path, text: str, **kwargs: Any) -> CaseError:
    path = write_case(root, text)
    with pytest.raises(CaseError) as info:
        load_case(path, **kwargs)
    err = info.value
    assert err.path == path
    assert str(err).startswith(f"{path}:{err.line}: " if err.line else f"{path}: ")
    return err


# --- a valid case ---

def test_valid_case_loads(root: Path) -> None:
    path = write_case(root, BASE)
    case = load_case(path)
    assert case.name == "tiny"
    assert case.root == root
    assert case.profile == DEFAULT_PROFILE
    assert case.golden_dir == root / "golden" / "tiny"
    assert case.checkpoint is None
    s = case.spec
    assert s.model.args == {"width": 4} and s.model.seed == 0
    assert s.data.args == {"size": 2, "seed": 7} and s.data.batch_size == 4
    assert s.golden.samples == 1
    assert list(s.backends) == ["torch-fp32", "ort-fp32"]
    tf = s.backends["torch-fp32"].compare
    assert (tf.atol, tf.rtol, tf.max_mismatch) == (1e-5, 1e-4, 0.0)
    assert tf.outputs["logits"].cosine_min == 0.999
    assert s.backends["ort-fp32"].metric is not None and s.backends["ort-fp32"].metric.min_ratio == 0.99
    assert s.metric is not None and s.metric.float_min == 0.5
    assert s.quant.activations.calibrator == "histogram" and s.quant.weights.per_channel
    assert case.line_of("backends", "ort-fp32") == line_of(BASE, "ort-fp32:")
    assert case.line_of("data", "args", "seed") == line_of(BASE, "seed: 7")
    assert case.line_of("data", "args", "nonexistent") == line_of(BASE, "args:", 2)
    assert case.line_of("nonexistent") is None
    err = case.error("bad value", "data", "args", "seed")
    assert (err.line, err.key) == (line_of(BASE, "seed: 7"), "data.args.seed")


def test_checkpoint_resolved_against_root(root: Path) -> None:
    (root / "golden").mkdir()
    (root / "golden" / "w.pt").write_bytes(b"x")
    text = BASE.replace("  args: {width: 4}", "  args: {width: 4}\n  checkpoint: golden/w.pt")
    case = load_case(write_case(root, text))
    assert case.checkpoint == root / "golden" / "w.pt"
    absolute = BASE.replace("  args: {width: 4}", f"  args: {{width: 4}}\n  checkpoint: {root / 'golden' / 'w.pt'}")
    assert load_case(write_case(root, absolute)).checkpoint == root / "golden" / "w.pt"


def test_root_is_found_from_project_marker(root: Path) -> None:
    nested = root / "cases" / "deep"
    nested.mkdir()
    path = write_case(root, BASE, "deep/tiny.yaml")
    assert find_root(path) == root
    assert load_case(path).golden_dir == root / "golden" / "tiny"
    other = root / "elsewhere"
    assert load_case(path, root=other).golden_dir == other / "golden" / "tiny"


def test_golden_string_shorthand_and_mapping(root: Path) -> None:
    short = load_case(write_case(root, BASE)).spec.golden
    long = load_case(write_case(root, BASE.replace("golden: golden/tiny", "golden: {dir: golden/tiny}"))).spec.golden
    assert short == long
    assert (short.dir, short.samples) == ("golden/tiny", 1)


# --- bad input: each a CaseError naming file, line and key ---

def test_malformed_yaml(root: Path) -> None:
    text = BASE.replace("  args: {width: 4}", "  args: {width: 4")
    err = case_error(root, text)
    assert "malformed YAML" in str(err)
    assert err.line is not None and line_of(text, "args: {width: 4") <= err.line <= line_of(text, "data:") + 1


def test_tab_indentation_is_malformed(root: Path) -> None:
    err = case_error(root, BASE.replace("  factory: qh_test_case_factories:make_model", "\tfactory: x:y"))
    assert "malformed YAML" in str(err) and err.line == line_of(BASE, "make_model")


@pytest.mark.parametrize(
    ("needle", "duplicate", "key"),
    [("task: tensors", "task: again", "task"),
     ("  args: {width: 4}", "  args: {width: 5}", "model.args"),
     ("      rtol: 1.0e-4", "      rtol: 2.0e-4", "backends.torch-fp32.compare.rtol"),
     ("  args: {width: 4}", "  args: {width: 4, width: 5}", "model.args.width")],
)
def test_duplicate_key(root: Path, needle: str, duplicate: str, key: str) -> None:
    text = BASE.replace(needle, duplicate) if "width: 4, width" in duplicate else BASE.replace(needle, f"{needle}\n{duplicate}")
    err = case_error(root, text)
    assert err.key == key
    assert err.line == line_of(text, duplicate)
    assert "duplicate key" in str(err)


@pytest.mark.parametrize(
    ("after", "insert", "key"),
    [("task: tensors", "colour: red", "colour"),
     ("  args: {width: 4}", "  weights: model.pt", "model.weights"),
     ("    compare: {cosine_min: 0.99}", "    bogus: 1", "backends.ort-fp32.bogus"),
     ("      rtol: 1.0e-4", "      rtoll: 1.0e-4", "backends.torch-fp32.compare.rtoll"),
     ("        logits: {cosine_min: 0.999}", "        other: {cosin_min: 0.9}", "backends.torch-fp32.compare.outputs.other.cosin_min"),
     ("  float_min: 0.5", "  floor: 0.5", "metric.floor")],
)
def test_unknown_key_at_several_depths(root: Path, after: str, insert: str, key: str) -> None:
    text = BASE.replace(after, f"{after}\n{insert}", 1)
    err = case_error(root, text)
    assert err.key == key
    assert err.line == line_of(text, insert)
    assert err.detail == "unknown key"
    assert f"key '{key}': unknown key" in str(err)


def test_unknown_key_in_quant_section(root: Path) -> None:
    text = BASE + "quant:\n  activations:\n    calibrator: max\n    bins: 10\n"
    err = case_error(root, text)
    assert (err.key, err.line, err.detail) == ("quant.activations.bins", line_of(text, "bins: 10"), "unknown key")


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [("      atol: 1.0e-5", "      atol: big", "backends.torch-fp32.compare.atol", "number"),
     ("      atol: 1.0e-5", "      atol: -1.0", "backends.torch-fp32.compare.atol", "greater than or equal to 0"),
     ("    seed: 7", "    seed: 7\n  batch_size: many", "data.batch_size", "integer"),
     ("  float_min: 0.5", "  float_min: high", "metric.float_min", "number"),
     ("  float_min: 0.5", "  float_min: {miou: high}", "metric.float_min", "number"),
     ("name: tiny", "name: [tiny]", "name", "string"),
     ("name: tiny", "name: 'bad name!'", "name", "pattern"),
     ("golden: golden/tiny", "golden: {dir: golden/tiny, samples: 0}", "golden.samples", "greater than or equal to 1"),
     ("  args: {width: 4}", "  args: [4]", "model.args", "dictionary")],
)
def test_wrong_type(root: Path, old: str, new: str, key: str, fragment: str) -> None:
    text = BASE.replace(old, new)
    err = case_error(root, text)
    assert err.key == key
    assert err.line == line_of(text, new.splitlines()[-1].strip())
    assert fragment in err.detail


def test_union_errors_name_the_inner_key(root: Path) -> None:
    err = case_error(root, BASE.replace("  float_min: 0.5", "  float_min: {miou: high}"))
    assert "key 'metric.float_min.miou'" in str(err)


def test_several_errors_are_all_listed(root: Path) -> None:
    text = BASE.replace("      atol: 1.0e-5", "      atol: big").replace("task: tensors", "task: tensors\ncolour: red")
    err = case_error(root, text)
    assert "(and 1 more)" in str(err)
    assert f"line {line_of(text, 'colour')}: key 'colour': unknown key" in str(err)
    assert f"line {line_of(text, 'atol: big')}: key 'backends.torch-fp32.compare.atol'" in str(err)


def test_missing_required_key(root: Path) -> None:
    err = case_error(root, BASE.replace("task: tensors\n", ""))
    assert (err.key, err.detail) == ("task", "required key is missing")
    text = BASE.replace("  factory: qh_test_case_factories:Data\n", "")
    err = case_error(root, text)
    assert (err.key, err.detail) == ("data.factory", "required key is missing")
    assert err.line == line_of(text, "data:")


def test_missing_checkpoint(root: Path) -> None:
    text = BASE.replace("  args: {width: 4}", "  args: {width: 4}\n  checkpoint: golden/absent.pt")
    err = case_error(root, text)
    assert err.key == "model.checkpoint"
    assert err.line == line_of(text, "checkpoint:")
    assert str(root / "golden" / "absent.pt") in str(err) and "does not exist" in str(err)


def test_unknown_backend_lists_known_ones(root: Path) -> None:
    text = BASE.replace("  ort-fp32:", "  ort-fp64:")
    err = case_error(root, text)
    assert err.key == "backends.ort-fp64"
    assert err.line == line_of(text, "ort-fp64:")
    assert "unknown backend 'ort-fp64'" in err.detail
    for name in known_backends():
        assert name in err.detail


def test_unknown_backend_added_by_a_profile(root: Path) -> None:
    text = BASE.replace("        compare: {atol: 1.0e-3}", "        compare: {atol: 1.0e-3}\n      trt-fp64: {}")
    assert load_case(write_case(root, text)).name == "tiny"
    err = case_error(root, text, profile="fast")
    assert (err.key, err.line) == ("backends.trt-fp64", line_of(text, "trt-fp64"))


def test_empty_backends(root: Path) -> None:
    text = BASE.split("backends:")[0] + "backends: {}\n"
    err = case_error(root, text)
    assert err.key == "backends" and "at least one backend" in err.detail


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [("qh_no_such_module_anywhere:make", "cannot import module 'qh_no_such_module_anywhere'"),
     ("qh_test_case_factories:make_modle", "has no attribute 'make_modle'"),
     ("qh_test_case_factories:NOT_CALLABLE", "not callable"),
     ("qh_test_case_factories.make_model", "not of the form 'package.module:callable'")],
)
def test_unknown_factory(root: Path, factory: str, fragment: str) -> None:
    text = BASE.replace("qh_test_case_factories:make_model", factory)
    err = case_error(root, text)
    assert err.key == "model.factory"
    assert err.line == line_of(text, factory)
    assert fragment in err.detail


@pytest.mark.parametrize(
    ("quantizer", "fragment"),
    [("qh_test_case_factories:quantize", "has no attribute 'quantize'"),
     ("qh_test_case_factories:NOT_CALLABLE", "not callable")],
)
def test_unknown_quantizer(root: Path, quantizer: str, fragment: str) -> None:
    text = BASE.replace("golden: golden/tiny\n", f"golden: golden/tiny\nquant:\n  quantizer: {quantizer}\n")
    err = case_error(root, text)
    assert (err.key, err.line) == ("quant.quantizer", line_of(text, "quantizer:"))
    assert fragment in err.detail


def test_task_args_enter_the_hash_only_when_set(root: Path) -> None:
    plain = load_case(write_case(root, BASE)).config_hash()
    assert load_case(write_case(root, BASE.replace("task: tensors", "task: tensors\ntask_args: {}"))).config_hash() == plain
    assert load_case(write_case(root, BASE.replace("task: tensors", "task: tensors\ntask_args: {a: 1}"))).config_hash() != plain


def test_unknown_data_factory(root: Path) -> None:
    text = BASE.replace("qh_test_case_factories:Data", "qh_test_case_factories:Dta")
    err = case_error(root, text)
    assert (err.key, err.line) == ("data.factory", line_of(text, ":Dta"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "empty"), ("# only a comment\n", "empty"), ("- a\n- b\n", "mapping"), ("just text\n", "mapping")],
)
def test_not_a_mapping(root: Path, text: str, fragment: str) -> None:
    err = case_error(root, text)
    assert fragment in str(err) and err.line == 1


def test_unreadable_case_file(root: Path) -> None:
    with pytest.raises(CaseError, match="cannot read case file"):
        load_case(root / "cases" / "absent.yaml")


def test_yaml_tags_beyond_safe_load_are_refused(root: Path) -> None:
    err = case_error(root, BASE.replace("task: tensors", "task: !!python/name:os.system ''"))
    assert "malformed YAML" in str(err)
    assert err.line == line_of(BASE, "task:")


# --- profiles ---

def test_profile_deep_merges(root: Path) -> None:
    path = write_case(root, BASE)
    case = load_case(path, profile="fast")
    assert case.profile == "fast"
    assert case.spec.data.args == {"size": 1, "seed": 7}
    tf = case.spec.backends["torch-fp32"].compare
    assert (tf.atol, tf.rtol) == (1e-3, 1e-4)
    assert tf.outputs["logits"].cosine_min == 0.999
    assert "ort-fp32" in case.spec.backends
    assert case.golden_dir == root / "golden" / "tiny" / "profile-fast"
    assert load_case(path).golden_dir == root / "golden" / "tiny"


def test_profile_setting_golden_keeps_its_folder(root: Path) -> None:
    case = load_case(write_case(root, BASE), profile="own-golden")
    assert case.golden_dir == root / "golden" / "elsewhere"
    assert case.spec.golden.samples == 2


def test_unknown_profile(root: Path) -> None:
    err = case_error(root, BASE, profile="slow")
    assert err.key == "profiles" and err.line == line_of(BASE, "profiles:")
    assert "profile 'slow' is not defined" in err.detail
    assert "default, fast, own-golden" in err.detail
    no_profiles = BASE.split("profiles:")[0]
    err = case_error(root, no_profiles, profile="fast")
    assert "known profiles: default" in err.detail


@pytest.mark.parametrize("forbidden", ["name", "profiles"])
def test_profile_cannot_change_name_or_profiles(root: Path, forbidden: str) -> None:
    text = BASE.replace("  fast:\n", f"  fast:\n    {forbidden}: other\n")
    err = case_error(root, text, profile="fast")
    assert err.key == f"profiles.fast.{forbidden}"
    assert err.line == line_of(text, f"    {forbidden}: other")
    # Other profiles are unaffected.
    assert load_case(write_case(root, text), profile="own-golden").name == "tiny"


def test_profile_must_be_a_mapping(root: Path) -> None:
    text = BASE + "  broken: 3\n"
    err = case_error(root, text, profile="broken")
    assert (err.key, err.line) == ("profiles.broken", line_of(text, "broken: 3"))


def test_profile_errors_point_at_the_profile_lines(root: Path) -> None:
    text = BASE.replace("        compare: {atol: 1.0e-3}", "        compare: {atol: 1.0e-3, bogus: 1}")
    assert load_case(write_case(root, text)).name == "tiny"  # the default profile does not use it
    err = case_error(root, text, profile="fast")
    assert err.key == "backends.torch-fp32.compare.bogus"
    assert err.line == line_of(text, "bogus: 1")
    text = BASE.replace("      args: {size: 1}", "      args: {size: 1}\n    model:\n      checkpoint: absent.pt")
    err = case_error(root, text, profile="fast")
    assert (err.key, err.line) == ("model.checkpoint", line_of(text, "checkpoint: absent.pt"))


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2], "f": 1}
    over = {"a": {"c": {"x": 3}}, "e": [3], "f": {"g": 1}}
    merged = deep_merge(base, over)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "x": 3}}, "e": [3], "f": {"g": 1}}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2], "f": 1}
    merged["a"]["c"]["x"] = 9
    assert over["a"]["c"]["x"] == 3


# --- config hash ---

@pytest.mark.parametrize(
    ("old", "new"),
    [("  args: {width: 4}", "  args: {width: 5}"),
     ("    seed: 7", "    seed: 8"),
     ("  args: {width: 4}", "  args: {width: 4}\n  seed: 3"),
     ("task: tensors", "task: segmentation"),
     ("qh_test_case_factories:Data", "qh_test_case_factories:make_model"),
     ("golden: golden/tiny", "golden: {dir: golden/tiny, samples: 3}"),
     ("profiles:", "stages:\n  head: {inputs: [x], outputs: [y]}\nprofiles:")],
)
def test_config_hash_changes_with_what_makes_goldens(root: Path, old: str, new: str) -> None:
    base = load_case(write_case(root, BASE)).config_hash()
    changed = load_case(write_case(root, BASE.replace(old, new, 1))).config_hash()
    assert changed != base
    assert re.fullmatch(r"[0-9a-f]{64}", base)


@pytest.mark.parametrize(
    ("old", "new"),
    [("      atol: 1.0e-5", "      atol: 1.0e-2"),
     ("    compare: {cosine_min: 0.99}", "    compare: {cosine_min: 0.5, snr_min_db: 20}"),
     ("    metric: {min_ratio: 0.99}", "    metric: {min_ratio: 0.5, max_drop: 0.1}"),
     ("  float_min: 0.5", "  float_min: 0.9"),
     ("description: a small case", "description: renamed"),
     ("  ort-fp32:", "  trt-int8: {compare: none}\n  ort-fp32:"),
     ("profiles:", "benchmark: {rounds: 3}\nquant: {calibration_batches: 2}\nprofiles:"),
     ("    seed: 7", "    seed: 7\n  calibration: {args: {size: 9}}\n  batch_size: 1")],
)
def test_config_hash_ignores_tolerances_gates_and_backends(root: Path, old: str, new: str) -> None:
    base = load_case(write_case(root, BASE)).config_hash()
    text = BASE.replace(old, new, 1)
    assert text != BASE
    assert load_case(write_case(root, text)).config_hash() == base


def test_config_hash_ignores_key_order(root: Path) -> None:
    base = load_case(write_case(root, BASE)).config_hash()
    swapped = BASE.replace("    size: 2\n    seed: 7", "    seed: 7\n    size: 2")
    assert load_case(write_case(root, swapped)).config_hash() == base


# --- JSON Schema ---

def _validate(instance: Any, schema: dict[str, Any], defs: dict[str, Any], where: str = "$") -> list[str]:
    """A small JSON Schema (2020-12 subset used by pydantic) validator; returns the violations."""
    if "$ref" in schema:
        return _validate(instance, defs[schema["$ref"].split("/")[-1]], defs, where)
    if "anyOf" in schema:
        results = [_validate(instance, s, defs, where) for s in schema["anyOf"]]
        return [] if any(not r for r in results) else [f"{where}: matches no anyOf branch"]
    errors: list[str] = []
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    kind = schema.get("type")
    if kind in types and not isinstance(instance, types[kind]):
        return [f"{where}: not {kind}"]
    if kind in ("number", "integer"):
        ok = isinstance(instance, int if kind == "integer" else (int, float)) and not isinstance(instance, bool)
        if not ok:
            return [f"{where}: not {kind}"]
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{where}: below minimum")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{where}: above maximum")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{where}: not above exclusiveMinimum")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: not in enum")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{where}: not const")
    if "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{where}: does not match pattern")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in instance]
        for key, value in instance.items():
            if "propertyNames" in schema:
                errors += _validate(key, schema["propertyNames"], defs, f"{where}.<{key}>")
            if key in props:
                errors += _validate(value, props[key], defs, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unknown key {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(value, schema["additionalProperties"], defs, f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += _validate(item, schema["items"], defs, f"{where}[{i}]")
    return errors


def test_json_schema_is_json_and_lists_backends() -> None:
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "qharness case"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "task", "model", "data", "golden", "backends"}
    assert schema["properties"]["backends"]["propertyNames"]["enum"] == list(known_backends())
    compare = schema["$defs"]["BackendSpec"]["properties"]["compare"]
    assert not _validate("none", compare, schema["$defs"]) and _validate("nothing", compare, schema["$defs"])
    # Every $ref resolves.
    refs = re.findall(r'"\$ref": "#/\$defs/(\w+)"', json.dumps(schema))
    assert refs and all(ref in schema["$defs"] for ref in refs)


def test_json_schema_accepts_valid_cases_and_rejects_invalid_ones() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    case = yaml.safe_load(BASE)
    assert _validate(case, schema, defs) == []
    assert _validate(deep_merge(case, {"golden": {"dir": "g", "samples": 2}}), schema, defs) == []
    bad = [
        deep_merge(case, {"colour": "red"}),
        deep_merge(case, {"backends": {"ort-fp64": {}}}),
        deep_merge(case, {"backends": {"torch-fp32": {"compare": {"atol": "big"}}}}),
        deep_merge(case, {"backends": {"torch-fp32": {"compare": {"rtoll": 1}}}}),
        deep_merge(case, {"golden": {"samples": 0}}),
        deep_merge(case, {"name": "bad name"}),
        {k: v for k, v in case.items() if k != "task"},
    ]
    for instance in bad:
        assert _validate(instance, schema, defs), instance


def test_json_schema_for_the_design_sketch_case() -> None:
    sketch = yaml.safe_load("""\
name: pidnet-s
task: segmentation
model:
  factory: harness.zoo.pidnet:pidnet_s
  args: {num_classes: 19}
  checkpoint: golden/pidnet-s/model.pt
data:
  factory: harness.datasets.roads:RoadScenes
  args: {split: val, size: 32, height: 256, width: 512, seed: 7}
  calibration: {args: {split: train, size: 16}}
golden: golden/pidnet-s
quant:
  activations: {calibrator: histogram, method: percentile, percentile: 99.99}
  weights: {per_channel: true}
  keep_float: ["final_layer.conv2"]
metric: {name: miou, args: {num_classes: 19, ignore_index: 255}, float_min: 0.70}
backends:
  torch-fp32:     {compare: {atol: 1.0e-5, rtol: 1.0e-4}}
  fakequant-int8: {compare: {cosine_min: 0.99}, metric: {min_ratio: 0.99}}
  ort-int8:       {compare: {cosine_min: 0.99}, metric: {min_ratio: 0.99}}
  trt-int8:       {compare: {cosine_min: 0.99}, metric: {min_ratio: 0.99}}
benchmark: {warmup: 10, rounds: 50}
""")
    schema = json_schema()
    assert _validate(sketch, schema, schema["$defs"]) == []


def test_high_precision_only_on_trt_int8(root: Path) -> None:
    text = BASE.replace("  ort-fp32:\n", "  trt-int8: {high_precision: fp32, compare: {cosine_min: 0.99}}\n  ort-fp32:\n")
    assert load_case(write_case(root, text)).spec.backends["trt-int8"].high_precision == "fp32"
    err = case_error(root, BASE.replace("    compare: {cosine_min: 0.99}\n", "    compare: {cosine_min: 0.99}\n    high_precision: fp16\n"))
    assert "backends.ort-fp32.high_precision" in str(err) and "only trt-int8" in str(err)
    err = case_error(root, text.replace("high_precision: fp32", "high_precision: int4"))
    assert err.key == "backends.trt-int8.high_precision"
