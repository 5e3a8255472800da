"""Tests for harness/datasets/cityscapes.py on a tiny tree in the official layout (PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.datasets.cityscapes import LABEL_TO_TRAIN_ID, Cityscapes, CityscapesError, train_ids
from harness.tasks.segmentation import preprocess

# cityscapesScripts' labels.py: (labelId, trainId) of every label with an id
OFFICIAL = [(0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255), (7, 0), (8, 1),
            (9, 255), (10, 255), (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5),
            (18, 255), (19, 6), (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13),
            (27, 14), (28, 15), (29, 255), (30, 255), (31, 16), (32, 17), (33, 18)]


def write_tree(root: Path, split: str = "val") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two cities, three frames of 24x48: random RGB images and labelIds over every official id."""
    gen = np.random.default_rng(0)
    frames = {}
    for city, frame in (("frankfurt", "000000_000294"), ("lindau", "000001_000019"), ("frankfurt", "000000_000576")):
        stem = f"{city}_{frame}"
        image = gen.integers(0, 256, (24, 48, 3), dtype=np.uint8)
        label = gen.integers(0, 34, (24, 48), dtype=np.uint8)
        for folder, name, array in (("leftImg8bit", f"{stem}_leftImg8bit.png", image),
                                    ("gtFine", f"{stem}_gtFine_labelIds.png", label)):
            path = root / folder / split / city / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        # the other gtFine files of the official release sit beside it and are ignored
        Image.fromarray(label).save(root / "gtFine" / split / city / f"{stem}_gtFine_color.png")
        frames[stem] = (image, label)
    return frames


def test_table_is_the_official_one() -> None:
    for label_id, train_id in OFFICIAL:
        assert LABEL_TO_TRAIN_ID[label_id] == train_id, label_id
    assert (LABEL_TO_TRAIN_ID[34:] == 255).all()
    with pytest.raises(CityscapesError, match=r"0\.\.255"):
        train_ids(np.array([-1, 3]))


def test_samples_in_segmentation_layout(tmp_path: Path) -> None:
    frames = write_tree(tmp_path)
    data = Cityscapes(tmp_path, "val")
    assert len(data) == 3
    stems = [data[i].stem for i in range(3)]
    assert stems == ["frankfurt_000000_000294", "frankfurt_000000_000576", "lindau_000001_000019"]
    sample = data[1]
    image, label = frames[sample.stem]
    assert sample.index == 1 and sample.image.dtype == np.uint8 and sample.label.dtype == np.uint8
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.label, LABEL_TO_TRAIN_ID[label])
    assert set(np.unique(sample.label)) <= {*range(19), 255}
    assert preprocess(np.stack([data[i].image for i in range(2)])).shape == (2, 3, 24, 48)
    assert len(Cityscapes(tmp_path, "val", size=2)) == 2


def test_resize_keeps_label_values(tmp_path: Path) -> None:
    frames = write_tree(tmp_path)
    sample = Cityscapes(tmp_path, "val", height=12, width=24)[0]
    assert sample.image.shape == (12, 24, 3) and sample.label.shape == (12, 24)
    expected = np.asarray(Image.fromarray(frames[sample.stem][1]).resize((24, 12), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(sample.label, LABEL_TO_TRAIN_ID[expected])


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CityscapesError, match=r"no folder .*leftImg8bit/val"):
        Cityscapes(tmp_path, "val")
    write_tree(tmp_path)
    with pytest.raises(CityscapesError, match="both height and width"):
        Cityscapes(tmp_path, "val", height=12)
    with pytest.raises(IndexError):
        Cityscapes(tmp_path, "val", size=1)[1]
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(CityscapesError, match=r"lindau_000001_000019_leftImg8bit\.png has no label file"):
        Cityscapes(tmp_path, "val")


CASE = """\
name: cityscapes-pidnet
task: segmentation
model:
  factory: harness.zoo.pidnet:pidnet_s
  args: {{num_classes: 19}}
data:
  factory: harness.datasets.cityscapes:Cityscapes
  args: {{root: {root}, split: val, height: 64, width: 128}}
  calibration: {{args: {{size: 1}}}}
golden: {{dir: golden/cityscapes-pidnet, samples: 1}}
metric: {{name: miou, args: {{num_classes: 19, ignore_index: 255}}}}
backends:
  torch-fp32: {{compare: {{atol: 1.0e-4}}}}
"""


def test_a_case_scores_the_loader_with_the_segmentation_task(tmp_path: Path) -> None:
    from harness.cases import load_case
    from harness.context import CaseContext, RunOptions, build_float_model

    write_tree(tmp_path / "cityscapes")
    path = tmp_path / "cases" / "cityscapes.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(CASE.format(root=tmp_path / "cityscapes"))
    (tmp_path / "pyproject.toml").touch()
    case = load_case(path)
    run = CaseContext(case, RunOptions.default(tmp_path))
    assert len(run.dataset()) == 3 and len(run.dataset("calibration")) == 1
    model, metric = build_float_model(case), run.metric()
    for batch in run.adapter.batches(run.dataset(), 2):
        assert batch.inputs["image"].shape[1:] == (3, 64, 128)
        with torch.no_grad():
            predictions = run.adapter.decode({"logits": model(batch.inputs["image"])}, batch)
        metric.update(predictions, run.adapter.targets(batch), batch.sample_ids)
    values = metric.compute()
    assert 0.0 <= values.values["pixel_acc"] <= 1.0 and values.primary == "miou"
