"""The backends qharness knows: name, implementation, precision, capabilities and roles.

Everything outside `harness/backends/` asks this registry instead of naming backends:
- roles: which backend is the float reference (golden outputs, float metric), the speedup base
  of reports, and the quantization reference (default fidelity reference, host of the rules
  check);
- capabilities: which graph a backend runs (`torch`: the PyTorch model itself, `onnx`: a standard
  ONNX export, `scn`: NVIDIA's sparse-convolution custom-op graph), whether it needs CUDA, and
  whether it runs the calibrated (quantized) model.
Implementations are imported only when a backend is prepared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from harness.registry import Registry, RegistryError

if TYPE_CHECKING:
    from harness.backends.base import Backend

Graph = Literal["torch", "onnx", "scn"]

FLOAT_REFERENCE = "float_reference"
"""Produces the golden reference outputs and the float metric every gate compares with."""
SPEEDUP_BASE = "speedup_base"
"""Latencies in reports are shown as speedups over this backend."""
QUANT_REFERENCE = "quant_reference"
"""The int8 accuracy model: default fidelity reference of real int8 kernels; hosts the rules check."""
ONNX_FLOAT_REFERENCE = "onnx_float_reference"
"""The float reference of cases whose model is an ONNX file (no PyTorch model to run)."""
QAT_REFERENCE = "qat_reference"
"""The quantization-aware-trained fake-quant model (`quant.qat.checkpoint`): default fidelity
reference of real int8 kernels when they run the QAT export (`quant.qat.deploy`)."""
ROLES = (FLOAT_REFERENCE, SPEEDUP_BASE, QUANT_REFERENCE, ONNX_FLOAT_REFERENCE, QAT_REFERENCE)


@dataclass(frozen=True)
class BackendInfo:
    """What is known about a backend without importing it."""

    name: str
    target: str
    precision: str
    graph: Graph
    quantized: bool = False
    needs_cuda: bool = False
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def integer_kernels(self) -> bool:
        """True for backends that run a quantized export with real int8 kernels (ort-int8,
        trt-int8, scn-ref-int8): they run the QAT model's export when the case deploys it."""
        return self.quantized and self.graph != "torch"


_INFO: dict[str, BackendInfo] = {}
_CLASSES: Registry[type[Backend]] = Registry("backend")


def register_backend(info: BackendInfo) -> None:
    """Add a backend (after the built-in ones in report order); a role may have one backend."""
    for role in info.roles:
        if role not in ROLES:
            raise ValueError(f"backend {info.name}: unknown role '{role}' (known: {', '.join(ROLES)})")
        holder = next((b.name for b in _INFO.values() if role in b.roles and b.name != info.name), None)
        if holder is not None:
            raise ValueError(f"backend {info.name}: role '{role}' already belongs to {holder}")
    _CLASSES.register(info.name, info.target)
    _INFO[info.name] = info


# Order matters: it is the order of items and of report rows.
for _info in (
    BackendInfo("torch-fp32", "harness.backends.torch_eager:TorchFP32", "fp32", "torch",
                roles=frozenset({FLOAT_REFERENCE, SPEEDUP_BASE})),
    BackendInfo("torch-fp16", "harness.backends.torch_eager:TorchFP16", "fp16", "torch", needs_cuda=True),
    BackendInfo("fakequant-int8", "harness.backends.fakequant:FakeQuantInt8", "int8", "torch", quantized=True,
                roles=frozenset({QUANT_REFERENCE})),
    BackendInfo("qat-int8", "harness.backends.fakequant:QatInt8", "int8", "torch", quantized=True,
                roles=frozenset({QAT_REFERENCE})),
    BackendInfo("ort-fp32", "harness.backends.onnxruntime:OrtFP32", "fp32", "onnx",
                roles=frozenset({ONNX_FLOAT_REFERENCE})),
    BackendInfo("ort-int8", "harness.backends.onnxruntime:OrtInt8", "int8", "onnx", quantized=True),
    BackendInfo("trt-fp16", "harness.backends.tensorrt:TrtFP16", "fp16", "onnx", needs_cuda=True),
    BackendInfo("trt-int8", "harness.backends.tensorrt:TrtInt8", "int8", "onnx", quantized=True, needs_cuda=True),
    BackendInfo("scn-ref", "harness.backends.scn_ref:ScnRefFP16", "fp16", "scn"),
    BackendInfo("scn-ref-int8", "harness.backends.scn_ref:ScnRefInt8", "int8", "scn", quantized=True),
):
    register_backend(_info)


def known_backends() -> tuple[str, ...]:
    """Every backend name qharness knows, in report order."""
    return tuple(_INFO)


def backend_info(name: str) -> BackendInfo:
    """The registry entry of `name` (RegistryError listing the known names otherwise)."""
    if name not in _INFO:
        raise RegistryError(f"unknown backend '{name}'; known: {', '.join(_INFO)}")
    return _INFO[name]


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under `name` (imported now)."""
    return _CLASSES.get(name)


def backend_with_role(role: str) -> str:
    """The name of the backend holding `role` (one of ROLES)."""
    for info in _INFO.values():
        if role in info.roles:
            return info.name
    raise LookupError(f"no backend holds the role '{role}'")
