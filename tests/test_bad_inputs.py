"""The bad-input corpus of issue 14: every hostile or broken input gives a clear error naming the
culprit (file, key, tensor, field) or a correct verdict, never a crash, a silent pass or a lost
golden set.

Sections: tensor files, case files, golden folders (plus the kill and full-disk tests of the golden
lifecycle), locks, the cache, and `qharness compare`. Static inputs live in tests/corpus/.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from harness import tensorfile
from harness.cache import Cache
from harness.cases import load_case
from harness.cli import main
from harness.errors import CaseError, GoldenError, HarnessError, TensorFileError
from harness.golden import GoldenStore
from harness.locks import lock_for

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "corpus"
HINT = "pytest cases/corpus.yaml --update-golden"


def _writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("golden_writer", CORPUS / "golden_writer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WRITER = _writer()


# --- tensor files -------------------------------------------------------------------------------

def _tensor(ndim: int = 1, code: int = 3, dims: tuple[int, ...] = (2,), payload: bytes = b"\0" * 8,
            magic: int = 0x33FF1101) -> bytes:
    return struct.pack("<iii", magic, ndim, code) + struct.pack(f"<{len(dims)}i", *dims) + payload


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


TENSOR_CORPUS: list[tuple[str, str, bytes | None, str | None, str]] = [
    # (id, file name, bytes (None: a static corpus file of that name), field, message fragment)
    ("empty", "e.tensor", b"", "header", "shorter than the 12-byte header"),
    ("short-header", "s.tensor", b"\x01\x11\xff\x33\x01", "header", "shorter than the 12-byte header"),
    ("bad-magic", "m.tensor", _tensor(magic=0x12345678), "magic", "expected 0x33FF1101"),
    ("ndim-0", "n0.tensor", _tensor(ndim=0, dims=()), "ndim", "ndim is 0"),
    ("ndim-17", "n17.tensor", _tensor(ndim=17, dims=(1,) * 17, payload=b"\0" * 4), "ndim", "ndim is 17"),
    ("negative-ndim", "nn.tensor", _tensor(ndim=-1, dims=()), "ndim", "ndim is -1"),
    ("dtype-code-11", "d.tensor", _tensor(code=11), "dtype", "dtype code is 11"),
    ("dtype-code-0", "d0.tensor", _tensor(code=0), "dtype", "dtype code is 0"),
    ("dims-cut", "dc.tensor", _tensor(ndim=3, dims=(2,), payload=b""), "dims", "file ends inside the 3 dims"),
    ("negative-dim", "nd.tensor", _tensor(ndim=2, dims=(2, -4)), "dims", "negative dimension"),
    ("dims-near-2^31", "huge_dims.tensor", None, "data", "needs 18446744056529682436 payload bytes, file holds 16"),
    ("one-dim-2^31-1", "big1.tensor", _tensor(dims=(2**31 - 1,)), "data", "needs 8589934588 payload bytes"),
    ("payload-short", "ps.tensor", _tensor(dims=(3,)), "data", "needs 12 payload bytes, file holds 8"),
    ("trailing-bytes", "tb.tensor", _tensor(payload=b"\0" * 12), "data", "4 bytes after the payload"),
    ("npy-TiB-header", "tib_header.npy", None, "data", "needs 4398046511104 payload bytes, file holds 16"),
    ("npz-as-npy", "npz_as.npy", None, "magic", "is a zip archive (.npz)"),
    ("pickled-object-npy", "pickled_object.npy", None, "dtype", "object arrays need pickle"),
    ("structured-npy", "st.npy", _npy(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])), "dtype",
     "not a plain numeric dtype"),
    ("complex-npy", "c.npy", _npy(np.zeros(2, np.complex64)), "dtype", "not a plain numeric dtype"),
    ("string-npy", "u.npy", _npy(np.array(["a", "b"])), "dtype", "not a plain numeric dtype"),
    ("npy-garbage-header", "g.npy", b"\x93NUMPY\x01\x00\x10\x00{garbage}      \n", "header", "not a valid .npy"),
    ("npy-bad-magic", "bm.npy", b"NUMPY\x93" + b"\0" * 20, "magic", "not a valid .npy file: magic is"),
    ("npy-truncated", "t.npy", _npy(np.arange(8, dtype=np.float32))[:-5], "data", "needs 32 payload bytes"),
    ("npy-trailing", "tr.npy", _npy(np.arange(2, dtype=np.float32)) + b"xx", "data", "2 bytes after the payload"),
    ("npy-empty", "em.npy", b"", "magic", "not a valid .npy file"),
    ("npy-shape-TiB-tiny-file", "s2.npy", _npy_header((1 << 20, 1 << 20)) + b"\0" * 4, "data",
     "needs 4398046511104 payload bytes"),
]


@pytest.mark.parametrize(("name", "data", "field", "fragment"), [c[1:] for c in TENSOR_CORPUS],
                         ids=[c[0] for c in TENSOR_CORPUS])
def test_bad_tensor_file_is_named(tmp_path: Path, name: str, data: bytes | None, field: str | None,
                                  fragment: str) -> None:
    path = CORPUS / "tensors" / name if data is None else tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(TensorFileError) as info:
        tensorfile.load(path)
    assert info.value.path == path and info.value.field == field
    assert str(info.value).startswith(f"{path} [{field}]: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_tensor_file_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.tensor"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(TensorFileError, match=r"cannot read") as info:
        tensorfile.load(path)
    assert info.value.path == path


# --- case files ---------------------------------------------------------------------------------

BASE = """\
name: corpus
task: tensors
model:
  factory: "qh_corpus_factories:make"
  args: {width: 4}
