"""Benchmark: ONNX Runtime int8 (onnxruntime Q/DQ layout) vs fp32 latency on CPU at 1x3x256x512.

Run: PYTHONPATH=$PWD python -m pytest -p no:qharness tests/bench_export_qdq.py -s
Prints the CPU flags that matter for int8 (VNNI) and the median latencies; asserts no timing.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from quant_nets import FourConv, ResNetish, randomize_bn
from torch import nn

from harness.export.qdq import export_qdq, int8_report, optimize_with_onnxruntime
from harness.quant.calibrate import calibrate
from harness.quant.rules import get_rule
from harness.quant.transform import QuantConfig, quantize_model

SHAPE = (1, 3, 256, 512)


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(f for f in flags if f.startswith(("avx512", "avx2", "avx_vnni", "amx")) or f == "fma")


def _median_latency(session: ort.InferenceSession, x: np.ndarray, rounds: int = 15) -> float:
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@pytest.mark.parametrize("net", [FourConv, ResNetish], ids=["four_conv", "resnetish"])
def test_bench_ort_int8_vs_fp32(net: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(net())
    x = torch.randn(SHAPE)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    (tmp_path / "fp32.onnx").write_bytes(buffer.getvalue())
    rules = (get_rule("shared_input"),) if net is ResNetish else ()  # FourConv reads no tensor twice
    q = quantize_model(model, QuantConfig(rules=rules), example_inputs=(x,))
    calibrate(q, [(torch.randn(SHAPE),) for _ in range(2)], progress=False)
    int8_path = export_qdq(q, (x,), tmp_path / "int8.onnx", layout="onnxruntime", input_names=["x"], output_names=["y"])
    report = int8_report(optimize_with_onnxruntime(int8_path, tmp_path / "int8.opt.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    fp32 = _median_latency(ort.InferenceSession(str(tmp_path / "fp32.onnx"), options, providers=["CPUExecutionProvider"]), x.numpy())
    int8 = _median_latency(ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"]), x.numpy())
    print(
        f"\n{net.__name__} {SHAPE}: ort-fp32 {fp32 * 1e3:.1f} ms, ort-int8 {int8 * 1e3:.1f} ms, speedup {fp32 / int8:.2f}x "
        f"(QLinearConv {report.count('QLinearConv')}, ConvInteger {report.count('ConvInteger')}, "
        f"float convs {len(report.float_convs)}); CPU flags: {_cpu_flags()}"
    )
