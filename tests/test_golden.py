"""Tests for harness/golden.py: golden folders, meta.json, hash checks and regeneration hints."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import tensorfile
from harness.errors import GoldenError
from harness.golden import FORMAT, GoldenFile, GoldenStore

HINT = "pytest cases/tiny.yaml --update-golden"


@pytest.fixture
def store(tmp_path: Path) -> GoldenStore:
    return GoldenStore(tmp_path / "golden" / "tiny", HINT)


def tensors() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return {
        "inputs": {"image": rng.standard_normal((1, 3, 4, 5)).astype(np.float32),
                   "mask": np.array([[True, False]]), "ids": np.arange(4, dtype=np.int64)},
        "outputs": {"logits": rng.standard_normal((1, 2, 4, 5)),  # float64
                    "depth": rng.standard_normal(3).astype(np.float16)},
    }


META = {"config_hash": "c" * 64, "checkpoint_sha256": None, "case": "tiny", "command": HINT}


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def expect_golden_error(fn: Any, *fragments: str) -> str:
    with pytest.raises(GoldenError) as info:
        fn()
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text
    assert text.rstrip().endswith(HINT)
    return text


def test_write_read_round_trip(store: GoldenStore) -> None:
    assert not store.exists()
    data = tensors()
    store.write(data, META)
    assert store.exists()
    meta = store.meta()
    assert meta["format"] == FORMAT
    assert meta["config_hash"] == META["config_hash"] and meta["case"] == "tiny"
    assert sorted(meta["files"]) == ["inputs/ids.tensor", "inputs/image.tensor", "inputs/mask.tensor",
                                     "outputs/depth.tensor", "outputs/logits.tensor"]
    for kind, named in data.items():
        for name, array in named.items():
            loaded = store.read(kind, name, meta)
            if array.dtype == np.bool_:
                assert loaded.dtype == np.uint8
            elif array.dtype == np.float64:
                assert loaded.dtype == np.float32
            else:
                assert loaded.dtype == array.dtype
            np.testing.assert_array_equal(loaded, array.astype(loaded.dtype))
    assert files_under(store.dir) == ["inputs/ids.tensor", "inputs/image.tensor", "inputs/mask.tensor",
                                      "meta.json", "outputs/depth.tensor", "outputs/logits.tensor"]
    assert json.loads(store.meta_path.read_text()) == meta


def test_meta_keeps_float_metric_and_baselines_across_rewrites_of_the_same_model(store: GoldenStore) -> None:
    store.write(tensors(), META)

    def record(meta: dict[str, Any]) -> None:
        meta["float_metric"] = {"miou": 0.71}
        meta["baselines"] = {"ort-int8": {"miou": 0.70}}

    store.update_meta(record)
    store.write(tensors(), {**META, "created_at": "later"})
    meta = store.meta()
    assert meta["float_metric"] == {"miou": 0.71}
    assert meta["baselines"] == {"ort-int8": {"miou": 0.70}}
    # Explicit values in the new meta win over the stored ones.
    store.write(tensors(), {**META, "float_metric": {"miou": 0.5}})
    assert store.meta()["float_metric"] == {"miou": 0.5}
    assert store.meta()["baselines"] == {"ort-int8": {"miou": 0.70}}


def test_rewrite_removes_tensors_no_longer_in_the_set(store: GoldenStore) -> None:
    store.write(tensors(), META)
    store.write({"inputs": {"image": np.zeros(2, np.float32)}, "outputs": {"logits": np.ones(2, np.float32)}}, META)
    assert files_under(store.dir) == ["inputs/image.tensor", "meta.json", "outputs/logits.tensor"]
    np.testing.assert_array_equal(store.read("outputs", "logits", store.meta()), np.ones(2, np.float32))


def test_sha_mismatch_names_file_and_hint(store: GoldenStore) -> None:
    store.write(tensors(), META)
    meta = store.meta()
    path = store.dir / "outputs" / "logits.tensor"
    tensorfile.save(path, np.zeros((1, 2, 4, 5), np.float32))  # edited after generation
    text = expect_golden_error(lambda: store.read("outputs", "logits", meta), str(path), "sha256")
    assert "Regenerate with:" in text


def test_corrupt_tensor_names_file_and_hint(store: GoldenStore) -> None:
    store.write(tensors(), META)
    meta = store.meta()
    path = store.dir / "inputs" / "image.tensor"
    path.write_bytes(path.read_bytes()[:-3])
    meta["files"]["inputs/image.tensor"] = hashlib.sha256(path.read_bytes()).hexdigest()  # the reader must complain
    expect_golden_error(lambda: store.read("inputs", "image", meta), str(path), "[data]")


def test_missing_tensor_and_missing_meta_give_the_hint(store: GoldenStore) -> None:
    expect_golden_error(store.meta, "missing", str(store.meta_path), "Generate them with:")
    with pytest.raises(GoldenError, match=r"stale|missing"):
        store.check_fresh("c" * 64, None)
    store.write(tensors(), META)
    expect_golden_error(lambda: store.read("outputs", "seg", store.meta()), "'seg' is missing",
                        str(store.dir / "outputs"))


def test_corrupt_or_foreign_meta_gives_the_hint(store: GoldenStore) -> None:
    store.dir.mkdir(parents=True)
    store.meta_path.write_text("{not json")
    expect_golden_error(store.meta, "not valid JSON", str(store.meta_path))
    store.meta_path.write_text(json.dumps({"format": 99}))
    expect_golden_error(store.meta, "format 99", str(store.meta_path))


def test_stale_config_and_checkpoint(store: GoldenStore) -> None:
    store.write(tensors(), {**META, "checkpoint_sha256": "a" * 64})
    assert store.check_fresh("c" * 64, "a" * 64)["case"] == "tiny"
    text = expect_golden_error(lambda: store.check_fresh("e" * 64, "a" * 64), "stale", "config hash",
                               "c" * 12, "e" * 12)
    assert "checkpoint" not in text.split("stale")[1].split(".\n")[0]
    expect_golden_error(lambda: store.check_fresh("c" * 64, "b" * 64), "stale", "checkpoint sha256")
    expect_golden_error(lambda: store.check_fresh("c" * 64, None), "stale", "checkpoint sha256")
    both = expect_golden_error(lambda: store.check_fresh("e" * 64, None), "stale")
    assert "config hash" in both and "checkpoint" in both


def test_npy_next_to_a_deleted_tensor_is_refused(store: GoldenStore) -> None:
    store.write({"inputs": {"image": np.zeros(2, np.float32)}, "outputs": {"ref": np.zeros(3, np.float32)}}, META)
    (store.dir / "outputs" / "ref.tensor").unlink()
    np.save(store.dir / "outputs" / "ref.npy", np.arange(3.0))
    expect_golden_error(lambda: store.read("outputs", "ref", store.meta()), "outputs/ref.npy is not listed")


def test_update_meta_under_concurrent_threads_loses_nothing(store: GoldenStore) -> None:
    store.write(tensors(), META)
    workers, rounds = 6, 8
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(rounds):
                def change(meta: dict[str, Any], i: int = i, j: int = j) -> None:
                    meta.setdefault("baselines", {})[f"w{i}-{j}"] = j
                    meta["counter"] = meta.get("counter", 0) + 1
                store.update_meta(change)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    meta = store.meta()
    assert meta["counter"] == workers * rounds
    assert len(meta["baselines"]) == workers * rounds


def test_update_meta_without_golden_fails_with_hint(store: GoldenStore) -> None:
    expect_golden_error(lambda: store.update_meta(lambda meta: None), "missing")


def test_no_lock_or_temp_files_inside_the_golden_folder(store: GoldenStore) -> None:
    store.write(tensors(), META)
    store.update_meta(lambda meta: meta.update(float_metric={"miou": 0.7}))
    store.write(tensors(), META)
    names = files_under(store.dir.parent)
    assert not [n for n in names if n.endswith((".lock", ".tmp")) or "/." in f"/{n}"]
    assert names == [f"tiny/{n}" for n in files_under(store.dir)]


def test_failed_write_keeps_previous_meta(store: GoldenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.write(tensors(), META)
    before = store.meta_path.read_bytes()

    def broken(path: Path, array: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorfile, "save", broken)
    with pytest.raises(OSError):
        store.write(tensors(), {**META, "config_hash": "f" * 64})
    assert store.meta_path.read_bytes() == before


def test_golden_layout_chooses_file_names_and_dtypes(store: GoldenStore) -> None:
    data = tensors()
    files = {"image": GoldenFile("in_image.torch.fp16", np.dtype(np.float16)),
             "logits": GoldenFile("out_logits.torch.fp16", np.dtype(np.float16)),
             "ids": GoldenFile("in_ids.torch.int32", np.dtype(np.int32))}
    store.write(data, META, files)
    meta = store.meta()
    assert meta["tensor_files"] == {"inputs": {"image": "in_image.torch.fp16", "ids": "in_ids.torch.int32"},
                                    "outputs": {"logits": "out_logits.torch.fp16"}}
    assert files_under(store.dir) == ["inputs/in_ids.torch.int32.tensor", "inputs/in_image.torch.fp16.tensor",
                                      "inputs/mask.tensor", "meta.json", "outputs/depth.tensor",
                                      "outputs/out_logits.torch.fp16.tensor"]
    image = store.read("inputs", "image", meta)
    assert image.dtype == np.float16 and np.array_equal(image, data["inputs"]["image"].astype(np.float16))
    assert store.read("inputs", "ids", meta).dtype == np.int32
    assert store.read("outputs", "logits", meta).dtype == np.float16
    assert store.read("inputs", "mask", meta).dtype == np.uint8
    assert store.path_of("inputs", "image", meta) == store.dir / "inputs/in_image.torch.fp16.tensor"
    (store.dir / "inputs/in_image.torch.fp16.tensor").unlink()
    expect_golden_error(lambda: store.read("inputs", "image", meta), "inputs/in_image.torch.fp16.tensor is listed in")
    expect_golden_error(lambda: store.path_of("inputs", "image", meta),
                        "golden input 'image' ('in_image.torch.fp16.tensor' is missing")
    # Rewriting without the mapping goes back to plain names and drops the renamed files.
    store.write(data, META)
    assert "tensor_files" not in store.meta()
    assert "inputs/image.tensor" in files_under(store.dir) and "inputs/in_ids.torch.int32.tensor" not in files_under(store.dir)


@pytest.mark.parametrize(("files", "fragment"), [
    ({"image": GoldenFile("mask")}, "tensors 'image' and 'mask' would both be stored as mask.tensor"),
    ({"image": GoldenFile("../escape")}, "golden file name '../escape' of tensor 'image' is not a plain file name"),
    ({"image": GoldenFile("")}, "golden file name '' of tensor 'image'"),
])
def test_golden_file_names_must_be_plain_and_distinct(store: GoldenStore, files: dict[str, GoldenFile],
                                                      fragment: str) -> None:
    with pytest.raises(GoldenError, match=re.escape(fragment)):
        store.write(tensors(), META, files)
    assert not store.exists()


def test_results_are_dropped_when_the_identity_changes(tmp_path: Path) -> None:
    from harness.golden import GoldenStore

    store = GoldenStore(tmp_path / "g", "pytest x --update-golden")
    tensors = {"inputs": {"x": np.zeros(2, np.float32)}, "outputs": {"y": np.ones(2, np.float32)}}
    store.write(tensors, {"config_hash": "a", "checkpoint_sha256": "c"})
    store.update_meta(lambda m: m.update(baselines={"b": {"miou": 0.5}}, float_metric={"miou": 0.6},
                                         training={"steps": 3}))
    store.write(tensors, {"config_hash": "a", "checkpoint_sha256": "c"})
    assert store.meta()["baselines"] == {"b": {"miou": 0.5}}
    store.write(tensors, {"config_hash": "changed", "checkpoint_sha256": "c"})
    meta = store.meta()
    assert "baselines" not in meta and "float_metric" not in meta and meta["training"] == {"steps": 3}


def test_model_files_join_the_atomic_set(store: GoldenStore) -> None:
    store.write(tensors(), META, model_files={"anchors": np.arange(4, dtype=np.float32)})
    assert "anchors.tensor" in store.meta()["files"]
    store.write(tensors(), META, model_files={"anchors": np.arange(5, dtype=np.float32)})
    np.testing.assert_array_equal(tensorfile.load(store.dir / "anchors.tensor"), np.arange(5, dtype=np.float32))
    store.verify(store.meta())
    (store.dir / "anchors.tensor").write_bytes((store.dir / "anchors.tensor").read_bytes()[:-4])
    expect_golden_error(lambda: store.verify(store.meta()), "anchors.tensor does not match the sha256")
    with pytest.raises(GoldenError, match=r"golden model file name 'meta\.json' is not a plain file name"):
        store.write(tensors(), META, model_files={"meta.json": np.zeros(1, np.float32)})
