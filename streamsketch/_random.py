"""Randomness: seeds (SPEC 7) and counter-based hashes.

A sketch turns its ``seed`` into one 63-bit integer *key* at construction.
Everything random about the sketch is a pure function of that key and an
index (a global row position, a feature index), so

- two sketches with the same seed are bit-identical on the same stream, and
- workers that sketch different shards with the same seed use the same
  random matrix, which is what lets their states merge by addition.

The hash is SplitMix64's finaliser (Steele, Lea & Flood, 2014), a bijection on
64-bit words with full avalanche; :func:`hash_index` keys it twice so that
different keys give unrelated streams.
"""

from __future__ import annotations

import numbers

import numpy as np
import numpy.typing as npt

from ._parallel import njit
from ._validation import check_int

__all__ = [
    "SeedKey",
    "SeedLike",
    "derive_key",
    "hash_index",
    "hashed_normals",
    "hashed_signs",
    "key_generator",
    "seed_to_key",
]

SeedLike = int | np.random.Generator | None

_MASK63 = (1 << 63) - 1


class SeedKey(int):
    """An already-derived key, used when a sketch is rebuilt from its bytes."""


def seed_to_key(seed: SeedLike, name: str = "seed") -> int:
    """Map ``seed`` (int, Generator or None) to the sketch's 63-bit key.

    An int gives the same key every time; a Generator is advanced by one draw
    (SPEC 7); ``None`` draws fresh OS entropy.
    """
    if isinstance(seed, SeedKey):
        return int(seed)
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0]) & _MASK63
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63, dtype=np.uint64))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"{name} must be an int, a numpy.random.Generator or None, got {type(seed).__name__}"
        )
    check_int(seed, name, minimum=0)
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint64)[0]) & _MASK63


def derive_key(key: int, *path: int) -> int:
    """A sub-key for an independent component (a degree of a TensorSketch, ...)."""
    # The path's length goes first: SeedSequence ignores trailing zero words,
    # which would make (k, 0) and (k,) the same sub-key.
    words = np.random.SeedSequence([key, len(path), *path]).generate_state(1, np.uint64)
    return int(words[0]) & _MASK63


def key_generator(key: int) -> np.random.Generator:
    """A numpy Generator fully determined by ``key`` (for small, fixed random structure)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


@njit(inline="always")
def _mix64(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    # Assigned before returning: for a Python 3.10 target numpy's stubs (which
    # need typing.Self) make uint64 arithmetic Any; ``z``'s annotation does not.
    z = z ^ (z >> np.uint64(31))
    return z


@njit(inline="always")
def hash_index(key: np.uint64, index: np.uint64) -> np.uint64:
    """64 well-mixed bits for ``(key, index)``; usable inside other kernels."""
    return _mix64(_mix64(index + np.uint64(0x9E3779B97F4A7C15)) ^ key)


@njit(nogil=True, cache=True)
def hashed_buckets_signs(  # pragma: no cover
    key: int,
    start: int,
    count: int,
    n_buckets: int,
    buckets: npt.NDArray[np.int64],
    signs: np.ndarray,
) -> None:
    """CountSketch hashes of indices ``start .. start+count-1``.

    ``buckets[i]`` is uniform on ``[0, n_buckets)`` (multiply-shift on the high
    32 bits, no modulo bias worth the name) and ``signs[i]`` is +-1 from the
    lowest bit.
    """
    k = np.uint64(key)
    m = np.uint64(n_buckets)
    for i in range(count):
        h = hash_index(k, np.uint64(start + i))
        buckets[i] = np.int64(((h >> np.uint64(32)) * m) >> np.uint64(32))
        signs[i] = 1.0 if (h & np.uint64(1)) else -1.0


@njit(nogil=True, cache=True)
def hashed_normals(  # pragma: no cover
    key: int, start: int, count: int, n_rows: int, out: np.ndarray
) -> None:
    """Fill ``out[r, i]`` (shape (n_rows, count)) with N(0, 1) for column ``start + i``.

    Entry ``(r, j)`` depends only on ``(key, j, r)``: Box-Muller on two 32-bit
    uniforms drawn from one hash per pair of rows.
    """
    k = np.uint64(key)
    two_pi = 2.0 * np.pi
    scale = 1.0 / 4294967296.0
    for i in range(count):
        base = hash_index(k, np.uint64(start + i))
        for r in range(0, n_rows, 2):
            h = hash_index(base, np.uint64(r))
            u1 = (np.float64(h >> np.uint64(32)) + 0.5) * scale
            u2 = (np.float64(h & np.uint64(0xFFFFFFFF)) + 0.5) * scale
            rad = np.sqrt(-2.0 * np.log(u1))
            out[r, i] = rad * np.cos(two_pi * u2)
            if r + 1 < n_rows:
                out[r + 1, i] = rad * np.sin(two_pi * u2)


@njit(nogil=True, cache=True)
def hashed_signs(key: int, start: int, count: int, out: np.ndarray) -> None:  # pragma: no cover
    """``out[i]`` = +-1 for index ``start + i`` (independent of the other hashes)."""
    k = np.uint64(key)
    for i in range(count):
        h = hash_index(k, np.uint64(start + i))
        out[i] = 1.0 if (h >> np.uint64(63)) else -1.0
