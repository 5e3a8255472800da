"""Tests of harness/backends/tensorrt.py: availability, cache keys, parser errors, profiles,
layer listings; engines are built and run only where TensorRT and a GPU exist."""

from __future__ import annotations

import enum
import importlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from harness.backends import tensorrt as trt_backend
from harness.backends.registry import backend_class
from harness.backends.tensorrt import (
    FLOAT_GRAPH,
    FP16_GRAPH,
    NO_CUDA,
    NOT_INSTALLED,
    QDQ_FP16_GRAPH,
    BuildOptions,
    BuildPlan,
    EngineSpec,
    Gpu,
    HighPrecision,
    IoTensor,
    LayerPrecision,
    ProfileShapes,
    TimingCacheFile,
    build_plan,
    format_parser_errors,
    io_tensors,
    layer_precisions,
    network_flags,
    precision_of,
    precision_summary,
    profile_shapes,
    stage_profiles,
    tensorrt_major,
    timing_cache_key,
    torch_dtype,
    unavailable_reason,
)
from harness.cache import Cache, file_sha256
from harness.errors import ExportError, HarnessError
from harness.export.artifacts import fp16_onnx

CUDA = torch.device("cuda")


# -- availability --------------------------------------------------------------------------------

def _forget_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()


def test_stub_folder_namespace_package_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `pip install --no-deps tensorrt-stubs` leaves: a tensorrt/ folder of .pyi files only.
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    _forget_tensorrt(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("tensorrt")
    assert not hasattr(module, "Builder")
    assert trt_backend.tensorrt_import_problem() == NOT_INSTALLED
    assert unavailable_reason(CUDA) == NOT_INSTALLED


def test_missing_module_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert trt_backend.tensorrt_import_problem() == NOT_INSTALLED


def test_broken_library_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    _forget_tensorrt(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = trt_backend.tensorrt_import_problem()
    assert reason is not None and reason.startswith("tensorrt cannot be imported") and "libnvinfer" in reason


def test_no_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_backend, "tensorrt_import_problem", lambda: None)
    monkeypatch.setattr(trt_backend, "cuda_available", lambda: False)
    assert unavailable_reason(CUDA) == NO_CUDA
    assert backend_class("trt-fp16")().unavailable_reason(CUDA) == "trt-fp16 needs a CUDA device: no CUDA device"
    monkeypatch.setattr(trt_backend, "cuda_available", lambda: True)
    assert unavailable_reason(torch.device("cpu")) == "--device is cpu"
    assert backend_class("trt-int8")().unavailable_reason(torch.device("cpu")) == "trt-int8 needs a CUDA device: --device is cpu"
    assert unavailable_reason(CUDA) is None
    assert backend_class("trt-int8")().unavailable_reason(CUDA) is None


def test_tensorrt_is_checked_before_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_backend, "cuda_available", lambda: False)
    assert unavailable_reason(CUDA) == NOT_INSTALLED
    for name in ("trt-fp16", "trt-int8"):
        backend = backend_class(name)()
        assert backend.name == name
        assert backend.unavailable_reason(torch.device("cpu")) == f"{name} needs TensorRT: tensorrt is not installed"


# -- cache keys ----------------------------------------------------------------------------------

def _spec(**changes: object) -> EngineSpec:
    base = EngineSpec(
        onnx_sha256="ab" * 32, tensorrt_version="10.13.0.35", gpu=Gpu("NVIDIA H100 80GB HBM3", (9, 0)),
        options=BuildOptions(strongly_typed=False, flags=("FP16",)),
        profiles=(ProfileShapes("image", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)),),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_engine_key_is_stable_and_json_describable() -> None:
    assert _spec().key() == _spec().key()
    assert json.loads(json.dumps(_spec().describe())) == _spec().describe()


