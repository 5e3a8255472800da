"""Machine facts: which CPUs make ONNX Runtime's U8S8 int8 kernels saturate."""

from __future__ import annotations

import pytest

from harness.environment import cpu_flags, int8_gemm_saturates


@pytest.mark.parametrize(
    ("flags", "machine", "saturates"),
    [
        (("avx2",), "x86_64", True),  # AVX2 only: vpmaddubsw
        (("avx2", "avx512f"), "x86_64", True),  # AVX512BW without VNNI: still vpmaddubsw
        (("avx2", "avx512f", "avx512_vnni"), "x86_64", False),
        (("avx2", "avx_vnni"), "AMD64", False),
        (("avx2", "amx_tile", "amx_int8"), "x86_64", False),
        ((), "x86_64", True),  # flags unknown: assume the worst
        (("asimddp",), "aarch64", False),
        ((), "arm64", False),
    ],
)
def test_int8_gemm_saturates_on_x86_without_vnni(flags: tuple[str, ...], machine: str, saturates: bool) -> None:
    assert int8_gemm_saturates(flags, machine) is saturates


def test_cpu_flags_only_names_the_features_it_looks_for() -> None:
    assert set(cpu_flags()) <= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimddp", "i8mm"}
