"""Plugin helpers usable without a pytest run: --backend parsing, GPU pinning per xdist worker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from harness import plugin


def test_selected_backends_accepts_repeats_and_comma_lists() -> None:
    assert plugin.selected_backends([]) is None
    assert plugin.selected_backends(["ort-int8,torch-fp32", "ort-int8", " trt-int8 "]) == (
        "ort-int8", "torch-fp32", "trt-int8")
    with pytest.raises(pytest.UsageError, match=r"unknown backend.*bogus.*known backends: torch-fp32"):
        plugin.selected_backends(["bogus"])


def _config(worker: str | None) -> Any:
    return SimpleNamespace(workerinput={"workerid": worker}) if worker else SimpleNamespace()


@pytest.mark.parametrize(("visible", "count", "worker", "expected"), [
    (None, 4, "gw0", "0"),
    (None, 4, "gw5", "1"),
    ("2,3", 8, "gw1", "3"),
    ("2,3", 8, "gw2", "2"),
    (None, 0, "gw1", None),     # no GPU: nothing pinned
    (None, 4, None, None),      # not an xdist worker
])
def test_workers_are_pinned_round_robin(monkeypatch: pytest.MonkeyPatch, visible: str | None, count: int,
                                        worker: str | None, expected: str | None) -> None:
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(plugin, "gpu_count", lambda: count)
    assert plugin.pin_worker_gpu(_config(worker)) == expected
    if expected is not None:
        import os

        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
