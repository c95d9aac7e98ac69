"""Float dtype facts shared by the readers (statistics) and the validate stage (range checks).

A domain module below the stages: NumPy only, no stage imports it reads from.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLOAT_LIMITS", "FLOAT_RANGE"]

# Largest finite value and smallest positive subnormal of each float dtype a source may be cast
# to. A value above the first becomes inf; a nonzero value at or below half the second becomes 0.
FLOAT_LIMITS: dict[str, tuple[float, float]] = {
    "float16": (65504.0, 2.0**-24),
    "bfloat16": (3.3895313892515355e38, 2.0**-133),
    "float32": (float(np.finfo(np.float32).max), float(np.finfo(np.float32).smallest_subnormal)),
}
# every float target dtype: what validate checks a manifest row against
FLOAT_RANGE: dict[str, tuple[float, float]] = {
    **FLOAT_LIMITS,
    "float64": (float(np.finfo(np.float64).max), float(np.finfo(np.float64).smallest_subnormal)),
}