data:
  factory: "qh_corpus_factories:make"
  args: {size: 2}
  batch_size: 2
golden: golden/corpus
quant:
  activations: {num_bins: 2048}
  calibration_batches: 2
  calibration_batch_size: 2
metric: {name: miou, float_min: 0.5}
benchmark: {warmup: 1, rounds: 5, batch_size: 1}
backends:
  torch-fp32: {compare: {atol: 1.0e-5, rtol: 1.0e-4}}
  ort-int8: {compare: {cosine_min: 0.99}, metric: {min_ratio: 0.99}, fidelity: {reference: fakequant-int8}}
"""

FP32 = "{compare: {atol: 1.0e-5, rtol: 1.0e-4}}"

CASE_CORPUS: list[tuple[str, str, str, str, str]] = [
    # (id, text replaced, replacement, key named, message fragment)
    ("atol-inf", "atol: 1.0e-5", "atol: .inf", "backends.torch-fp32.compare.atol", "finite number"),
    ("atol-1e400", "atol: 1.0e-5", "atol: 1.0e+400", "backends.torch-fp32.compare.atol", "finite number"),
    ("atol-1e400-string", "atol: 1.0e-5", "atol: 1e400", "backends.torch-fp32.compare.atol", "finite number"),
    ("atol-nan", "atol: 1.0e-5", "atol: .nan", "backends.torch-fp32.compare.atol", "finite number"),
    ("atol-huge", "atol: 1.0e-5", "atol: 1.0e+9", "backends.torch-fp32.compare.atol", "less than or equal to"),
    ("atol-negative", "atol: 1.0e-5", "atol: -1.0", "backends.torch-fp32.compare.atol", "greater than or equal"),
    ("rtol-huge", "rtol: 1.0e-4", "rtol: 1.0e+6", "backends.torch-fp32.compare.rtol", "less than or equal to"),
    ("cosine-nan", "cosine_min: 0.99", "cosine_min: .nan", "backends.ort-int8.compare.cosine_min",
     "finite number"),
    ("cosine-2", "cosine_min: 0.99", "cosine_min: 2.0", "backends.ort-int8.compare.cosine_min",
     "less than or equal to 1"),
    ("snr-inf", "cosine_min: 0.99", "snr_min_db: .inf", "backends.ort-int8.compare.snr_min_db", "finite number"),
    ("max-mismatch-1.5", "rtol: 1.0e-4", "rtol: 1.0e-4, max_mismatch: 1.5",
     "backends.torch-fp32.compare.max_mismatch", "less than or equal to 1"),
    ("min-ratio-nan", "min_ratio: 0.99", "min_ratio: .nan", "backends.ort-int8.metric.min_ratio", "finite number"),
    ("float-min-inf", "float_min: 0.5", "float_min: .inf", "metric.float_min", "finite number"),
    ("rounds-1e9", "rounds: 5", "rounds: 1000000000", "benchmark.rounds", "less than or equal to 100000"),
    ("warmup-1e9", "warmup: 1", "warmup: 1000000000", "benchmark.warmup", "less than or equal to 100000"),
    ("bench-batch-1e6", "rounds: 5, batch_size: 1", "rounds: 5, batch_size: 1000000", "benchmark.batch_size",
     "less than or equal to 4096"),
    ("num-bins-2^30", "num_bins: 2048", "num_bins: 1073741824", "quant.activations.num_bins",
     "less than or equal to 1048576"),
    ("calib-batches-1e9", "calibration_batches: 2", "calibration_batches: 1000000000",
     "quant.calibration_batches", "less than or equal to 100000"),
    ("calib-batch-size-1e6", "calibration_batch_size: 2", "calibration_batch_size: 1000000",
     "quant.calibration_batch_size", "less than or equal to 4096"),
    ("data-batch-1e6", "  batch_size: 2", "  batch_size: 1000000", "data.batch_size", "less than or equal to 4096"),
    ("golden-samples-1e6", "golden: golden/corpus", "golden: {dir: golden/corpus, samples: 1000000}",
     "golden.samples", "less than or equal to 4096"),
    ("no-compare-bound", f"torch-fp32: {FP32}", "torch-fp32: {}", "backends.torch-fp32", "compare: no bound"),
    ("only-max-mismatch", f"torch-fp32: {FP32}", "torch-fp32: {compare: {max_mismatch: 0.1}}",
     "backends.torch-fp32", "compare: no bound"),
    ("unbounded-output-override", f"torch-fp32: {FP32}",
     "torch-fp32: {compare: {atol: 1.0e-5, outputs: {logits: {max_mismatch: 0.5}}}}", "backends.torch-fp32",
     "compare.outputs.logits: no bound"),
    ("compare-none-with-atol", f"torch-fp32: {FP32}", "torch-fp32: {compare: {none: true, atol: 1.0}}",
     "backends.torch-fp32.compare", "'compare: none' cannot be combined"),
    ("compare-misspelt", f"torch-fp32: {FP32}", "torch-fp32: {compare: nothing}", "backends.torch-fp32.compare",
     "valid dictionary"),
    ("seed-2^70", "  args: {width: 4}", "  args: {width: 4}\n  seed: 1180591620717411303424", "model.seed",
     "less than or equal to 18446744073709551615"),
    ("golden-dotdot", "golden: golden/corpus", "golden: ../elsewhere", "golden.dir", "outside the project root"),
    ("golden-absolute", "golden: golden/corpus", "golden: /var/tmp/golden", "golden.dir",
     "outside the project root"),
    ("golden-sneaky-dotdot", "golden: golden/corpus", "golden: golden/../../x", "golden.dir",
     "outside the project root"),
    ("checkpoint-dotdot", "  args: {width: 4}", "  args: {width: 4}\n  checkpoint: ../w.pt", "model.checkpoint",
     "outside the project root"),
    ("model-path-arg", "args: {width: 4}", "args: {width: 4, weights_path: ../../etc/passwd}",
     "model.args.weights_path", "outside the project root"),
    ("data-dir-arg", "args: {size: 2}", "args: {size: 2, cache_dir: /etc}", "data.args.cache_dir",
     "outside the project root"),
    ("qat-backend-without-checkpoint", "  torch-fp32: {compare", "  qat-int8: {compare: {cosine_min: 0.9}}\n"
     "  torch-fp32: {compare", "backends.qat-int8", "set quant.qat.checkpoint"),
    ("qat-deploy-without-checkpoint", "  calibration_batches: 2\n", "  calibration_batches: 2\n  qat: {deploy: true}\n",
     "quant.qat", "deploy: true needs a checkpoint"),
    ("qat-checkpoint-dotdot", "  calibration_batches: 2\n", "  calibration_batches: 2\n  qat: {checkpoint: ../q.pt}\n",
     "quant.qat.checkpoint", "outside the project root"),
    ("qat-unknown-key", "  calibration_batches: 2\n", "  calibration_batches: 2\n  qat: {checkpoint: q.pt, lr: 1}\n",
     "quant.qat.lr", "unknown key"),
    ("int8-kernels-on-qat-export-vs-ptq", "  calibration_batch_size: 2\n",
     "  calibration_batch_size: 2\n  qat: {checkpoint: q.pt, deploy: true}\n", "backends.ort-int8.fidelity.reference",
     "compare it with qat-int8, not fakequant-int8"),
]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project root with a factory module the corpus cases name."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    (tmp_path / "qh_corpus_factories.py").write_text("def make(**kwargs):\n    return kwargs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("qh_corpus_factories", None)


def _case_error(path: Path, **kwargs: Any) -> CaseError:
    with pytest.raises(CaseError) as info:
        load_case(path, **kwargs)
    assert info.value.path == path and str(info.value).startswith(str(path))
    return info.value


def test_base_case_of_the_corpus_is_valid(project: Path) -> None:
    path = project / "cases" / "corpus.yaml"
    path.write_text(BASE)
    case = load_case(path)
    assert case.golden_dir == project / "golden" / "corpus"
    assert not case.spec.backends["torch-fp32"].compare.disabled


@pytest.mark.parametrize(("old", "new", "key", "fragment"), [c[1:] for c in CASE_CORPUS],
                         ids=[c[0] for c in CASE_CORPUS])
def test_bad_case_value_names_the_key(project: Path, old: str, new: str, key: str, fragment: str) -> None:
    assert old in BASE
    path = project / "cases" / "corpus.yaml"
    path.write_text(BASE.replace(old, new, 1))
    err = _case_error(path)
    assert err.key == key and fragment in err.detail
    assert err.line is not None and f"key '{key}'" in str(err)


def test_compare_none_is_a_disabled_compare(project: Path) -> None:
    path = project / "cases" / "corpus.yaml"
    path.write_text(BASE.replace(f"torch-fp32: {FP32}", "torch-fp32: {compare: none}"))
    spec = load_case(path).spec.backends["torch-fp32"].compare
    assert spec.disabled and spec.none and not spec.bounded


@pytest.mark.parametrize("golden", ["../elsewhere", "/var/tmp/golden-corpus"])
def test_outside_paths_load_when_enabled(project: Path, golden: str) -> None:
    path = project / "cases" / "corpus.yaml"
    path.write_text(BASE.replace("golden: golden/corpus", f"golden: {golden}"))
    case = load_case(path, allow_outside_root=True)
    assert os.path.normpath(case.golden_dir) == os.path.normpath(project / golden)


def test_absolute_path_inside_the_root_is_fine(project: Path) -> None:
    path = project / "cases" / "corpus.yaml"
    path.write_text(BASE.replace("golden: golden/corpus", f"golden: {project / 'golden' / 'abs'}"))
    assert load_case(path).golden_dir == project / "golden" / "abs"


YAML_CORPUS: list[tuple[str, str | None, str, int | None]] = [
    # (id, static corpus file (None: generated below), message fragment, line)
    ("alias-bomb", "alias_bomb.yaml", "expands to more than 100000 values", None),
    ("recursive-alias", "recursive_alias.yaml", "an alias that contains itself", None),
    ("deep-block-mapping", "deep_block.yaml", "nested deeper than 64 levels", None),
    ("latin-1", "latin1.yaml", "not UTF-8 text (byte 0xe9", 2),
    ("deep-flow-200", None, "nested deeper than 64 levels", None),
    ("deep-flow-20000", None, "YAML nested too deeply", None),
    ("utf-16", None, "not UTF-8 text", 1),
    ("nul-bytes", None, "malformed YAML", None),
    ("tab-indent", None, "malformed YAML", None),
    ("top-level-list", None, "must be a mapping at the top level", 1),
    ("empty", None, "the case file is empty", 1),
]


def _generated_yaml(name: str) -> bytes:
    head = BASE.replace("name: corpus\n", "")
    texts = {
        "deep-flow-200": "name: d\ntask_args: {x: " + "[" * 200 + "]" * 200 + "}\n" + head,
        "deep-flow-20000": "name: d\ntask_args: {x: " + "[" * 20000 + "]" * 20000 + "}\n" + head,
        "nul-bytes": "name: d\x00\n" + head,
        "tab-indent": "name: d\nmodel:\n\tfactory: x\n",
        "top-level-list": "- name: d\n",
        "empty": "# nothing\n",
    }
    if name == "utf-16":
        return ("name: d\n" + head).encode("utf-16")
    return texts[name].encode()


@pytest.mark.parametrize(("static", "fragment", "line"), [c[1:] for c in YAML_CORPUS],
                         ids=[c[0] for c in YAML_CORPUS])
def test_hostile_yaml_gives_a_case_error(project: Path, request: pytest.FixtureRequest, static: str | None,
                                         fragment: str, line: int | None) -> None:
    path = project / "cases" / "hostile.yaml"
    name = request.node.callspec.id
    path.write_bytes((CORPUS / "yaml" / static).read_bytes() if static else _generated_yaml(name))
    started = time.perf_counter()
    err = _case_error(path)
    assert fragment in err.detail
    if line is not None:
        assert err.line == line
    assert time.perf_counter() - started < 5


# --- golden folders -----------------------------------------------------------------------------

def _set(label: str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    rng = np.random.default_rng(ord(label))
    tensors = {"inputs": {"image": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)},
               "outputs": {"logits": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
                           "boxes": rng.standard_normal((5, 7)).astype(np.float32)}}
    return tensors, {"case": "corpus", "config_hash": label * 64, "checkpoint_sha256": None}


@pytest.fixture
def golden(tmp_path: Path) -> GoldenStore:
    """A valid golden set with a listed model file (anchors) and an unlisted checkpoint."""
    store = GoldenStore(tmp_path / "golden" / "corpus", HINT, lock_dir=tmp_path / "locks")
    store.dir.mkdir(parents=True)
    tensorfile.save(store.dir / "anchors.tensor", np.arange(6, dtype=np.float32))
    (store.dir / "model_fp16.pt").write_bytes(b"checkpoint bytes")
    store.write(*_set("a"))
    digest = hashlib.sha256((store.dir / "anchors.tensor").read_bytes()).hexdigest()
    store.update_meta(lambda m: m["files"].update({"anchors.tensor": digest}))
    return store


def _read_all(store: GoldenStore) -> None:
    meta = store.meta()
    for kind, names in (("inputs", ["image"]), ("outputs", ["logits", "boxes"])):
        for name in names:
            store.read(kind, name, meta)


def _edit_meta(store: GoldenStore, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(store.meta_path.read_text())
    change(meta)
    store.meta_path.write_text(json.dumps(meta))


def _replace_by_npy(path: Path) -> None:
    array = tensorfile.load(path)
    path.unlink()
    np.save(path.with_suffix(".npy"), array)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


GOLDEN_CORPUS: list[tuple[str, Callable[[GoldenStore], object], str]] = [
    # (id, tampering, fragment of the GoldenError (the path at fault is part of it))
    ("output-deleted", lambda s: (s.dir / "outputs/boxes.tensor").unlink(),
     "outputs/boxes.tensor is listed in"),
    ("npy-next-to-deleted-tensor", lambda s: _replace_by_npy(s.dir / "outputs/boxes.tensor"),
     "outputs/boxes.npy is not listed in"),
    ("unlisted-file-in-inputs", lambda s: (s.dir / "inputs/notes.txt").write_text("hi"),
     "inputs/notes.txt is not listed in"),
    ("unlisted-tensor-in-outputs", lambda s: tensorfile.save(s.dir / "outputs/extra.tensor", np.zeros(2, np.int32)),
     "outputs/extra.tensor is not listed in"),
    ("output-edited", lambda s: _flip_byte(s.dir / "outputs/logits.tensor"),
     "outputs/logits.tensor does not match the sha256"),
    ("input-truncated", lambda s: (s.dir / "inputs/image.tensor").write_bytes(
        (s.dir / "inputs/image.tensor").read_bytes()[:-4]), "inputs/image.tensor does not match the sha256"),
    ("model-file-edited", lambda s: _flip_byte(s.dir / "anchors.tensor"), "anchors.tensor does not match the sha256"),
    ("model-file-deleted", lambda s: (s.dir / "anchors.tensor").unlink(), "anchors.tensor is listed in"),
    ("meta-lists-no-outputs", lambda s: _edit_meta(s, lambda m: m.update(
        files={k: v for k, v in m["files"].items() if not k.startswith("outputs/")})), "lists no output files"),
    ("meta-files-escape", lambda s: _edit_meta(s, lambda m: m["files"].update({"../../etc/passwd": "0" * 64})),
     "lists '../../etc/passwd', which is no file of a golden folder"),
    ("meta-files-not-a-mapping", lambda s: _edit_meta(s, lambda m: m.update(files=["outputs/logits.tensor"])),
     "'files' is not a mapping"),
    ("meta-not-json", lambda s: s.meta_path.write_text("{half"), "is not valid JSON"),
    ("meta-a-list", lambda s: s.meta_path.write_text("[1, 2]"), "has format 'list', expected 1"),
    ("meta-deleted", lambda s: s.meta_path.unlink(), "golden files are missing"),
]


@pytest.mark.parametrize(("tamper", "fragment"), [c[1:] for c in GOLDEN_CORPUS], ids=[c[0] for c in GOLDEN_CORPUS])
def test_tampered_golden_set_is_refused(golden: GoldenStore, tamper: Callable[[GoldenStore], object],
                                        fragment: str) -> None:
    _read_all(golden)
    tamper(golden)
    with pytest.raises(GoldenError) as info:
        _read_all(golden)
    assert fragment in str(info.value)
    assert str(info.value).rstrip().endswith(HINT)


def test_unlisted_top_level_checkpoint_is_allowed_and_carried(golden: GoldenStore) -> None:
    _read_all(golden)
    golden.write(*_set("b"))
    assert (golden.dir / "model_fp16.pt").read_bytes() == b"checkpoint bytes"
    assert "anchors.tensor" in golden.meta()["files"]
    _read_all(golden)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_reference_is_refused_unless_allowed(golden: GoldenStore, value: float) -> None:
    tensors, meta = _set("b")
    tensors["outputs"]["boxes"][2, 3] = value
    before = _snapshot(golden.dir)
    with pytest.raises(GoldenError, match=r"golden output 'boxes' has \d NaN and \d Inf values"):
        golden.write(tensors, meta)
    assert _snapshot(golden.dir) == before
    golden.write(tensors, meta, allow_nonfinite=True)
    assert golden.meta()["config_hash"] == "b" * 64


def test_folder_of_another_case_is_not_overwritten(golden: GoldenStore) -> None:
    tensors, meta = _set("b")
    before = _snapshot(golden.dir)
    with pytest.raises(GoldenError, match=r"belongs to case 'corpus', not 'intruder'"):
        golden.write(tensors, {**meta, "case": "intruder"})
    assert _snapshot(golden.dir) == before
    golden.write(tensors, {**meta, "case": "intruder"}, overwrite_other_case=True)
    assert golden.meta()["case"] == "intruder"


def test_folder_that_is_no_golden_folder_is_not_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    (folder / "package").mkdir(parents=True)
    (folder / "package" / "code.py").write_text("x = 1\n")
    store = GoldenStore(folder, HINT, lock_dir=tmp_path / "locks")
    with pytest.raises(GoldenError, match=r"no meta.json and holds folder 'package'"):
        store.write(*_set("a"))
    assert (folder / "package" / "code.py").read_text() == "x = 1\n"


def test_symlinked_golden_dir_stays_a_link_to_the_new_set(tmp_path: Path) -> None:
    (tmp_path / "big-disk" / "corpus").mkdir(parents=True)
    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / "corpus").symlink_to(tmp_path / "big-disk" / "corpus")
    store = GoldenStore(tmp_path / "golden" / "corpus", HINT, lock_dir=tmp_path / "locks")
    store.write(*_set("a"))
    store.write(*_set("b"))
    assert (tmp_path / "golden" / "corpus").is_symlink()
    assert sorted(p.name for p in (tmp_path / "big-disk").iterdir()) == ["corpus"]
    assert json.loads((tmp_path / "big-disk" / "corpus" / "meta.json").read_text())["config_hash"] == "b" * 64
    _read_all(store)


def test_golden_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "golden"
    path.write_text("not a folder")
    with pytest.raises(GoldenError, match=r"is a file"):
        GoldenStore(path, HINT, lock_dir=tmp_path / "locks").write(*_set("a"))
    assert path.read_text() == "not a folder"


def test_old_set_left_by_a_kill_between_the_renames_is_restored(golden: GoldenStore) -> None:
    before = _snapshot(golden.dir)
    golden.dir.rename(golden.dir.parent / ".corpus.old-99999")
    staged = golden.dir.parent / ".corpus.new-99999"
    staged.mkdir()
    (staged / "half.tensor").write_bytes(b"\0")
    fresh = GoldenStore(golden.dir, HINT, lock_dir=golden.lock_dir)
    assert fresh.exists()
    assert _snapshot(golden.dir) == before
    assert sorted(p.name for p in golden.dir.parent.iterdir()) == ["corpus"]


# --- the golden lifecycle under kill -9 and a full disk -----------------------------------------

def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _lifecycle_start(folder: Path, lock_dir: Path, elements: int) -> dict[str, str]:
    """Write generation A (with a listed model file and an unlisted checkpoint); its snapshot."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tensorfile.save(folder / "anchors.tensor", np.arange(64, dtype=np.float32))
    (folder / "model_fp16.pt").write_bytes(b"\1" * 4096)
    store = GoldenStore(folder, HINT, lock_dir=lock_dir)
    store.write(*WRITER.generation("a", elements))
    digest = hashlib.sha256((folder / "anchors.tensor").read_bytes()).hexdigest()
    store.update_meta(lambda m: m["files"].update({"anchors.tensor": digest}))
    return _snapshot(folder)


