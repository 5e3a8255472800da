"""Number formatting shared by failure tables, gates and reports (one place, one style)."""

from __future__ import annotations

import math


def general(x: float | None) -> str:
    """Six significant digits, scientific outside [1e-3, 1e5); "0", "inf", "nan", "-" for None."""
    if x is None:
        return "-"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.6g}"
    return f"{x:.3e}"


def fixed(x: object, decimals: int = 4) -> str:
    """`decimals` places for numbers ("nan"/"inf" as such), "-" for None, str() otherwise."""
    if isinstance(x, bool) or x is None:
        return "-" if x is None else str(x)
    if isinstance(x, (int, float)):
        return str(float(x)) if not math.isfinite(x) else f"{x:.{decimals}f}"
    return str(x)
