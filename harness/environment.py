"""Facts about this machine and its libraries, for cache keys and reports."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess

import torch

_LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim", "tensorrt", "spconv", "qharness")


@functools.cache
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that change numerics or artefacts."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The SIMD features that decide int8 speed on the CPU (AVX2, AVX512, VNNI, AMX)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimddp", "i8mm")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return tuple(f for f in wanted if f in present)
    except OSError:
        pass
    return ()


_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_gemm_saturates(flags: tuple[str, ...] | None = None, machine: str | None = None) -> bool:
    """True when ONNX Runtime's U8S8 int8 kernels can saturate on this CPU (or on one with `flags`
    and `machine`): x86-64 without VNNI, where MLAS multiplies with `vpmaddubsw` (pairs of
    u8 x s8 products summed in saturating int16). VNNI (`vpdpbusd`) and ARM dot products
    accumulate in int32. An x86-64 CPU whose flags cannot be read counts as saturating."""
    flags = cpu_flags() if flags is None else flags
    machine = (platform.machine() if machine is None else machine).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not any(f in flags for f in _VNNI)


@functools.cache
def cpu_name() -> str:
    """The CPU model name, or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A readable name for a torch device (the GPU model for CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def thread_count() -> int:
    """Threads torch uses for intra-op parallelism."""
    return torch.get_num_threads()


def cuda_available() -> bool:
    """True when torch sees a usable CUDA device."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


@functools.cache
def gpu_count() -> int:
    """NVIDIA GPUs on this machine, counted by `nvidia-smi -L` without initialising CUDA
    (0 when nvidia-smi is absent or fails)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def cuda_visible_devices() -> str | None:
    """The CUDA_VISIBLE_DEVICES setting of this process, if any."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")
