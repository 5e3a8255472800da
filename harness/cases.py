"""Case YAML -> validated `Case`; every error names the file, the line and the key.

A case file describes one model: how to build it (factory + checkpoint), its data, its golden
folder, quantization, the metric and its gates, and per-backend tolerances. Validation is strict
(unknown keys, wrong types, duplicate keys, unknown backends, factories that do not import and
missing files are errors) and uses `yaml.safe_load` semantics only. Profiles (`profiles:`) are
partial cases deep-merged over the base case; `--profile NAME` selects one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.backends.registry import (
    QAT_REFERENCE,
    QUANT_REFERENCE,
    backend_info,
    backend_with_role,
    known_backends,
)
from harness.compare import Tolerance
from harness.errors import CaseError
from harness.factory import FactoryError, resolve

DEFAULT_PROFILE = "default"
_ROOT_MARKERS = ("pyproject.toml", "pytest.ini", "setup.cfg", "tox.ini", ".git")
#: YAML limits: nesting depth and the number of values after expanding aliases (alias bombs)
MAX_DEPTH = 64
MAX_NODES = 100_000
#: upper bounds of counts and tolerances (far above any real use; they catch typos and hostile files)
MAX_BATCH = 4096
MAX_ROUNDS = 100_000
MAX_BINS = 1 << 20
MAX_ATOL = 1.0e6
MAX_RTOL = 1.0e3
MAX_SNR_DB = 1.0e3
#: factory arguments whose names end so are paths, resolved (and confined) like case paths
PATH_ARG_SUFFIXES = ("_dir", "_path", "_file")
PATH_ARG_NAMES = ("root", "dataroot")
"""Factory arguments with these suffixes or names are paths: resolved against the project root."""
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _resolvable(spec: str | None) -> str | None:
    """`spec` when it names an importable callable (or is None); ValueError with the reason, which
    pydantic reports at the key."""
    if spec is not None:
        try:
            resolve(spec)
        except FactoryError as exc:
            raise ValueError(str(exc)) from None
    return spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FactorySpec(_Strict):
    """A callable named "package.module:callable" and its keyword arguments."""

    factory: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory_resolves(cls, value: str) -> str:
        _resolvable(value)
        return value


class ModelSpec(_Strict):
    """How to build the float model: a factory (with arguments and checkpoint), or an ONNX file."""

    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    onnx: str | None = Field(None, description="an ONNX file instead of a factory: run by the ONNX backends only")
    checkpoint: str | None = None
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1,
                      description="torch.manual_seed before building, for checkpoint-less models")

    @field_validator("factory")
    @classmethod
    def _factory_resolves(cls, value: str | None) -> str | None:
        return _resolvable(value)

    @model_validator(mode="after")
    def _factory_or_onnx(self) -> ModelSpec:
        if (self.factory is None) == (self.onnx is None):
            raise ValueError("give exactly one of model.factory (a PyTorch model) and model.onnx (an ONNX file)")
        if self.onnx is not None and (self.args or self.checkpoint is not None):
            raise ValueError("model.args and model.checkpoint belong to a factory; an ONNX model has its weights")
        return self


class DataOverride(_Strict):
    """Arguments merged over `data.args` for another split (calibration, training)."""

    args: dict[str, Any] = Field(default_factory=dict)


class DataSpec(FactorySpec):
    """The evaluation dataset and the splits derived from it."""

    calibration: DataOverride = Field(default_factory=DataOverride)
    train: DataOverride = Field(default_factory=DataOverride)
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="batch size of metric runs")


class GoldenSpec(_Strict):
    """Where golden files live and how many samples they hold."""

    dir: str
    samples: int = Field(1, ge=1, le=MAX_BATCH)
    allow_nonfinite: bool = Field(False, description="store reference outputs holding NaN/Inf (refused by default)")


class ToleranceSpec(_Strict):
    """Bounds for an output tensor against its golden reference."""

    atol: float | None = Field(None, ge=0, le=MAX_ATOL, allow_inf_nan=False)
    rtol: float | None = Field(None, ge=0, le=MAX_RTOL, allow_inf_nan=False)
    max_mismatch: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                description="fraction allowed outside atol + rtol*|ref|")
    cosine_min: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)
    snr_min_db: float | None = Field(None, ge=-MAX_SNR_DB, le=MAX_SNR_DB, allow_inf_nan=False)

    @property
    def bounded(self) -> bool:
        """True when at least one bound (atol, rtol, cosine_min, snr_min_db) is set."""
        return any(v is not None for v in (self.atol, self.rtol, self.cosine_min, self.snr_min_db))

    def to_tolerance(self) -> Tolerance:
        """The comparison library's Tolerance with these bounds."""
        return Tolerance(self.atol, self.rtol, self.max_mismatch, self.cosine_min, self.snr_min_db)