def _settled(folder: Path, lock_dir: Path, old: dict[str, str], new: dict[str, str]) -> str:
    """'old' or 'new' after a fresh store cleaned up; fails unless the folder holds exactly one
    complete, hash-verified set and no leftovers."""
    store = GoldenStore(folder, HINT, lock_dir=lock_dir)
    assert store.exists()
    store.verify(store.meta())
    state = _snapshot(folder)
    assert state in (old, new), "the folder holds neither the old nor the new complete set"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    return "old" if state == old else "new"


KILL_RUNS = 20


@pytest.mark.slow
def test_kill_9_during_golden_write_leaves_old_or_new_set(tmp_path: Path) -> None:
    folder, lock_dir = tmp_path / "golden" / "kill", tmp_path / "locks"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(CORPUS / "golden_writer.py"), str(folder), str(lock_dir), "b"]
    old = _lifecycle_start(folder, lock_dir, WRITER.ELEMENTS)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    write_s = float(finished.stdout.split()[-1])
    new = _snapshot(folder)
    assert new != old
    rng = random.Random(14)
    outcomes = {"old": 0, "new": 0}
    for _ in range(KILL_RUNS):
        _lifecycle_start(folder, lock_dir, WRITER.ELEMENTS)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.0, write_s * 1.2))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        outcomes[_settled(folder, lock_dir, old, new)] += 1
    print(f"kill test: {KILL_RUNS} runs, write {write_s:.3f} s, outcomes {outcomes}")
    assert sum(outcomes.values()) == KILL_RUNS