@pytest.mark.parametrize("changes", [
    {"onnx_sha256": "cd" * 32},
    {"tensorrt_version": "10.12.0.36"},
    {"gpu": Gpu("NVIDIA H200", (9, 0))},
    {"gpu": Gpu("NVIDIA H100 80GB HBM3", (8, 9))},
    {"options": BuildOptions(strongly_typed=True, flags=())},
    {"options": BuildOptions(strongly_typed=False, flags=("INT8", "FP16"))},
    {"options": BuildOptions(strongly_typed=False, flags=("FP16",), workspace_bytes=1 << 30)},
    {"profiles": (ProfileShapes("image", (1, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8)),)},
])
def test_engine_key_changes_with_every_ingredient(changes: dict[str, object]) -> None:
    assert _spec(**changes).key() != _spec().key()


def test_timing_cache_key_per_version_and_gpu() -> None:
    gpu = Gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert timing_cache_key("10.13.0.35", gpu) == timing_cache_key("10.13.0.35", gpu)
    assert timing_cache_key("10.13.0.35", gpu) != timing_cache_key("10.12.0.36", gpu)
    assert timing_cache_key("10.13.0.35", gpu) != timing_cache_key("10.13.0.35", Gpu("NVIDIA H200", (9, 0)))


def test_timing_cache_file_merges_under_lock(tmp_path: Path) -> None:
    store = TimingCacheFile(Cache(tmp_path), "10.13.0.35", Gpu("NVIDIA H100 80GB HBM3", (9, 0)))
    assert store.read() == b""
    store.update(b"one", combine=lambda stored, built: stored + built)
    store.update(b"two", combine=lambda stored, built: stored + built)
    assert store.read() == b"onetwo"
    assert store.path.parent == tmp_path / "tensorrt-timing"


def test_build_options_describe() -> None:
    assert BuildOptions(strongly_typed=True, flags=()).describe() == "strongly typed"
    assert BuildOptions(strongly_typed=False, flags=("INT8", "FP16")).describe() == "flags INT8+FP16"


# -- parser errors -------------------------------------------------------------------------------

class ErrorCode(enum.Enum):
    """Shaped like tensorrt.ErrorCode (str() gives "ErrorCode.NAME")."""

    UNSUPPORTED_NODE = 8
    INVALID_GRAPH = 5


@dataclass
class ParserErrorRecord:
    """Plain data with the accessor methods of tensorrt.ParserError that messages use."""

    code_: ErrorCode
    desc_: str
    node_: int
    name_: str
    op_: str

    def code(self) -> ErrorCode:
        return self.code_

    def desc(self) -> str:
        return self.desc_

    def node(self) -> int:
        return self.node_

    def node_name(self) -> str:
        return self.name_

    def node_operator(self) -> str:
        return self.op_


def test_parser_errors_list_every_node() -> None:
    errors = [
        ParserErrorRecord(ErrorCode.UNSUPPORTED_NODE, "No importer registered for op: FancyOp\n", 3, "/head/fancy", "FancyOp"),
        ParserErrorRecord(ErrorCode.UNSUPPORTED_NODE, "Unsupported attribute", 7, "", "Resize"),
        ParserErrorRecord(ErrorCode.INVALID_GRAPH, "Graph has no outputs", -1, "", ""),
    ]
    text = format_parser_errors("cache/model.onnx", errors)
    lines = text.splitlines()
    assert lines[0] == "cache/model.onnx: TensorRT's ONNX parser rejected the model (3 error(s)):"
    assert lines[1] == "  node 3 '/head/fancy' (FancyOp): [UNSUPPORTED_NODE] No importer registered for op: FancyOp"
    assert lines[2] == "  node 7 (Resize): [UNSUPPORTED_NODE] Unsupported attribute"
    assert lines[3] == "  model: [INVALID_GRAPH] Graph has no outputs"


# -- optimisation profiles -----------------------------------------------------------------------

def test_dynamic_batch_profile() -> None:
    p = profile_shapes("image", [-1, 3, 8, 16], (2, 3, 8, 16), max_batch=4)
    assert (p.min, p.opt, p.max) == ((1, 3, 8, 16), (2, 3, 8, 16), (4, 3, 8, 16))


def test_profile_max_is_at_least_opt() -> None:
    p = profile_shapes("image", [-1, 3, 8, 16], (6, 3, 8, 16), max_batch=4)
    assert p.max == (6, 3, 8, 16) and p.min[0] == 1


