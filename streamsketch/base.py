"""The protocol every sketch follows (see ``docs/architecture.md``).

Two roles share one serialisable root:

- :class:`Sketch` consumes a stream of rows: ``update(x)``, ``extend(X)``,
  ``merge(other)``, ``n_seen``, ``nbytes``, ``to_bytes()``,
  ``from_bytes(blob)``, ``copy()``.
- :class:`FeatureMap` is a fixed random map ``x -> phi(x)``: ``transform(X)``.

A subclass describes itself with four small hooks instead of re-implementing
the protocol:

``_params()``
    The constructor arguments (``seed`` as the derived integer key). Two
    objects are compatible for merging exactly when their params are equal.
``_state_arrays()``
    The live arrays that make up the stream state (summed by ``nbytes``,
    written by ``to_bytes``). A freshly constructed object must hold arrays of
    the shapes and dtypes a loaded blob must match.
``_state_scalars()``
    Integer counters (``n_seen``, ``next_index``...), non-negative.
``_merge_state(other)``
    Combine a compatible sketch's state into ``self``.

Validation happens in the public methods, before any state changes.
"""

from __future__ import annotations

import abc
import copy as _copy
import inspect
from typing import Any, ClassVar, TypeVar

import numpy as np

from . import _serialization
from ._random import SeedKey
from ._validation import as_float_matrix, as_float_vector

__all__ = ["FeatureMap", "Serializable", "Sketch", "load"]

_REGISTRY: dict[str, type[Serializable]] = {}

#: Most bytes that rebuilding an object from a blob may allocate beyond the
#: blob's own size (fixed random structure such as projection matrices). A
#: blob whose parameters imply more is refused before anything is allocated.
MAX_LOAD_WORKSPACE_BYTES = 256 * 2**20

T = TypeVar("T", bound="Serializable")
S = TypeVar("S", bound="Sketch")


class Serializable(abc.ABC):
    """Root of every streamsketch object: parameters, state and bytes."""

    #: Version of the class's own field layout, stored in every blob.
    _layout_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # First definition wins: a user class that reuses a library name must
        # not silently take over what ``load`` rebuilds.
        _REGISTRY.setdefault(cls.__name__, cls)

    # -- hooks -----------------------------------------------------------
    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild an empty twin of ``self``."""

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _state_scalars(self) -> dict[str, int]:
        return {}

    def _set_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, int]) -> None:
        """Install validated state; the default copies into the fresh arrays."""
        live = self._state_arrays()
        for name, arr in arrays.items():
            live[name][...] = arr
        for name, value in scalars.items():
            setattr(self, "_" + name, value)

    def _check_loaded_state(self) -> None:
        """Extra invariants a loaded state must satisfy (raise ValueError)."""
        return None

    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int | None:
        """Bytes the constructor would allocate for ``params`` (``None``: negligible).

        Called on *untrusted* parameters before construction, so it must not
        allocate; it may raise TypeError/ValueError/KeyError on bad values.
        """
        return None

    # -- construction from parameters ------------------------------------
    @classmethod
    def _from_params(cls: type[T], params: dict[str, Any]) -> T:
        params = dict(params)
        if "seed_key" in params:
            key = params.pop("seed_key")
            if type(key) is not int or not 0 <= key < 2**63:
                raise ValueError("seed_key must be an int in [0, 2**63)")
            params["seed"] = SeedKey(key)
        return cls(**params)

    # -- public protocol ---------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Workspace in bytes: the state arrays plus any fixed random structure."""
        total = sum(a.nbytes for a in self._state_arrays().values())
        return int(total + sum(a.nbytes for a in self._workspace_arrays()))

    def _workspace_arrays(self) -> list[np.ndarray]:
        """Arrays held besides the state (precomputed hashes, projections)."""
        return []

    def to_bytes(self) -> bytes:
        """Serialise to a versioned, self-describing blob (no pickle).

        Cost: O(nbytes).
        """
        fields: dict[str, Any] = {"layout_version": self._layout_version}
        for name, value in self._params().items():
            fields["param." + name] = value
        for name, value in self._state_scalars().items():
            fields["scalar." + name] = value
        for name, arr in self._state_arrays().items():
            fields["array." + name] = arr
        return _serialization.dumps(type(self).__name__, fields)

    @classmethod
    def from_bytes(cls: type[T], blob: bytes) -> T:
        """Rebuild an object from :meth:`to_bytes` output, checking every field.

        Raises
        ------
        ValueError
            The blob is corrupt, truncated, of another class or layout version,
            or its state does not fit its parameters.
        """
        class_name, fields = _serialization.loads(blob)
        if class_name != cls.__name__:
            raise ValueError(f"blob holds a {class_name}, not a {cls.__name__}")
        return cls._from_fields(fields, len(blob))

    @classmethod
    def _from_fields(cls: type[T], fields: dict[str, Any], blob_size: int) -> T:
        layout = fields.pop("layout_version", None)
        if layout != cls._layout_version:
            raise ValueError(
                f"{cls.__name__} blob has layout version {layout!r}, "
                f"this build reads {cls._layout_version}"
            )
        params: dict[str, Any] = {}
        scalars: dict[str, Any] = {}
        arrays: dict[str, Any] = {}
        for name, value in fields.items():
            group, _, key = name.partition(".")
            target = {"param": params, "scalar": scalars, "array": arrays}.get(group)
            if target is None or not key:
                raise ValueError(f"corrupt {cls.__name__} blob: unexpected field {name!r}")
            target[key] = value
        try:
            predicted = cls._predicted_nbytes(params)
            if predicted is not None and predicted > blob_size + MAX_LOAD_WORKSPACE_BYTES:
                raise ValueError(
                    f"the parameters imply {predicted} bytes of workspace, more than "
                    f"the blob's {blob_size} plus MAX_LOAD_WORKSPACE_BYTES"
                )
            obj = cls._from_params(params)
        except (
            TypeError,
            ValueError,
            KeyError,
            OverflowError,
            ZeroDivisionError,
            MemoryError,
            RecursionError,
        ) as exc:
            raise ValueError(f"corrupt {cls.__name__} blob: bad parameters ({exc})") from None
        # The parameters must be exactly those the object reports: nothing
        # missing (filled by a default or fresh entropy) and nothing coerced.
        mine = obj._params()
        if set(mine) != set(params) or not all(_param_equal(mine[k], params[k]) for k in mine):
            raise ValueError(f"corrupt {cls.__name__} blob: parameters do not round-trip")
        obj._load_state(arrays, scalars)
        return obj

    def _load_state(self, arrays: dict[str, Any], scalars: dict[str, Any]) -> None:
        name = type(self).__name__
        want_arrays = self._state_arrays()
        want_scalars = self._state_scalars()
        if set(arrays) != set(want_arrays) or set(scalars) != set(want_scalars):
            raise ValueError(f"corrupt {name} blob: state fields do not match the class")
        for key, want in want_arrays.items():
            got = arrays[key]
            if (
                not isinstance(got, np.ndarray)
                or got.shape != want.shape
                or got.dtype != want.dtype
            ):
                raise ValueError(
                    f"corrupt {name} blob: array {key!r} should be {want.dtype}{list(want.shape)}"
                )
            if got.dtype.kind == "f" and not np.isfinite(got).all():
                raise ValueError(f"corrupt {name} blob: array {key!r} holds NaN or Inf")
        for key, value in scalars.items():
            if type(value) is not int or value < 0:
                raise ValueError(f"corrupt {name} blob: {key!r} must be a non-negative int")
        self._set_state(arrays, scalars)
        self._check_loaded_state()

    def copy(self: T) -> T:
        """An independent deep copy."""
        return _copy.deepcopy(self)

    def _check_compatible(self, other: Any, argname: str = "other") -> None:
        if type(other) is not type(self):
            raise TypeError(
                f"{argname} must be a {type(self).__name__}, got {type(other).__name__}"
            )
        mine, theirs = self._params(), other._params()
        for key in mine:
            a, b = mine[key], theirs[key]
            if _param_equal(a, b):
                continue
            if key == "seed_key":
                raise ValueError(f"{argname} is incompatible: it was built with a different seed")
            shown = "" if isinstance(a, (bytes, np.ndarray)) else f" ({b!r} != {a!r})"
            raise ValueError(f"{argname} is incompatible: {key} differs{shown}")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{k}={v!r}"
            for k, v in self._params().items()
            if not isinstance(v, (bytes, np.ndarray))
        )
        return f"{type(self).__name__}({shown})"


