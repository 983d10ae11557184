"""Tests for streamsketch.linear.tensorsketch.TensorSketch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamsketch import _serialization
from streamsketch.base import load
from streamsketch.linear.tensorsketch import TensorSketch


def _unit_pair(d: int, cos: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors in R^d with inner product ``cos``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    x = q[:, 0]
    y = cos * q[:, 0] + np.sqrt(1 - cos**2) * q[:, 1]
    return x, y


def _explicit_tensorsketch(ts: TensorSketch, X: np.ndarray) -> np.ndarray:
    """CountSketch of x^{(x)p} under H = sum_j h_j mod m, S = prod_j s_j, term by term."""
    buckets, signs = ts.hashes()
    p, m = ts.degree, ts.sketch_size
    out = np.zeros((X.shape[0], m))
    for idx in itertools.product(range(ts.n_features), repeat=p):
        k = sum(int(buckets[j, idx[j]]) for j in range(p)) % m
        sign = np.prod([signs[j, idx[j]] for j in range(p)])
        out[:, k] += sign * np.prod([X[:, idx[j]] for j in range(p)], axis=0)
    return out


def _samples(d, p, m, x, y, n_seeds, offset=0):
    est = np.empty(n_seeds)
    XY = np.stack([x, y])
    for s in range(n_seeds):
        Z = TensorSketch(d, p, m, seed=offset + s).transform(XY)
        est[s] = Z[0] @ Z[1]
    return est


# -- the map is the Pham–Pagh TensorSketch ----------------------------------
@pytest.mark.parametrize(("d", "p", "m"), [(5, 3, 7), (4, 2, 8), (6, 1, 5), (3, 4, 16)])
def test_matches_explicit_tensor_countsketch(d, p, m):
    ts = TensorSketch(d, p, m, seed=11)
    X = np.random.default_rng(1).standard_normal((4, d))
    np.testing.assert_allclose(ts.transform(X), _explicit_tensorsketch(ts, X), atol=1e-12)


def test_hashes_are_in_range_and_independent_per_degree():
    ts = TensorSketch(200, 3, 64, seed=2)
    buckets, signs = ts.hashes()
    assert buckets.shape == (3, 200) and signs.shape == (3, 200)
    assert buckets.min() >= 0 and buckets.max() < 64
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert not np.array_equal(buckets[0], buckets[1])
    assert not np.array_equal(signs[1], signs[2])


# -- statistics -----------------------------------------------------------------
@pytest.mark.parametrize(("p", "cos"), [(2, 0.6), (3, -0.7), (4, 0.8)])
def test_unbiased_over_seeds(p, cos):
    d, m, n = 8, 16, 3000
    x, y = _unit_pair(d, cos, seed=p)
    est = _samples(d, p, m, x, y, n)
    se = est.std(ddof=1) / np.sqrt(n)
    assert abs(est.mean() - cos**p) < 4 * se, (est.mean(), cos**p, se)
    # The documented variance bound (unit vectors): (2 + 3^p) / m.
    assert est.var(ddof=1) <= (2 + 3**p) / m


def test_variance_shrinks_like_one_over_sketch_size():
    d, p, n = 8, 2, 3000
    x, y = _unit_pair(d, 0.5, seed=3)
    v16 = _samples(d, p, 16, x, y, n).var(ddof=1)
    v64 = _samples(d, p, 64, x, y, n, offset=10_000).var(ddof=1)
    assert 2.5 < v16 / v64 < 6.5, (v16, v64)


def test_gram_matrix_error_small_for_large_sketch():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((40, 10))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Z = TensorSketch(10, 2, 4096, seed=0).transform(X)
    err = np.abs(Z @ Z.T - (X @ X.T) ** 2)
    # Standard deviation per entry is at most sqrt(11 / 4096) ~ 0.052.
    assert err.mean() < 0.06 and err.max() < 0.35


# -- determinism ----------------------------------------------------------------
def test_same_seed_bit_identical_different_seeds_differ():
    X = np.random.default_rng(0).standard_normal((50, 12))
    a = TensorSketch(12, 3, 128, seed=7).transform(X)
    b = TensorSketch(12, 3, 128, seed=7).transform(X)
    c = TensorSketch(12, 3, 128, seed=8).transform(X)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    g1 = TensorSketch(12, 3, 128, seed=np.random.default_rng(3)).transform(X)
    g2 = TensorSketch(12, 3, 128, seed=np.random.default_rng(3)).transform(X)
    assert np.array_equal(g1, g2)
    assert not np.array_equal(
        TensorSketch(12, 3, 128).transform(X), TensorSketch(12, 3, 128).transform(X)
    )


def test_blocks_and_threads_match_row_by_row():
    X = np.random.default_rng(4).standard_normal((1000, 20))
    ts = TensorSketch(20, 3, 96, seed=1)
    ts._block_rows = 8  # many blocks, spread over threads
    whole = ts.transform(X)
    rows = np.vstack([ts.transform(X[i : i + 1]) for i in range(0, 1000, 97)])
    np.testing.assert_allclose(whole[::97], rows, rtol=1e-12, atol=1e-12)
    ts2 = TensorSketch(20, 3, 96, seed=1)
    np.testing.assert_allclose(ts2.transform(X), whole, rtol=1e-12, atol=1e-12)


# -- shapes and dtypes --------------------------------------------------------
def test_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 9))
    ts64 = TensorSketch(9, 2, 33, seed=1)
    ts32 = TensorSketch(9, 2, 33, dtype=np.float32, seed=1)
    assert ts64.n_components == 33
    out64 = ts64.transform(X)
    assert out64.shape == (30, 33) and out64.dtype == np.float64
    out32 = ts32.transform(X.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)
    assert ts32.transform(X).dtype == np.float32  # converted to the map's dtype
    assert ts64.transform(X.astype(np.float32)).dtype == np.float64
    Xi = rng.integers(-3, 4, size=(5, 9))
    np.testing.assert_allclose(ts64.transform(Xi), ts64.transform(Xi.astype(float)))
    empty = ts64.transform(np.empty((0, 9)))
    assert empty.shape == (0, 33) and empty.dtype == np.float64


def test_nbytes_counts_hash_arrays():
    assert TensorSketch(10, 3, 64, seed=0).nbytes == 3 * 10 * (8 + 8)
    assert TensorSketch(10, 3, 64, dtype=np.float32, seed=0).nbytes == 3 * 10 * (8 + 4)


# -- serialisation ------------------------------------------------------------
def test_bytes_round_trip():
    X = np.random.default_rng(2).standard_normal((20, 7))
    for dtype in (np.float64, np.float32):
        ts = TensorSketch(7, 3, 50, dtype=dtype, seed=123)
        blob = ts.to_bytes()
        back = TensorSketch.from_bytes(blob)
        assert back._params() == ts._params()
        assert np.array_equal(back.transform(X), ts.transform(X))
        assert np.array_equal(load(blob).transform(X), ts.transform(X))
        assert np.array_equal(ts.copy().transform(X), ts.transform(X))


def test_corrupt_bytes_raise_value_error():
    blob = TensorSketch(7, 3, 50, seed=1).to_bytes()
    with pytest.raises(ValueError):
        TensorSketch.from_bytes(blob[:-3])
    with pytest.raises(ValueError):
        TensorSketch.from_bytes(blob[: len(blob) // 2])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        TensorSketch.from_bytes(bytes(flipped))
    good = {
        "layout_version": 1,
        "param.n_features": 7,
        "param.degree": 3,
        "param.sketch_size": 50,
        "param.dtype": "float64",
        "param.seed_key": 5,
    }
    assert TensorSketch.from_bytes(_serialization.dumps("TensorSketch", good)).degree == 3
    for key, value in [
        ("param.degree", 0),
        ("param.sketch_size", -1),
        ("param.dtype", "bool"),
        ("param.seed_key", -4),
        ("param.n_features", "7"),
    ]:
        bad = dict(good, **{key: value})
        with pytest.raises(ValueError):
            TensorSketch.from_bytes(_serialization.dumps("TensorSketch", bad))
    with pytest.raises(ValueError):
        TensorSketch.from_bytes(
            _serialization.dumps("TensorSketch", dict(good, **{"array.extra": np.zeros(3)}))
        )
    with pytest.raises(ValueError):
        TensorSketch.from_bytes(_serialization.dumps("CountSketch", good))


# -- argument validation ------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"degree": 0}, ValueError, "degree"),
        ({"degree": 2.0}, TypeError, "degree"),
        ({"sketch_size": 0}, ValueError, "sketch_size"),
        ({"n_features": 0}, ValueError, "n_features"),
        ({"dtype": bool}, TypeError, "dtype"),
        ({"dtype": np.int32}, TypeError, "dtype"),
        ({"seed": "abc"}, TypeError, "seed"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_constructor_args(kwargs, exc, name):
    args = {"n_features": 4, "degree": 2, "sketch_size": 8, **kwargs}
    with pytest.raises(exc, match=name):
        TensorSketch(args.pop("n_features"), args.pop("degree"), args.pop("sketch_size"), **args)


@pytest.mark.parametrize(
    ("X", "exc"),
    [
        (np.ones((3, 5)), ValueError),  # wrong width
        (np.ones(4), ValueError),  # 1-D
        (np.array([[1.0, np.nan, 0.0, 0.0]]), ValueError),
        (np.array([[1.0, np.inf, 0.0, 0.0]]), ValueError),
        (np.ones((2, 4), dtype=bool), TypeError),
        (np.ones((2, 4), dtype=np.complex128), TypeError),
        ("abcd", TypeError),
    ],
)
def test_bad_inputs_name_X(X, exc):
    with pytest.raises(exc, match="X"):
        TensorSketch(4, 2, 8, seed=0).transform(X)


def test_overflow_is_refused():
    ts = TensorSketch(4, 3, 16, dtype=np.float32, seed=0)
    with pytest.raises(ValueError, match="too large"):
        ts.transform(np.full((2, 4), 1e15, dtype=np.float32))
    # Large but representable values are fine (and checked, not refused).
    out = ts.transform(np.full((2, 4), 1e11, dtype=np.float32))
    assert np.isfinite(out).all()


def test_scipy_fft_fallback_matches(monkeypatch):
    # numpy < 2 has no ``out=`` in numpy.fft; the scipy.fft path must agree.
    from streamsketch.linear import tensorsketch as mod

    X = np.random.default_rng(6).standard_normal((300, 10))
    for dtype in (np.float64, np.float32):
        ts = TensorSketch(10, 3, 40, dtype=dtype, seed=2)
        fast = ts.transform(X)
        monkeypatch.setattr(mod, "_NUMPY_FFT_OUT", False)
        slow = ts.transform(X)
        monkeypatch.setattr(mod, "_NUMPY_FFT_OUT", True)
        assert slow.dtype == fast.dtype == dtype
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(slow, fast, rtol=tol, atol=tol)
