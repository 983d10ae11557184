"""The streaming updater of any feature map: the state that linear attention keeps."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import as_float_matrix, as_float_vector, check_dtype_arg, check_int
from ..base import FeatureMap, Sketch, registered_class

__all__ = ["LinearAttentionState"]


class LinearAttentionState(Sketch):
    """Running sums ``S = sum_i phi(x_i) y_i^T`` and ``z = sum_i phi(x_i)``.

    Rows arrive as pairs ``(x_i, y_i)`` (a key and its value, a data row and
    its target). With a feature map ``phi`` whose inner products approximate
    a kernel ``k(q, x) ~ <phi(q), phi(x)>`` this is exactly the state that
    linear attention keeps, and :meth:`query` reads out
    ``sum_i k(q, x_i) y_i / sum_i k(q, x_i)`` in O(m e) per query, whatever
    the stream length. The state is linear in the stream, so workers merge by
    addition (same feature map, same seed).

    Parameters
    ----------
    feature_map : FeatureMap
        Any of :class:`CountSketch`, :class:`GaussianSketch`, :class:`SRHT`
        (used through ``transform``), :class:`TensorSketch`,
        :class:`PolySketch`. Only its parameters and seed are used: a row
        sketch's own stream state is ignored.
    n_targets : int
        Width ``e`` of the ``y`` rows.
    dtype : {numpy.float64, numpy.float32}, default float64
        Dtype of the sums.

    Notes
    -----
    Cost per row: one ``transform`` (``m`` outputs) plus O(m e) for the outer
    product. Workspace: ``m * (e + 1)`` numbers plus the map's own fixed
    random structure.
    """

    def __init__(self, feature_map: FeatureMap, n_targets: int, *, dtype: Any = np.float64):
        if not isinstance(feature_map, FeatureMap):
            raise TypeError(
                f"feature_map must be a streamsketch FeatureMap, got {type(feature_map).__name__}"
            )
        self.n_targets = check_int(n_targets, "n_targets", minimum=1)
        self.dtype = check_dtype_arg(dtype)
        # An empty twin: the user's object may go on changing (a row sketch
        # keeps streaming), the map it defines does not.
        self.feature_map = type(feature_map)._from_params(feature_map._params())
        # The map never changes: serialise it once, not on every merge check.
        self._feature_map_blob = self.feature_map.to_bytes()
        self.n_features = self.feature_map.n_features
        m = self.feature_map.n_components
        self._S = np.zeros((m, self.n_targets), dtype=self.dtype)
        self._z = np.zeros(m, dtype=self.dtype)
        self._n_seen = 0

    # -- protocol hooks ------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {
            "feature_map": self._feature_map_blob,
            "n_targets": self.n_targets,
            "dtype": self.dtype.name,
        }

    @staticmethod
    def _load_feature_map(blob: Any) -> FeatureMap:
        if not isinstance(blob, bytes):
            raise ValueError("feature_map must be stored as bytes")
        # Check the claimed class before building it: a nested blob must not
        # be able to recurse or build something that is not a map.
        cls = registered_class(blob)
        if not issubclass(cls, FeatureMap):
            raise ValueError(f"feature_map holds a {cls.__name__}, not a FeatureMap")
        fmap = cls.from_bytes(blob)
        if type(fmap)._from_params(fmap._params()).to_bytes() != blob:
            raise ValueError("feature_map must be stored as an empty map (parameters only)")
        return fmap

    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        fmap = cls._load_feature_map(params["feature_map"])
        return fmap.nbytes + 8 * fmap.n_components * (int(params["n_targets"]) + 1)

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> LinearAttentionState:
        params = dict(params)
        fmap = cls._load_feature_map(params.pop("feature_map", None))
        return cls(fmap, **params)

    def _check_compatible(self, other: Any, argname: str = "other") -> None:
        if isinstance(other, LinearAttentionState):
            # Name the real difference (seed, size...) rather than "feature_map".
            self.feature_map._check_compatible(other.feature_map, argname + ".feature_map")
        super()._check_compatible(other, argname)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"S": self._S, "z": self._z}

    def _state_scalars(self) -> dict[str, int]:
        return {"n_seen": self._n_seen}

    def _workspace_arrays(self) -> list[np.ndarray]:
        # The map's own state arrays (a row sketch's unused S·A) are held too.
        return self.feature_map._workspace_arrays() + list(
            self.feature_map._state_arrays().values()
        )

    def _merge_state(self, other: LinearAttentionState) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            S, z = self._S + other._S, self._z + other._z
        if not (np.isfinite(S).all() and np.isfinite(z).all()):
            raise ValueError("other cannot be merged: the sum overflows the dtype")
        self._S, self._z = S, z
        self._n_seen += other._n_seen

    # -- streaming -----------------------------------------------------------
    def extend(self, X: Any, Y: Any) -> LinearAttentionState:
        """Add the pairs ``(X[i], Y[i])``.

        Parameters
        ----------
        X : array_like, shape (k, n_features)
        Y : array_like, shape (k, n_targets)

        Returns
        -------
        self
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        Y = as_float_matrix(Y, "Y", self.n_targets, dtype=self.dtype)
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X and Y must have as many rows, got {X.shape[0]} and {Y.shape[0]}")
        if X.shape[0]:
            # A float64 map can produce features beyond a float32 state's range:
            # the overflow surfaces as Inf in the sums, checked before any change.
            with np.errstate(over="ignore", invalid="ignore"):
                phi = self.feature_map.transform(X).astype(self.dtype, copy=False)
                S = self._S + phi.T @ Y
                z = self._z + phi.sum(axis=0)
            if not (np.isfinite(S).all() and np.isfinite(z).all()):
                raise ValueError("X, Y are too large: the sums overflow the dtype")
            self._S, self._z = S, z
        self._n_seen += X.shape[0]
        return self

    def update(self, x: Any, y: Any) -> LinearAttentionState:
        """Add one pair: ``x`` of shape ``(n_features,)``, ``y`` of shape ``(n_targets,)``."""
        x = as_float_vector(x, "x", self.n_features, dtype=self.dtype)
        y = as_float_vector(y, "y", self.n_targets, dtype=self.dtype)
        return self.extend(x[None, :], y[None, :])

    # -- read-out --------------------------------------------------------------
    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``(S, z)``: shapes ``(m, n_targets)`` and ``(m,)``."""
        return self._S.copy(), self._z.copy()

    def query(self, Q: Any, *, normalize: bool = True) -> np.ndarray:
        """Linear-attention read-out for queries ``Q`` of shape ``(n, n_features)``.

        Returns ``phi(Q) S`` divided row-wise by ``phi(Q) z`` when ``normalize``
        (shape ``(n, n_targets)``). Normalising is meaningful for non-negative
        maps such as :class:`PolySketch`, whose denominators are positive; for
        signed maps pass ``normalize=False`` and normalise as you see fit.
        Cost O(n (transform + m e)). Raises ``ValueError`` when ``phi(Q)`` or
        ``phi(Q) S`` overflows the dtype (rather than returning Inf).
        """
        Q = as_float_matrix(Q, "Q", self.n_features, dtype=self.dtype)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                phi = self.feature_map.transform(Q).astype(self.dtype, copy=False)
                num: np.ndarray = phi @ self._S
        except ValueError:
            # Q is validated above: the map can only refuse an overflow.
            raise ValueError("Q is too large: its features overflow the dtype") from None
        if not (np.isfinite(phi).all() and np.isfinite(num).all()):
            raise ValueError("Q is too large: its features or read-out overflow the dtype")
        if not normalize:
            return num
        den: np.ndarray = phi @ self._z
        with np.errstate(divide="ignore", invalid="ignore"):
            out: np.ndarray = num / den[:, None]
        return out
