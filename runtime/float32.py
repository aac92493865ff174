"""float32 arithmetic that numpy lacks, for bit-exact mirrors of torch's compiled CPU kernels."""
from __future__ import annotations

import numpy as np

_LOW29 = (1 << 29) - 1  # float64 mantissa bits below float32's
_HALF_ULP32 = 1 << 28  # those bits at a float32 midpoint


def fma(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once, as the FMA instructions GCC emits in torch's kernels.

    The float64 product of two float32 is exact, so the float64 sum is rounded once; rounding that to
    float32 again can only go wrong when it lands exactly on a float32 midpoint, and there TwoSum's
    exact error says which way the true sum lies.
    """
    p = np.multiply(a, b, dtype=np.float64)
    c = np.asarray(c, np.float64)
    s = np.asarray(p + c)
    tie = (s.view(np.int64) & _LOW29) == _HALF_ULP32
    if tie.any():
        bp = s - p
        err = (p - (s - bp)) + (c - bp)  # p + c == s + err exactly
        s = np.where(tie & (err != 0), np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)
