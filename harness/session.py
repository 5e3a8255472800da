"""One case in one run: builds model, data and runners lazily and produces item records.

Everything the pytest plugin does is delegated here, so it is callable from plain Python:

    run = CaseRun(load_case("cases/pidnet_s.yaml"), RunOptions.default())
    record = run.check_golden("ort-fp32", "model")
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness import tensorfile
from harness.backends.base import PrepareContext, Runner
from harness.backends.registry import backend_class
from harness.cache import Cache, content_key, file_sha256
from harness.cases import DEFAULT_PROFILE, Case, CompareSpec
from harness.compare import CompareResult, Tolerance, compare, failure_table
from harness.environment import library_versions
from harness.errors import BackendUnavailable, GoldenError, HarnessError, MetricError
from harness.factory import FactoryError, resolve
from harness.golden import GoldenStore
from harness.program import Program
from harness.records import Record
from harness.tasks.base import Batch, Dataset, MetricValues, TaskAdapter, task_class

REFERENCE_DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class RunOptions:
    """Run-wide settings from the command line."""

    device: torch.device
    cache_dir: Path
    update_golden: bool = False
    report_dir: Path | None = None

    @staticmethod
    def default(root: Path = Path(".")) -> RunOptions:
        """CUDA when available, cache under `root/.qharness_cache`, no golden updates."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return RunOptions(device=device, cache_dir=root / ".qharness_cache")


class ItemFailure(HarnessError):
    """An item failed its check; `text` is the table shown to the user."""

    def __init__(self, text: str, record: Record):
        super().__init__(text)
        self.text = text
        self.record = record


StageIO = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
"""A stage's feeds and outputs in one run."""


@dataclass
class StageRecord:
    """Feeds and outputs of one stage in the reference run (CPU numpy arrays)."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def _accumulate(acc: list[float], actual: torch.Tensor, reference: torch.Tensor) -> None:
    """Add a <a, r>, <a, a> and <r, r> of one tensor pair to `acc` (float64)."""
    a, r = actual.double().reshape(-1), reference.double().reshape(-1)
    acc[0] += float(a @ r)
    acc[1] += float(a @ a)
    acc[2] += float(r @ r)


def _cosine(acc: list[float]) -> float:
    """Cosine from accumulated products; 1 when both sides are zero, 0 when only one is."""
    dot, na, nr = acc
    return dot / math.sqrt(na * nr) if na > 0 and nr > 0 else float(na == nr)


def regenerate_command(case: Case) -> str:
    """The pytest command that regenerates this case's golden files."""
    try:
        rel = case.path.resolve().relative_to(case.root.resolve())
    except ValueError:
        rel = case.path
    profile = "" if case.profile == DEFAULT_PROFILE else f" --profile {case.profile}"
    return f"pytest {rel} --update-golden{profile}"


PATH_ARG_SUFFIXES = ("_dir", "_path", "_file")


def _is_path_arg(key: str, value: object) -> bool:
    """Factory arguments named *_dir / *_path / *_file are paths, resolved like case paths."""
    return isinstance(value, str) and key.endswith(PATH_ARG_SUFFIXES)


