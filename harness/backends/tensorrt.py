"""TensorRT backends: trt-fp16 (float ONNX, FP16 allowed) and trt-int8 (Q/DQ ONNX, explicit int8).

Each stage's ONNX is parsed by TensorRT's ONNX parser (every parser error is reported with its
node), built with a workspace limit and an optimisation profile for a dynamic batch (min 1, opt the
golden batch, max the largest batch the case runs), and serialised into the qharness cache keyed by
the ONNX sha256, the TensorRT version, the GPU (name and compute capability) and the build flags,
so an engine of another version or GPU is never loaded. A cached engine that cannot be read or
deserialised is rebuilt with a warning. One timing cache per TensorRT version and GPU speeds up
later builds.

The build path is chosen by TensorRT's major version (`build_plan`), never by probing attributes:

* 10.x: trt-fp16 builds the float ONNX weakly typed with the FP16 flag; trt-int8 with
  `high_precision: fp16` (the default, as the seeds' `trtexec --int8 --fp16`) builds the Q/DQ ONNX
  weakly typed with the INT8 and FP16 flags, with `fp32` strongly typed (the remainder in FP32);
* 11.x and newer (weak typing and the precision flags are gone; every network is strongly
  typed): trt-fp16 builds an FP16 graph converted from the float ONNX (`harness.export.fp16`,
  I/O and sensitive ops float32); trt-int8 builds the Q/DQ ONNX, with `high_precision: fp16` its
  layers outside the quantized regions rewritten to FP16 in the graph.

The runner's info records the path ("build", "graph"). Every TensorRT failure (parser, builder,
flag, inspector) is a HarnessError naming the ONNX, the TensorRT version and the step. Engines run through `set_tensor_address` / `execute_async_v3` on a torch CUDA stream
with torch CUDA tensors as buffers. The engine inspector's per-layer listing (JSON) is stored next
to the engine as a runner artifact and summarised by precision in the runner's info.

TensorRT is optional: without it (or with only the `tensorrt-stubs` folder, an empty namespace
package) the backends skip with "tensorrt is not installed"; without CUDA, "no CUDA device".
"""

from __future__ import annotations

import functools
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import onnx
import torch
from filelock import FileLock

from harness.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from harness.backends.base import Backend, PrepareContext, Runner
from harness.cache import Cache, content_key, file_sha256
from harness.environment import cuda_available
from harness.errors import ExportError, HarnessError
from harness.export.artifacts import fp16_onnx

if TYPE_CHECKING:
    import tensorrt as trt

    from harness.cases import BackendSpec

NOT_INSTALLED = "tensorrt is not installed"
NO_CUDA = "no CUDA device"
WORKSPACE_BYTES = 4 << 30
ENGINE_FILE = "engine.plan"
META_FILE = "meta.json"
INSPECTOR_FILE = "inspector.json"

Shape = tuple[int, ...]
_log = logging.getLogger("qharness.tensorrt")

# TensorRT DataType names -> torch dtypes of the buffers bound to the engine.
_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}

# Words of the inspector's type strings -> precision names (first match wins). 10.x writes
# "Format/Datatype": "Row major linear FP16 format"; 11.x writes "DataType": "Half" / "Float" /
# "Int8" / "BFloat16" / "FP8" / "Int4" / "FP4" and keeps the layout in "Format".
_PRECISION_WORDS = {
    "bfloat16": "bf16", "bf16": "bf16", "fp8": "fp8", "int8": "int8", "uint8": "uint8", "fp16": "fp16",
    "half": "fp16", "fp32": "fp32", "float": "fp32", "int32": "int32", "int64": "int64", "bool": "bool",
    "int4": "int4", "fp4": "fp4", "e8m0": "e8m0",
}
FLOAT_GRAPH = "float"
FP16_GRAPH = "fp16"
QDQ_FP16_GRAPH = "qdq-fp16"
HighPrecision = Literal["fp16", "fp32"]
BuilderFlagName = Literal["FP16", "INT8"]


# -- availability ------------------------------------------------------------------------------

