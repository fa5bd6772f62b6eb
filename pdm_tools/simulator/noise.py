"""Counter-based random numbers: the value at index ``i`` depends only on ``(key, stream, i)``.

A stateful generator would make a block's noise depend on which blocks were generated before it.
Hashing the absolute sample index instead (SplitMix64) makes every block reproducible on its own, so a
signal tiles exactly across block boundaries whatever the block size.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def mix(x: int) -> int:
    """SplitMix64 finalizer on a Python int (64-bit wrap-around).

    >>> mix(0) == mix(0) != mix(1)
    True
    """
    x &= _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return x ^ (x >> 31)


def key(*parts: int) -> int:
    """Combine integers (seed, machine id, ...) into one 64-bit key."""
    out = 0
    for part in parts:
        out = mix(out ^ mix((part & _MASK) + _GOLDEN))
    return out


def uniform(key_: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Uniform float64 in the open interval (0, 1), one per element of the int64 ``index``."""
    base = np.uint64(mix((key_ + stream * _GOLDEN) & _MASK))
    x = np.ascontiguousarray(index, dtype=np.int64).view(np.uint64)
    # uint64 array arithmetic wraps modulo 2**64, which is what SplitMix64 needs.
    x = x * np.uint64(_GOLDEN) + base
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normal(key_: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Standard normal float64 per index (Box-Muller on two independent uniform streams)."""
    u1 = uniform(key_, 2 * stream, index)
    u2 = uniform(key_, 2 * stream + 1, index)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
