"""The case context: one case in one run, built lazily and shared by every check.

Everything a check needs comes from here - the task adapter, datasets, the float model (private
copies), the program of stages, the golden store, the reference run, prepared backend runners,
the calibrated model, the cached exports, and each backend's evaluation over the eval set
(`harness.evaluation`, computed once and shared by the metric and fidelity checks). Collecting a
case builds nothing: stage names come from the case file, the model is built on first use.

    ctx = CaseContext(load_case("cases/pidnet_s.yaml"), RunOptions.default())
    record = harness.checks.run_check(ctx, "golden", "ort-fp32", "model")
"""

from __future__ import annotations

import copy
import functools
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from harness import tensorfile
from harness.backends.base import PrepareContext, Runner
from harness.backends.registry import (
    FLOAT_REFERENCE,
    ONNX_FLOAT_REFERENCE,
    BackendInfo,
    backend_class,
    backend_info,
    backend_with_role,
)
from harness.cache import Cache, content_key, file_sha256
from harness.cases import DEFAULT_PROFILE, PATH_ARG_NAMES, PATH_ARG_SUFFIXES, Case
from harness.compare import Tolerance
from harness.environment import library_versions
from harness.errors import BackendUnavailable, GoldenError, HarnessError
from harness.export import artifacts
from harness.export.onnx_model import GraphIO, OnnxModule, graph_io
from harness.export.ort_quant import Method, ort_qdq_onnx
from harness.factory import FactoryError, resolve
from harness.golden import GoldenStore
from harness.identity import Fingerprint, fingerprint
from harness.metrics.base import Metric, MetricArgsError, metric_class
from harness.program import SINGLE_STAGE, Program
from harness.records import Record
from harness.tasks.base import Batch, Dataset, TaskAdapter, task_class

if TYPE_CHECKING:
    from harness.evaluation import Evaluation

REFERENCE_DEVICE = torch.device("cpu")
BATCH_CACHE_BYTES = 512 << 20
"""Evaluation batches are kept in memory for the next backend up to this many bytes of inputs."""


@dataclass(frozen=True)
class RunOptions:
    """Run-wide settings from the command line."""

    device: torch.device
    cache_dir: Path
    update_golden: bool = False
    report_dir: Path | None = None
    overwrite_golden: bool = False
    allow_outside_root: bool = False

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


def regenerate_command(case: Case) -> str:
    """The pytest command that regenerates this case's golden files."""
    profile = "" if case.profile == DEFAULT_PROFILE else f" --profile {case.profile}"
    return f"pytest {case.display_path} --update-golden{profile}"


def import_command(case: Case) -> str:
    """The qharness command that imports golden files made elsewhere for this case."""
    return f"qharness golden import --case {case.display_path} --inputs DIR --outputs DIR"