def test_other_dynamic_dims_are_fixed_at_the_example() -> None:
    p = profile_shapes("points", [-1, -1, 5], (1, 1000, 5), max_batch=2)
    assert (p.min, p.opt, p.max) == ((1, 1000, 5), (1, 1000, 5), (2, 1000, 5))


def test_static_shape_profile_and_mismatch() -> None:
    p = profile_shapes("x", [1, 4], (1, 4), max_batch=8)
    assert p.min == p.opt == p.max == (1, 4)
    with pytest.raises(HarnessError, match="input 'x'"):
        profile_shapes("x", [1, 4], (1, 5), max_batch=8)
    with pytest.raises(HarnessError, match="input 'x'"):
        profile_shapes("x", [-1, 4], (1, 4, 1), max_batch=8)


def _identity_onnx(path: Path, dims: list[int | str]) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_stage_profiles_only_for_dynamic_inputs(tmp_path: Path) -> None:
    feeds = {"x": torch.zeros(2, 3, 4)}
    dynamic = _identity_onnx(tmp_path / "dynamic.onnx", ["batch", 3, 4])
    assert stage_profiles(dynamic, feeds, max_batch=4) == (ProfileShapes("x", (1, 3, 4), (2, 3, 4), (4, 3, 4)),)
    static = _identity_onnx(tmp_path / "static.onnx", [2, 3, 4])
    assert stage_profiles(static, feeds, max_batch=4) == ()
    with pytest.raises(HarnessError, match="no example feed"):
        stage_profiles(dynamic, {"other": torch.zeros(1)}, max_batch=4)


# -- layer listing and buffers -------------------------------------------------------------------