def tensorrt_import_problem() -> str | None:
    """None when the real TensorRT Python package (10 or newer) imports, else why not (the skip
    reason).

    A `tensorrt` folder of type stubs imports as an empty namespace package; only a module with
    the real `Builder` counts as installed.
    """
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            return NOT_INSTALLED
        return f"tensorrt cannot be imported: {exc}"
    except (ImportError, OSError) as exc:
        return f"tensorrt cannot be imported: {exc}"
    if not hasattr(tensorrt, "Builder"):
        return NOT_INSTALLED
    try:
        tensorrt_major(str(getattr(tensorrt, "__version__", "")))
    except HarnessError as exc:
        return str(exc)
    return None


def cuda_problem(device: torch.device) -> str | None:
    """None when a run on `device` can use CUDA, else why not ("no CUDA device", "--device is cpu")."""
    if not cuda_available():
        return NO_CUDA
    if device.type != "cuda":
        return f"--device is {device.type}"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the TensorRT backends cannot run on `device` (TensorRT first, then CUDA), or None."""
    return tensorrt_import_problem() or cuda_problem(device)


def tensorrt_major(version: str) -> int:
    """The major version of a TensorRT version string ("10.13.3.9" -> 10, "11.1.0" -> 11).

    Raises HarnessError for a string that does not start with a number, and for majors before
    10 (qharness uses the 10.x name-based I/O API).
    """
    match = re.match(r"\s*(\d+)(?:\.|$)", version)
    if match is None:
        raise HarnessError(f"TensorRT version '{version}' has no major version number")
    major = int(match.group(1))
    if major < 10:
        raise HarnessError(f"TensorRT {version} is too old: the trt backends need TensorRT 10 or newer")
    return major


@dataclass(frozen=True)
class BuildPlan:
    """What one backend builds on one TensorRT major: which graph, and how the network is built.

    `graph` is FLOAT_GRAPH (the ONNX as exported), FP16_GRAPH (a float ONNX converted by
    `harness.export.fp16.to_fp16`) or QDQ_FP16_GRAPH (a Q/DQ ONNX converted by
    `qdq_high_precision`).
    """

    options: BuildOptions
    graph: str
    precision: str

    def describe(self) -> dict[str, str]:
        """Entries of the runner's info: "build" and "graph"."""
        graph = "as exported" if self.graph == FLOAT_GRAPH else "FP16 by graph (float I/O and sensitive ops FP32)"
        return {"build": self.options.describe(), "graph": graph}


def build_plan(backend: str, version: str, high_precision: HighPrecision = "fp16") -> BuildPlan:
    """The build of `backend` ("trt-fp16" or "trt-int8") on TensorRT `version`, by its major.

    10.x: trt-fp16 weakly typed with the FP16 flag; trt-int8 weakly typed with INT8+FP16 for
    `high_precision` fp16, strongly typed for fp32. 11.x and newer: always strongly typed without
    flags; trt-fp16 and trt-int8 with fp16 build the FP16 graph. HarnessError for other backends.
    """
    major = tensorrt_major(version)
    if backend == "trt-fp16":
        if major == 10:
            return BuildPlan(BuildOptions(strongly_typed=False, flags=("FP16",)), FLOAT_GRAPH, "fp16")
        return BuildPlan(BuildOptions(strongly_typed=True, flags=()), FP16_GRAPH, "fp16")
    if backend == "trt-int8":
        precision = f"int8+{high_precision}"
        if major == 10:
            if high_precision == "fp16":
                return BuildPlan(BuildOptions(strongly_typed=False, flags=("INT8", "FP16")), FLOAT_GRAPH, precision)
            return BuildPlan(BuildOptions(strongly_typed=True, flags=()), FLOAT_GRAPH, precision)
        graph = QDQ_FP16_GRAPH if high_precision == "fp16" else FLOAT_GRAPH
        return BuildPlan(BuildOptions(strongly_typed=True, flags=()), graph, precision)
    raise HarnessError(f"no TensorRT build plan for backend '{backend}'")


# -- what an engine is built from: the cache key -----------------------------------------------

@dataclass(frozen=True)
class Gpu:
    """The GPU an engine is built for."""

    name: str
    compute_capability: tuple[int, int]

    @staticmethod
    def of(device: torch.device) -> Gpu:
        """The GPU behind a CUDA torch device."""
        index = cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        return Gpu(torch.cuda.get_device_name(index), (major, minor))


