"""Fidelity of the FP16 graphs that trt-fp16 builds on TensorRT 11, measured in ONNX Runtime (CPU).

For each case: export (or take from the cache) the float ONNX of every stage, convert it with
`harness.export.fp16.to_fp16`, run both in ONNX Runtime's CPU provider on the golden stage
inputs, and print cosine similarity and max |error| of every output against the fp32 ONNX.
With --qdq, the same for trt-int8's `high_precision: fp16` graph: the TensorRT-layout Q/DQ ONNX
rewritten by `qdq_high_precision` against the Q/DQ ONNX as exported (fp32 remainder).

    PYTHONPATH=. .venv/bin/python tools/fp16_fidelity.py cases/pidnet_s.yaml cases/fastbev_r18.yaml \
        cases/bevfusion_camera.yaml --cache /tmp/qh-cache-trt
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from harness.cases import load_case
from harness.compare import cosine_similarity
from harness.context import CaseContext, RunOptions
from harness.export.fp16 import convert_file


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {n: a for n, a in feeds.items() if n in wanted}), strict=True))


def main(argv: list[str] | None = None) -> int:
    """Print one line per case, stage and output: cosine and max |error| of FP16 vs FP32 ONNX."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--cache", type=Path, default=Path(".qharness_cache"))
    parser.add_argument("--qdq", action="store_true", help="the Q/DQ graph with an FP16 remainder instead")
    args = parser.parse_args(argv)
    print(f"case | stage | output | cosine {'int8+fp16 vs int8+fp32' if args.qdq else 'fp16 vs fp32'} | 1 - cosine | max abs err | max abs ref")
    scratch = Path(tempfile.mkdtemp(prefix="qh-fp16-"))
    for case_path in args.cases:
        case = load_case(case_path)
        options = RunOptions.default()
        ctx = CaseContext(case, RunOptions(device=options.device, cache_dir=args.cache))
        record = ctx.golden_record()
        sources = ctx.qdq_onnx("tensorrt") if args.qdq else ctx.float_onnx()
        for stage, path in sources.items():
            fp16_path = convert_file(path, scratch / f"{case.name}-{stage}.fp16.onnx", high_precision_qdq=args.qdq)
            feeds = {n: np.ascontiguousarray(a) for n, a in record[stage].inputs.items()}
            ref, out = _run(path, feeds), _run(fp16_path, feeds)
            for name, value in ref.items():
                err = float(np.max(np.abs(out[name].astype(np.float64) - value))) if value.size else 0.0
                cos = cosine_similarity(out[name], value)
                print(f"{case.name} | {stage} | {name} | {cos:.6f} | {1 - cos:.2e} | "
                      f"{err:.4g} | {float(np.max(np.abs(value))):.4g}", flush=True)
    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