class CompareSpec(ToleranceSpec):
    """Tolerance for every output, with per-output overrides under `outputs`; `compare: none`
    (stored as `none: true`) says this backend's outputs are deliberately not compared."""

    outputs: dict[str, ToleranceSpec] = Field(default_factory=dict)
    none: bool = Field(False, description="true (or `compare: none`): outputs are not compared with golden files")

    @property
    def disabled(self) -> bool:
        """True when the case says this backend's outputs are not compared (`compare: none`)."""
        return self.none

    @model_validator(mode="after")
    def _none_alone(self) -> CompareSpec:
        if self.none and (self.bounded or self.outputs):
            raise ValueError("'compare: none' cannot be combined with tolerances")
        return self

    def tolerance(self, output: str) -> Tolerance:
        """The Tolerance of `output`: its override under `outputs`, else the backend-wide bounds."""
        return self.outputs.get(output, self).to_tolerance()


class GateSpec(_Strict):
    """Metric gates of one backend against the float model and its stored baseline."""

    min_ratio: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_drop: float | None = Field(None, ge=0, allow_inf_nan=False)
    baseline_tolerance: float | None = Field(None, ge=0, allow_inf_nan=False)


class FidelitySpec(_Strict):
    """Agreement of this backend with another (real int8 kernels vs fake quantization) over the
    evaluation set: cosine of every output and the task's prediction agreement."""

    reference: str = Field(default_factory=lambda: backend_with_role(QUANT_REFERENCE),
                           description="backend to compare with (default: the backend holding the quantization-reference role)")
    cosine_min: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)
    agreement_min: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)


class BackendSpec(_Strict):
    """Per-backend settings: golden tolerances, metric gates, fidelity against another backend."""

    compare: CompareSpec = Field(default_factory=CompareSpec)
    metric: GateSpec | None = None
    fidelity: FidelitySpec | None = None
    high_precision: Literal["fp16", "fp32"] | None = Field(
        None, description="trt-int8 only: type of the layers outside the quantized regions (default fp16)")

    @field_validator("compare", mode="before")
    @classmethod
    def _compare_none(cls, value: Any) -> Any:
        return {"none": True} if value == "none" else value

    @model_validator(mode="after")
    def _compare_bounded(self) -> BackendSpec:
        if self.compare.disabled:
            return self
        if not self.compare.bounded:
            raise ValueError("compare: no bound (set atol, rtol, cosine_min or snr_min_db, or write 'compare: none' "
                             "to report the golden item as not compared)")
        for output, spec in self.compare.outputs.items():
            if not spec.bounded:
                raise ValueError(f"compare.outputs.{output}: no bound (set atol, rtol, cosine_min or snr_min_db)")
        return self


CalibratorName = Literal["max", "histogram"]
MethodName = Literal["percentile", "mse", "entropy"]


class ActivationQuantSpec(_Strict):
    """How activations (module inputs) are calibrated."""

    calibrator: CalibratorName = "histogram"
    method: MethodName | None = "percentile"
    percentile: float = Field(99.99, ge=0, le=100, allow_inf_nan=False)
    num_bins: int = Field(2048, ge=16, le=MAX_BINS)
    start_bin: int = Field(128, ge=1, le=MAX_BINS)
    stride: int = Field(1, ge=1, le=MAX_BINS)

    @model_validator(mode="after")
    def _method_matches(self) -> ActivationQuantSpec:
        if self.calibrator == "max" and self.method not in (None, "percentile"):
            raise ValueError(f"method '{self.method}' needs calibrator 'histogram'")
        return self


class WeightQuantSpec(_Strict):
    """How weights are calibrated (per-channel max by default, as NVIDIA's defaults)."""

    per_channel: bool = True
    calibrator: Literal["max"] = "max"


