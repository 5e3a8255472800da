"""A tiny nuScenes dataroot in the real on-disk formats (v1.0 JSON tables, JPG key frames), for
tests of harness/datasets/nuscenes.py: scene-0103 (mini_val, two samples 0.5 s apart) and
scene-0061 (mini_train, one sample); real LIDAR_TOP and camera calibrations (yaw, position,
focal length at 1/10 of 1600x900)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.datasets.nuscenes import matrix_quaternion
from harness.datasets.scenes import _NUSCENES_CAMERAS, CAMERAS

VERSION = "v1.0-mini"
NATIVE_W, NATIVE_H = 160, 90
SCALE = NATIVE_W / 1600
LIDAR_ROTATION = [0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817]
LIDAR_TRANSLATION = [0.943713, 0.0, 1.84023]


def token(*parts: object) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, "/".join(str(p) for p in parts)).hex


def _yaw_quaternion(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _camera_quaternion(yaw_deg: float) -> list[float]:
    t = math.radians(yaw_deg)
    # columns: camera x (right), y (down), z (forward) in the ego frame (x forward, y left, z up)
    r = np.array([[math.sin(t), 0.0, math.cos(t)], [-math.cos(t), 0.0, math.sin(t)], [0.0, -1.0, 0.0]])
    return matrix_quaternion(r)


def _ego_point(ego_xy: tuple[float, float], ego_yaw: float, local: tuple[float, float, float]) -> list[float]:
    c, s = math.cos(ego_yaw), math.sin(ego_yaw)
    return [ego_xy[0] + c * local[0] - s * local[1], ego_xy[1] + s * local[0] + c * local[1], local[2]]


def write_dataroot(root: Path) -> dict[str, Any]:
    """Write the dataroot under `root`; returns the tables (as written) and the sample tokens."""
    t: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
        "log", "scene", "sample", "sample_data", "sample_annotation", "map")}
    categories = ("vehicle.car", "human.pedestrian.adult", "movable_object.barrier", "animal")
    for name in categories:
        t["category"].append({"token": token("cat", name), "name": name, "description": ""})
    for name in ("vehicle.moving", "pedestrian.standing", "cycle.with_rider"):
        t["attribute"].append({"token": token("attr", name), "name": name, "description": ""})
    t["visibility"].append({"token": "4", "level": "v80-100", "description": ""})
    for channel in (*CAMERAS, "LIDAR_TOP"):
        modality = "lidar" if channel == "LIDAR_TOP" else "camera"
        t["sensor"].append({"token": token("sensor", channel), "channel": channel, "modality": modality})
        if channel == "LIDAR_TOP":
            calib = {"translation": LIDAR_TRANSLATION, "rotation": LIDAR_ROTATION, "camera_intrinsic": []}
        else:
            yaw, position, f, cx, cy = _NUSCENES_CAMERAS[channel]
            k = [[f * SCALE, 0.0, cx * SCALE], [0.0, f * SCALE, cy * SCALE], [0.0, 0.0, 1.0]]
            calib = {"translation": list(position), "rotation": _camera_quaternion(yaw), "camera_intrinsic": k}
        t["calibrated_sensor"].append({"token": token("calib", channel), "sensor_token": token("sensor", channel), **calib})
    t["log"].append({"token": token("log"), "logfile": "n015-2018-07-24-11-22-45+0800", "vehicle": "n015",
                     "date_captured": "2018-07-24", "location": "singapore-onenorth"})
    t["map"].append({"token": token("map"), "log_tokens": [token("log")], "category": "semantic_prior",
                     "filename": "maps/tiny.png"})
    (root / "maps").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(root / "maps" / "tiny.png")
    scenes = {"scene-0103": 2, "scene-0061": 1}
    gen = np.random.default_rng(0)
    car_instance, ped_instance = token("inst", "car"), token("inst", "ped")
    car_anns: list[str] = []
    for scene_name, count in scenes.items():
        samples = [token("sample", scene_name, i) for i in range(count)]
        t["scene"].append({"token": token("scene", scene_name), "log_token": token("log"), "nbr_samples": count,
                           "first_sample_token": samples[0], "last_sample_token": samples[-1],
                           "name": scene_name, "description": ""})
        for i, sample in enumerate(samples):
            stamp = 1532402927647951 + 500000 * i + (10**9 if scene_name == "scene-0061" else 0)
            ego_xy, ego_yaw = (411.3 + 5.0 * i, 1180.9 + 0.5 * i), 0.3
            t["sample"].append({"token": sample, "timestamp": stamp, "scene_token": token("scene", scene_name),
                                "prev": samples[i - 1] if i else "", "next": samples[i + 1] if i + 1 < count else ""})
            for channel in (*CAMERAS, "LIDAR_TOP"):
                # each sensor fires a little later than the LiDAR: the ego has moved on
                shift = 0.0 if channel == "LIDAR_TOP" else 0.2 + 0.01 * CAMERAS.index(channel)
                ego_token = token("ego", sample, channel)
                t["ego_pose"].append({"token": ego_token, "timestamp": stamp + int(shift * 1e5),
                                      "translation": _ego_point(ego_xy, ego_yaw, (shift, 0.0, 0.0)),
                                      "rotation": _yaw_quaternion(ego_yaw + 0.01 * shift)})
                if channel == "LIDAR_TOP":
                    filename = f"samples/LIDAR_TOP/{scene_name}__LIDAR_TOP__{stamp}.pcd.bin"
                    (root / filename).parent.mkdir(parents=True, exist_ok=True)
                    np.zeros((4, 5), np.float32).tofile(root / filename)
                    height = width = 0
                else:
                    filename = f"samples/{channel}/{scene_name}__{channel}__{stamp}.jpg"
                    (root / filename).parent.mkdir(parents=True, exist_ok=True)
                    pixels = gen.integers(0, 256, (NATIVE_H, NATIVE_W, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / filename, quality=95)
                    height, width = NATIVE_H, NATIVE_W
                t["sample_data"].append({
                    "token": token("sd", sample, channel), "sample_token": sample, "ego_pose_token": ego_token,
                    "calibrated_sensor_token": token("calib", channel), "timestamp": stamp,
                    "fileformat": "pcd" if channel == "LIDAR_TOP" else "jpg", "is_key_frame": True,
                    "height": height, "width": width, "filename": filename, "prev": "", "next": ""})
            boxes = [
                ("car", car_instance, "vehicle.car", (12.0 + 1.0 * i, 1.5, 0.8), 0.3 + 0.2, (1.9, 4.6, 1.7), ["vehicle.moving"], 40),
                ("ped", ped_instance, "human.pedestrian.adult", (6.0, -4.0, 0.9), 1.2, (0.6, 0.7, 1.8), ["pedestrian.standing"], 7),
                ("barrier", token("inst", "barrier", sample), "movable_object.barrier", (-8.0, 3.0, 0.5), 0.0, (2.5, 0.5, 1.0), [], 0),
                ("animal", token("inst", "animal", sample), "animal", (4.0, 6.0, 0.3), 0.0, (0.4, 0.8, 0.5), [], 3),
            ]
            for kind, instance, category, local, yaw, size, attrs, points in boxes:
                ann = token("ann", sample, kind)
                if kind == "car" and scene_name == "scene-0103":
                    car_anns.append(ann)
                t["sample_annotation"].append({
                    "token": ann, "sample_token": sample, "instance_token": instance, "visibility_token": "4",
                    "attribute_tokens": [token("attr", a) for a in attrs],
                    "translation": _ego_point(ego_xy, ego_yaw, local), "size": list(size),
                    "rotation": _yaw_quaternion(yaw), "prev": "", "next": "",
                    "num_lidar_pts": points, "num_radar_pts": 1 if kind == "car" else 0})
                if kind in ("car", "ped") and scene_name == "scene-0061":
                    instance_token = token("inst", kind, "0061")
                    t["sample_annotation"][-1]["instance_token"] = instance_token
                    t["instance"].append({"token": instance_token, "category_token": token("cat", category),
                                          "nbr_annotations": 1, "first_annotation_token": ann,
                                          "last_annotation_token": ann})
                elif kind in ("barrier", "animal"):
                    t["instance"].append({"token": instance, "category_token": token("cat", category),
                                          "nbr_annotations": 1, "first_annotation_token": ann,
                                          "last_annotation_token": ann})
    by_token = {a["token"]: a for a in t["sample_annotation"]}
    by_token[car_anns[0]]["next"], by_token[car_anns[1]]["prev"] = car_anns[1], car_anns[0]
    ped_anns = [a["token"] for a in t["sample_annotation"] if a["instance_token"] == ped_instance]
    for instance, anns, category in ((car_instance, car_anns, "vehicle.car"),
                                     (ped_instance, ped_anns, "human.pedestrian.adult")):
        t["instance"].append({"token": instance, "category_token": token("cat", category),
                              "nbr_annotations": len(anns), "first_annotation_token": anns[0],
                              "last_annotation_token": anns[-1]})
    (root / VERSION).mkdir(parents=True, exist_ok=True)
    for name, rows in t.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return {"tables": t, "val_samples": [token("sample", "scene-0103", i) for i in range(2)]}
