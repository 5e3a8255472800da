"""nuScenes camera samples for the detection3d task, read through nuscenes-devkit, and the
detection submission JSON.

`NuScenesCameras(dataroot, version, split)` yields the samples `harness.tasks.detection3d` takes,
in the layout the synthetic `harness.datasets.scenes.DrivingScenes` has: the six key-frame
camera images in `CAMERAS` order (mmdet3d's, CUDA-FastBEV's), `lidar2img` per camera and the
ground-truth boxes of the 10 detection classes.

Frame: nuScenes' LIDAR_TOP sensor frame at the sample's LiDAR timestamp (x right, y forward,
z up), as mmdet3d >= 1.0 and BEVFusion use it. `lidar2img` = K @ (lidar -> ego(t_lidar) ->
global -> ego(t_cam) -> camera), the chain of mmdet3d's `obtain_sensor2top`. Boxes: `center`
(geometric centre), `size` (w, l, h), `yaw` (heading from +x towards +y), `velocity` (vx, vy;
the devkit's `box_velocity` rotated into the frame, 0 where it is NaN, as mmdet3d),
`attribute` (the annotation's first, '' if none), `num_pts` (LiDAR + radar points, which the
devkit's evaluation filters on), `token` (the sample_annotation token). Annotations whose
category has no detection class (animals, strollers, ...) are left out.

Images may be shrunk as FastBEV / BEVDet feed nuScenes to the network: resized by
s = image_width / 1600 and the top cropped to `image_height` rows; the intrinsics follow
(fx' = s fx, cx' = s cx, cy' = s cy - crop).

nuscenes-devkit is the optional extra `qharness[nuscenes]`; without it the loader raises
`NuScenesError` saying so. The synthetic datasets stay the CI default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.atomic import write_json_atomic
from harness.datasets.scene3d import Box3D
from harness.errors import HarnessError
from harness.metrics.nds import DETECTION_CLASSES
from harness.tasks.detection3d import CAMERAS

__all__ = ["CAMERAS", "NuScenesCameras", "NuScenesError", "NuScenesSample", "submission"]

Matrix = npt.NDArray[np.float64]
LIDAR = "LIDAR_TOP"
MAX_BOXES = 500
"""The devkit refuses more boxes per sample in a submission."""
DEFAULT_META: Mapping[str, bool] = {
    "use_camera": True,
    "use_lidar": False,
    "use_radar": False,
    "use_map": False,
    "use_external": False,
}
"""The submission's `meta` block for a camera-only model."""


class NuScenesError(HarnessError):
    """The nuScenes dataroot, version, split or a record is unusable; the message names it."""


@dataclass(frozen=True)
class NuScenesBox(Box3D):
    """A ground-truth `Box3D` with its sample_annotation `token`."""

    token: str = ""


@dataclass(frozen=True)
class NuScenesSample:
    """One key frame: `images` (6, H, W, 3) uint8 RGB in `CAMERAS` order, `intrinsics`
    (6, 3, 3), `cam2lidar` (6, 4, 4), `lidar2img` (6, 4, 4) (image pixels), `boxes` in the
    LiDAR frame, and the poses that take that frame to the global one: `lidar2ego`,
    `ego2global` (4, 4)."""

    token: str
    index: int
    images: npt.NDArray[np.uint8]
    intrinsics: Matrix
    cam2lidar: Matrix
    lidar2img: Matrix
    boxes: tuple[NuScenesBox, ...]
    lidar2ego: Matrix
    ego2global: Matrix


def _require_devkit() -> None:
    try:
        import nuscenes  # noqa: F401
    except ImportError as exc:
        raise NuScenesError(
            "NuScenesCameras needs nuscenes-devkit: pip install 'qharness[nuscenes]' "
            f"(nuscenes-devkit==1.2.0); {exc}"
        ) from exc