class _FullDisk:
    """Counts file-system writes (file writes, fsync, mkdir, link, rename, replace) and raises
    OSError(ENOSPC) at the k-th."""

    def __init__(self, k: int):
        self.k = k
        self.calls = 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.k:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _CountingFile:
    def __init__(self, raw: Any, disk: _FullDisk):
        self._raw = raw
        self._disk = disk

    def write(self, data: bytes) -> int:
        self._disk.tick()
        written: int = self._raw.write(data)
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


@contextmanager
def _full_disk_at(k: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FullDisk]:
    disk = _FullDisk(k)
    with monkeypatch.context() as patch:
        fdopen = os.fdopen
        patch.setattr(os, "fdopen", lambda *a, **kw: _CountingFile(fdopen(*a, **kw), disk))
        for name in ("fsync", "mkdir", "link", "rename", "replace"):
            real = getattr(os, name)

            def counted(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                disk.tick()
                return _real(*args, **kwargs)

            patch.setattr(os, name, counted)
        yield disk


@pytest.mark.slow
def test_full_disk_at_every_write_leaves_old_or_new_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, lock_dir = tmp_path / "golden" / "disk", tmp_path / "locks"
    elements = 256
    old = _lifecycle_start(folder, lock_dir, elements)
    GoldenStore(folder, HINT, lock_dir=lock_dir).write(*WRITER.generation("b", elements))
    new = _snapshot(folder)
    outcomes: dict[str, int] = {}
    k = 0
    while True:
        k += 1
        _lifecycle_start(folder, lock_dir, elements)
        store = GoldenStore(folder, HINT, lock_dir=lock_dir)
        with _full_disk_at(k, monkeypatch) as disk:
            try:
                store.write(*WRITER.generation("b", elements))
                raised = False
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                raised = True
        outcome = _settled(folder, lock_dir, old, new)
        if not raised:  # a failure absorbed on the way (an exist_ok mkdir, a link falling back to a copy)
            assert outcome == "new"
        if disk.calls < k:  # nothing failed: every write call of a whole run has been tried
            break
        label = f"{'raised' if raised else 'absorbed'} -> {outcome}"
        outcomes[label] = outcomes.get(label, 0) + 1
        assert k < 500
    print(f"full-disk test: ENOSPC at each of {k - 1} write calls, then a clean run; outcomes {outcomes}")
    assert outcomes["raised -> old"] > 0 and sum(outcomes.values()) == k - 1


# --- locks --------------------------------------------------------------------------------------

def test_lock_dir_is_private_and_used(tmp_path: Path) -> None:
    lock_dir = tmp_path / "cache" / "locks"
    store = GoldenStore(tmp_path / "golden" / "x", HINT, lock_dir=lock_dir)
    store.write(*_set("a"))
    assert lock_dir.stat().st_mode & 0o777 == 0o700
    assert [p.suffix for p in lock_dir.iterdir()] == [".lock"]


def test_cache_lock_dir_is_private_and_per_user(tmp_path: Path) -> None:
    folder = Cache(tmp_path / "cache").lock_dir
    assert folder == tmp_path / "cache" / f".locks-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700


def test_default_lock_dir_is_per_user(tmp_path: Path) -> None:
    lock = lock_for(tmp_path / "meta.json")
    folder = Path(lock.lock_file).parent
    assert folder.name == f"qharness-locks-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.getuid()


def test_symlinked_lock_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "locks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HarnessError, match=r"lock folder .*locks is not a plain folder \(a symlink\?\)"):
        GoldenStore(tmp_path / "golden" / "x", HINT, lock_dir=tmp_path / "locks").write(*_set("a"))


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a folder to another user")
def test_lock_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    (tmp_path / "locks").mkdir(mode=0o700)
    os.chown(tmp_path / "locks", 4242, 4242)
    with pytest.raises(HarnessError, match=r"belongs to uid 4242, not to you"):
        GoldenStore(tmp_path / "golden" / "x", HINT, lock_dir=tmp_path / "locks").write(*_set("a"))


def test_world_writable_lock_dir_of_ours_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks").chmod(0o777)
    GoldenStore(tmp_path / "golden" / "x", HINT, lock_dir=tmp_path / "locks").write(*_set("a"))
    assert (tmp_path / "locks").stat().st_mode & 0o777 == 0o700


# --- the cache ----------------------------------------------------------------------------------

KEY = "k" * 64


def _build(calls: list[int]) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        calls.append(1)
        (folder / "model.onnx").write_bytes(b"onnx" * 100)
        (folder / "sub").mkdir()
        (folder / "sub" / "engine.bin").write_bytes(b"engine" * 100)
    return build


CACHE_CORPUS: list[tuple[str, Callable[[Path], object], str]] = [
    ("truncated", lambda e: (e / "model.onnx").write_bytes(b"onnx"), "file model.onnx changed after it was built"),
    ("edited-same-size", lambda e: _flip_byte(e / "sub" / "engine.bin"),
     "file sub/engine.bin changed after it was built"),
    ("deleted", lambda e: (e / "model.onnx").unlink(), "file model.onnx was added or removed"),
    ("extra-file", lambda e: (e / "planted.so").write_bytes(b"x"), "file planted.so was added or removed"),
    ("manifest-corrupt", lambda e: (e / ".complete").write_text("{"), "its manifest is unreadable"),
    ("manifest-old-format", lambda e: (e / ".complete").write_text(KEY), "it was built by an older qharness"),
    ("manifest-without-files", lambda e: (e / ".complete").write_text('{"key": "k", "files": []}'),
     "its manifest lists no files"),
]


@pytest.mark.parametrize(("tamper", "reason"), [c[1:] for c in CACHE_CORPUS], ids=[c[0] for c in CACHE_CORPUS])
def test_tampered_cache_entry_is_rebuilt_with_a_warning(tmp_path: Path, tamper: Callable[[Path], object],
                                                        reason: str) -> None:
    cache, calls = Cache(tmp_path / "cache"), list[int]()
    entry = cache.entry("onnx", KEY, _build(calls))
    assert cache.entry("onnx", KEY, _build(calls)) == entry and len(calls) == 1
    tamper(entry)
    with pytest.warns(UserWarning, match=rf"qharness cache entry {entry} is unusable \({reason}"):
        assert cache.entry("onnx", KEY, _build(calls)) == entry
    assert len(calls) == 2
    assert (entry / "model.onnx").read_bytes() == b"onnx" * 100
    assert (entry / "sub" / "engine.bin").read_bytes() == b"engine" * 100


def test_hand_edited_cached_metric_is_recomputed(tmp_path: Path) -> None:
    cache, calls = Cache(tmp_path / "cache"), list[int]()

    def compute() -> dict[str, float]:
        calls.append(1)
        return {"miou": 0.5}

    assert cache.json_value("float-metric", KEY, compute) == {"miou": 0.5}
    value = next((tmp_path / "cache" / "float-metric").glob("*/value.json"))
    value.write_text(json.dumps({"value": {"miou": 0.99}}))
    with pytest.warns(UserWarning, match=r"float-metric/kkkk.* is unusable \(file value.json changed"):
        assert cache.json_value("float-metric", KEY, compute) == {"miou": 0.5}
    assert len(calls) == 2


@pytest.mark.parametrize("layout", ["root-is-a-file", "root-under-a-file"])
def test_cache_folder_that_is_a_file_is_named(tmp_path: Path, layout: str) -> None:
    (tmp_path / "cachefile").write_text("")
    root = tmp_path / "cachefile" if layout == "root-is-a-file" else tmp_path / "cachefile" / "sub"
    with pytest.raises(HarnessError, match=r"qharness cache folder .*cachefile.* (is a file|is not writable)"
                                           r".*--qharness-cache"):
        Cache(root).entry("onnx", KEY, _build([]))


def test_read_only_cache_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(HarnessError, match=r"cache folder .*ro-cache is not writable \(Permission denied\)"):
        Cache(tmp_path / "ro-cache").entry("onnx", KEY, _build([]))


# --- qharness compare ---------------------------------------------------------------------------

@pytest.fixture
def tensors(tmp_path: Path) -> Path:
    ref = np.linspace(1.0, 2.0, 8, dtype=np.float32).reshape(2, 4)
    tensorfile.save(tmp_path / "ref.tensor", ref)
    tensorfile.save(tmp_path / "same.tensor", ref)
    tensorfile.save(tmp_path / "flat.tensor", ref.reshape(8))
    tensorfile.save(tmp_path / "far.tensor", -ref)
    nan = ref.copy()
    nan[0, 1] = np.nan
    tensorfile.save(tmp_path / "nan.tensor", nan)
    tensorfile.save(tmp_path / "short.tensor", ref.reshape(8)[:7])
    (tmp_path / "npz.npy").write_bytes((CORPUS / "tensors" / "npz_as.npy").read_bytes())
    return tmp_path


CLI_CORPUS: list[tuple[str, list[str], int, str]] = [
    # (id, arguments after `compare`, exit status, fragment of stdout+stderr)
    ("max-mismatch-1.5", ["same", "ref", "--atol", "0.1", "--max-mismatch", "1.5"], 2, "1.5 is outside [0.0, 1.0]"),
    ("max-mismatch-negative", ["same", "ref", "--atol", "0.1", "--max-mismatch", "-0.1"], 2, "outside [0.0, 1.0]"),
    ("max-mismatch-alone", ["same", "ref", "--max-mismatch", "0.1"], 2, "--max-mismatch needs --atol or --rtol"),
    ("atol-nan", ["same", "ref", "--atol", "nan"], 2, "nan is not finite"),
    ("atol-inf", ["same", "ref", "--atol", "inf"], 2, "inf is not finite"),
    ("atol-negative", ["same", "ref", "--atol", "-1"], 2, "-1 is outside [0.0, inf]"),
    ("rtol-word", ["same", "ref", "--rtol", "tiny"], 2, "'tiny' is not a number"),
    ("cosine-1.5", ["same", "ref", "--cosine-min", "1.5"], 2, "outside [-1.0, 1.0]"),
    ("snr-inf", ["same", "ref", "--snr-min-db", "inf"], 2, "inf is not finite"),
    ("shape-mismatch", ["flat", "ref", "--atol", "0.1"], 1, "shapes differ; --allow-reshape"),
    ("shape-mismatch-allowed", ["flat", "ref", "--atol", "0.1", "--allow-reshape"], 0, "[verdict] PASSED"),
    ("numel-mismatch", ["short", "ref", "--allow-reshape"], 2, "element counts differ"),
    ("nan-in-actual", ["nan", "ref", "--atol", "10"], 1, "actual has 1 NaN and 0 Inf values"),
    ("default-bound-pass", ["same", "ref"], 0, "[verdict] PASSED (default bound cosine >= 0.99"),
    ("default-bound-fail", ["far", "ref"], 1, "[verdict] FAILED (default bound cosine >= 0.99"),
    ("missing-file", ["absent", "ref"], 2, "absent.tensor: cannot read"),
    ("npz-as-npy", ["npz.npy", "ref"], 2, "npz.npy [magic]: is a zip archive"),
]


@pytest.mark.parametrize(("args", "status", "fragment"), [c[1:] for c in CLI_CORPUS], ids=[c[0] for c in CLI_CORPUS])
def test_compare_cli_verdict_or_usage_error(tensors: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                            status: int, fragment: str) -> None:
    argv = ["compare", *(str(tensors / (a if "." in a else f"{a}.tensor")) if i < 2 else a
                         for i, a in enumerate(args))]
    try:
        got = main(argv)
    except SystemExit as exc:
        got = int(str(exc.code))
    out, err = capsys.readouterr()
    assert got == status, out + err
    assert fragment in out + err
    if status != 2:
        assert out.splitlines()[-1].startswith("[verdict] " + ("PASSED" if status == 0 else "FAILED"))


def test_compare_help_documents_exit_codes_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "exit status: 0 passed, 1 failed, 2 usage error" in out
    assert "cosine >= 0.99" in out and "--allow-reshape" in out


def test_compare_into_a_closed_pipe_has_no_traceback(tensors: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    shell = (f"set -o pipefail; {sys.executable} -m harness compare --detail {tensors / 'far.tensor'} "
             f"{tensors / 'ref.tensor'} | head -c 0")
    done = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 1