class QatSpec(_Strict):
    """Quantization-aware training: the trained checkpoint, whether the int8 kernels run it, and
    the fine-tuning recipe of `qharness train CASE --qat` (docs/qat.md)."""

    checkpoint: str | None = Field(
        None, description="QAT checkpoint written by `qharness train CASE --qat` (runs as backend qat-int8)")
    deploy: bool = Field(
        False, description="ort-int8 / trt-int8 run the QAT model's Q/DQ export instead of the PTQ one")
    learn_amax: bool = Field(False, description="train the quantizers' amax too (LSQ gradient); default: fixed")
    training: dict[str, Any] = Field(
        default_factory=dict, description="trainer keyword arguments over the case's `training:` section")

    @model_validator(mode="after")
    def _deploy_needs_checkpoint(self) -> QatSpec:
        if self.deploy and self.checkpoint is None:
            raise ValueError("deploy: true needs a checkpoint (train one with `qharness train CASE --qat`)")
        return self


class QuantSpec(_Strict):
    """Post-training quantization settings (and quantization-aware training under `qat`)."""

    activations: ActivationQuantSpec = Field(default_factory=ActivationQuantSpec)
    weights: WeightQuantSpec = Field(default_factory=WeightQuantSpec)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    keep_float: list[str] = Field(default_factory=list)
    rules: list[str] = Field(default_factory=list)
    fold_bn: bool = True
    functional_joins: bool = Field(
        False, description="trace the model with torch.fx and quantize functional adds and concats "
                           "(x + y, torch.cat) like join modules")
    calibration_batches: int = Field(8, ge=1, le=MAX_ROUNDS)
    calibration_batch_size: int = Field(2, ge=1, le=MAX_BATCH)
    qat: QatSpec | None = None
    quantizer: str | None = Field(
        None, description='"module:callable" called like harness.quant.transform:quantize_model(model, config, '
                          "example_inputs=...) to make the quantizable model (default: that dense quantizer; "
                          "harness.quant.sparse:quantize_scn_model for spconv models)")

    @field_validator("quantizer")
    @classmethod
    def _quantizer_resolves(cls, value: str | None) -> str | None:
        return _resolvable(value)


class MetricSpec(_Strict):
    """The accuracy metric, which of its figures are gated, and the float model's floor."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    keys: list[str] = Field(default_factory=list, description="gated figures; default: the metric's primary")
    float_min: Finite | dict[str, Finite] | None = None
    baseline_tolerance: float = Field(0.002, ge=0, allow_inf_nan=False)


class BenchmarkSpec(_Strict):
    """Timing settings for benchmark items."""

    warmup: int = Field(10, ge=0, le=MAX_ROUNDS)
    rounds: int = Field(50, ge=1, le=MAX_ROUNDS)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)


class StageSpec(_Strict):
    """One separately exported part of a multi-stage model."""

    inputs: list[str]
    outputs: list[str]


BackendName = Annotated[str, Field(description="one of: " + ", ".join(known_backends()))]


class CaseSpec(_Strict):
    """The validated content of a case file (paths still as written)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    task: str
    task_args: dict[str, Any] = Field(default_factory=dict, description="keyword options of the task adapter")
    model: ModelSpec
    data: DataSpec
    golden: GoldenSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    metric: MetricSpec | None = None
    backends: dict[BackendName, BackendSpec]
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    stages: dict[str, StageSpec] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the task's trainer")
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fidelity_references(self) -> CaseSpec:
        for name, spec in self.backends.items():
            if spec.high_precision is not None and name != "trt-int8":
                raise ValueError(f"backends.{name}.high_precision: only trt-int8 takes high_precision")
            if spec.fidelity is not None and spec.fidelity.reference not in known_backends():
                raise ValueError(f"backends.{name}.fidelity.reference: unknown backend '{spec.fidelity.reference}'")
        return self._check_qat()

    def _check_qat(self) -> CaseSpec:
        """The QAT backend needs a QAT checkpoint; int8 kernels running the QAT export
        (`quant.qat.deploy`) compare with the QAT model (the default reference then), never with
        the PTQ one, and int8 kernels running the PTQ export never with the QAT model."""
        qat_backend, ptq_backend = backend_with_role(QAT_REFERENCE), backend_with_role(QUANT_REFERENCE)
        qat = self.quant.qat
        if qat_backend in self.backends and (qat is None or qat.checkpoint is None):
            raise ValueError(f"backends.{qat_backend}: runs the quantization-aware-trained model; set "
                             "quant.qat.checkpoint (train one with `qharness train CASE --qat`)")
        deploy = qat is not None and qat.deploy
        deployed, other = (qat_backend, ptq_backend) if deploy else (ptq_backend, qat_backend)
        backends = dict(self.backends)
        for name, spec in self.backends.items():
            if spec.fidelity is None or not backend_info(name).integer_kernels:
                continue
            if deploy and "reference" not in spec.fidelity.model_fields_set:
                fidelity = spec.fidelity.model_copy(update={"reference": qat_backend})
                backends[name] = spec.model_copy(update={"fidelity": fidelity})
            elif spec.fidelity.reference == other:
                runs = "the QAT model's export (quant.qat.deploy)" if deploy else "the PTQ export"
                raise ValueError(f"backends.{name}.fidelity.reference: {name} runs {runs}; compare it with "
                                 f"{deployed}, not {other}")
        return self if backends == self.backends else self.model_copy(update={"backends": backends})

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: dict[str, BackendSpec]) -> dict[str, BackendSpec]:
        unknown = [name for name in value if name not in known_backends()]
        if unknown:
            raise ValueError(f"unknown backend '{unknown[0]}'; known backends: {', '.join(known_backends())}")
        if not value:
            raise ValueError("at least one backend is required")
        return value

    @field_validator("golden", mode="before")
    @classmethod
    def _golden_shorthand(cls, value: Any) -> Any:
        return {"dir": value} if isinstance(value, str) else value