def quaternion_matrix(wxyz: Sequence[float]) -> Matrix:
    """3x3 rotation of a (w, x, y, z) quaternion (normalised first), nuScenes' convention."""
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(np.asarray(wxyz, dtype=np.float64))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_quaternion(rotation: Matrix) -> list[float]:
    """(w, x, y, z) of a 3x3 rotation, w >= 0 (Shepperd's method: the largest diagonal term)."""
    r = np.asarray(rotation, dtype=np.float64)
    trace = float(np.trace(r))
    candidates = (trace, float(r[0, 0]), float(r[1, 1]), float(r[2, 2]))
    k = int(np.argmax(candidates))
    if k == 0:
        t = math.sqrt(1.0 + trace) * 2
        q = (t / 4, (r[2, 1] - r[1, 2]) / t, (r[0, 2] - r[2, 0]) / t, (r[1, 0] - r[0, 1]) / t)
    elif k == 1:
        t = math.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
        q = ((r[2, 1] - r[1, 2]) / t, t / 4, (r[0, 1] + r[1, 0]) / t, (r[0, 2] + r[2, 0]) / t)
    elif k == 2:
        t = math.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
        q = ((r[0, 2] - r[2, 0]) / t, (r[0, 1] + r[1, 0]) / t, t / 4, (r[1, 2] + r[2, 1]) / t)
    else:
        t = math.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
        q = ((r[1, 0] - r[0, 1]) / t, (r[0, 2] + r[2, 0]) / t, (r[1, 2] + r[2, 1]) / t, t / 4)
    sign = -1.0 if q[0] < 0 else 1.0
    return [sign * float(v) for v in q]


def pose(translation: Sequence[float], rotation: Sequence[float]) -> Matrix:
    """4x4 transform of a nuScenes record: `rotation` a (w, x, y, z) quaternion, then
    `translation`."""
    out = np.eye(4)
    out[:3, :3] = quaternion_matrix(rotation)
    out[:3, 3] = np.asarray(translation, dtype=np.float64)
    return out


def _yaw(rotation: Matrix) -> float:
    return math.atan2(float(rotation[1, 0]), float(rotation[0, 0]))


