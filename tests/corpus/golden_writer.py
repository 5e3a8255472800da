"""Writes generation A or B of a real-sized golden set; run as a subprocess by the kill test.

Usage: python golden_writer.py GOLDEN_DIR LOCK_DIR {a,b}
Prints "go" once the arrays are built (right before `GoldenStore.write`) and "done <seconds>" after.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.golden import GoldenStore

#: tensors per kind and elements per tensor: 2 x 6 x 256 Ki float32 = 12 MiB per generation
TENSORS = 6
ELEMENTS = 1 << 18


def generation(label: str, elements: int = ELEMENTS) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """The tensors (`elements` float32 each) and meta of generation `label`, deterministic."""
    rng = np.random.default_rng(ord(label))
    tensors = {kind: {f"{kind[:-1]}{i}": rng.standard_normal(elements).astype(np.float32) for i in range(TENSORS)}
               for kind in ("inputs", "outputs")}
    meta = {"case": "kill", "config_hash": label * 64, "checkpoint_sha256": None, "created_by": "kill test"}
    return tensors, meta


def main() -> None:
    """Write the generation named on the command line."""
    folder, lock_dir, label = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    tensors, meta = generation(label)
    store = GoldenStore(folder, "regenerate", lock_dir=lock_dir)
    print("go", flush=True)
    started = time.perf_counter()
    store.write(tensors, meta)
    print(f"done {time.perf_counter() - started:.4f}", flush=True)


if __name__ == "__main__":
    main()