INSPECTOR = json.dumps({"Layers": [
    {"Name": "conv1 + relu1", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "x_q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
     "Outputs": [{"Name": "y", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
    {"Name": "head", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
     "Outputs": [{"Name": "z", "Format/Datatype": "Row major linear FP32"}]},
    {"Name": "const", "LayerType": "Constant", "Inputs": [],
     "Outputs": [{"Name": "c", "Format/Datatype": "Row major linear FP32"}]},
    {"Name": "reformat", "LayerType": "Reformat",
     "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Name": "x_q", "Format/Datatype": "Row major Int8 format"}]},
], "Bindings": ["x", "z"]})


def test_layer_precisions_from_inspector_json() -> None:
    layers = layer_precisions(INSPECTOR)
    assert layers == [
        LayerPrecision("conv1 + relu1", "CaskConvolution", "int8"),
        LayerPrecision("head", "CaskConvolution", "fp16"),
        LayerPrecision("const", "Constant", "fp32"),
        LayerPrecision("reformat", "Reformat", "fp32"),
    ]
    assert precision_summary(layers) == "4 layers: fp32 2, fp16 1, int8 1"
    assert precision_summary([]) == "0 layers"


def test_layers_listed_by_name_only() -> None:
    assert layer_precisions(json.dumps({"Layers": ["a", "b"]})) == [
        LayerPrecision("a", "unknown", "unknown"), LayerPrecision("b", "unknown", "unknown")]


@pytest.mark.parametrize(("text", "precision"), [
    ("Row major linear FP32", "fp32"), ("Float", "fp32"), ("Half", "fp16"), ("BFloat16", "bf16"),
    ("Channel major BFloat16 format where channel % 8 == 0", "bf16"), ("Row major linear Int32", "int32"),
    ("Row major linear UInt8 format", "uint8"), ("Row major linear FP8 format", "fp8"), ("Unknown format", "unknown"),
    ("Int8", "int8"), ("Int4", "int4"), ("FP4", "fp4"), ("E8M0", "e8m0"), ("Row major linear FP32 format (kLINEAR)", "fp32"),
])
def test_precision_of_format_strings(text: str, precision: str) -> None:
    assert precision_of(text) == precision


def test_torch_dtypes_of_tensorrt_types() -> None:
    assert torch_dtype("FLOAT") is torch.float32 and torch_dtype("HALF") is torch.float16
    assert torch_dtype("INT64") is torch.int64 and torch_dtype("BOOL") is torch.bool
    with pytest.raises(HarnessError, match="FP4"):
        torch_dtype("FP4")


# -- TensorRT 10 vs 11: version switch, inspector layouts, errors ----------------------------------

@pytest.mark.parametrize(("version", "major"), [("10.13.3.9", 10), ("10.0.1", 10), ("11.1.0.4", 11), ("12", 12)])
def test_tensorrt_major(version: str, major: int) -> None:
    assert tensorrt_major(version) == major


@pytest.mark.parametrize("version", ["", "x.1", "8.6.1", "9.3.0"])
def test_tensorrt_major_rejects(version: str) -> None:
    with pytest.raises(HarnessError, match="TensorRT"):
        tensorrt_major(version)


def test_build_plans_on_tensorrt_10() -> None:
    fp16 = build_plan("trt-fp16", "10.13.3.9")
    assert (fp16.options, fp16.graph) == (BuildOptions(strongly_typed=False, flags=("FP16",)), FLOAT_GRAPH)
    int8 = build_plan("trt-int8", "10.13.3.9")
    assert (int8.options, int8.graph, int8.precision) == (BuildOptions(False, ("INT8", "FP16")), FLOAT_GRAPH, "int8+fp16")
    strict = build_plan("trt-int8", "10.13.3.9", "fp32")
    assert (strict.options, strict.graph, strict.precision) == (BuildOptions(True, ()), FLOAT_GRAPH, "int8+fp32")


@pytest.mark.parametrize("version", ["11.0.0", "11.4.1.2", "12.0"])
def test_build_plans_on_tensorrt_11_and_later_use_no_flags(version: str) -> None:
    fp16 = build_plan("trt-fp16", version)
    assert (fp16.options, fp16.graph) == (BuildOptions(strongly_typed=True, flags=()), FP16_GRAPH)
    assert fp16.describe()["graph"].startswith("FP16 by graph")
    int8 = build_plan("trt-int8", version)
    assert (int8.options.flags, int8.graph, int8.precision) == ((), QDQ_FP16_GRAPH, "int8+fp16")
    assert int8.describe()["graph"].startswith("FP16 by graph")
    strict = build_plan("trt-int8", version, "fp32")
    assert (strict.options.flags, strict.graph, strict.describe()["graph"]) == ((), FLOAT_GRAPH, "as exported")
    with pytest.raises(HarnessError, match="ort-int8"):
        build_plan("ort-int8", version)


def test_network_flags_without_tensorrt_where_no_flag_is_needed() -> None:
    # 11.x never sets the deprecated STRONGLY_TYPED flag; a weakly typed 10.x network has none.
    assert network_flags("11.1.0", strongly_typed=True) == 0
    assert network_flags("10.13.3.9", strongly_typed=False) == 0


def test_high_precision_option_of_the_case(tmp_path: Path) -> None:
    from harness.cases import BackendSpec

    assert trt_backend.high_precision(None) == "fp16"
    bound = {"compare": {"cosine_min": 0.99}}
    assert trt_backend.high_precision(BackendSpec.model_validate(bound)) == "fp16"
    assert trt_backend.high_precision(BackendSpec.model_validate({**bound, "high_precision": "fp32"})) == "fp32"
    with pytest.raises(ValueError, match="high_precision"):
        BackendSpec.model_validate({**bound, "high_precision": "bf16"})


def test_tensorrt_error_names_onnx_version_and_step() -> None:
    err = trt_backend.TensorRTError("/c/model.onnx", "11.1.0", "set builder flag FP16", "no such flag")
    assert str(err) == "/c/model.onnx: TensorRT 11.1.0, set builder flag FP16: no such flag"
    assert isinstance(err, HarnessError) and err.step == "set builder flag FP16"


# The 11.x layout (TensorRT 11.0 IEngineInspector migration page): "Bindings" became "I/O Tensors"
# objects, and a region's "Format/Datatype" is split into "Format" and "DataType".
INSPECTOR_11 = json.dumps({"Layers": [
    {"Name": "conv1 + relu1", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "x_q", "Format": "Thirty-two wide channel vectorized row major", "DataType": "Int8"}],
     "Outputs": [{"Name": "y", "Format": "Thirty-two wide channel vectorized row major", "DataType": "Int8"}]},
    {"Name": "head", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "y", "Format": "Channel major format where channel % 8 == 0", "DataType": "Half"}],
     "Outputs": [{"Name": "z", "Format": "Row major linear", "DataType": "Float"}]},
    {"Name": "bf", "LayerType": "Reformat", "Inputs": [{"Name": "z", "Format": "Row major linear", "DataType": "BFloat16"}],
     "Outputs": []},
    {"Name": "w4", "LayerType": "Gemm", "Inputs": [{"Name": "a", "Format": "Row major linear", "DataType": "Int4"}]},
    {"Name": "f4", "LayerType": "Gemm", "Inputs": [{"Name": "a", "Format": "Row major linear", "DataType": "FP4"}]},
    {"Name": "f8", "LayerType": "Gemm", "Inputs": [{"Name": "a", "Format": "Row major linear", "DataType": "FP8"}]},
], "I/O Tensors": [
    {"Name": "x", "IOMode": "Input", "DataType": "Float", "Dimensions": [1, 3, 16, 16], "Location": "Device",
     "IsShapeInferenceIO": False, "ProfileInfo": [{"MinShape": [1, 3, 16, 16], "OptShape": [2, 3, 16, 16],
                                                   "MaxShape": [4, 3, 16, 16],
                                                   "Format": "Row major linear FP32 format (kLINEAR)"}]},
    {"Name": "z", "IOMode": "Output", "DataType": "Half", "Dimensions": [1, 4, 16, 16], "Location": "Device",
     "IsShapeInferenceIO": False},
]})


