"""Input validation shared by every sketch.

Every public entry point converts and checks its arguments here *before* it
touches any state, so that a rejected call leaves a sketch exactly as it was.
Errors name the offending argument.

Dtype policy: ``float32`` and ``float64`` are kept as given (non-native byte
order is swapped to native), integer arrays are converted to ``float64``, and
everything else (bool, float16, complex, object, strings, datetimes) is refused
with a :class:`TypeError`; so are torch/jax/cupy/tensorflow tensors and masked
arrays (convert them explicitly). Layout is free: Fortran-order, strided,
negatively strided and read-only arrays are accepted and copied to a
C-contiguous array only where needed; nothing is ever written into the input.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "as_float_matrix",
    "as_float_vector",
    "check_dtype_arg",
    "check_finite",
    "check_float",
    "check_index",
    "check_int",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _refuse_foreign_tensor(value: Any, name: str) -> None:
    # Torch (and similar) tensors convert silently through ``__array__`` and
    # would force a host copy of device memory; the numpy core refuses them so
    # the user decides where the copy happens.
    mod = type(value).__module__
    if mod.startswith(("torch", "jax", "cupy", "tensorflow")):
        raise TypeError(
            f"{name} must be a numpy array, got {type(value).__module__}."
            f"{type(value).__name__}; convert it first (e.g. tensor.cpu().numpy())"
        )


def _as_float_array(value: Any, name: str, dtype: np.dtype | None) -> np.ndarray:
    _refuse_foreign_tensor(value, name)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}")
    if isinstance(value, np.ma.MaskedArray):
        # The mask would be dropped silently and masked values used.
        raise TypeError(f"{name} must be a plain array, not a masked array; fill it first")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    kind = arr.dtype.kind
    if kind == "f" and not arr.dtype.isnative and arr.dtype.itemsize in (4, 8):
        # Byte-swapped floats (read from a file or the network) are the same numbers.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype in _FLOAT_DTYPES:
        pass
    elif kind in "iu":
        arr = arr.astype(np.float64)
    else:
        raise TypeError(f"{name} must have a float32, float64 or integer dtype, got {arr.dtype}")
    if dtype is not None and arr.dtype != dtype:
        if dtype.itemsize < arr.dtype.itemsize and arr.size:
            limit = np.finfo(dtype).max
            with np.errstate(invalid="ignore"):
                # NaN compares False and +-Inf is not "beyond the range": both
                # stay non-finite through the cast and the NaN/Inf check names them.
                too_big = (np.abs(arr) > limit) & np.isfinite(arr)
            if too_big.any():
                raise ValueError(f"{name} has values beyond the {dtype} range of this sketch")
        arr = arr.astype(dtype)
    return arr


def check_finite(arr: np.ndarray, name: str, row_offset: int | None = None) -> None:
    """Raise :class:`ValueError` if ``arr`` holds NaN or +-Inf.

    With ``row_offset`` (a 2-D block of a longer row stream starting at that
    row) the message names the stream's row and the column instead of the
    block's index.
    """
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        if row_offset is not None:
            where = f"row {row_offset + int(bad[0])}, column {int(bad[1])}"
        else:
            where = "index [" + ", ".join(str(int(i)) for i in bad) + "]"
        raise ValueError(f"{name} contains NaN or Inf (first at {where})")


def as_float_matrix(
    value: Any,
    name: str,
    n_features: int | None = None,
    *,
    dtype: np.dtype | type | None = None,
    finite: bool = True,
    allow_empty: bool = True,
) -> np.ndarray:
    """Return ``value`` as a C-contiguous 2-D float array of shape ``(n, n_features)``.

    Parameters
    ----------
    value : array_like, shape (n, n_features)
        The rows.
    name : str
        Argument name used in error messages.
    n_features : int, optional
        Required width; any width is accepted when ``None``.
    dtype : numpy dtype, optional
        Convert to this float dtype (the sketch's own); keep the input's float
        dtype when ``None``.
    finite : bool
        Refuse NaN/Inf (one extra pass over the data) when true. Kernels that
        check finiteness themselves pass ``False``.
    allow_empty : bool
        Accept ``n == 0``.

    Returns
    -------
    numpy.ndarray
        C-contiguous, ``float32`` or ``float64``; a copy only where needed.
    """
    arr = _as_float_array(value, name, None if dtype is None else np.dtype(dtype))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D of shape (n, n_features), got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} must have {n_features} columns (n_features), got {arr.shape[1]}")
    if not allow_empty and arr.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row")
    arr = np.ascontiguousarray(arr)
    if finite:
        check_finite(arr, name)
    return arr


def as_float_vector(
    value: Any,
    name: str,
    n_features: int | None = None,
    *,
    dtype: np.dtype | type | None = None,
    finite: bool = True,
) -> np.ndarray:
    """Return ``value`` as a contiguous 1-D float array of length ``n_features``."""
    arr = _as_float_array(value, name, None if dtype is None else np.dtype(dtype))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n_features,), got shape {arr.shape}")
    if n_features is not None and arr.shape[0] != n_features:
        raise ValueError(f"{name} must have length {n_features} (n_features), got {arr.shape[0]}")
    arr = np.ascontiguousarray(arr)
    if finite:
        check_finite(arr, name)
    return arr


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a Python bool, refusing anything but ``bool`` and ``numpy.bool_``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def check_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Return ``value`` as a Python int, refusing bools, floats and out-of-range values."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """Return ``value`` as a finite Python float within the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if minimum is not None:
        if strict_minimum and number <= minimum:
            raise ValueError(f"{name} must be > {minimum}, got {number}")
        if not strict_minimum and number < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def check_index(value: Any, name: str) -> int:
    """A global stream position: a non-negative integer below 2**62."""
    return check_int(value, name, minimum=0, maximum=2**62)


def resolve_start(start_index: Any, next_index: int, n_rows: int) -> int:
    """Global position of a block's first row: ``start_index``, or ``next_index`` when None.

    Positions are non-negative and the block must end below 2**62 (hashes
    and counters use 64-bit words).
    """
    start = next_index if start_index is None else check_index(start_index, "start_index")
    if start + n_rows > 2**62:
        raise ValueError(f"start_index + rows must stay below 2**62, got {start + n_rows}")
    return start


def check_dtype_arg(value: Any, name: str = "dtype") -> np.dtype:
    """Validate a sketch's ``dtype`` parameter: float32 or float64."""
    # np.dtype() parses arbitrary strings (even with ast), and maps None to
    # float64; accept only what names a float32/float64 unambiguously.
    if value is None or (
        isinstance(value, str) and value not in ("float32", "float64", "f4", "f8")
    ):
        raise TypeError(f"{name} must be float32 or float64, got {value!r}")
    try:
        dt: np.dtype = np.dtype(value)
    except Exception:
        raise TypeError(f"{name} must be float32 or float64, got {value!r}") from None
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt
