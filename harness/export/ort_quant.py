"""ONNX Runtime's static quantization of an ONNX file into a Q/DQ ONNX, cached like the exports.

Cases whose model is an ONNX file have no PyTorch model to calibrate; their int8 graphs come from
`onnxruntime.quantization.quantize_static` in QDQ format with per-channel weights, calibrated on
the case's calibration data (fed through a `CalibrationDataReader`). Two layouts, as for the
PyTorch exports (`harness.export.artifacts`): ONNX Runtime's (uint8 activations, weights as
`weight_codes`) and TensorRT's (int8 activations and weights, both symmetric: zero points 0, as
TensorRT's explicit quantization requires). Entries are keyed by the identity of the source file
and the calibration, the layout, the method and the library versions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from harness.cache import Cache, content_key
from harness.environment import library_versions
from harness.errors import HarnessError

Layout = Literal["tensorrt", "onnxruntime"]
WeightCodes = Literal["int8", "uint8"]
Method = Literal["minmax", "percentile", "entropy"]


def quantize_onnx(source: Path, target: Path, calibration: Iterable[Mapping[str, np.ndarray]], layout: Layout,
                  weight_codes: WeightCodes = "int8", method: Method = "minmax", percentile: float = 99.99,
                  keep_float: tuple[str, ...] = ()) -> None:
    """Write the Q/DQ quantization of the ONNX file `source` to `target`: static quantization
    calibrated on the feeds of `calibration` (input name -> array), per-channel weights; the
    nodes named in `keep_float` stay float.

    Raises HarnessError naming `source` when there are no calibration feeds or ONNX Runtime
    cannot quantize the graph.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, feeds: Iterator[Mapping[str, np.ndarray]]):
            self.feeds = feeds
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self.feeds, None)
            if feed is None:
                return None
            self.count += 1
            return {k: np.ascontiguousarray(v) for k, v in feed.items()}

    reader = Reader(iter(calibration))
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    extra: dict[str, Any] = {"CalibPercentile": percentile} if method == "percentile" else {}
    if layout == "tensorrt":
        activations, weights = QuantType.QInt8, QuantType.QInt8
        extra.update(ActivationSymmetric=True, WeightSymmetric=True)
    else:
        activations = QuantType.QUInt8
        weights = QuantType.QInt8 if weight_codes == "int8" else QuantType.QUInt8
    try:
        quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activations, weight_type=weights, calibrate_method=calibrate,
                        nodes_to_exclude=list(keep_float), extra_options=extra)
    except Exception as exc:
        raise HarnessError(f"ONNX Runtime cannot quantize {source}: {type(exc).__name__}: {exc}") from exc
    if reader.count == 0:
        raise HarnessError(f"no calibration data to quantize {source}")


def ort_qdq_onnx(cache: Cache, namespace: str, identity: str, source: Path,
                 calibration: Callable[[], Iterable[Mapping[str, np.ndarray]]], layout: Layout,
                 weight_codes: WeightCodes = "int8", method: Method = "minmax", percentile: float = 99.99,
                 keep_float: tuple[str, ...] = ()) -> Path:
    """The cached `quantize_onnx` of `source` (built once per identity, layout, codes, method,
    float nodes and library versions; `calibration()` is called only when the entry is built).
    `identity` must cover the source file's bytes and the calibration data."""
    flavour = f"ort-qdq-{layout}" if weight_codes == "int8" else f"ort-qdq-{layout}-{weight_codes}"

    def build(folder: Path) -> None:
        quantize_onnx(source, folder / "model.onnx", calibration(), layout, weight_codes, method, percentile,
                      keep_float)

    key = content_key("ort-quant", flavour, identity, method, percentile, sorted(keep_float), library_versions())
    return cache.entry(f"{namespace}/onnx-{flavour}", key, build) / "model.onnx"
