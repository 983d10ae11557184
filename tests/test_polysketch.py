"""Tests for streamsketch.linear.polysketch.PolySketch."""

from __future__ import annotations

import numpy as np
import pytest

from streamsketch import _serialization
from streamsketch.base import load
from streamsketch.linear.polysketch import PolySketch


def _unit_pair(d: int, cos: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    return q[:, 0], cos * q[:, 0] + np.sqrt(1 - cos**2) * q[:, 1]


def _inner_samples(d, p, r, x, y, n_seeds):
    XY = np.stack([x, y])
    est = np.empty(n_seeds)
    for s in range(n_seeds):
        P = PolySketch(d, p, r, seed=s).inner_transform(XY)
        est[s] = P[0] @ P[1]
    return est


def _adversarial_rows(d: int) -> np.ndarray:
    rng = np.random.default_rng(9)
    x = rng.standard_normal(d)
    e = np.eye(d)
    rows = [
        x,
        -x,  # <x, -x> < 0
        -0.999 * x + 0.01 * rng.standard_normal(d),  # nearly antiparallel
        e[0],
        e[1],  # orthogonal to e[0]: target 0
        -e[0],
        e[0] - e[1],
        1e-3 * rng.standard_normal(d),  # tiny norm
        50.0 * rng.standard_normal(d),  # large norm
        np.zeros(d),
    ]
    return np.vstack([np.vstack(rows), rng.standard_normal((30, d))])


# -- the inner sketch is unbiased ---------------------------------------------
@pytest.mark.parametrize(("p", "cos"), [(2, 0.6), (4, 0.7), (6, -0.8), (8, 0.9)])
def test_inner_sketch_unbiased(p, cos):
    d, r, n = 6, 8, 3000
    x, y = _unit_pair(d, cos, seed=p)
    est = _inner_samples(d, p, r, x, y, n)
    se = est.std(ddof=1) / np.sqrt(n)
    assert abs(est.mean() - cos ** (p // 2)) < 4 * se, (est.mean(), cos ** (p // 2), se)


def test_outer_map_bias_is_the_inner_variance():
    # E <phi x, phi y> = <x,y>^p + Var <psi x, psi y>: the documented upward bias.
    d, p, r, n = 6, 4, 8, 3000
    x, y = _unit_pair(d, 0.5, seed=1)
    XY = np.stack([x, y])
    inner = np.empty(n)
    outer = np.empty(n)
    for s in range(n):
        ps = PolySketch(d, p, r, seed=s)
        P, F = ps.inner_transform(XY), ps.transform(XY)
        inner[s], outer[s] = P[0] @ P[1], F[0] @ F[1]
    np.testing.assert_allclose(outer, inner**2, rtol=1e-10, atol=1e-12)
    se = outer.std(ddof=1) / np.sqrt(n)
    bias = outer.mean() - 0.5**p
    assert bias > 4 * se  # really biased upwards at this small r ...
    # ... by the inner variance (exact formula for q = 2, unit vectors).
    var_q2 = ((1 + 2 * 0.5**2) ** 2 - 0.5**4) / r
    assert abs(bias - var_q2) < 4 * se, (bias, var_q2, se)


# -- non-negativity ----------------------------------------------------------------
@pytest.mark.parametrize("p", [2, 4, 6])
@pytest.mark.parametrize("symmetric", [False, True])
def test_inner_products_never_negative(p, symmetric):
    d = 12
    X = _adversarial_rows(d)
    for seed in range(5):
        ps = PolySketch(d, p, 16, symmetric=symmetric, seed=seed)
        F = ps.transform(X)
        G = F @ F.T
        norms = np.linalg.norm(F, axis=1)
        tol = 1e-12 * np.outer(norms, norms)
        assert (G >= -tol).all(), G.min()
        # And the computed Gram really is the square of the inner one.
        P = ps.inner_transform(X)
        np.testing.assert_allclose(G, (P @ P.T) ** 2, rtol=1e-9, atol=1e-9 * norms.max() ** 2)
    # The signed polynomial kernel of odd inner degree is negative on (x, -x):
    # the inner sketch sees it, the tensor square does not.
    if p == 6:
        P = PolySketch(d, p, 64, seed=0).inner_transform(X[:2])
        assert P[0] @ P[1] < 0


def test_symmetric_and_full_give_equal_grams():
    X = np.random.default_rng(3).standard_normal((25, 10))
    for p in (2, 4, 6):
        full = PolySketch(10, p, 12, seed=4)
        sym = PolySketch(10, p, 12, symmetric=True, seed=4)
        assert full.n_components == 144 and sym.n_components == 78
        A, B = full.transform(X), sym.transform(X)
        assert A.shape == (25, 144) and B.shape == (25, 78)
        scale = np.abs(A @ A.T).max()
        np.testing.assert_allclose(A @ A.T, B @ B.T, rtol=1e-12, atol=1e-12 * scale)
        assert np.array_equal(full.inner_transform(X), sym.inner_transform(X))


def test_full_layout_is_outer_product():
    X = np.random.default_rng(1).standard_normal((3, 5))
    ps = PolySketch(5, 4, 6, seed=2)
    P, F = ps.inner_transform(X), ps.transform(X)
    np.testing.assert_array_equal(F, np.einsum("nu,nv->nuv", P, P).reshape(3, 36))
    sym = PolySketch(5, 4, 6, symmetric=True, seed=2).transform(X)
    iu, ju = np.triu_indices(6)
    w = np.where(iu == ju, 1.0, np.sqrt(2.0))
    np.testing.assert_allclose(sym, P[:, iu] * P[:, ju] * w, rtol=1e-15)


# -- accuracy ------------------------------------------------------------------
def test_error_shrinks_and_documented_bound_holds():
    d, p, q = 16, 4, 2
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, d))
    X[1::2] = -X[::2] + 0.3 * rng.standard_normal((30, d))  # plenty of <x,y> < 0
    norms = np.linalg.norm(X, axis=1)
    N = np.outer(norms, norms)
    exact = (X @ X.T) ** p
    iu = np.triu_indices(60, 1)
    mean_err = {}
    for r in (16, 128):
        ps = PolySketch(d, p, r, symmetric=True, seed=r)
        P, F = ps.inner_transform(X), ps.transform(X)
        err = np.abs(F @ F.T - exact)[iu]
        mean_err[r] = (err / N[iu] ** p).mean()
        # Deterministic part of the bound, pair by pair: with eps the pair's
        # inner relative error, the outer error is at most (2 eps + eps^2).
        eps_pair = np.abs(P @ P.T - (X @ X.T) ** q)[iu] / N[iu] ** q
        assert (err <= (2 * eps_pair + eps_pair**2) * N[iu] ** p * (1 + 1e-9) + 1e-9).all()
        # Probabilistic part: Var <psi x, psi y> <= 9 |x|^4 |y|^4 / r for q = 2,
        # so eps = one worst-case standard deviation, 3 / sqrt(r). Most pairs
        # sit well inside the worst case, so the bound should hold for nearly
        # all of them (Chebyshev alone would only promise 15/16 at 4 eps).
        eps = 3 / np.sqrt(r)
        frac = (err <= (2 * eps + eps**2) * N[iu] ** p).mean()
        assert frac >= 0.9, (r, frac)
        eps4 = 4 * eps
        assert (err <= (2 * eps4 + eps4**2) * N[iu] ** p).mean() >= 15 / 16
    assert mean_err[128] < mean_err[16] / 2, mean_err


# -- determinism and dtypes -----------------------------------------------------
def test_same_seed_bit_identical_different_seeds_differ():
    X = np.random.default_rng(0).standard_normal((20, 8))
    a = PolySketch(8, 6, 10, seed=5).transform(X)
    assert np.array_equal(a, PolySketch(8, 6, 10, seed=5).transform(X))
    assert not np.allclose(a, PolySketch(8, 6, 10, seed=6).transform(X))
    g = [PolySketch(8, 6, 10, seed=np.random.default_rng(1)).transform(X) for _ in range(2)]
    assert np.array_equal(g[0], g[1])


def test_dtypes_and_shapes():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((7, 5))
    ps64 = PolySketch(5, 4, 9, seed=1)
    ps32 = PolySketch(5, 4, 9, dtype=np.float32, seed=1)
    assert ps32.transform(X.astype(np.float32)).dtype == np.float32
    assert ps32.inner_transform(X).dtype == np.float32
    assert ps64.transform(X.astype(np.float32)).dtype == np.float64
    # Same seed: the float32 map uses the float64 map's matrices, rounded.
    np.testing.assert_allclose(
        ps32.inner_transform(X), ps64.inner_transform(X), rtol=1e-4, atol=1e-4
    )
    assert ps64.inner_degree == 2
    assert ps64.transform(np.empty((0, 5))).shape == (0, 81)
    assert ps64.inner_transform(np.empty((0, 5))).shape == (0, 9)
    Xi = rng.integers(-2, 3, size=(4, 5))
    np.testing.assert_allclose(ps64.transform(Xi), ps64.transform(Xi.astype(float)))


def test_nbytes_counts_gaussian_matrices():
    d, r = 7, 5
    assert PolySketch(d, 2, r, seed=0).nbytes == r * d * 8
    assert PolySketch(d, 4, r, seed=0).nbytes == 2 * r * d * 8
    # q = 3: root (r x r, r x d) + child q = 2 (two r x d).
    assert PolySketch(d, 6, r, seed=0).nbytes == (r * r + 3 * r * d) * 8
    assert PolySketch(d, 4, r, dtype=np.float32, seed=0).nbytes == 2 * r * d * 4


def test_large_n_uses_threads_consistently():
    X = np.random.default_rng(8).standard_normal((3000, 6))
    ps = PolySketch(6, 4, 8, symmetric=True, seed=3)
    whole = ps.transform(X)
    np.testing.assert_array_equal(whole[2990:], ps.transform(X[2990:]))


# -- serialisation ------------------------------------------------------------
def test_bytes_round_trip():
    X = np.random.default_rng(2).standard_normal((10, 6))
    for sym in (False, True):
        ps = PolySketch(6, 6, 7, symmetric=sym, seed=42)
        blob = ps.to_bytes()
        back = PolySketch.from_bytes(blob)
        assert back._params() == ps._params() and back.symmetric is sym
        assert np.array_equal(back.transform(X), ps.transform(X))
        assert np.array_equal(load(blob).inner_transform(X), ps.inner_transform(X))
        assert back.nbytes == ps.nbytes


def test_corrupt_bytes_raise_value_error():
    blob = PolySketch(6, 4, 7, seed=1).to_bytes()
    with pytest.raises(ValueError):
        PolySketch.from_bytes(blob[:-1])
    with pytest.raises(ValueError):
        PolySketch.from_bytes(blob[:10])
    good = {
        "layout_version": 1,
        "param.n_features": 6,
        "param.degree": 4,
        "param.sketch_size": 7,
        "param.symmetric": False,
        "param.dtype": "float64",
        "param.seed_key": 3,
    }
    assert PolySketch.from_bytes(_serialization.dumps("PolySketch", good)).degree == 4
    for key, value in [
        ("param.degree", 3),
        ("param.degree", 0),
        ("param.symmetric", 1),
        ("param.sketch_size", 0),
        ("param.dtype", "int8"),
    ]:
        with pytest.raises(ValueError):
            PolySketch.from_bytes(_serialization.dumps("PolySketch", dict(good, **{key: value})))
    with pytest.raises(ValueError):
        PolySketch.from_bytes(_serialization.dumps("PolySketch", dict(good, layout_version=2)))
    with pytest.raises(ValueError):
        PolySketch.from_bytes(_serialization.dumps("TensorSketch", good))


# -- argument validation ------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"degree": 3}, ValueError, "degree must be even"),
        ({"degree": 0}, ValueError, "degree"),
        ({"degree": 4.0}, TypeError, "degree"),
        ({"sketch_size": 0}, ValueError, "sketch_size"),
        ({"n_features": -2}, ValueError, "n_features"),
        ({"symmetric": "yes"}, TypeError, "symmetric"),
        ({"symmetric": 1}, TypeError, "symmetric"),
        ({"dtype": bool}, TypeError, "dtype"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_constructor_args(kwargs, exc, match):
    args = {"n_features": 4, "degree": 4, "sketch_size": 8, **kwargs}
    with pytest.raises(exc, match=match):
        PolySketch(args.pop("n_features"), args.pop("degree"), args.pop("sketch_size"), **args)


@pytest.mark.parametrize("method", ["transform", "inner_transform"])
@pytest.mark.parametrize(
    ("X", "exc"),
    [
        (np.ones((3, 5)), ValueError),
        (np.ones((2, 2, 4)), ValueError),
        (np.array([[0.0, np.nan, 1.0, 2.0]]), ValueError),
        (np.ones((2, 4), dtype=bool), TypeError),
        (np.ones((2, 4), dtype=np.float16), TypeError),
    ],
)
def test_bad_inputs_name_X(method, X, exc):
    with pytest.raises(exc, match="X"):
        getattr(PolySketch(4, 4, 8, seed=0), method)(X)


def test_overflow_is_refused():
    ps = PolySketch(4, 4, 8, dtype=np.float32, seed=0)
    with pytest.raises(ValueError, match="too large"):
        ps.inner_transform(np.full((2, 4), 1e20, dtype=np.float32))
    with pytest.raises(ValueError, match="too large"):
        ps.transform(np.full((2, 4), 1e10, dtype=np.float32))