class NuScenesCameras:
    """Key frames of one nuScenes split as camera samples for the detection3d task.

    `split`: a devkit split name (`train`, `val`, `test`, `mini_train`, `mini_val`) or None for
    every sample of `version`. Samples are in scene order, then time. `size` keeps the first
    samples only; `image_height` / `image_width` (both or neither) shrink the images.
    """

    def __init__(
        self,
        dataroot: str | Path,
        version: str = "v1.0-mini",
        split: str | None = "mini_val",
        size: int | None = None,
        image_height: int | None = None,
        image_width: int | None = None,
    ) -> None:
        _require_devkit()
        from nuscenes.nuscenes import NuScenes
        from nuscenes.utils.splits import create_splits_scenes

        self.dataroot = Path(dataroot)
        if not (self.dataroot / version).is_dir():
            raise NuScenesError(f"nuScenes: no table folder {self.dataroot / version}")
        if (image_height is None) != (image_width is None):
            raise NuScenesError("nuScenes: give both image_height and image_width, or neither")
        self.image_hw = None if image_height is None or image_width is None else (image_height, image_width)
        try:
            self.nusc = NuScenes(version=version, dataroot=str(self.dataroot), verbose=False)
        except (AssertionError, KeyError, FileNotFoundError) as exc:
            raise NuScenesError(f"nuScenes: cannot read {self.dataroot / version}: {exc!r}") from exc
        scenes = list(self.nusc.scene)
        if split is not None:
            splits = create_splits_scenes()
            if split not in splits:
                raise NuScenesError(f"nuScenes: unknown split {split!r}; known: {sorted(splits)}")
            names = set(splits[split])
            scenes = [s for s in scenes if s["name"] in names]
        tokens: list[str] = []
        for scene in scenes:
            token = scene["first_sample_token"]
            while token:
                tokens.append(token)
                token = self.nusc.get("sample", token)["next"]
        if size is not None:
            tokens = tokens[:size]
        if not tokens:
            raise NuScenesError(f"nuScenes: no samples in {version} split {split!r} under {self.dataroot}")
        self.version = version
        self.split = split
        self.tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[NuScenesSample]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (f"NuScenesCameras(dataroot={str(self.dataroot)!r}, version={self.version!r}, "
                f"split={self.split!r}, size={len(self)})")

    def _record(self, table: str, token: str) -> dict[str, Any]:
        try:
            record: dict[str, Any] = self.nusc.get(table, token)
        except KeyError as exc:
            raise NuScenesError(f"nuScenes: {table} has no token {token!r}") from exc
        return record

    def _sensor(self, sample: Mapping[str, Any], channel: str) -> tuple[dict[str, Any], Matrix, Matrix]:
        """(sample_data, sensor2ego, ego2global) of `channel` in `sample`."""
        if channel not in sample["data"]:
            raise NuScenesError(f"nuScenes: sample {sample['token']} has no {channel} key frame")
        data = self._record("sample_data", sample["data"][channel])
        calib = self._record("calibrated_sensor", data["calibrated_sensor_token"])
        ego = self._record("ego_pose", data["ego_pose_token"])
        return data, pose(calib["translation"], calib["rotation"]), pose(ego["translation"], ego["rotation"])

    def poses(self, token: str) -> tuple[Matrix, Matrix]:
        """(lidar2ego, ego2global) of sample `token`: its LiDAR frame to the global frame."""
        _, lidar2ego, ego2global = self._sensor(self._record("sample", token), LIDAR)
        return lidar2ego, ego2global

    def _image(self, path: Path, intrinsic: Matrix) -> tuple[npt.NDArray[np.uint8], Matrix]:
        from PIL import Image

        if not path.is_file():
            raise NuScenesError(f"nuScenes: image {path} is missing")
        with Image.open(path) as raw:
            image = raw.convert("RGB")
        k = intrinsic.copy()
        if self.image_hw is not None:
            height, width = self.image_hw
            scale = width / image.width
            resized_h = round(image.height * scale)
            crop = resized_h - height
            if crop < 0:
                raise NuScenesError(
                    f"nuScenes: {path} ({image.width}x{image.height}) resized to width {width} is "
                    f"{resized_h} rows, fewer than image_height {height}"
                )
            image = image.resize((width, resized_h), Image.Resampling.BILINEAR).crop((0, crop, width, resized_h))
            k[:2] *= scale
            k[1, 2] -= crop
        return np.asarray(image, dtype=np.uint8), k

    def _boxes(self, sample: Mapping[str, Any], lidar2global: Matrix) -> tuple[NuScenesBox, ...]:
        from nuscenes.eval.detection.utils import category_to_detection_name

        global2lidar = np.linalg.inv(lidar2global)
        boxes = []
        for ann_token in sample["anns"]:
            ann = self._record("sample_annotation", ann_token)
            label = category_to_detection_name(ann["category_name"])
            if label is None:
                continue
            box_pose = global2lidar @ pose(ann["translation"], ann["rotation"])
            velocity = global2lidar[:3, :3] @ np.nan_to_num(self.nusc.box_velocity(ann_token), nan=0.0)
            attributes = [self._record("attribute", t)["name"] for t in ann["attribute_tokens"]]
            w, length, h = (float(v) for v in ann["size"])
            boxes.append(NuScenesBox(
                label=label,
                center=(float(box_pose[0, 3]), float(box_pose[1, 3]), float(box_pose[2, 3])),
                size=(w, length, h),
                yaw=_yaw(box_pose[:3, :3]),
                velocity=(float(velocity[0]), float(velocity[1])),
                attribute=attributes[0] if attributes else "",
                num_pts=int(ann["num_lidar_pts"]) + int(ann["num_radar_pts"]),
                token=ann_token,
            ))
        return tuple(boxes)

    def __getitem__(self, index: int) -> NuScenesSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"NuScenesCameras: index {index} out of range({len(self)})")
        index %= len(self)
        sample = self._record("sample", self.tokens[index])
        _, lidar2ego, lidar_ego2global = self._sensor(sample, LIDAR)
        lidar2global = lidar_ego2global @ lidar2ego
        images, intrinsics, cam2lidar, lidar2img = [], [], [], []
        for camera in CAMERAS:
            data, cam2ego, cam_ego2global = self._sensor(sample, camera)
            calib = self._record("calibrated_sensor", data["calibrated_sensor_token"])
            image, k = self._image(self.dataroot / data["filename"], np.asarray(calib["camera_intrinsic"], np.float64))
            c2l = np.linalg.inv(lidar2global) @ cam_ego2global @ cam2ego
            k4 = np.eye(4)
            k4[:3, :3] = k
            images.append(image)
            intrinsics.append(k)
            cam2lidar.append(c2l)
            lidar2img.append(k4 @ np.linalg.inv(c2l))
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise NuScenesError(f"nuScenes: sample {sample['token']} has images of sizes {sorted(shapes)}")
        return NuScenesSample(
            token=sample["token"],
            index=index,
            images=np.stack(images),
            intrinsics=np.stack(intrinsics),
            cam2lidar=np.stack(cam2lidar),
            lidar2img=np.stack(lidar2img),
            boxes=self._boxes(sample, lidar2global),
            lidar2ego=lidar2ego,
            ego2global=lidar_ego2global,
        )

    def submission(
        self,
        predictions: Mapping[str, Sequence[Mapping[str, Any]]],
        meta: Mapping[str, bool] = DEFAULT_META,
    ) -> dict[str, Any]:
        """The detection submission of `predictions` (sample token -> boxes in the
        `harness.metrics.nds` form, LiDAR frame): one entry per sample of this dataset."""
        unknown = sorted(set(predictions) - set(self.tokens))
        if unknown:
            raise NuScenesError(f"nuScenes submission: tokens not in this split: {unknown[:5]}")
        poses = {token: self.poses(token) for token in self.tokens}
        return submission(predictions, poses, meta)

    def write_submission(
        self,
        path: str | Path,
        predictions: Mapping[str, Sequence[Mapping[str, Any]]],
        meta: Mapping[str, bool] = DEFAULT_META,
    ) -> Path:
        """Write `submission(predictions, meta)` as JSON to `path` (atomically); returns it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target, self.submission(predictions, meta))
        return target


def submission(
    predictions: Mapping[str, Sequence[Mapping[str, Any]]],
    poses: Mapping[str, tuple[Matrix, Matrix]],
    meta: Mapping[str, bool] = DEFAULT_META,
) -> dict[str, Any]:
    """nuScenes detection submission JSON (as a dict): boxes (`label`, `center`, `size` (w, l,
    h), `yaw`, `velocity`, `attribute`, `score`, in each sample's LiDAR frame) taken to the global
    frame with `poses[token]` = (lidar2ego, ego2global); every token of `poses` gets an entry
    (empty if it has no predictions); the highest-scoring `MAX_BOXES` boxes per sample are kept."""
    missing_meta = sorted(set(DEFAULT_META) - set(meta))
    if missing_meta:
        raise NuScenesError(f"nuScenes submission: meta lacks {missing_meta}")
    results: dict[str, list[dict[str, Any]]] = {}
    for token, (lidar2ego, ego2global) in poses.items():
        lidar2global = ego2global @ lidar2ego
        boxes = sorted(predictions.get(token, ()), key=lambda b: -float(b["score"]))[:MAX_BOXES]
        entries = []
        for k, box in enumerate(boxes):
            label = box["label"]
            if label not in DETECTION_CLASSES:
                raise NuScenesError(f"nuScenes submission: sample {token} box {k}: label {label!r} "
                                    f"is not one of {DETECTION_CLASSES}")
            c, s = math.cos(float(box["yaw"])), math.sin(float(box["yaw"]))
            local = np.eye(4)
            local[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
            local[:3, 3] = [float(v) for v in box["center"]]
            world = lidar2global @ local
            vx, vy = (float(v) for v in box["velocity"])
            velocity = lidar2global[:3, :3] @ np.array([vx, vy, 0.0])
            entries.append({
                "sample_token": token,
                "translation": [float(v) for v in world[:3, 3]],
                "size": [float(v) for v in box["size"]],
                "rotation": matrix_quaternion(world[:3, :3]),
                "velocity": [float(velocity[0]), float(velocity[1])],
                "detection_name": label,
                "detection_score": float(box["score"]),
                "attribute_name": str(box.get("attribute", "")),
            })
        results[token] = entries
    return {"meta": {k: bool(meta[k]) for k in DEFAULT_META}, "results": results}