@dataclass(frozen=True)
class ProfileShapes:
    """Optimisation profile of one dynamic network input."""

    name: str
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class BuildOptions:
    """How a network is built: strongly typed or with builder precision flags, and workspace."""

    strongly_typed: bool
    flags: tuple[BuilderFlagName, ...]
    workspace_bytes: int = WORKSPACE_BYTES

    def describe(self) -> str:
        """A short phrase for reports ("strongly typed", "flags FP16+INT8")."""
        if self.strongly_typed:
            return "strongly typed" + (f", flags {'+'.join(self.flags)}" if self.flags else "")
        return f"flags {'+'.join(self.flags)}" if self.flags else "fp32"


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides a serialized engine; its key addresses the engine in the cache."""

    onnx_sha256: str
    tensorrt_version: str
    gpu: Gpu
    options: BuildOptions
    profiles: tuple[ProfileShapes, ...]

    def describe(self) -> dict[str, object]:
        """JSON-ready description (stored next to the engine and checked on load)."""
        described: dict[str, object] = json.loads(json.dumps(asdict(self)))
        return described

    def key(self) -> str:
        """sha256 over the description: differs for another ONNX, version, GPU, flag or profile."""
        return content_key("tensorrt-engine", self.describe())


def timing_cache_key(tensorrt_version: str, gpu: Gpu) -> str:
    """Key of the timing cache shared by every engine built with one TensorRT version on one GPU."""
    return content_key("tensorrt-timing-cache", tensorrt_version, asdict(gpu))


def onnx_input_shapes(path: Path) -> dict[str, list[int]]:
    """Declared shapes of the graph inputs of an ONNX file (-1 for symbolic dimensions);
    initializers listed as inputs are left out."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shapes


def profile_shapes(name: str, declared: Sequence[int], example: Sequence[int], max_batch: int) -> ProfileShapes:
    """min / opt / max shapes of one input with declared dims (-1 = dynamic) and an example shape.

    A dynamic first (batch) dimension gets min 1, opt the example's batch and max
    max(opt, `max_batch`); other dynamic dimensions are fixed at the example's size. Raises
    HarnessError naming the input when the example does not fit the declared shape.
    """
    if len(declared) != len(example) or any(d >= 0 and d != e for d, e in zip(declared, example, strict=False)):
        raise HarnessError(f"input '{name}': example shape {list(example)} does not fit the ONNX shape "
                           f"{['?' if d < 0 else d for d in declared]}")
    opt = tuple(int(e) for e in example)
    low, high = list(opt), list(opt)
    if declared and declared[0] < 0:
        low[0] = 1
        high[0] = max(opt[0], max_batch)
    return ProfileShapes(name, tuple(low), opt, tuple(high))


def stage_profiles(onnx_path: Path, feeds: Mapping[str, torch.Tensor], max_batch: int) -> tuple[ProfileShapes, ...]:
    """Profiles of the dynamic inputs of one stage's ONNX (static inputs need none)."""
    profiles = []
    for name, declared in onnx_input_shapes(onnx_path).items():
        if name not in feeds:
            raise HarnessError(f"{onnx_path}: input '{name}' has no example feed (got {sorted(feeds)})")
        if any(d < 0 for d in declared):
            profiles.append(profile_shapes(name, declared, tuple(feeds[name].shape), max_batch))
    return tuple(profiles)


# -- reporting: parser errors and per-layer precisions -----------------------------------------

class ParserErrorLike(Protocol):
    """The part of `tensorrt.ParserError` that error messages use."""

    def code(self) -> object: ...
    def desc(self) -> str: ...
    def node(self) -> int: ...
    def node_name(self) -> str: ...
    def node_operator(self) -> str: ...


def format_parser_errors(what: str, errors: Sequence[ParserErrorLike]) -> str:
    """One message listing every ONNX parser error with its node index, name and operator."""
    lines = [f"{what}: TensorRT's ONNX parser rejected the model ({len(errors)} error(s)):"]
    for err in errors:
        code = str(err.code()).rsplit(".", 1)[-1]
        index = err.node()
        if index >= 0:
            name = f" '{err.node_name()}'" if err.node_name() else ""
            op = f" ({err.node_operator()})" if err.node_operator() else ""
            where = f"node {index}{name}{op}"
        else:
            where = "model"
        lines.append(f"  {where}: [{code}] {err.desc().strip()}")
    return "\n".join(lines)


