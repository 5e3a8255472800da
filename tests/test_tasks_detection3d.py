"""Detection3D task: preprocessing, box glue, NDS accumulation, bad boxes, agreement, pictures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cases import load_case
from harness.context import CaseContext, RunOptions
from harness.datasets.scenes import DrivingScenes
from harness.errors import CaseError, HarnessError, MetricError
from harness.metrics import nds
from harness.metrics.nds import NDSMetric
from harness.tasks.base import Batch, task_class
from harness.tasks.detection3d import (
    Detection3DTarget,
    Detection3DTask,
    denormalize,
    ground_truth_boxes,
    match_count,
    predicted_attribute,
    prediction_boxes,
    preprocess,
)
from harness.zoo.fastbev import (
    CLASSES,
    IMAGE_MEAN,
    IMAGE_STD,
    AnchorRowDecoder,
    NMSConfig,
    direction_target,
    postprocess,
)

DATA = DrivingScenes("val", size=3, image_height=64, image_width=176, max_boxes=12, max_range=25.0)
NO_NMS = NMSConfig(nms_type=("circle",) * 10, nms_radius_thr=(1e-9,) * 10)
NO_NMS_ARGS = "{nms: {nms_type: [circle, circle, circle, circle, circle, circle, circle, circle, circle, circle], " \
              "nms_radius_thr: [1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9, 1.0e-9]}}"

CASE = """\
name: det
task: detection3d
task_args: {{decoder: harness.zoo.fastbev:AnchorRowDecoder, decoder_args: {decoder_args}}}
model:
  factory: harness.zoo.fastbev:fastbev_r18
  args: {{profile: ci}}
data:
  factory: harness.datasets.scenes:DrivingScenes
  args: {{split: val, size: 3, image_height: 64, image_width: 176, max_boxes: 12, max_range: 25.0}}
golden: {{dir: golden/det, samples: {samples}}}
metric: {metric}
backends:
  torch-fp32: {{compare: none}}