def _param_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return type(a) is type(b) and a == b


class Sketch(Serializable):
    """A streaming sketch of a sequence of rows ``x`` in ``R^n_features``.

    Subclasses implement :meth:`_extend` (validated input, the fast path) and
    :meth:`_merge_state`. ``update`` is ``extend`` of one row, never a second
    copy of the logic.
    """

    n_features: int
    _n_seen: int

    @property
    def n_seen(self) -> int:
        """Rows consumed so far (merged sketches add their counts)."""
        return int(self._n_seen)

    def _validate_rows(self, X: Any, name: str = "X") -> np.ndarray:
        return as_float_matrix(X, name, self.n_features, dtype=getattr(self, "dtype", None))

    # ``*args: Any, **kwargs: Any`` lets each sketch declare the keywords it
    # takes (``start_index``, a second array) and its own return type: mypy
    # accepts any override of such a signature.
    def update(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Consume one row ``x`` of shape ``(n_features,)``; same as ``extend(x[None])``."""
        row = as_float_vector(x, "x", self.n_features, dtype=getattr(self, "dtype", None))
        return self.extend(row[None, :], *args, **kwargs)

    @abc.abstractmethod
    def extend(self, X: Any, *args: Any, **kwargs: Any) -> Any:
        """Consume the rows of ``X``, shape ``(k, n_features)``."""

    def merge(self: S, other: S) -> S:
        """Fold ``other`` into ``self``: the sketch of both streams. Returns ``self``.

        Raises
        ------
        TypeError
            ``other`` is of another class.
        ValueError
            ``other`` has other parameters or another seed.
        """
        self._check_compatible(other)
        self._merge_state(other)
        return self

    @abc.abstractmethod
    def _merge_state(self, other: Any) -> None:
        """Combine a compatible ``other``'s state into ``self``."""


class FeatureMap(Serializable):
    """A fixed (random) map ``phi: R^n_features -> R^n_components``."""

    n_features: int

    @property
    @abc.abstractmethod
    def n_components(self) -> int:
        """Output dimension of :meth:`transform`."""

    @abc.abstractmethod
    def transform(self, X: Any) -> np.ndarray:
        """Map rows ``X`` of shape ``(n, n_features)`` to ``(n, n_components)``."""


def registered_class(blob: bytes) -> type[Serializable]:
    """The concrete class a blob claims to hold (its envelope fully checked), unloaded."""
    name = _serialization.peek_class_name(blob)
    cls = _REGISTRY.get(name)
    if cls is None or inspect.isabstract(cls):
        raise ValueError(f"blob holds an unknown class {name!r}")
    return cls


def load(blob: bytes) -> Serializable:
    """Rebuild any streamsketch object from its bytes (class read from the blob)."""
    return registered_class(blob).from_bytes(blob)