@dataclass(frozen=True)
class LayerPrecision:
    """One engine layer as the inspector describes it."""

    name: str
    type: str
    precision: str


@dataclass(frozen=True)
class IoTensor:
    """One engine input or output as the inspector describes it."""

    name: str
    mode: str
    precision: str


def precision_of(type_text: str) -> str:
    """Precision named in an inspector type string: 10.x "Format/Datatype" ("Row major linear
    FP32" -> fp32) or 11.x "DataType" ("Half" -> fp16, "Int4" -> int4); "unknown" otherwise."""
    for word in re.findall(r"[A-Za-z][A-Za-z0-9]*", type_text):
        precision = _PRECISION_WORDS.get(word.lower())
        if precision:
            return precision
    return "unknown"


def region_precision(region: Mapping[str, object]) -> str:
    """Precision of one inspector tensor region in either layout: 11.x "DataType" first, then
    10.x "Format/Datatype", then a "Format" that names a type ("Row major linear FP32 format")."""
    for key in ("DataType", "Datatype", "Format/Datatype", "Format"):
        if key in region:
            precision = precision_of(str(region[key]))
            if precision != "unknown":
                return precision
    return "unknown"


def _inspector(inspector_json: str) -> dict[str, object]:
    try:
        info = json.loads(inspector_json)
    except ValueError as exc:
        raise HarnessError(f"TensorRT engine inspector output is not JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise HarnessError(f"TensorRT engine inspector output is a {type(info).__name__}, not a JSON object")
    return info


def layer_precisions(inspector_json: str) -> list[LayerPrecision]:
    """Per-layer records of an engine from `EngineInspector.get_engine_information(JSON)` in the
    10.x or the 11.x layout.

    A layer's precision is that of its first input (of its first output when it has no input),
    as TensorRT's engine explorer reads it; layers listed by name only (engines built without
    detailed profiling verbosity) get "unknown". Raises HarnessError when the text is not a
    JSON object.
    """
    layers = []
    listed = _inspector(inspector_json).get("Layers", [])
    for raw in listed if isinstance(listed, list) else []:
        if not isinstance(raw, dict):
            layers.append(LayerPrecision(str(raw), "unknown", "unknown"))
            continue
        regions = raw.get("Inputs") or raw.get("Outputs") or []
        first = regions[0] if isinstance(regions, list) and regions and isinstance(regions[0], dict) else {}
        layers.append(LayerPrecision(str(raw.get("Name", "?")), str(raw.get("LayerType", "unknown")),
                                     region_precision(first)))
    return layers


def io_tensors(inspector_json: str) -> list[IoTensor]:
    """The engine's inputs and outputs: 11.x "I/O Tensors" objects (mode and precision read), or
    10.x "Bindings" names (mode and precision "unknown")."""
    info = _inspector(inspector_json)
    tensors = info.get("I/O Tensors")
    if isinstance(tensors, list):
        return [IoTensor(str(t.get("Name", "?")), str(t.get("IOMode", "unknown")).lower(), region_precision(t))
                for t in tensors if isinstance(t, dict)]
    bindings = info.get("Bindings")
    return [IoTensor(str(name), "unknown", "unknown") for name in bindings] if isinstance(bindings, list) else []


def precision_summary(layers: Sequence[LayerPrecision]) -> str:
    """Layer counts by precision, most frequent first ("12 layers: int8 9, fp32 3")."""
    counts = Counter(layer.precision for layer in layers)
    parts = ", ".join(f"{p} {n}" for p, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{len(layers)} layers: {parts}" if layers else "0 layers"


# -- building and loading engines --------------------------------------------------------------

class _Messages:
    """Errors TensorRT logged since they were last taken or cleared (for failure messages)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def take(self) -> str:
        """The collected errors joined into one line, then forgotten."""
        text = "; ".join(self.errors)
        self.errors.clear()
        return text


_MESSAGES = _Messages()


@functools.cache
def trt_logger() -> trt.ILogger:
    """The process-wide TensorRT logger (TensorRT wants one): errors are collected for messages,
    warnings go to the `qharness.tensorrt` logging channel."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                _MESSAGES.errors.append(msg)
                _log.error(msg)
            elif severity == trt.ILogger.WARNING:
                _log.warning(msg)
            else:
                _log.debug(msg)

    return _Logger()


def _timing_cache(config: trt.IBuilderConfig, serialized: bytes) -> trt.ITimingCache:
    """A timing cache from stored bytes; an unreadable one is replaced by an empty cache."""
    if serialized:
        try:
            cache: trt.ITimingCache | None = config.create_timing_cache(serialized)
        except Exception as exc:  # TensorRT raises its own error types from the binding
            cache = None
            _MESSAGES.errors.append(str(exc))
        if cache is not None:
            return cache
        warnings.warn(f"TensorRT timing cache unreadable ({_MESSAGES.take() or 'rejected'}); starting an empty one",
                      stacklevel=3)
    return config.create_timing_cache(b"")


class TensorRTError(HarnessError):
    """A TensorRT step failed; the message names the ONNX, the TensorRT version and the step."""

    def __init__(self, onnx_path: Path | str, version: str, step: str, detail: str):
        super().__init__(f"{onnx_path}: TensorRT {version}, {step}: {detail}")
        self.step = step


def network_flags(version: str, strongly_typed: bool) -> int:
    """`create_network` flags: 10.x sets STRONGLY_TYPED when asked; 11.x networks are always
    strongly typed and the (deprecated, ignored) flag is not used, so 0."""
    if tensorrt_major(version) >= 11 or not strongly_typed:
        return 0
    import tensorrt as trt

    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def builder_flag(name: BuilderFlagName) -> trt.BuilderFlag:
    """The 10.x builder flag of `name` (FP16, INT8); only 10.x build plans name flags."""
    import tensorrt as trt

    if name == "FP16":
        return trt.BuilderFlag.FP16
    return trt.BuilderFlag.INT8


def build_serialized_engine(onnx_path: Path, spec: EngineSpec, timing_cache: bytes = b"") -> tuple[bytes, bytes]:
    """Parse `onnx_path` and build an engine as `spec` says; return (engine, updated timing cache).

    Raises ExportError listing every parser error (with its node) when the parser rejects the
    ONNX, TensorRTError (naming the ONNX, version and step) when a flag is missing or the build
    fails.
    """
    import tensorrt as trt

    version = spec.tensorrt_version
    logger = trt_logger()
    _MESSAGES.errors.clear()
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(version, spec.options.strongly_typed))
        parser = trt.OnnxParser(network, logger)
        parsed = parser.parse_from_file(str(onnx_path))
    except Exception as exc:  # TensorRT raises its own error types from the binding
        raise TensorRTError(onnx_path, version, "create the network and parse", str(exc)) from exc
    if not parsed:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        _MESSAGES.errors.clear()
        raise ExportError(format_parser_errors(f"{onnx_path} (TensorRT {version}, parse)", errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.options.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in spec.options.flags:
        try:
            config.set_flag(builder_flag(flag))
        except AttributeError as exc:  # a flag this TensorRT no longer has
            raise TensorRTError(onnx_path, version, f"set builder flag {flag}",
                                f"this TensorRT has no BuilderFlag.{flag} ({exc})") from exc
    if spec.profiles:
        profile = builder.create_optimization_profile()
        for p in spec.profiles:
            profile.set_shape(p.name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
        config.add_optimization_profile(profile)
    config.set_timing_cache(_timing_cache(config, timing_cache), ignore_mismatch=False)
    try:
        serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    except Exception as exc:  # TensorRT raises its own error types from the binding
        raise TensorRTError(onnx_path, version, f"build ({spec.options.describe()})", str(exc)) from exc
    if serialized is None:
        raise TensorRTError(onnx_path, version, f"build ({spec.options.describe()})",
                            _MESSAGES.take() or "no error was logged")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def combine_timing_caches(stored: bytes, built: bytes) -> bytes:
    """`stored` with the entries of `built` appended (TensorRT's ITimingCache.combine); `built`
    alone when `stored` is empty or unreadable."""
    if not stored:
        return built
    import tensorrt as trt

    config = trt.Builder(trt_logger()).create_builder_config()
    merged = _timing_cache(config, stored)
    merged.combine(config.create_timing_cache(built), False)
    return bytes(merged.serialize())


class TimingCacheFile:
    """The timing cache of one TensorRT version and GPU under the qharness cache, updated under
    a file lock so concurrent workers merge their entries instead of overwriting them."""

    def __init__(self, cache: Cache, tensorrt_version: str, gpu: Gpu):
        self.path = cache.root / "tensorrt-timing" / f"{timing_cache_key(tensorrt_version, gpu)[:24]}.cache"

    def read(self) -> bytes:
        """The stored bytes (empty when there is no cache yet)."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def update(self, built: bytes, combine: Callable[[bytes, bytes], bytes] = combine_timing_caches) -> None:
        """Merge `built` into the stored cache atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            write_bytes_atomic(self.path, combine(self.read(), built))


class _Unusable(Exception):
    """A cached engine folder that must be rebuilt."""


@dataclass
class LoadedEngine:
    """A deserialized engine with the folder it came from and its layer listing."""

    engine: trt.ICudaEngine
    folder: Path
    layers: list[LayerPrecision]


def deserialize(runtime: trt.Runtime, data: bytes) -> trt.ICudaEngine:
    """Deserialize an engine; raise _Unusable with TensorRT's errors when it is rejected."""
    _MESSAGES.errors.clear()
    if not data:
        raise _Unusable("the engine file is empty")
    try:
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    except Exception as exc:  # TensorRT raises its own error types from the binding
        raise _Unusable(f"deserialization failed: {exc}") from exc
    if engine is None:
        raise _Unusable(f"deserialization failed: {_MESSAGES.take() or 'TensorRT returned no engine'}")
    return engine


def inspector_json(engine: trt.ICudaEngine, onnx_path: Path | str = "engine") -> str:
    """The engine inspector's description of every layer (JSON); TensorRTError (step "inspect")
    when the inspector fails or returns something `layer_precisions` cannot read."""
    import tensorrt as trt

    try:
        text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        layer_precisions(text)
    except Exception as exc:  # TensorRT's binding errors and HarnessError alike
        raise TensorRTError(onnx_path, trt.__version__, "inspect", str(exc)) from exc
    return text


def load_engine(cache: Cache, namespace: str, onnx_path: Path, spec: EngineSpec, runtime: trt.Runtime,
                timing: TimingCacheFile) -> LoadedEngine:
    """The engine of `spec` from the cache, built (and the timing cache updated) when absent.

    The key holds the TensorRT version and GPU, so an engine built elsewhere is never found; the
    folder's meta.json is checked against `spec` as well. An entry whose files are missing,
    corrupt or rejected by the runtime is invalidated with a warning and rebuilt once.
    """
    key = spec.key()

    def build(folder: Path) -> None:
        engine_bytes, timing_bytes = build_serialized_engine(onnx_path, spec, timing.read())
        timing.update(timing_bytes)
        write_bytes_atomic(folder / ENGINE_FILE, engine_bytes)
        write_text_atomic(folder / INSPECTOR_FILE, inspector_json(deserialize(runtime, engine_bytes), onnx_path))
        write_json_atomic(folder / META_FILE, spec.describe())

    for attempt in range(2):
        folder = cache.entry(namespace, key, build)
        try:
            try:
                meta = json.loads((folder / META_FILE).read_text())
                layers = layer_precisions((folder / INSPECTOR_FILE).read_text())
                data = (folder / ENGINE_FILE).read_bytes()
            except (OSError, ValueError, AttributeError, HarnessError) as exc:
                raise _Unusable(str(exc)) from exc
            if meta != spec.describe():
                raise _Unusable("its meta.json describes another ONNX, TensorRT version, GPU or build")
            return LoadedEngine(deserialize(runtime, data), folder, layers)
        except _Unusable as exc:
            if attempt:
                raise TensorRTError(onnx_path, spec.tensorrt_version, "load the engine just built",
                                    f"{folder / ENGINE_FILE} is unusable: {exc}") from exc
            cache.invalidate(namespace, key, str(exc))
    raise AssertionError("unreachable")


# -- running -----------------------------------------------------------------------------------

def cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of `device` (the current device for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    """The torch dtype of a TensorRT DataType name (HarnessError for types without one)."""
    try:
        return _TORCH_DTYPES[trt_dtype_name]
    except KeyError:
        raise HarnessError(f"TensorRT tensor type {trt_dtype_name} has no torch buffer type") from None


@dataclass
class _Binding:
    """Device buffers bound to one stage's execution context."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@dataclass
class StageEngine:
    """One stage's engine, its execution context and its I/O tensors."""

    context: trt.IExecutionContext
    engine: trt.ICudaEngine
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: dict[str, torch.dtype]
    bound: _Binding | None = None

    @staticmethod
    def open(engine: trt.ICudaEngine) -> StageEngine:
        """An execution context and the I/O names and buffer types of `engine`."""
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        dtypes = {n: torch_dtype(engine.get_tensor_dtype(n).name) for n in names}
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise HarnessError(f"TensorRT could not create an execution context: {_MESSAGES.take() or 'out of memory?'}")
        return StageEngine(context, engine, inputs, outputs, dtypes)


@dataclass
class TrtRunner(Runner):
    """One engine per stage, run on a dedicated CUDA stream of `device`."""

    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    stream: torch.cuda.Stream | None = None
    runtime: trt.Runtime | None = None
    stages: dict[str, StageEngine] = field(default_factory=dict)

    def run_stage(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy the inputs to the GPU in the engine's types, run, and return the outputs (half
        outputs as float32) on the GPU."""
        with torch.cuda.device(self.device):
            binding = self._bind(stage, feeds)
            self._stream().wait_stream(torch.cuda.current_stream(self.device))
            self._execute(stage, binding)
        return {n: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for n, t in binding.outputs.items()}

    def timed_call(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Buffers allocated and bound once; the call enqueues the engine and synchronises."""
        with torch.cuda.device(self.device):
            binding = self._bind(stage, feeds)
            torch.cuda.current_stream(self.device).synchronize()

        def call() -> None:
            self._execute(stage, binding)
        return call

    def close(self) -> None:
        """Drop contexts, engines and the runtime."""
        self.stages.clear()
        self.runtime = None
        self.stream = None

    def _stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        return self.stream

    def _bind(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> _Binding:
        se = self.stages[stage]
        missing = [n for n in se.inputs if n not in feeds]
        if missing:
            raise HarnessError(f"stage '{stage}': missing inputs {missing}; got {sorted(feeds)}")
        inputs = {n: feeds[n].to(device=self.device, dtype=se.dtypes[n]).contiguous() for n in se.inputs}
        for name, tensor in inputs.items():
            if not se.context.set_input_shape(name, tuple(tensor.shape)):
                raise HarnessError(f"stage '{stage}': input '{name}' of shape {list(tensor.shape)} is outside the "
                                   f"engine's profile {profile_text(se.engine, name)}; {_MESSAGES.take()}")
        outputs = {}
        for name in se.outputs:
            dims = se.context.get_tensor_shape(name)
            shape = [dims[i] for i in range(len(dims))]
            if any(d < 0 for d in shape):
                raise HarnessError(f"stage '{stage}': output '{name}' has a data-dependent shape {shape}; "
                                   "the TensorRT backends need shapes known from the inputs")
            outputs[name] = torch.empty(shape, dtype=se.dtypes[name], device=self.device)
        binding = _Binding(inputs, outputs)
        self._apply(se, binding)
        return binding

    @staticmethod
    def _apply(se: StageEngine, binding: _Binding) -> None:
        for name, tensor in binding.inputs.items():
            se.context.set_input_shape(name, tuple(tensor.shape))
            se.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in binding.outputs.items():
            se.context.set_tensor_address(name, tensor.data_ptr())
        se.bound = binding

    def _execute(self, stage: str, binding: _Binding) -> None:
        se = self.stages[stage]
        if se.bound is not binding:
            self._apply(se, binding)
        stream = self._stream()
        if not se.context.execute_async_v3(stream.cuda_stream):
            raise HarnessError(f"stage '{stage}': TensorRT execution failed: {_MESSAGES.take() or 'no error logged'}")
        stream.synchronize()


def profile_text(engine: trt.ICudaEngine, name: str) -> str:
    """min / opt / max of input `name` in profile 0 (its static shape if it has no profile)."""
    def listed(dims: trt.Dims) -> str:
        return str([dims[i] for i in range(len(dims))])

    declared = engine.get_tensor_shape(name)
    if all(declared[i] >= 0 for i in range(len(declared))):
        return f"static shape {listed(declared)}"
    return "min/opt/max " + " / ".join(listed(d) for d in engine.get_tensor_profile_shape(name, 0))


# -- the backends --------------------------------------------------------------------------------

def max_batch(ctx: PrepareContext) -> int:
    """The largest batch the case feeds a stage (metric runs and benchmarks)."""
    return max(ctx.case.spec.data.batch_size, ctx.case.spec.benchmark.batch_size)


def engine_runner(ctx: PrepareContext, onnx_paths: Mapping[str, Path], plan: BuildPlan) -> TrtRunner:
    """Build or load one engine per stage as `plan` says (converting the graphs to FP16 first
    where it says so) and open execution contexts on `ctx.device`."""
    import tensorrt as trt

    if plan.graph != FLOAT_GRAPH:
        onnx_paths = fp16_onnx(ctx.cache, ctx.case.name, onnx_paths, qdq=plan.graph == QDQ_FP16_GRAPH)
    precision = plan.precision
    options = plan.options
    device = torch.device("cuda", cuda_index(ctx.device))
    gpu = Gpu.of(device)
    feeds = ctx.stage_feeds()
    timing = TimingCacheFile(ctx.cache, trt.__version__, gpu)
    runner = TrtRunner(device=device)
    summaries, artifacts = [], {}
    with torch.cuda.device(device):
        runner.runtime = trt.Runtime(trt_logger())
        for stage, onnx_path in onnx_paths.items():
            spec = EngineSpec(file_sha256(onnx_path), trt.__version__, gpu, options,
                              stage_profiles(onnx_path, feeds[stage], max_batch(ctx)))
            namespace = f"{ctx.case.name}/tensorrt-{precision}/{stage}"
            loaded = load_engine(ctx.cache, namespace, onnx_path, spec, runner.runtime, timing)
            runner.stages[stage] = StageEngine.open(loaded.engine)
            summaries.append(f"{stage}: {precision_summary(loaded.layers)}")
            artifacts.update({f"onnx:{stage}": str(onnx_path), f"engine:{stage}": str(loaded.folder / ENGINE_FILE),
                              f"layers:{stage}": str(loaded.folder / INSPECTOR_FILE)})
    major, minor = gpu.compute_capability
    runner.info = {"provider": f"TensorRT {trt.__version__}", "device": gpu.name, "compute_capability": f"{major}.{minor}",
                   "precision": precision, **plan.describe(), "layers": "; ".join(summaries)}
    runner.artifacts = artifacts
    return runner


class _TensorRT(Backend):
    """Common availability of the TensorRT backends."""

    precision: ClassVar[str]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Skip without TensorRT, without CUDA, or when the run's device is not CUDA
        ("trt-int8 needs TensorRT: tensorrt is not installed")."""
        problem = tensorrt_import_problem()
        if problem is not None:
            return f"{self.name} needs TensorRT: {problem}"
        problem = cuda_problem(device)
        if problem is not None:
            return f"{self.name} needs a CUDA device: {problem}"
        return None


class TrtFP16(_TensorRT):
    """TensorRT engine from the float ONNX in FP16 (10.x: FP16 flag; 11.x: FP16 graph)."""

    name = "trt-fp16"
    precision = "fp16"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """Reuse ort-fp32's cached float export; build or load one engine per stage."""
        import tensorrt as trt

        return engine_runner(ctx, ctx.float_onnx(), build_plan(self.name, trt.__version__))


class TrtInt8(_TensorRT):
    """TensorRT engine from the Q/DQ ONNX (explicit quantization); the layers outside the
    quantized regions run in the case's `high_precision` (fp16 by default)."""

    name = "trt-int8"
    precision = "int8"

    def prepare(self, ctx: PrepareContext) -> Runner:
        """Export the deployed int8 model (PTQ, or QAT under `quant.qat.deploy`) as Q/DQ ONNX
        (TensorRT layout) and build one engine per stage; the runner's info says which model."""
        import tensorrt as trt

        plan = build_plan(self.name, trt.__version__, high_precision(ctx.case.spec.backends.get(self.name)))
        runner = engine_runner(ctx, ctx.qdq_onnx("tensorrt", "int8"), plan)
        runner.info["int8_model"] = ctx.deployed_source()
        return runner


def high_precision(spec: BackendSpec | None) -> HighPrecision:
    """The case's `backends.trt-int8.high_precision`, fp16 when unset."""
    return spec.high_precision if spec is not None and spec.high_precision is not None else "fp16"