class Case:
    """A validated case with its paths resolved against the project root."""

    def __init__(self, spec: CaseSpec, path: Path, root: Path, profile: str, lines: dict[tuple[str, ...], int],
                 *, allow_outside_root: bool = False):
        self.spec = spec
        self.path = path
        self.root = root
        self.profile = profile
        self.allow_outside_root = allow_outside_root
        self._lines = lines

    @property
    def name(self) -> str:
        """The case name used in item ids and reports."""
        return self.spec.name

    @property
    def golden_dir(self) -> Path:
        """Golden folder of the selected profile (profiles other than the default get a subfolder
        unless they set `golden.dir` themselves)."""
        return self.resolve_path(self.spec.golden.dir, "golden", "dir")

    @property
    def checkpoint(self) -> Path | None:
        """Absolute checkpoint path, or None for seeded initial weights."""
        ckpt = self.spec.model.checkpoint
        return None if ckpt is None else self.resolve_path(ckpt, "model", "checkpoint")

    @property
    def display_path(self) -> Path:
        """The case file relative to the project root (as written in commands shown to users),
        or as given when it lies outside."""
        try:
            return self.path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return self.path

    @property
    def qat_checkpoint(self) -> Path | None:
        """Absolute path of the QAT checkpoint (`quant.qat.checkpoint`), or None."""
        qat = self.spec.quant.qat
        return None if qat is None or qat.checkpoint is None else self.resolve_path(qat.checkpoint, "quant", "qat",
                                                                                   "checkpoint")

    @property
    def onnx(self) -> Path | None:
        """Absolute path of the case's ONNX model (`model.onnx`), or None for a factory model."""
        onnx = self.spec.model.onnx
        return None if onnx is None else self.resolve_path(onnx, "model", "onnx")

    def resolve_path(self, value: str, *key: str) -> Path:
        """Resolve a path written in the case (at `key`) against the project root. Unless
        `allow_outside_root`, CaseError naming the key for a path that leaves the root (`../`, or
        absolute elsewhere); the check is lexical, so symlinks placed inside the root are honoured."""
        p = Path(value)
        resolved = p if p.is_absolute() else self.root / p
        if not self.allow_outside_root:
            root = os.path.normpath(os.path.abspath(self.root))
            target = os.path.normpath(os.path.abspath(resolved))
            if os.path.commonpath([root, target]) != root:
                raise self.error(f"path '{value}' is outside the project root {root}; keep case files' paths "
                                 "inside the project (outside paths must be enabled explicitly)", *key)
        return resolved

    def check_paths(self) -> None:
        """CaseError naming the key of the first path (golden.dir, model.checkpoint, factory
        arguments named *_dir/_path/_file) that `resolve_path` refuses."""
        s = self.spec
        self.resolve_path(s.golden.dir, "golden", "dir")
        if s.model.checkpoint is not None:
            self.resolve_path(s.model.checkpoint, "model", "checkpoint")
        if s.model.onnx is not None:
            self.resolve_path(s.model.onnx, "model", "onnx")
        _ = self.qat_checkpoint
        sources = [(("model", "args"), s.model.args), (("data", "args"), s.data.args),
                   (("data", "calibration", "args"), s.data.calibration.args),
                   (("data", "train", "args"), s.data.train.args)]
        for where, args in sources:
            for name, value in args.items():
                if isinstance(value, str) and (name.endswith(PATH_ARG_SUFFIXES) or name in PATH_ARG_NAMES):
                    self.resolve_path(value, *where, name)

    def line_of(self, *key: str) -> int | None:
        """1-based line of `key` (a path of mapping keys) in the case file, if known."""
        for n in range(len(key), 0, -1):
            if key[:n] in self._lines:
                return self._lines[key[:n]]
        return None

    def error(self, message: str, *key: str) -> CaseError:
        """A CaseError naming this case's file, the line of `key` and the dotted key."""
        return CaseError(self.path, message, line=self.line_of(*key), key=".".join(key) or None)

    def config_hash(self) -> str:
        """Hash of everything that determines golden inputs and float outputs (model, data, task and
        its options, golden sample count, stages); tolerances, gates and backends do not enter it."""
        s = self.spec
        payload = {
            "task": s.task,
            "model": s.model.model_dump(exclude=set() if s.model.onnx else {"onnx"}),  # hashes as before `onnx`
            "data": {"factory": s.data.factory, "args": s.data.args},
            "golden_samples": s.golden.samples,
            "stages": {k: v.model_dump() for k, v in s.stages.items()},
        }
        if s.task_args:  # only when set, so the hashes of cases without task options stay as they were
            payload["task_args"] = s.task_args
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def find_root(path: Path) -> Path:
    """The nearest ancestor of `path` holding a project marker (pyproject.toml, .git, ...)."""
    for parent in path.resolve().parents:
        if any((parent / marker).exists() for marker in _ROOT_MARKERS):
            return parent
    return path.resolve().parent


