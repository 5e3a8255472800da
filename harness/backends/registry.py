"""The names of all backends and where each is implemented (imported only when used)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.factory import resolve

if TYPE_CHECKING:
    from harness.backends.base import Backend

# Order matters: it is the order of items and of report rows.
_BACKENDS: dict[str, str] = {
    "torch-fp32": "harness.backends.torch_eager:TorchFP32",
    "torch-fp16": "harness.backends.torch_eager:TorchFP16",
    "fakequant-int8": "harness.backends.fakequant:FakeQuantInt8",
    "ort-fp32": "harness.backends.onnxruntime:OrtFP32",
    "ort-int8": "harness.backends.onnxruntime:OrtInt8",
    "trt-fp16": "harness.backends.tensorrt:TrtFP16",
    "trt-int8": "harness.backends.tensorrt:TrtInt8",
    "scn-ref": "harness.backends.scn_ref:ScnRefFP16",
    "scn-ref-int8": "harness.backends.scn_ref:ScnRefInt8",
}


def known_backends() -> tuple[str, ...]:
    """Every backend name qharness knows, in report order."""
    return tuple(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """Return the backend class registered under `name` (KeyError for unknown names)."""
    cls = resolve(_BACKENDS[name])
    return cls  # type: ignore[return-value]