"""


def make_context(tmp_path: Path, metric: str = "{name: nds}", samples: int = 1,
                 decoder_args: str = NO_NMS_ARGS) -> CaseContext:
    path = tmp_path / "cases" / "det.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CASE.format(metric=metric, samples=samples, decoder_args=decoder_args))
    (tmp_path / "pyproject.toml").touch()
    ctx = CaseContext(load_case(path), RunOptions(torch.device("cpu"), tmp_path / ".cache"))
    ctx.validate()
    return ctx


def make_case(tmp_path: Path, metric: str = "{name: nds}", samples: int = 1,
              decoder_args: str = NO_NMS_ARGS) -> Detection3DTask:
    adapter = task_class("detection3d")(make_context(tmp_path, metric, samples, decoder_args).case)
    assert isinstance(adapter, Detection3DTask)
    return adapter


def rows_for(boxes: list, score: float = 0.9) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    """Top-k rows (one sample) that postprocess back into exactly `boxes` (Box3D records)."""
    k = len(boxes) + 2
    cls = np.zeros((k, 10), np.float32)
    bbox = np.zeros((k, 9), np.float32)
    bbox[:, 3:6] = 1.0
    dirs = np.zeros(k, np.int64)
    for i, b in enumerate(boxes):
        cls[i, CLASSES.index(b.label)] = score - 0.01 * i
        bbox[i] = (*b.center[:2], b.center[2] - b.size[2] / 2, *b.size, b.yaw, *b.velocity)
        dirs[i] = int(direction_target(torch.tensor([b.yaw], dtype=torch.float64))[0])
    return {"cls_score": torch.from_numpy(cls)[None], "bbox_pred": torch.from_numpy(bbox)[None],
            "dir_cls_preds": torch.from_numpy(dirs)[None]}


def batch_of(index: int) -> Batch:
    s = DATA[index]
    target = Detection3DTarget(s.token, s.boxes, s.lidar2img)
    return Batch({"image": torch.from_numpy(preprocess(s.images))}, (target,), (s.token,))


def test_preprocess_is_fastbevs_normalisation_and_inverts() -> None:
    images = np.zeros((2, 4, 6, 3), np.uint8)
    images[0, 1, 2] = (255, 0, 128)
    x = preprocess(images)
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 6) and x.flags.c_contiguous
    want = [(v - m) / s for v, m, s in zip((255, 0, 128), IMAGE_MEAN, IMAGE_STD, strict=True)]
    np.testing.assert_allclose(x[0, :, 1, 2], want, rtol=1e-6)
    np.testing.assert_array_equal(denormalize(x), images)
    with pytest.raises(HarnessError, match="uint8"):
        preprocess(images.astype(np.float32))


@pytest.mark.parametrize(
    ("label", "speed", "attribute"),
    [("car", 5.0, "vehicle.moving"), ("car", 0.0, "vehicle.parked"), ("bus", 0.1, "vehicle.stopped"),
     ("bicycle", 3.0, "cycle.with_rider"), ("motorcycle", 0.0, "cycle.without_rider"),
     ("pedestrian", 1.0, "pedestrian.moving"), ("pedestrian", 0.1, "pedestrian.standing"),
     ("barrier", 2.0, ""), ("traffic_cone", 0.0, "")],
)
def test_predicted_attributes_follow_mmdet3d(label: str, speed: float, attribute: str) -> None:
    assert predicted_attribute(label, (speed * math.cos(1.0), speed * math.sin(1.0))) == attribute
    assert attribute == "" or attribute in nds.CLASS_ATTRIBUTES[label]


def test_ground_truth_boxes_keep_num_pts() -> None:
    sample = DATA[0]
    boxes = ground_truth_boxes(sample.boxes)
    assert [b["num_pts"] for b in boxes] == [b.num_pts for b in sample.boxes]
    assert boxes[0]["center"] == list(sample.boxes[0].center) and boxes[0]["label"] == sample.boxes[0].label
    unseen = [type(sample.boxes[0])(label="car", center=(1.0, 2.0, -1.0), size=(1.8, 4.5, 1.6), yaw=0.3)]
    assert "num_pts" not in ground_truth_boxes(unseen)[0]


def test_metric_scores_decoded_rows_exactly_as_nds_evaluate(tmp_path: Path) -> None:
    adapter = make_case(tmp_path)
    metric = NDSMetric(filter_range=True)
    gt: dict[str, list[dict[str, object]]] = {}
    pred: dict[str, list[dict[str, object]]] = {}
    for i in range(2):
        batch = batch_of(i)
        boxes = list(DATA[i].boxes)
        rows = rows_for(boxes[: len(boxes) - 2])  # the last two GT boxes are missed
        metric.update(adapter.decode(rows, batch), adapter.targets(batch), batch.sample_ids)
        dets = postprocess(*(t[0].numpy() for t in rows.values()), NO_NMS)
        pred[batch.sample_ids[0]] = prediction_boxes(dets)
        gt[batch.sample_ids[0]] = ground_truth_boxes(boxes)
    values = metric.compute()
    want = nds.evaluate(gt, pred, filter_range=True)
    assert values.primary == "NDS" and values.values["NDS"] == want.NDS and values.values["mAP"] == want.mAP
    assert set(values.values) == {"NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE"}
    assert values.details["per_class"] == {c: m.ap for c, m in want.per_class.items()}
    assert values.details["samples"] == 2
    # boxes reproduced from their own ground truth: no translation, scale or orientation error
    seen = [c for c, m in values.details["classes"].items() if m["AP"] > 0]
    assert seen
    for c in seen:
        errors = values.details["classes"][c]
        assert errors["trans_err"] < 1e-4 and errors["scale_err"] < 1e-4, c
        assert math.isnan(errors["orient_err"]) or errors["orient_err"] < 1e-4, c
    assert 0.0 < values.values["mAP"] < 1.0
    assert [f.direction for f in NDSMetric.figures] == ["higher", "higher"] + ["lower"] * 5


def test_nan_box_is_reported_with_sample_and_box(tmp_path: Path) -> None:
    adapter = make_case(tmp_path)
    batch = batch_of(0)
    rows = rows_for(list(DATA[0].boxes))
    rows["bbox_pred"][0, 2, 7] = float("nan")  # third row: velocity x
    metric = NDSMetric(filter_range=True)
    with pytest.raises(MetricError, match=rf"sample '{batch.sample_ids[0]}': predicted box 2 \(\w+\) has a non-finite velocity"):
        metric.update(adapter.decode(rows, batch), adapter.targets(batch), batch.sample_ids)
    with pytest.raises(MetricError, match="no samples"):
        metric.compute()


def test_sample_added_twice_is_an_error() -> None:
    metric = NDSMetric()
    metric.update([[]], [[]], ["a"])
    with pytest.raises(MetricError, match="added twice"):
        metric.update([[]], [[]], ["a"])


def test_adapter_batches_and_golden_inputs(tmp_path: Path) -> None:
    adapter = make_case(tmp_path)
    batches = list(adapter.batches(DATA, 2))
    assert [b.sample_ids for b in batches] == [(DATA[0].token, DATA[1].token), (DATA[2].token,)]
    assert batches[0].inputs["image"].shape == (12, 3, 64, 176)
    np.testing.assert_array_equal(batches[0].inputs["image"][6:].numpy(), preprocess(DATA[1].images))
    assert batches[1].targets[0].boxes == DATA[2].boxes
    golden = adapter.golden_inputs(DATA, 1)
    assert golden["image"].shape == (6, 3, 64, 176)
    assert isinstance(adapter.decoder, AnchorRowDecoder) and adapter.decoder.nms == NO_NMS


def test_bad_case_settings_are_collection_errors(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="metric 'miou' scores label_map predictions; task 'detection3d' decodes boxes3d"):
        make_context(tmp_path, "{name: miou}")
    with pytest.raises(CaseError, match=r"key 'metric.args.range': unknown argument 'range' of metric 'nds'"):
        make_context(tmp_path, "{name: nds, args: {range: 1}}")
    with pytest.raises(CaseError, match=r"key 'metric.args.classes': unknown class\(es\) \['tram'\]"):
        make_context(tmp_path, "{name: nds, args: {classes: [car, tram]}}")
    with pytest.raises(CaseError, match=r"key 'metric.keys.1': metric 'nds' has no figure 'NDX'"):
        make_context(tmp_path, "{name: nds, keys: [NDS, NDX]}")
    with pytest.raises(CaseError, match=r"task_args.decoder_args.*unknown nms argument"):
        make_case(tmp_path, decoder_args="{nms: {score: 0.1}}")
    adapter = make_case(tmp_path, decoder_args="{nms: {score_thr: 0.2, nms_thr: [0.3, 0.3, 0.3, 0.3, 0.3, 0.5, 0.2, 0.2, 0.5, 0.2]}}",
                        samples=2)
    assert isinstance(adapter.decoder, AnchorRowDecoder)
    assert adapter.decoder.nms.score_thr == 0.2 and adapter.decoder.nms.nms_thr[0] == 0.3
    with pytest.raises(CaseError, match=r"golden\.samples"):
        adapter.golden_inputs(DATA, 2)


def test_agreement_counts_matched_boxes(tmp_path: Path) -> None:
    adapter = make_case(tmp_path)
    boxes = list(DATA[0].boxes)
    batch = batch_of(0)
    same = adapter.decode(rows_for(boxes), batch)
    n = len(same[0])
    assert adapter.agreement(same, same, batch) == (n, n)
    fewer = adapter.decode(rows_for(boxes[:-3]), batch)
    assert adapter.agreement(same, fewer, batch) == (n - 3, n)
    moved_rows = rows_for(boxes)
    moved_rows["bbox_pred"][0, :, 0] += 100.0
    assert adapter.agreement(same, adapter.decode(moved_rows, batch), batch) == (0, 2 * n)


def test_match_count_is_one_to_one_by_label() -> None:
    a = postprocess(*(t[0].numpy() for t in rows_for(list(DATA[1].boxes)).values()), NO_NMS)
    assert match_count(a, a, 0.5) == len(a)
    relabelled = type(a)(a.center, a.size, a.yaw, a.velocity, a.score, (a.label + 1) % 10)
    assert match_count(a, relabelled, 0.5) == 0


def test_pictures_show_every_sample(tmp_path: Path) -> None:
    adapter = make_case(tmp_path)
    batch = next(iter(adapter.batches(DATA, 2)))
    outputs = {
        name: {k: torch.cat([rows_for(list(DATA[i].boxes), score)[k] for i in range(2)]) for k in ("cls_score", "bbox_pred", "dir_cls_preds")}
        for name, score in (("float", 0.9), ("ort-int8", 0.8))
    }
    paths = adapter.pictures(batch, outputs, tmp_path / "pics", "ort-int8")
    assert [p.name for p in paths] == [f"ort-int8-{t}-{kind}.png" for t in batch.sample_ids for kind in ("bev", "cameras")]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_normalisation_options_are_used_and_checked(tmp_path: Path) -> None:
    adapter = make_case(tmp_path, decoder_args=NO_NMS_ARGS + ", mean: [10, 20, 30], std: [2, 4, 8], channel_order: bgr")
    images = DATA[0].images
    x = adapter.golden_inputs(DATA, 1)["image"].numpy()
    expected = (images[..., ::-1].astype(np.float32) - [10, 20, 30]) / [2, 4, 8]
    np.testing.assert_allclose(x.transpose(0, 2, 3, 1), expected, rtol=1e-6)
    assert np.array_equal(adapter.norm.invert(x), images)
    assert np.array_equal(make_case(tmp_path).golden_inputs(DATA, 1)["image"].numpy(), preprocess(images))
    with pytest.raises(CaseError, match=r"key 'task_args.nomalize': unknown detection3d task option 'nomalize'"):
        make_case(tmp_path, decoder_args=NO_NMS_ARGS + ", nomalize: true")