def load_case(path: str | Path, *, root: Path | None = None, profile: str = DEFAULT_PROFILE,
              allow_outside_root: bool = False) -> Case:
    """Load, merge the profile into, and validate a case file.

    Raises CaseError naming the file, line and key for malformed YAML (also: not UTF-8, nested
    deeper than MAX_DEPTH, more than MAX_NODES values after alias expansion), duplicate or unknown
    keys, wrong types, non-finite or out-of-range numbers, backends without a compare bound,
    unknown backends or profiles, factories that cannot be imported, missing checkpoints, and
    paths outside the project root (unless `allow_outside_root`).
    """
    path = Path(path)
    root = root or find_root(path)
    try:
        data_bytes = path.read_bytes()
    except OSError as exc:
        raise CaseError(path, f"cannot read case file: {exc.strerror or exc}") from exc
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data_bytes[:exc.start].count(b"\n") + 1
        raise CaseError(path, f"not UTF-8 text (byte 0x{data_bytes[exc.start]:02x} at offset {exc.start}); "
                              "save the case file as UTF-8", line=line) from None
    raw, lines = _parse_yaml(path, text)
    if not isinstance(raw, dict):
        raise CaseError(path, f"a case file must be a mapping at the top level, got {type(raw).__name__}", line=1)
    data = _apply_profile(path, raw, profile, lines)
    if profile != DEFAULT_PROFILE:
        # Keys the profile sets are reported at their line inside `profiles:`.
        prefix = ("profiles", profile)
        lines = {**lines, **{k[2:]: ln for k, ln in lines.items() if k[:2] == prefix and len(k) > 2}}
    backends = data.get("backends")
    if isinstance(backends, dict):
        for name in backends:
            if name not in known_backends():
                raise CaseError(path, f"unknown backend '{name}'; known backends: {', '.join(known_backends())}",
                                line=lines.get(("backends", str(name))), key=f"backends.{name}")
    try:
        spec = CaseSpec.model_validate(data)
    except ValidationError as exc:
        raise _case_error(path, exc, lines) from None
    case = Case(spec, path, root, profile, lines, allow_outside_root=allow_outside_root)
    if profile != DEFAULT_PROFILE and "golden" not in spec.profiles.get(profile, {}):
        golden = spec.golden.model_copy(update={"dir": str(Path(spec.golden.dir) / f"profile-{profile}")})
        case.spec = spec.model_copy(update={"golden": golden})
    case.check_paths()
    if case.checkpoint is not None and not case.checkpoint.is_file():
        raise case.error(f"checkpoint file {case.checkpoint} does not exist", "model", "checkpoint")
    if case.onnx is not None and not case.onnx.is_file():
        raise case.error(f"ONNX file {case.onnx} does not exist", "model", "onnx")
    return case