def build_float_model(case: Case) -> nn.Module:
    """Build the case's model on the CPU in float32 eval mode, loading its checkpoint if any.

    Checkpoints are read with `torch.load(weights_only=True)`; a state dict may be stored bare or
    under "state_dict"/"model". Arguments named *_dir / *_path / *_file resolve against the project
    root like every path in a case. Raises CaseError naming `model.checkpoint` on mismatching keys.
    """
    spec = case.spec.model
    torch.manual_seed(spec.seed)
    args = {k: str(case.resolve_path(v)) if _is_path_arg(k, v) else v for k, v in spec.args.items()}
    try:
        model = resolve(spec.factory)(**args)
    except TypeError as exc:
        raise case.error(f"factory {spec.factory} rejected its arguments: {exc}", "model", "args") from exc
    if not isinstance(model, nn.Module):
        raise case.error(f"factory {spec.factory} returned {type(model).__name__}, not an nn.Module", "model", "factory")
    if case.checkpoint is not None:
        try:
            state = torch.load(case.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise case.error(f"cannot load {case.checkpoint}: {exc}", "model", "checkpoint") from exc
        if isinstance(state, dict):
            for wrapper in ("state_dict", "model"):
                if isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise case.error(f"{case.checkpoint} does not fit the model: {exc}", "model", "checkpoint") from exc
    return model.float().eval()


class CaseRun:
    """Lazily built state of one case; one instance per case and profile per pytest run."""

    def __init__(self, case: Case, options: RunOptions):
        self.case = case
        self.options = options
        self.cache = Cache(options.cache_dir)
        self.golden = GoldenStore(case.golden_dir, regenerate_command(case))
        self._runners: dict[str, Runner] = {}
        self._golden_written = False

    # -- building blocks -------------------------------------------------------------------

    @functools.cached_property
    def adapter(self) -> TaskAdapter:
        """The task adapter (segmentation, detection3d, tensors, or "module:Class")."""
        try:
            cls = task_class(self.case.spec.task)
        except (ValueError, TypeError) as exc:
            raise self.case.error(str(exc), "task") from exc
        return cls(self.case)

    def dataset(self, split: str = "eval") -> Dataset:
        """The evaluation dataset, or the calibration / train split (args merged over data.args)."""
        return self._datasets(split)

    @functools.cache  # noqa: B019 - one CaseRun per case per run; the cache lives as long as it
    def _datasets(self, split: str) -> Dataset:
        data = self.case.spec.data
        args = dict(data.args)
        if split == "calibration":
            args.update(data.calibration.args)
        elif split == "train":
            args.update(data.train.args)
        try:
            dataset: Dataset = resolve(data.factory)(**args)
        except TypeError as exc:
            raise self.case.error(f"{data.factory} rejected its arguments: {exc}", "data", "args") from exc
        if len(dataset) == 0:
            raise self.case.error(f"the {split} dataset is empty", "data", "args")
        return dataset

    @functools.cached_property
    def _float_model(self) -> nn.Module:
        return build_float_model(self.case)

    def float_model(self) -> nn.Module:
        """A private copy of the float model (CPU, float32, eval) that the caller may modify."""
        return copy.deepcopy(self._float_model)

    def program(self, model: nn.Module) -> Program:
        """The case's stages over `model` (single stage named "model" unless `stages:` says)."""
        stages = self.case.spec.stages
        adapter = self.adapter
        if not stages:
            return Program.single(model, adapter.input_names, adapter.output_names, adapter.dynamic_batch)
        if list(stages) == ["model"]:
            only = stages["model"]
            return Program.single(model, tuple(only.inputs), tuple(only.outputs), adapter.dynamic_batch)
        try:
            return Program.staged(model, {k: (tuple(v.inputs), tuple(v.outputs)) for k, v in stages.items()})
        except HarnessError as exc:
            raise self.case.error(str(exc), "stages") from exc

    @functools.cached_property
    def checkpoint_sha256(self) -> str | None:
        """sha256 of the checkpoint file (None for seeded initial weights)."""
        ckpt = self.case.checkpoint
        return None if ckpt is None else file_sha256(ckpt)

    @functools.cached_property
    def model_key(self) -> str:
        """Identity of the float model: case config hash plus checkpoint hash."""
        return content_key(self.case.config_hash(), self.checkpoint_sha256)

    @functools.cached_property
    def stage_names(self) -> tuple[str, ...]:
        """Stage names in declaration order ("model" for single-stage cases)."""
        return tuple(self.program(self._float_model).stages)

    def stage_is_dynamic(self, stage: str) -> bool:
        """True when dim 0 of the stage's inputs is a free batch dimension."""
        return self.program(self._float_model).stages[stage].dynamic_batch

    # -- reference and golden --------------------------------------------------------------

    @functools.cached_property
    def reference(self) -> dict[str, StageRecord]:
        """The float reference run on the golden samples: every stage's feeds and outputs."""
        program = self.program(self.float_model())
        inputs = self.adapter.golden_inputs(self.dataset(), self.case.spec.golden.samples)
        records: dict[str, StageRecord] = {}

        def call(name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if name in records:
                raise HarnessError(f"stage '{name}' ran twice in one reference run; stages must run once")
            outputs = program.stages[name](feeds)
            records[name] = StageRecord(
                {k: v.detach().cpu().numpy() for k, v in feeds.items()},
                {k: v.detach().cpu().numpy() for k, v in outputs.items()},
            )
            return outputs

        with torch.inference_mode():
            program.run(inputs, call)
        return records

    def golden_record(self) -> dict[str, StageRecord]:
        """The golden stage records from disk (regenerated first under --update-golden); the
        task adapter checks the inputs (errors name the golden file)."""
        if self.options.update_golden and not self._golden_written:
            self.write_golden()
        meta = self.golden.check_fresh(self.case.config_hash(), self.checkpoint_sha256)
        stages = meta.get("stages", {})
        out = {}
        for name in self.stage_names:
            if name not in stages:
                raise GoldenError(f"golden meta {self.golden.meta_path} has no stage '{name}'.\n"
                                  f"Regenerate with: {self.golden.hint}")
            inputs = {n: self.golden.read("inputs", n, meta) for n in stages[name]["inputs"]}
            self.adapter.check_inputs(inputs, {n: str(self.golden.path_of("inputs", n, meta)) for n in inputs})
            out[name] = StageRecord(inputs, {n: self.golden.read("outputs", n, meta) for n in stages[name]["outputs"]})
        return out

    def write_golden(self) -> None:
        """Regenerate golden inputs, reference outputs and meta.json from the float model, in
        the file names and dtypes the task adapter asks for (`golden_layout`)."""
        reference = self.reference
        inputs: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] = {}
        for rec in reference.values():
            inputs.update(rec.inputs)
            outputs.update(rec.outputs)
        meta = {
            "case": self.case.name,
            "profile": self.case.profile,
            "config_hash": self.case.config_hash(),
            "checkpoint": self.case.spec.model.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "versions": library_versions(),
            "created_by": regenerate_command(self.case),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stages": {n: {"inputs": list(r.inputs), "outputs": list(r.outputs)} for n, r in reference.items()},
        }
        model_files = self._write_model_files()
        self.golden.write({"inputs": inputs, "outputs": outputs}, meta, self.adapter.golden_layout())
        if model_files:
            self.golden.update_meta(lambda m: m["files"].update(model_files))
        self._golden_written = True

    def _write_model_files(self) -> dict[str, str]:
        """Save the float model's `golden_files()` (e.g. FastBEV's lookup tables) as
        `<golden dir>/<name>.tensor`, each atomically; returns their sha256 by file name.

        They are written before meta.json so that a meta.json naming them never points at
        missing files; their hashes then join meta.json's `files`.
        """
        provide = getattr(self._float_model, "golden_files", None)
        if not callable(provide):
            return {}
        hashes = {}
        for name, array in provide().items():
            if not name or Path(name).name != name or name.startswith("."):
                raise GoldenError(f"{type(self._float_model).__name__}.golden_files(): '{name}' is not a plain file name")
            path = self.golden.dir / f"{name}.tensor"
            tensorfile.save(path, np.asarray(array))
            hashes[path.name] = file_sha256(path)
        return hashes

    def stage_feeds(self) -> dict[str, dict[str, torch.Tensor]]:
        """Example feeds per stage for exports: golden inputs when present, else the reference."""
        try:
            record = self.golden_record()
        except GoldenError:
            record = self.reference
        return {s: {n: torch.from_numpy(a) for n, a in r.inputs.items()} for s, r in record.items()}

    # -- backends ----------------------------------------------------------------------------

    def unavailable_reason(self, backend: str) -> str | None:
        """The skip reason for `backend` on this run's device, or None when it can run."""
        reason = self.adapter.unsupported_backends().get(backend)
        if reason:
            return reason
        try:
            return backend_class(backend)().unavailable_reason(self.options.device)
        except FactoryError as exc:
            return f"{backend} is not available: {exc}"

    def prepare_context(self) -> PrepareContext:
        """What backends (and the rules item's export) may use to build their artefacts."""
        return PrepareContext(
            case=self.case, cache=self.cache, device=self.options.device, program=self.program,
            float_model=self.float_model, quantized_model=self.quantized_model,
            stage_feeds=self.stage_feeds, model_key=self.model_key, quant_key=lambda: self.quant_key,
        )

    def runner(self, backend: str) -> Runner:
        """The prepared runner of `backend` (built once per run; artefacts cached on disk)."""
        if backend not in self._runners:
            reason = self.unavailable_reason(backend)
            if reason:
                raise BackendUnavailable(reason)
            self._runners[backend] = backend_class(backend)().prepare(self.prepare_context())
        return self._runners[backend]

    def release(self, backend: str) -> None:
        """Close and forget the runner of `backend` (called after its last item)."""
        runner = self._runners.pop(backend, None)
        if runner is not None:
            runner.close()

    @functools.cached_property
    def quant_key(self) -> str:
        """Identity of the calibrated model: float model, quant settings, calibration data."""
        data = self.case.spec.data
        return content_key(self.model_key, self.case.spec.quant.model_dump(), data.factory,
                           {**data.args, **data.calibration.args}, library_versions())

    def quantized_model(self) -> nn.Module:
        """The calibrated fake-quant model shared by every int8 backend of this run."""
        return self._quantized

    @functools.cached_property
    def _quantized(self) -> nn.Module:
        from harness.quant.pipeline import calibrated_model

        return calibrated_model(self)

    # -- items -------------------------------------------------------------------------------

    def tolerance(self, backend: str, output: str) -> Tolerance:
        """The case's tolerance for one output of one backend."""
        spec: CompareSpec = self.case.spec.backends[backend].compare
        chosen = spec.outputs.get(output, spec)
        return Tolerance(chosen.atol, chosen.rtol, chosen.max_mismatch, chosen.cosine_min, chosen.snr_min_db)

    def check_golden(self, backend: str, stage: str) -> Record:
        """Run `stage` of `backend` on the golden inputs and compare with the golden outputs.

        Returns the record when every output is within tolerance; raises ItemFailure with a
        compact table otherwise, GoldenError when golden files are missing or stale.
        """
        started = time.perf_counter()
        golden = self.golden_record()[stage]
        runner = self.runner(backend)
        feeds = {n: torch.from_numpy(a) for n, a in golden.inputs.items()}
        actual = runner.run_stage(stage, feeds)
        results: list[CompareResult] = []
        for name, reference in golden.outputs.items():
            if name not in actual:
                raise HarnessError(f"{backend} stage '{stage}' produced no output '{name}' (got {sorted(actual)})")
            results.append(compare(actual[name].detach().cpu().numpy(), reference,
                                   self.tolerance(backend, name), name=name))
        record = self._record(backend, "golden", stage, runner, started)
        record.compare = {r.name: r.to_dict() for r in results}
        failed = [r for r in results if not r.passed]
        if failed:
            record.verdict = "failed"
            text = f"{self.case.name}[{backend}] stage '{stage}': {len(failed)} of {len(results)} outputs " \
                   f"outside tolerance\n" + "\n\n".join(failure_table(r) for r in failed)
            raise ItemFailure(text, record)
        return record

    def _record(self, backend: str, item: str, stage: str | None, runner: Runner | None, started: float) -> Record:
        return Record(
            case=self.case.name, profile=self.case.profile, backend=backend, item=item, stage=stage,
            verdict="passed", info=dict(runner.info) if runner else {},
            artifacts=self._artifacts(runner), duration_s=time.perf_counter() - started,
        )

    def _artifacts(self, runner: Runner | None) -> dict[str, str]:
        out = {"golden": str(self.golden.dir), "case": str(self.case.path)}
        if self.case.checkpoint is not None:
            out["checkpoint"] = str(self.case.checkpoint)
        if runner is not None:
            out.update(runner.artifacts)
        return out

    # -- metrics -----------------------------------------------------------------------------

    def run_batches(self, backend: str, batches: Iterable[Batch]) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """Run `backend` end to end on each batch; outputs come back on the CPU. NaN/Inf in a
        float output is a MetricError naming the backend, the output and the samples."""
        for batch, outputs, _ in self._run(backend, batches, record_stages=False):
            yield batch, outputs

    def _run(self, backend: str, batches: Iterable[Batch], *,
             record_stages: bool) -> Iterator[tuple[Batch, dict[str, torch.Tensor], dict[str, StageIO]]]:
        """`run_batches`, also yielding each stage's feeds and outputs (CPU) when `record_stages`."""
        runner = self.runner(backend)
        program = self.program(self._float_model)
        for batch in batches:
            stages: dict[str, StageIO] = {}

            def call(stage: str, feeds: dict[str, torch.Tensor], stages: dict[str, StageIO] = stages) -> dict[str, torch.Tensor]:
                outputs = runner.run_stage(stage, feeds)
                stages[stage] = ({k: v.detach().cpu() for k, v in feeds.items()},
                                 {k: v.detach().cpu() for k, v in outputs.items()})
                return outputs

            run_stage = call if record_stages else runner.run_stage
            outputs = {k: v.detach().cpu() for k, v in program.run(batch.inputs, run_stage).items()}
            for name, tensor in outputs.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise MetricError(f"{backend}: output '{name}' has {bad} NaN/Inf values "
                                      f"in samples {', '.join(batch.sample_ids)}")
            yield batch, outputs, stages

    def eval_batches(self) -> Iterator[Batch]:
        """The evaluation dataset in metric batches."""
        return self.adapter.batches(self.dataset(), self.case.spec.data.batch_size)

    def metric_values(self, backend: str) -> MetricValues:
        """Run `backend` end to end over the evaluation dataset and compute the case metric."""
        accumulator = self.adapter.metric()
        if accumulator is None:
            raise self.case.error(f"task '{self.case.spec.task}' has no metric", "metric")
        for batch, outputs in self.run_batches(backend, self.eval_batches()):
            accumulator.update(outputs, batch)
        return accumulator.compute()

    def pictures(self, backend: str, count: int = 2) -> dict[str, str]:
        """Comparison pictures of the first `count` samples (float vs `backend`) in the report
        folder; returns record artifacts `picture:<file>` -> path."""
        assert self.options.report_dir is not None
        batch = next(iter(self.adapter.batches(self.dataset(), count)))
        outputs = {"float": next(self.run_batches("torch-fp32", [batch]))[1]}
        if backend != "torch-fp32":
            outputs[backend] = next(self.run_batches(backend, [batch]))[1]
        out_dir = self.options.report_dir / "pictures" / self.case.name
        paths = self.adapter.pictures(batch, outputs, out_dir, backend)
        return {f"picture:{p.name}": str(p) for p in paths}

    def check_fidelity(self, backend: str) -> Record:
        """Agreement of `backend` with its fidelity reference over the evaluation set: cosine
        of every output (accumulated over all batches) and the task's prediction agreement.

        Multi-stage programs also get a cosine per stage output, each stage of `backend` fed with
        the reference's inputs of that stage (so a stage is judged on its own, not on what the
        stages before it passed on); `cosine_min` applies to those too.
        """
        started = time.perf_counter()
        spec = self.case.spec.backends[backend].fidelity
        assert spec is not None
        sums: dict[str, list[float]] = {}
        stage_sums: dict[str, dict[str, list[float]]] = {}
        staged = not self.program(self._float_model).is_single
        agree = total = 0
        pairs = zip(self.run_batches(backend, self.eval_batches()),
                    self._run(spec.reference, self.eval_batches(), record_stages=staged), strict=True)
        for (batch, out), (_, ref, ref_stages) in pairs:
            for name, tensor in out.items():
                _accumulate(sums.setdefault(name, [0.0, 0.0, 0.0]), tensor, ref[name])
            counted = self.adapter.agreement(out, ref, batch)
            if counted is not None:
                agree, total = agree + counted[0], total + counted[1]
            for stage, (feeds, expected) in ref_stages.items():
                actual = self.runner(backend).run_stage(stage, feeds)
                for name, tensor in expected.items():
                    _accumulate(stage_sums.setdefault(stage, {}).setdefault(name, [0.0, 0.0, 0.0]),
                                actual[name].detach().cpu(), tensor)
        cosine = {n: _cosine(acc) for n, acc in sums.items()}
        stage_cosine = {s: {n: _cosine(acc) for n, acc in outs.items()} for s, outs in stage_sums.items()}
        agreement = agree / total if total else None
        record = self._record(backend, "fidelity", None, self._runners.get(backend), started)
        record.fidelity = {"reference": spec.reference, "cosine": cosine, "agreement": agreement,
                           "agreeing": agree, "compared": total}
        if staged:
            record.fidelity["stages"] = stage_cosine
        problems = []
        if spec.cosine_min is not None:
            problems += [f"cosine of '{n}' vs {spec.reference} {c:.6f} < {spec.cosine_min}" for n, c in cosine.items()
                         if c < spec.cosine_min]
            problems += [f"stage '{s}': cosine of '{n}' vs {spec.reference} {c:.6f} < {spec.cosine_min}"
                         for s, outs in stage_cosine.items() for n, c in outs.items() if c < spec.cosine_min]
        if spec.agreement_min is not None and (agreement is None or agreement < spec.agreement_min):
            shown = "n/a (task has no agreement measure)" if agreement is None else f"{agreement:.6f}"
            problems.append(f"prediction agreement with {spec.reference} {shown} < {spec.agreement_min}")
        if problems:
            record.verdict = "failed"
            raise ItemFailure(f"{self.case.name}[{backend}] fidelity:\n  " + "\n  ".join(problems), record)
        return record

    def check_rules(self, backend: str) -> Record:
        """Export the calibrated model's stages in TensorRT's Q/DQ layout (cached, shared with
        trt-int8; TensorRT itself is not needed) and check the quantization rules on the graphs
        (`harness.export.inspect`). The record carries the rule report; any violation fails
        with the list of violating nodes."""
        from harness.backends.onnxruntime import qdq_onnx
        from harness.export.inspect import rule_report
        from harness.quant.transform import summarize

        started = time.perf_counter()
        paths = qdq_onnx(self.prepare_context(), "tensorrt")
        model = self.quantized_model()
        program = self.program(model)
        report = rule_report({s: (paths[s], program.model) for s in program.stages}, self.case.spec.quant.rules,
                             summarize(model))
        record = self._record(backend, "rules", None, None, started)
        record.artifacts.update({f"onnx-qdq-tensorrt:{s}": str(p) for s, p in paths.items()})
        record.rules = report.to_dict()
        if not report.passed:
            record.verdict = "failed"
            raise ItemFailure(f"{self.case.name}[{backend}] rules: {report.failure_text()}", record)
        return record

    def float_metric(self) -> dict[str, Any]:
        """The float model's metric (torch-fp32 on this run's device), cached on disk."""
        assert self.case.spec.metric is not None
        key = content_key("float-metric", self.model_key, self.case.spec.data.model_dump(),
                          self.case.spec.metric.model_dump(), library_versions(), self.options.device.type)

        def compute() -> dict[str, Any]:
            values = self.metric_values("torch-fp32")
            return {"values": values.values, "primary": values.primary, "details": values.details}

        return self.cache.json_value(f"{self.case.name}/float-metric", key, compute)

    def gated_keys(self, primary: str) -> list[str]:
        """The metric figures the gates apply to (`metric.keys`, default the primary)."""
        assert self.case.spec.metric is not None
        return list(self.case.spec.metric.keys) or [primary]

    def check_metric(self, backend: str) -> Record:
        """Gate `backend`'s metric against float_min, min_ratio / max_drop and the baseline."""
        from harness.gates import evaluate_gates

        started = time.perf_counter()
        metric = self.case.spec.metric
        if metric is None:
            raise self.case.error("the case has no metric section", "metric")
        float_result = self.float_metric()
        values = self.metric_values(backend)
        # Under --update-golden this run's figures become the new baseline, so the old one is not a gate.
        baselines = {} if self.options.update_golden else self._baselines().get(backend, {})
        gate = self.case.spec.backends[backend].metric
        outcome = evaluate_gates(
            backend=backend, keys=self.gated_keys(values.primary), values=values.values,
            float_values=float_result["values"], float_min=metric.float_min, gate=gate,
            baselines=baselines, baseline_tolerance=(gate.baseline_tolerance if gate and gate.baseline_tolerance
                                                     is not None else metric.baseline_tolerance),
        )
        record = self._record(backend, "metric", None, self._runners.get(backend), started)
        record.metric = outcome.to_dict(metric.name, values.primary, values.details, float_result["details"])
        if self.options.report_dir is not None:
            record.artifacts.update(self.pictures(backend))
        if self.options.update_golden:
            self._store_baseline(backend, values, float_result["values"])
        if not outcome.passed:
            record.verdict = "failed"
            raise ItemFailure(outcome.failure_text(self.case.name), record)
        return record

    def _baselines(self) -> dict[str, dict[str, float]]:
        if not self.golden.exists():
            return {}
        baselines: dict[str, dict[str, float]] = self.golden.meta().get("baselines", {})
        return baselines

    def _store_baseline(self, backend: str, values: MetricValues, float_values: Mapping[str, float]) -> None:
        keys = self.gated_keys(values.primary)

        def change(meta: dict[str, Any]) -> None:
            meta.setdefault("baselines", {})[backend] = {k: values.values[k] for k in keys}
            meta["float_metric"] = {k: float_values[k] for k in keys if not math.isnan(float_values[k])}

        if not self.golden.exists():
            self.write_golden()
        self.golden.update_meta(change)