def factory_failure(factory: str, exc: BaseException) -> str:
    """One message for a factory that raised: the exception and the innermost frame of the
    user's code (not pytest's or pluggy's), instead of a page of framework traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f for f in reversed(frames) if "site-packages" not in f.filename), frames[-1] if frames else None)
    at = f" (at {where.filename}:{where.lineno}, in {where.name})" if where else ""
    return f"{factory} raised {type(exc).__name__}: {exc}{at}"


def _imported_tensor(folder: Path, name: str, kind: str, stage: str) -> np.ndarray:
    """Tensor `name` from `folder` (`<name>.tensor`, else `<name>.npy`); GoldenError naming the
    folder, the tensor and the files there otherwise."""
    for suffix in (".tensor", ".npy"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            try:
                return tensorfile.load(path)
            except HarnessError as exc:
                raise GoldenError(f"cannot import {path}: {exc}") from exc
    present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    where = f"{folder} holds {', '.join(present[:10]) or 'nothing'}" if folder.is_dir() else f"{folder} is not a folder"
    raise GoldenError(f"cannot import the {kind} '{name}' of stage '{stage}': no {name}.tensor or {name}.npy "
                      f"({where})")


def _is_path_arg(key: str, value: object) -> bool:
    """Factory arguments named *_dir / *_path / *_file, `root` or `dataroot` are paths, resolved
    like case paths."""
    return isinstance(value, str) and (key.endswith(PATH_ARG_SUFFIXES) or key in PATH_ARG_NAMES)


def build_float_model(case: Case) -> nn.Module:
    """Build the case's model on the CPU in float32 eval mode, loading its checkpoint if any.

    Checkpoints are read with `torch.load(weights_only=True)`; a state dict may be stored bare or
    under "state_dict"/"model". Arguments named *_dir / *_path / *_file / root / dataroot resolve
    against the project root like every path in a case. Raises CaseError naming `model.checkpoint` on mismatching keys.
    """
    spec = case.spec.model
    if spec.factory is None:
        raise case.error("the case's model is an ONNX file, not a PyTorch model factory", "model", "onnx")
    torch.manual_seed(spec.seed)
    args = {k: str(case.resolve_path(v)) if _is_path_arg(k, v) else v for k, v in spec.args.items()}
    try:
        model = resolve(spec.factory)(**args)
    except HarnessError:
        raise
    except TypeError as exc:
        raise case.error(f"factory {spec.factory} rejected its arguments: {exc}", "model", "args") from exc
    except Exception as exc:
        raise case.error(factory_failure(spec.factory, exc), "model", "factory") from exc
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


class CaseContext:
    """Lazily built state of one case; one instance per case and profile per pytest run."""

    def __init__(self, case: Case, options: RunOptions):
        self.case = case
        self.options = options
        self.cache = Cache(options.cache_dir)
        self.golden = GoldenStore(case.golden_dir, regenerate_command(case))
        self._runners: dict[str, Runner] = {}
        self._golden_written = False
        self._evaluations: dict[str, Evaluation] = {}
        self._batches: list[Batch] | None = None

    # -- what the case says, without building anything --------------------------------------

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Stage names in declaration order ("model" for single-stage cases), from the case file."""
        return tuple(self.case.spec.stages) or (SINGLE_STAGE,)

    @property
    def is_staged(self) -> bool:
        """True for a program of several named stages (glue between them in PyTorch)."""
        return self.stage_names != (SINGLE_STAGE,)

    @functools.cached_property
    def metric_class(self) -> type[Metric] | None:
        """The case metric's class (None without a metric section); CaseError naming the key for
        unknown metrics, arguments, gated figures and metrics the task cannot feed."""
        spec = self.case.spec.metric
        if spec is None:
            return None
        try:
            cls = metric_class(spec.name)
        except MetricArgsError as exc:
            raise self.case.error(str(exc), "metric", "name") from exc
        try:
            cls.check_args(spec.args)
            cls(**spec.args)
        except MetricArgsError as exc:
            raise self.case.error(str(exc), "metric", "args", *([exc.key] if exc.key else [])) from exc
        except (TypeError, ValueError) as exc:
            raise self.case.error(f"metric '{spec.name}' rejected its arguments: {exc}", "metric", "args") from exc
        for index, key in enumerate(spec.keys):
            try:
                cls.figure(key)
            except MetricArgsError as exc:
                raise self.case.error(str(exc), "metric", "keys", str(index)) from exc
        if isinstance(spec.float_min, Mapping):
            for key in spec.float_min:
                try:
                    cls.figure(key)
                except MetricArgsError as exc:
                    raise self.case.error(str(exc), "metric", "float_min", key) from exc
        kind = self.adapter.prediction_kind
        if kind != cls.consumes:
            raise self.case.error(f"metric '{spec.name}' scores {cls.consumes} predictions; task "
                                  f"'{self.case.spec.task}' decodes {kind or 'none'}", "metric", "name")
        return cls

    def validate(self) -> None:
        """Collection-time checks that build nothing: task options and metric (CaseError); an
        ONNX case declares no stages (its one stage is the graph)."""
        _ = self.adapter
        _ = self.metric_class
        if self.is_onnx and self.case.spec.stages:
            raise self.case.error("a case whose model is an ONNX file has one stage, 'model', with the graph's "
                                  "inputs and outputs; remove `stages:`", "stages")
        if self.is_onnx:
            quant = self.case.spec.quant
            for key, value in (("rules", quant.rules), ("quantizer", quant.quantizer), ("qat", quant.qat)):
                if value:
                    raise self.case.error(f"quant.{key} applies to PyTorch models; an ONNX file is quantized by "
                                          "ONNX Runtime's static quantization", "quant", key)
            for index, name in enumerate(quant.keep_float):
                if name not in self.onnx_io.nodes:
                    raise self.case.error(f"quant.keep_float: the ONNX file {self.case.onnx} has no node named "
                                          f"'{name}' (an ONNX case keeps graph nodes float, by node name)",
                                          "quant", "keep_float", str(index))

    @property
    def is_onnx(self) -> bool:
        """True when the case's model is an ONNX file (`model.onnx`), not a PyTorch factory."""
        return self.case.onnx is not None

    @functools.cached_property
    def onnx_io(self) -> GraphIO:
        """Inputs and outputs of the case's ONNX file (CaseError naming `model.onnx` when unreadable)."""
        assert self.case.onnx is not None
        try:
            return graph_io(self.case.onnx)
        except HarnessError as exc:
            raise self.case.error(str(exc), "model", "onnx") from exc

    @functools.cached_property
    def onnx_sha256(self) -> str | None:
        """sha256 of the case's ONNX file (None for a PyTorch model): the ONNX model's identity."""
        return None if self.case.onnx is None else file_sha256(self.case.onnx)

    def info(self, backend: str) -> BackendInfo:
        """The registry entry of `backend`."""
        return backend_info(backend)

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

    @functools.cache  # noqa: B019 - one CaseContext per case per run; the cache lives as long as it
    def _datasets(self, split: str) -> Dataset:
        data = self.case.spec.data
        args = dict(data.args)
        if split == "calibration":
            args.update(data.calibration.args)
        elif split == "train":
            args.update(data.train.args)
        args = {k: str(self.case.resolve_path(v)) if _is_path_arg(k, v) else v for k, v in args.items()}
        try:
            dataset: Dataset = resolve(data.factory)(**args)
        except HarnessError:
            raise
        except TypeError as exc:
            raise self.case.error(f"{data.factory} rejected its arguments: {exc}", "data", "args") from exc
        except Exception as exc:
            raise self.case.error(factory_failure(data.factory, exc), "data", "factory") from exc
        if len(dataset) == 0:
            raise self.case.error(f"the {split} dataset is empty", "data", "args")
        return dataset

    @functools.cached_property
    def _float_model(self) -> nn.Module:
        if self.case.onnx is not None:
            _ = self.onnx_io
            return OnnxModule(self.case.onnx)
        return build_float_model(self.case)

    def float_model(self) -> nn.Module:
        """A private copy of the float model (CPU, float32, eval) that the caller may modify."""
        return copy.deepcopy(self._float_model)

    def program(self, model: nn.Module) -> Program:
        """The case's stages over `model` (single stage named "model" unless `stages:` says)."""
        stages = self.case.spec.stages
        adapter = self.adapter
        if self.is_onnx:
            io = self.onnx_io
            return Program.single(model, io.inputs, io.outputs, io.dynamic_batch)
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
    def fingerprint(self) -> Fingerprint:
        """What the float model is (`harness.identity`): its parameters and buffers and the code of
        the project modules that define it (builds the model). Not for ONNX cases (`onnx_sha256`)."""
        assert self.case.spec.model.factory is not None, "an ONNX case's identity is its file's sha256"
        return fingerprint(self._float_model, [self.case.spec.model.factory.split(":")[0]])

    @functools.cached_property
    def model_key(self) -> str:
        """Identity of the float model for every cache key: case config hash, checkpoint hash and
        the model's fingerprint, so edited weights, factory arguments or model code never reuse an
        export, calibration or float metric. An ONNX case: config hash and the file's sha256."""
        if self.onnx_sha256 is not None:
            return content_key(self.case.config_hash(), "onnx", self.onnx_sha256)
        return content_key(self.case.config_hash(), self.checkpoint_sha256, self.fingerprint.digest())

    def stage_is_dynamic(self, stage: str) -> bool:
        """True when dim 0 of the stage's inputs is a free batch dimension."""
        return self.program(self._float_model).stages[stage].dynamic_batch

    # -- reference and golden --------------------------------------------------------------

    @functools.cached_property
    def reference(self) -> dict[str, StageRecord]:
        """The float reference run on the golden samples: every stage's feeds and outputs."""
        program = self.program(self.float_model())
        samples, dataset = self.case.spec.golden.samples, self.dataset()
        if samples > len(dataset):
            raise self.case.error(f"golden.samples {samples} is more than the {len(dataset)} samples of the "
                                  "evaluation data", "golden", "samples")
        inputs = self.adapter.golden_inputs(dataset, samples)
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
        if self.is_onnx:
            self._check_onnx_fresh()
        meta = self.golden.check_fresh(self.case.config_hash(), self.checkpoint_sha256)
        changed = [] if self.is_onnx else self.fingerprint.differences(meta.get("model_fingerprint"))
        if changed:
            raise GoldenError(f"golden files in {self.golden.dir} are stale: " + "; ".join(changed)
                              + f".\nRegenerate with: {self.golden.hint}")
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

    def _check_onnx_fresh(self) -> None:
        """GoldenError (stale, with the regeneration command) when the golden files were made for
        another ONNX file than the case's."""
        made_for = self.golden.meta().get("onnx_sha256")
        if made_for != self.onnx_sha256:
            raise GoldenError(f"golden files in {self.golden.dir} are stale: ONNX file {self.case.onnx} sha256 "
                              f"{str(self.onnx_sha256)[:12]} != {str(made_for)[:12]} in {self.golden.meta_path}.\n"
                              f"Regenerate with: {self.golden.hint} (or import them again with "
                              f"`{import_command(self.case)}`)")

    def model_identity(self) -> dict[str, Any]:
        """meta.json entries saying which model made golden files: the fingerprint of a PyTorch
        model, or the ONNX file and its sha256."""
        if self.is_onnx:
            return {"onnx": self.case.spec.model.onnx, "onnx_sha256": self.onnx_sha256}
        return {"model_fingerprint": self.fingerprint.to_dict()}

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
            **self._golden_meta(regenerate_command(self.case),
                                {n: (list(r.inputs), list(r.outputs)) for n, r in reference.items()}),
            "provenance": "generated",
            "reference": self.float_reference if self.is_onnx else backend_with_role(FLOAT_REFERENCE),
        }
        provide = getattr(self._float_model, "golden_files", None)
        model_files = {name: np.asarray(a) for name, a in provide().items()} if callable(provide) else {}
        self.golden.write({"inputs": inputs, "outputs": outputs}, meta, self.adapter.golden_layout(),
                          model_files=model_files, allow_nonfinite=self.case.spec.golden.allow_nonfinite,
                          overwrite_other_case=self.options.overwrite_golden)
        self._golden_written = True

    def import_golden(self, inputs_dir: Path, outputs_dir: Path) -> dict[str, Any]:
        """Make golden files from tensors made elsewhere (e.g. NVIDIA's `.tensor` dumps of an
        engine's inputs and outputs): each stage input `<name>` is read from `inputs_dir` and each
        output from `outputs_dir` as `<name>.tensor` or `<name>.npy`, copied into the golden folder
        as `.tensor`, with meta.json saying `"provenance": "imported"`, where from, the model's
        identity (an ONNX case: its file's sha256) and the stage names (an ONNX case: read from the
        graph). Returns the new meta.json. GoldenError naming the folder and the tensor when a
        file is missing or unreadable."""
        program = self.program(self._float_model)
        tensors: dict[str, dict[str, np.ndarray]] = {"inputs": {}, "outputs": {}}
        for stage in program.stages.values():
            for kind, folder, names in (("inputs", inputs_dir, stage.inputs), ("outputs", outputs_dir, stage.outputs)):
                for name in names:
                    tensors[kind][name] = _imported_tensor(Path(folder), name, kind[:-1], stage.name)
        meta = {
            **self._golden_meta(import_command(self.case),
                                {s.name: (list(s.inputs), list(s.outputs)) for s in program.stages.values()}),
            "provenance": "imported",
            "imported_from": {"inputs": str(inputs_dir), "outputs": str(outputs_dir)},
        }
        self.golden.write(tensors, meta, allow_nonfinite=self.case.spec.golden.allow_nonfinite,
                          overwrite_other_case=self.options.overwrite_golden)
        return self.golden.meta()

    def _golden_meta(self, command: str, stages: Mapping[str, tuple[list[str], list[str]]]) -> dict[str, Any]:
        """meta.json fields every golden set carries: what made it (case, config, checkpoint,
        model identity, versions, command, time) and the stages' input and output names."""
        return {
            "case": self.case.name,
            "profile": self.case.profile,
            "config_hash": self.case.config_hash(),
            "checkpoint": self.case.spec.model.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "versions": library_versions(),
            "created_by": command,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stages": {n: {"inputs": i, "outputs": o} for n, (i, o) in stages.items()},
            **self.model_identity(),
        }

    def stage_feeds(self) -> dict[str, dict[str, torch.Tensor]]:
        """Example feeds per stage for exports: golden inputs when present, else the reference."""
        try:
            record = self.golden_record()
        except GoldenError:
            record = self.reference
        return {s: {n: torch.from_numpy(a) for n, a in r.inputs.items()} for s, r in record.items()}

    # -- backends ----------------------------------------------------------------------------

    def unavailable_reason(self, backend: str) -> str | None:
        """The skip reason for `backend` on this run's device, or None when it can run: the task's
        (by the backend's capabilities), then the backend's own (libraries, devices)."""
        if self.is_onnx and self.info(backend).graph != "onnx":
            return f"the case's model is an ONNX file; {backend} runs the PyTorch model"
        reason = self.adapter.unsupported_reason(self.info(backend), self.options.device)
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
            float_onnx=self.float_onnx, qdq_onnx=self.qdq_onnx, qat_model=self.qat_model,
            deployed_model=self.deployed_model, deployed_key=lambda: self.deployed_key,
            deployed_source=self.deployed_source,
        )

    def float_onnx(self) -> dict[str, Path]:
        """The float ONNX of every stage (cached; shared by every backend that takes ONNX); an
        ONNX case's own file as its stage "model"."""
        if self.case.onnx is not None:
            return {SINGLE_STAGE: self.case.onnx}
        return artifacts.float_onnx(self.cache, self.case.name, self.model_key,
                                    lambda: self.program(self.float_model()), self.stage_feeds())

    def qdq_onnx(self, layout: Literal["tensorrt", "onnxruntime"],
                 weight_codes: Literal["int8", "uint8"] = "int8") -> dict[str, Path]:
        """The Q/DQ ONNX of every stage of the deployed int8 model (`deployed_model`: the calibrated
        one, or the QAT one under `quant.qat.deploy`) in `layout` (cached); for an ONNX
        case, ONNX Runtime's static quantization of its file (`harness.export.ort_quant`)."""
        if self.case.onnx is not None:
            return {SINGLE_STAGE: ort_qdq_onnx(self.cache, self.case.name, self.quant_key, self.case.onnx,
                                               self._onnx_calibration_feeds, layout, weight_codes,
                                               *self._ort_calibration_method(),
                                               keep_float=tuple(self.case.spec.quant.keep_float))}
        return artifacts.qdq_onnx(self.cache, self.case.name, self.deployed_key,
                                  lambda: self.program(self.deployed_model()), self.stage_feeds(), layout,
                                  weight_codes)

    def _onnx_calibration_feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """The calibration split's program inputs as numpy feeds (for ONNX Runtime's calibration)."""
        spec = self.case.spec.quant
        inputs = self.adapter.calibration_inputs(self.dataset("calibration"), spec.calibration_batch_size,
                                                 spec.calibration_batches)
        for feeds in inputs:
            yield {k: v.detach().cpu().numpy() for k, v in feeds.items()}

    def _ort_calibration_method(self) -> tuple[Method, float]:
        """ONNX Runtime's calibration method for the case's activation calibrator (max: MinMax;
        histogram: Percentile or Entropy); CaseError naming the key for methods it lacks."""
        act = self.case.spec.quant.activations
        if act.calibrator == "max":
            return "minmax", act.percentile
        if act.method in ("percentile", "entropy"):
            return act.method, act.percentile
        raise self.case.error(f"ONNX Runtime's static quantization has no '{act.method}' calibration; an ONNX "
                              "case uses calibrator max, or histogram with method percentile or entropy",
                              "quant", "activations", "method")

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
        return content_key(self.model_key, self.case.spec.quant.model_dump(exclude={"qat"}), data.factory,
                           {**data.args, **data.calibration.args}, library_versions())

    def quantized_model(self) -> nn.Module:
        """The calibrated (PTQ) fake-quant model shared by the int8 backends of this run."""
        return self._quantized

    @functools.cached_property
    def _quantized(self) -> nn.Module:
        from harness.calibration import calibrated_model

        return calibrated_model(self)

    @functools.cached_property
    def qat_origin(self) -> dict[str, str]:
        """What a QAT checkpoint of this case must have been trained from, part by part: the float
        model (case model section, checkpoint, fingerprint), the quantization settings, the
        calibration data and the QAT recipe (`harness.calibration.qat_recipe`)."""
        from harness.calibration import qat_recipe

        spec, data = self.case.spec, self.case.spec.data
        qat = spec.quant.qat
        return {
            "case": spec.name,
            "float_model": content_key(spec.model.model_dump(exclude={"checkpoint"}), self.checkpoint_sha256,
                                       self.fingerprint.digest()),
            "quant_settings": content_key(spec.quant.model_dump(exclude={"qat"})),
            "calibration_data": content_key(data.factory, {**data.args, **data.calibration.args}),
            "qat_recipe": content_key(qat_recipe(self)) if qat else "",
        }

    @functools.cached_property
    def qat_key(self) -> str:
        """Identity of the QAT model: the calibrated model's key and the QAT checkpoint's sha256."""
        path = self.case.qat_checkpoint
        assert path is not None
        return content_key("qat", self.quant_key, file_sha256(path) if path.is_file() else None)

    def qat_model(self) -> nn.Module:
        """The quantization-aware-trained fake-quant model (`quant.qat.checkpoint`), shared."""
        return self._qat

    @functools.cached_property
    def _qat(self) -> nn.Module:
        from harness.calibration import trained_qat_model

        return trained_qat_model(self)

    @property
    def deploys_qat(self) -> bool:
        """True when the int8 kernels run the QAT model (`quant.qat.deploy`)."""
        qat = self.case.spec.quant.qat
        return qat is not None and qat.deploy

    def deployed_model(self) -> nn.Module:
        """The int8 model the integer-kernel backends export: QAT under `quant.qat.deploy`, else PTQ."""
        return self.qat_model() if self.deploys_qat else self.quantized_model()

    @property
    def deployed_key(self) -> str:
        """Identity of `deployed_model()`."""
        return self.qat_key if self.deploys_qat else self.quant_key

    def deployed_source(self) -> str:
        """Which model the integer-kernel backends run, for reports."""
        if self.deploys_qat:
            return f"QAT ({self.case.spec.quant.qat.checkpoint})"  # type: ignore[union-attr]
        return "PTQ (calibrated)"


    # -- what checks share ---------------------------------------------------------------------

    def tolerance(self, backend: str, output: str) -> Tolerance:
        """The case's tolerance for one output of one backend."""
        return self.case.spec.backends[backend].compare.tolerance(output)

    def new_record(self, backend: str, item: str, stage: str | None, started: float,
                   runner: Runner | None = None) -> Record:
        """A passed record of `item` with the runner's info, the case's artefacts and the time
        since `started` (perf_counter)."""
        out = {"golden": str(self.golden.dir), "case": str(self.case.path)}
        if self.case.checkpoint is not None:
            out["checkpoint"] = str(self.case.checkpoint)
        if runner is not None:
            out.update(runner.artifacts)
        return Record(case=self.case.name, profile=self.case.profile, backend=backend, item=item, stage=stage,
                      verdict="passed", info=dict(runner.info) if runner else {}, artifacts=out,
                      duration_s=time.perf_counter() - started)

    def metric(self) -> Metric:
        """A fresh accumulator of the case's metric (CaseError when the case has none)."""
        spec = self.case.spec.metric
        cls = self.metric_class
        if spec is None or cls is None:
            raise self.case.error("the case has no metric section", "metric")
        try:
            return cls(**spec.args)
        except (MetricArgsError, TypeError, ValueError) as exc:
            key = getattr(exc, "key", None)
            raise self.case.error(str(exc), "metric", "args", *([key] if key else [])) from exc

    def eval_batches(self) -> Iterator[Batch]:
        """The evaluation dataset in metric batches; the batches are kept in memory for the next
        backend while their inputs total at most BATCH_CACHE_BYTES (else regenerated)."""
        if self._batches is not None:
            yield from self._batches
            return
        kept: list[Batch] | None = []
        size = 0
        for batch in self.adapter.batches(self.dataset(), self.case.spec.data.batch_size):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in batch.inputs.values())
                if size <= BATCH_CACHE_BYTES:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._batches = kept

    @property
    def fidelity_references(self) -> frozenset[str]:
        """Backends another backend of this case compares with (their outputs are kept)."""
        return frozenset(spec.fidelity.reference for spec in self.case.spec.backends.values()
                         if spec.fidelity is not None)

    def evaluation(self, backend: str) -> Evaluation:
        """`backend`'s run over the evaluation set (metric, fidelity, first batch), computed once
        per context and shared by the checks (`harness.evaluation`)."""
        if backend not in self._evaluations:
            from harness.evaluation import evaluate

            self._evaluations[backend] = evaluate(self, backend)
        return self._evaluations[backend]

    @property
    def float_reference(self) -> str:
        """The backend whose outputs are the golden reference and whose metric is the float metric
        (for an ONNX case, the one running its file in float)."""
        return backend_with_role(ONNX_FLOAT_REFERENCE if self.is_onnx else FLOAT_REFERENCE)

    def float_metric(self) -> dict[str, Any]:
        """The float model's metric (the float reference backend on this run's device), cached on disk."""
        assert self.case.spec.metric is not None
        key = content_key("float-metric", self.model_key, self.case.spec.data.model_dump(),
                          self.case.spec.metric.model_dump(), self.case.spec.task_args, library_versions(),
                          self.options.device.type)

        def compute() -> dict[str, Any]:
            values = self.evaluation(self.float_reference).metric
            assert values is not None
            return {"values": values.values, "primary": values.primary, "details": values.details}

        return self.cache.json_value(f"{self.case.name}/float-metric", key, compute)