def _apply_profile(path: Path, raw: dict[str, Any], profile: str, lines: dict[tuple[str, ...], int]) -> dict[str, Any]:
    if profile == DEFAULT_PROFILE:
        return raw
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict) or profile not in profiles:
        known = [DEFAULT_PROFILE, *(profiles if isinstance(profiles, dict) else [])]
        raise CaseError(
            path, f"profile '{profile}' is not defined; known profiles: {', '.join(known)}",
            line=lines.get(("profiles",)), key="profiles",
        )
    override = profiles[profile]
    if not isinstance(override, dict):
        raise CaseError(path, "a profile must be a mapping", line=lines.get(("profiles", profile)),
                        key=f"profiles.{profile}")
    for forbidden in ("name", "profiles"):
        if forbidden in override:
            raise CaseError(path, f"a profile cannot change '{forbidden}'",
                            line=lines.get(("profiles", profile, forbidden)), key=f"profiles.{profile}.{forbidden}")
    return deep_merge(raw, override)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `override` merged in: mappings merge recursively, others replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _parse_yaml(path: Path, text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise CaseError(path, f"YAML nested too deeply (at most {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise CaseError(path, f"malformed YAML: {problem}", line=line) from None
    if node is None:
        raise CaseError(path, "the case file is empty", line=1)
    _measure(path, node, 1, {})
    lines: dict[tuple[str, ...], int] = {}
    _record_lines(path, node, (), lines)
    loader = _UniqueKeyLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise CaseError(path, f"malformed YAML: {exc}", line=mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    return data, lines


def _measure(path: Path, node: yaml.Node, depth: int, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, levels) of `node` with aliases expanded; CaseError at the node's line when
    deeper than MAX_DEPTH (a recursive alias is infinitely deep) or larger than MAX_NODES."""
    line = node.start_mark.line + 1
    if depth > MAX_DEPTH:
        raise CaseError(path, f"YAML nested deeper than {MAX_DEPTH} levels (or an alias that contains itself)",
                        line=line)
    known = memo.get(id(node))
    if known is not None:
        if depth + known[1] - 1 > MAX_DEPTH:
            raise CaseError(path, f"YAML nested deeper than {MAX_DEPTH} levels", line=line)
        return known
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    count, levels = 1, 1
    for child in children:
        c_count, c_levels = _measure(path, child, depth + 1, memo)
        count += c_count
        levels = max(levels, c_levels + 1)
        if count > MAX_NODES:
            raise CaseError(path, f"YAML expands to more than {MAX_NODES} values (aliases repeating large "
                                  "collections?)", line=line)
    memo[id(node)] = (count, levels)
    return count, levels


def _record_lines(path: Path, node: yaml.Node, prefix: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise CaseError(path, "duplicate key", line=key_node.start_mark.line + 1, key=".".join((*prefix, key)))
            seen.add(key)
            lines[(*prefix, key)] = key_node.start_mark.line + 1
            _record_lines(path, value_node, (*prefix, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*prefix, str(i))] = item.start_mark.line + 1
            _record_lines(path, item, (*prefix, str(i)), lines)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict\[.*\]|list\[.*\]|[A-Z]\w*Spec|function-.*)$")


_KEYED_MESSAGE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)+): (.*)$", re.S)


def _case_error(path: Path, exc: ValidationError, lines: dict[tuple[str, ...], int]) -> CaseError:
    found: list[tuple[int | None, str, str]] = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if not _TYPE_TAG.match(str(p)))
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        msg = err["msg"].removeprefix("Value error, ")
        named = _KEYED_MESSAGE.match(msg) if not loc else None
        if named and named.group(1).split(".")[0] in CaseSpec.model_fields:  # a whole-case check naming its key
            loc, msg = tuple(named.group(1).split(".")), named.group(2)
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        found.append((line, ".".join(loc) or "<top level>", msg))
    line, key, msg = found[0]
    if len(found) > 1:
        msg = f"{msg} (and {len(found) - 1} more)\n  " + "\n  ".join(
            f"line {ln}: key '{k}': {m}" if ln else f"key '{k}': {m}" for ln, k, m in found
        )
    return CaseError(path, msg, line=line, key=key)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of case files (for editor completion: `qharness schema`)."""
    schema = CaseSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "qharness case"
    golden = schema["properties"]["golden"]
    schema["properties"]["golden"] = {"anyOf": [golden, {"type": "string", "description": "shorthand for {dir: ...}"}]}
    backends = schema["properties"]["backends"]
    backends["propertyNames"] = {"enum": list(known_backends())}
    compare = schema["$defs"]["BackendSpec"]["properties"]["compare"]
    schema["$defs"]["BackendSpec"]["properties"]["compare"] = {
        "anyOf": [compare, {"const": "none", "description": "outputs are not compared with golden files"}]}
    return schema