def test_layer_precisions_from_the_11x_layout() -> None:
    assert [(layer.name, layer.precision) for layer in layer_precisions(INSPECTOR_11)] == [
        ("conv1 + relu1", "int8"), ("head", "fp16"), ("bf", "bf16"), ("w4", "int4"), ("f4", "fp4"), ("f8", "fp8")]
    assert "unknown" not in precision_summary(layer_precisions(INSPECTOR_11))


def test_io_tensors_of_both_layouts() -> None:
    assert io_tensors(INSPECTOR_11) == [IoTensor("x", "input", "fp32"), IoTensor("z", "output", "fp16")]
    assert io_tensors(INSPECTOR) == [IoTensor("x", "unknown", "unknown"), IoTensor("z", "unknown", "unknown")]


def test_inspector_text_that_is_not_json_is_an_error() -> None:
    with pytest.raises(HarnessError, match="not JSON"):
        layer_precisions("Layers: conv")
    with pytest.raises(HarnessError, match="not a JSON object"):
        io_tensors("[1, 2]")


# -- real engines (TensorRT + CUDA only) ---------------------------------------------------------

_REASON = unavailable_reason(CUDA)
needs_tensorrt = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(torch.relu(self.conv(image)))
        return logits


class TinyQDQNet(TinyNet):
    """Q/DQ on the conv inputs and weights, as the TensorRT layout places them."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(image, 4.0 / 127, 0, -128, 127)
        amax = self.conv.weight.detach().abs().amax(dim=(1, 2, 3))
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, amax / 127, torch.zeros_like(amax, dtype=torch.int32),
                                                   0, -128, 127)
        y = torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1))
        logits: torch.Tensor = self.head(y)
        return logits


def _export(module: nn.Module, path: Path) -> Path:
    from harness.export.onnx import export_stage
    from harness.program import Stage

    return export_stage(Stage("model", module.eval(), ("image",), ("logits",)), {"image": torch.rand(2, 3, 16, 16)},
                        path, opset=17, simplify=False)


def _plan(backend: str, high_precision: HighPrecision = "fp16") -> BuildPlan:
    import tensorrt as trt

    return build_plan(backend, trt.__version__, high_precision)


def _graph(cache: Cache, onnx_path: Path, plan: BuildPlan) -> Path:
    """The ONNX the plan builds: the export, or its FP16 graph (TensorRT 11)."""
    if plan.graph == FLOAT_GRAPH:
        return onnx_path
    return fp16_onnx(cache, "tiny", {"model": onnx_path}, qdq=plan.graph == QDQ_FP16_GRAPH)["model"]


def _load(cache: Cache, onnx_path: Path, options: BuildOptions) -> tuple[trt_backend.TrtRunner, trt_backend.LoadedEngine]:
    import tensorrt as trt

    device = torch.device("cuda", torch.cuda.current_device())
    gpu = Gpu.of(device)
    spec = EngineSpec(file_sha256(onnx_path), trt.__version__, gpu, options,
                      stage_profiles(onnx_path, {"image": torch.rand(2, 3, 16, 16)}, max_batch=4))
    runner = trt_backend.TrtRunner(device=device, runtime=trt.Runtime(trt_backend.trt_logger()))
    assert runner.runtime is not None
    loaded = trt_backend.load_engine(cache, "tiny/model", onnx_path, spec, runner.runtime,
                                     TimingCacheFile(cache, trt.__version__, gpu))
    runner.stages["model"] = trt_backend.StageEngine.open(loaded.engine)
    return runner, loaded


@needs_tensorrt
@pytest.mark.gpu
def test_fp16_engine_builds_runs_and_is_cached(tmp_path: Path) -> None:
    model = TinyNet().eval()
    onnx_path = _export(model, tmp_path / "tiny.onnx")
    cache = Cache(tmp_path / "cache")
    plan = _plan("trt-fp16")
    onnx_path = _graph(cache, onnx_path, plan)
    runner, loaded = _load(cache, onnx_path, plan.options)
    assert "fp16" in {layer.precision for layer in loaded.layers}, precision_summary(loaded.layers)
    for batch in (1, 3, 4):
        image = torch.rand(batch, 3, 16, 16)
        out = runner.run_stage("model", {"image": image})["logits"]
        with torch.no_grad():
            ref = model(image)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        torch.testing.assert_close(out.cpu(), ref, atol=2e-2, rtol=2e-2)
    runner.timed_call("model", {"image": torch.rand(2, 3, 16, 16)})()
    assert loaded.layers and (loaded.folder / trt_backend.INSPECTOR_FILE).is_file()
    built_at = (loaded.folder / trt_backend.ENGINE_FILE).stat().st_mtime_ns
    _, again = _load(cache, onnx_path, plan.options)
    assert (again.folder / trt_backend.ENGINE_FILE).stat().st_mtime_ns == built_at
    (loaded.folder / trt_backend.ENGINE_FILE).write_bytes(b"not an engine")
    with pytest.warns(UserWarning, match="unusable"):
        _, rebuilt = _load(cache, onnx_path, plan.options)
    assert (rebuilt.folder / trt_backend.ENGINE_FILE).stat().st_size > 100
    runner.close()


@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("high_precision", ["fp16", "fp32"])
def test_qdq_engine_runs_int8_layers(tmp_path: Path, high_precision: HighPrecision) -> None:
    model = TinyQDQNet().eval()
    cache = Cache(tmp_path / "cache")
    plan = _plan("trt-int8", high_precision)
    onnx_path = _graph(cache, _export(model, tmp_path / "tiny_qdq.onnx"), plan)
    runner, loaded = _load(cache, onnx_path, plan.options)
    precisions = {layer.precision for layer in loaded.layers}
    assert "int8" in precisions, precision_summary(loaded.layers)
    assert (high_precision in precisions) or high_precision == "fp32", precision_summary(loaded.layers)
    image = torch.rand(2, 3, 16, 16)
    out = runner.run_stage("model", {"image": image})["logits"].cpu()
    with torch.no_grad():
        ref = model(image)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cosine > 0.99
    runner.close()


@needs_tensorrt
@pytest.mark.gpu
def test_parser_rejection_lists_the_node(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("NoSuchOp", ["image"], ["logits"], name="bad_node", domain="qharness.test")
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qharness.test", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=r"node 0 'bad_node' \(NoSuchOp\)"):
        _load(Cache(tmp_path / "cache"), path, _plan("trt-fp16").options)
