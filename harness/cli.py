"""The `qharness` command: compare tensors, print the case JSON Schema, train zoo models, convert
official checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.compare import Tolerance, compare, nvidia_report
from harness.errors import HarnessError

#: the bound `qharness compare` applies when no tolerance option is given
DEFAULT_COSINE_MIN = 0.99

_COMPARE_EPILOG = f"""\
verdict: the last line is always "[verdict] PASSED" or "[verdict] FAILED". Without --atol, --rtol,
--cosine-min or --snr-min-db the bound is cosine >= {DEFAULT_COSINE_MIN} (the verdict line says so).
NaN or Inf in either tensor always fails; so do differing shapes unless --allow-reshape (then
only the element counts must match and both tensors are flattened).

exit status: 0 passed, 1 failed, 2 usage error or unreadable / incomparable input (message on stderr).
"""


def _compare(args: argparse.Namespace) -> int:
    from harness import tensorfile

    actual = tensorfile.load(args.actual)
    reference = tensorfile.load(args.reference)
    defaulted = all(v is None for v in (args.atol, args.rtol, args.cosine_min, args.snr_min_db))
    cosine_min = DEFAULT_COSINE_MIN if defaulted else args.cosine_min
    tolerance = Tolerance(args.atol, args.rtol, args.max_mismatch or 0.0, cosine_min, args.snr_min_db)
    try:
        result = compare(actual, reference, tolerance, name=args.actual, allow_reshape=args.allow_reshape)
    except ValueError as exc:
        print(f"qharness compare: {exc}", file=sys.stderr)
        return 2
    note = (f" (default bound cosine >= {DEFAULT_COSINE_MIN}; choose with --atol/--rtol/--cosine-min/--snr-min-db)"
            if defaulted else "")
    if result.stats.actual_shape != result.stats.reference_shape and not args.allow_reshape:
        note += " (shapes differ; --allow-reshape compares the flattened tensors)"
    _print(nvidia_report(result, args.actual, args.reference, detail=args.detail, verdict_note=note))
    return 0 if result.passed else 1


def _print(text: str) -> None:
    """Print to stdout; a reader that went away (`| head -1`) is not an error: the rest of the
    output is dropped quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _bounded(low: float | None, high: float | None) -> Callable[[str], float]:
    """An argparse type: a finite float within [low, high] (None: unbounded on that side)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not finite")
        if (low is not None and value < low) or (high is not None and value > high):
            shown = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {shown}")
        return value
    return parse


def _schema(args: argparse.Namespace) -> int:
    from harness.cases import json_schema

    _print(json.dumps(json_schema(), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from harness.training.cli import train_case

    status: int = train_case(args)
    return status


def _record_training(args: argparse.Namespace) -> int:
    from harness.cases import load_case
    from harness.training.record import record_training

    case = load_case(args.case, profile=args.profile)
    path = record_training(case, Path(args.summary), qat=args.qat)
    print(f"recorded {'QAT ' if args.qat else ''}training of {case.name} in {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from harness.convert.registry import convert_file, get_converter

    conversion = convert_file(args.model, Path(args.source), Path(args.target), args.profile)
    for note in conversion.notes:
        print(f"{args.model}: {note}")
    print(f"{args.model}: wrote {len(conversion.state)} entries to {args.target}, a state dict for "
          f"{get_converter(args.model).factory} (the case's model.checkpoint)")
    return 0


def _golden_import(args: argparse.Namespace) -> int:
    from harness.cases import load_case
    from harness.context import CaseContext, RunOptions

    case = load_case(args.case, profile=args.profile)
    meta = CaseContext(case, RunOptions.default(case.root)).import_golden(Path(args.inputs), Path(args.outputs))
    stages = ", ".join(f"{n}: {len(s['inputs'])} inputs, {len(s['outputs'])} outputs" for n, s in meta["stages"].items())
    print(f"imported golden files of {case.name} into {case.golden_dir} ({stages})")
    return 0


def _case_context(args: argparse.Namespace) -> tuple[Any, Any]:
    """(CaseContext, localise module) for the sensitivity / autoquant commands."""
    import os

    import torch

    from harness import localise
    from harness.backends.registry import QUANT_REFERENCE, backend_with_role
    from harness.cases import load_case
    from harness.context import CaseContext, RunOptions

    reference = backend_with_role(QUANT_REFERENCE)
    if args.backend not in (None, reference):
        raise localise.LocaliseError(f"--backend {args.backend}: layers are ranked on the quantization reference "
                                     f"({reference}), whose calibrated model every int8 backend shares")
    case = load_case(args.case, profile=args.profile)
    cache = args.qharness_cache or os.environ.get("QHARNESS_CACHE") or str(case.root / ".qharness_cache")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return CaseContext(case, RunOptions(device=device, cache_dir=Path(cache))), localise


def _sensitivity(args: argparse.Namespace) -> int:
    ctx, localise = _case_context(args)
    result = localise.case_sensitivity(ctx, top_k=args.top_k)
    rows = [[s.name, _num(s.proxy_snr_db, 2), _num(s.only_int8), _num(s.lost), _num(s.only_float), _num(s.regained)]
            for s in result.layers[: max(args.top_k, 10)]]
    print(f"{ctx.case.name}: {result.metric} float {result.float_value:.4f}, int8 {result.int8_value:.4f}")
    from tabulate import tabulate

    print(tabulate(rows, headers=["layer", "SNR dB (only it int8)", "metric only it int8", "lost",
                                  "metric only it float", "regained"], tablefmt="github", disable_numparse=True))
    if args.json:
        payload = {"case": ctx.case.name, "metric": result.metric, "float": result.float_value,
                   "int8": result.int8_value, "layers": [s.to_dict() for s in result.layers]}
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


def _autoquant(args: argparse.Namespace) -> int:
    ctx, localise = _case_context(args)
    found = localise.case_autoquant(ctx, localise.Target.parse(args.target), top_k=args.top_k)
    print(f"{ctx.case.name}: target {found.target} {'met' if found.met else 'NOT met'}; float {found.float_value:.4f}, "
          f"int8 before {found.before:.4f}, after {found.after:.4f}; int8 MACs {found.int8_macs_before:.1%} -> "
          f"{found.int8_macs_after:.1%}")
    print("quant:\n  keep_float: [" + ", ".join(found.keep_float) + "]")
    return 0 if found.met else 1


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _localise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("case", help="case YAML file")
    p.add_argument("--backend", default=None, help="the quantization reference (default; the only one accepted)")
    p.add_argument("--profile", default="default")
    p.add_argument("--top-k", type=int, default=5, help="layers (worst by SNR) whose metric is measured")
    p.add_argument("--device", default="auto")
    p.add_argument("--qharness-cache", default=None, help="cache folder (default $QHARNESS_CACHE or .qharness_cache)")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="qharness", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="compare two .tensor/.npy files as NVIDIA's tool/compare.py does",
                       epilog=_COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("actual", help="tensor produced by the engine under test (.tensor or .npy)")
    c.add_argument("reference", help="reference tensor, e.g. from PyTorch (.tensor or .npy)")
    c.add_argument("--detail", action="store_true", help="per-tensor summaries, error shares, cosine")
    c.add_argument("--atol", type=_bounded(0.0, None), default=None, help="absolute tolerance (finite, >= 0)")
    c.add_argument("--rtol", type=_bounded(0.0, None), default=None, help="relative tolerance (finite, >= 0)")
    c.add_argument("--max-mismatch", type=_bounded(0.0, 1.0), default=None,
                   help="fraction in [0, 1] allowed outside atol + rtol*|ref| (default 0; needs --atol or --rtol)")
    c.add_argument("--cosine-min", type=_bounded(-1.0, 1.0), default=None, help="minimum cosine similarity")
    c.add_argument("--snr-min-db", type=_bounded(None, None), default=None, help="minimum SNR in dB (finite)")
    c.add_argument("--allow-reshape", action="store_true",
                   help="compare tensors of different shapes but equal element counts, flattened")
    c.set_defaults(func=_compare)

    s = sub.add_parser("schema", help="print the JSON Schema of case files")
    s.set_defaults(func=_schema)

    t = sub.add_parser("train", help="train a zoo model on its case's dataset (see tools/train.py)")
    t.add_argument("case", help="case YAML file")
    t.add_argument("--profile", default="default")
    t.add_argument("--out", required=True, help="output folder (checkpoints, summary)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--time-limit-s", type=float, default=None, help="stop (resumably) after this wall time")
    t.add_argument("--qat", action="store_true",
                   help="quantization-aware training of the calibrated model (recipe: training + quant.qat.training)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    t.set_defaults(func=_train)

    r = sub.add_parser("record-training", help="record a training summary.json in the case's golden meta.json")
    r.add_argument("case", help="case YAML file")
    r.add_argument("summary", help="summary.json written by `qharness train`")
    r.add_argument("--profile", default="default")
    r.add_argument("--qat", action="store_true", help="the summary of `qharness train --qat` (for quant.qat.checkpoint)")
    r.set_defaults(func=_record_training)

    g = sub.add_parser("golden", help="golden files made elsewhere").add_subparsers(dest="golden", required=True)
    gi = g.add_parser("import", help="use .tensor/.npy files made elsewhere (e.g. NVIDIA's dumps) as a case's "
                                     "golden inputs and reference outputs (docs/own-project.md)")
    gi.add_argument("--case", required=True, help="case YAML file")
    gi.add_argument("--inputs", required=True, help="folder of <input name>.tensor / .npy files")
    gi.add_argument("--outputs", required=True, help="folder of <output name>.tensor / .npy reference outputs")
    gi.add_argument("--profile", default="default")
    gi.set_defaults(func=_golden_import)

    from harness.convert import NAMES, SUMMARIES

    v = sub.add_parser("convert", help="map an official checkpoint onto the zoo model (docs/checkpoints.md)",
                       epilog="; ".join(f"{name}: {text}" for name, text in SUMMARIES.items()))
    v.add_argument("model", choices=NAMES, help="which official checkpoint family (see below)")
    v.add_argument("source", help="official checkpoint (.pth / .pt), read with weights_only=True")
    v.add_argument("target", help="state dict to write, for the case's model.checkpoint")
    v.add_argument("--profile", default=None,
                   help="zoo profile to check against (cuda-fastbev, cuda-bevfusion-r50; default full)")
    v.set_defaults(func=_convert)

    sn = sub.add_parser("sensitivity", help="rank layers by the metric lost when only they are int8")
    _localise_args(sn)
    sn.add_argument("--json", default=None, help="write the ranking as JSON here")
    sn.set_defaults(func=_sensitivity)

    aq = sub.add_parser("autoquant", help="the smallest keep_float list that meets a metric target")
    _localise_args(aq)
    aq.add_argument("--target", required=True, help="min_ratio=<ratio> or max_drop=<absolute drop>")
    aq.set_defaults(func=_autoquant)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `qharness` and `python -m harness`; returns the exit status."""
    p = parser()
    args = p.parse_args(argv)
    if args.command == "compare" and args.max_mismatch is not None and args.atol is None and args.rtol is None:
        p.error("--max-mismatch needs --atol or --rtol (it is the share allowed outside atol + rtol*|ref|)")
    try:
        status: int = args.func(args)
    except HarnessError as exc:
        print(f"qharness {args.command}: {exc}", file=sys.stderr)
        return 2
    return status
