import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsketch.rows.leverage import _default_jl_dim, leverage_scores


def _svd_scores(A, ridge=0.0):
    """Reference: tau_i = sum_j U_ij^2 s_j^2 / (s_j^2 + ridge) over the numerical rank."""
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    r = int(np.sum(s > s.max(initial=0.0) * max(A.shape) * np.finfo(float).eps))
    w = s[:r] ** 2 / (s[:r] ** 2 + ridge)
    return (U[:, :r] ** 2) @ w


def _gaussian(rng, n, d):
    return rng.standard_normal((n, d))


def _coherent(rng, n, d, heavy=5, scale=1e4):
    A = rng.standard_normal((n, d))
    rows = rng.choice(n, heavy, replace=False)
    A[rows] *= scale
    return A, rows


def _assert_within_half(est, exact):
    ratio = est / exact
    assert ratio.min() > 0.5 and ratio.max() < 1.5, (ratio.min(), ratio.max())


# --- exact ------------------------------------------------------------------


def test_exact_matches_qr_and_explicit_inverse(rng):
    A = rng.standard_normal((400, 17))
    tau = leverage_scores(A)
    assert tau.shape == (400,) and tau.dtype == np.float64
    Q = np.linalg.qr(A)[0]
    np.testing.assert_allclose(tau, (Q**2).sum(axis=1), rtol=1e-10, atol=1e-14)
    inv = np.linalg.inv(A.T @ A)
    np.testing.assert_allclose(tau, np.einsum("ij,jk,ik->i", A, inv, A), rtol=1e-9)
    assert tau.sum() == pytest.approx(17.0, abs=1e-10)
    assert tau.min() >= 0.0 and tau.max() <= 1.0 + 1e-12


def test_exact_rank_deficient_is_leverage_of_column_space(rng):
    r = 6
    A = rng.standard_normal((300, r)) @ rng.standard_normal((r, 20))
    tau = leverage_scores(A)
    # Definition: the diagonal of the orthogonal projector A A^+.
    P = A @ np.linalg.pinv(A)
    np.testing.assert_allclose(tau, np.diag(P), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(tau, _svd_scores(A), rtol=1e-8, atol=1e-12)
    assert tau.sum() == pytest.approx(r, abs=1e-9)
    assert tau.max() <= 1.0 + 1e-12


def test_exact_rank_deficient_by_duplicate_and_zero_columns(rng):
    B = rng.standard_normal((200, 5))
    A = np.hstack([B, B[:, :2], np.zeros((200, 3))])
    tau = leverage_scores(A)
    np.testing.assert_allclose(tau, leverage_scores(B), rtol=1e-8, atol=1e-12)
    assert tau.sum() == pytest.approx(5.0, abs=1e-9)


def test_exact_is_invariant_to_column_scaling(rng):
    # Leverage depends only on the column space: A D has the scores of A even
    # when D spreads the columns over ten orders of magnitude.
    A = rng.standard_normal((500, 12))
    D = np.logspace(0, -10, 12)
    np.testing.assert_allclose(leverage_scores(A * D), leverage_scores(A), rtol=1e-6)


@pytest.mark.parametrize("ridge", [1e-3, 1.0, 50.0, 1e4])
def test_exact_ridge_matches_explicit_inverse_and_trace(rng, ridge):
    A = rng.standard_normal((300, 15)) * np.linspace(0.1, 3.0, 15)
    tau = leverage_scores(A, ridge=ridge)
    M = A.T @ A + ridge * np.eye(15)
    np.testing.assert_allclose(tau, np.einsum("ij,jk,ik->i", A, np.linalg.inv(M), A), rtol=1e-9)
    s = np.linalg.svd(A, compute_uv=False)
    assert tau.sum() == pytest.approx(np.sum(s**2 / (s**2 + ridge)), rel=1e-10)
    # Same as d - ridge * trace(M^{-1}).
    assert tau.sum() == pytest.approx(15 - ridge * np.trace(np.linalg.inv(M)), rel=1e-8)
    assert np.all(tau < leverage_scores(A) + 1e-12)


def test_exact_ridge_below_rounding_of_gram_stays_accurate(rng):
    # cond(A) = 1e7 and ridge = 1e-15 * ||A||^2: A^T A + ridge I is
    # numerically singular (Cholesky of it is unreliable), the stacked QR is not.
    U = np.linalg.qr(rng.standard_normal((400, 10)))[0]
    V = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    s = np.logspace(0, -7, 10)
    A = (U * s) @ V.T
    ridge = 1e-15
    tau = leverage_scores(A, ridge=ridge)
    ref = (U**2) @ (s**2 / (s**2 + ridge))
    np.testing.assert_allclose(tau, ref, rtol=1e-5, atol=1e-12)
    assert tau.sum() == pytest.approx(np.sum(s**2 / (s**2 + ridge)), rel=1e-6)


def test_exact_ridge_on_rank_deficient(rng):
    A = rng.standard_normal((250, 4)) @ rng.standard_normal((4, 9))
    np.testing.assert_allclose(
        leverage_scores(A, ridge=0.7), _svd_scores(A, 0.7), rtol=1e-8, atol=1e-13
    )


def test_wide_and_degenerate_shapes(rng):
    A = rng.standard_normal((5, 12))  # full row rank: every row is needed
    np.testing.assert_allclose(leverage_scores(A), np.ones(5), atol=1e-12)
    np.testing.assert_allclose(leverage_scores(A, ridge=2.0), _svd_scores(A, 2.0), rtol=1e-10)
    np.testing.assert_allclose(leverage_scores(np.zeros((7, 3))), np.zeros(7))
    np.testing.assert_allclose(leverage_scores(np.zeros((7, 3)), ridge=1.0), np.zeros(7))
    assert leverage_scores(np.zeros((0, 3))).shape == (0,)
    assert leverage_scores(np.zeros((4, 0))).shape == (4,)
    assert leverage_scores(np.zeros((0, 3)), method="sketch", seed=0).shape == (0,)
    one = leverage_scores(np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(one, [1.0])


def test_dtypes_and_input_untouched(rng):
    A = rng.standard_normal((300, 6))
    keep = A.copy()
    ref = leverage_scores(A)
    np.testing.assert_array_equal(A, keep)
    out32 = leverage_scores(A.astype(np.float32))
    assert out32.dtype == np.float64
    np.testing.assert_allclose(out32, ref, rtol=1e-4)
    Ai = rng.integers(-5, 6, size=(300, 6))
    np.testing.assert_allclose(leverage_scores(Ai), leverage_scores(Ai.astype(float)))
    assert leverage_scores(A.tolist()).shape == (300,)
    F = np.asfortranarray(A)
    np.testing.assert_allclose(leverage_scores(F), ref, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    rank=st.integers(0, 12),
    ridge=st.sampled_from([0.0, 1e-6, 0.3, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_matches_svd_definition_property(n, d, rank, ridge, seed):
    rng = np.random.default_rng(seed)
    rank = min(rank, n, d)
    A = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
    tau = leverage_scores(A, ridge=ridge)
    np.testing.assert_allclose(tau, _svd_scores(A, ridge), rtol=1e-7, atol=1e-10)
    if ridge == 0.0:
        assert tau.sum() == pytest.approx(rank, abs=1e-8)


# --- sketched ------------------------------------------------------------------


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(7)
    G = rng.standard_normal((50_000, 64))
    C, heavy = _coherent(rng, 50_000, 64)
    T = rng.standard_t(3, size=(50_000, 64))  # heavy-tailed rows
    return {"gaussian": G, "coherent": C, "t3": T, "heavy": heavy}


@pytest.mark.parametrize("name", ["gaussian", "coherent", "t3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sketch_within_half_of_exact_for_every_row(big, name, seed):
    A = big[name]
    exact = leverage_scores(A)
    est = leverage_scores(A, method="sketch", seed=seed)
    assert est.dtype == np.float64 and est.shape == exact.shape
    _assert_within_half(est, exact)
    # The default sketch is far from the tolerance edge on these matrices.
    assert np.max(np.abs(est / exact - 1.0)) < 0.25
    assert est.max() <= 1.0


def test_sketch_finds_the_heavy_rows(big):
    est = leverage_scores(big["coherent"], method="sketch", seed=3)
    top = np.argsort(est)[-len(big["heavy"]) :]
    assert set(top) == set(big["heavy"])
    assert est[big["heavy"]].min() > 0.99


@pytest.mark.parametrize("ridge", [1.0, 1e3, 1e5])
def test_sketch_ridge_within_half(big, ridge):
    A = big["coherent"]
    exact = leverage_scores(A, ridge=ridge)
    est = leverage_scores(A, ridge=ridge, method="sketch", seed=5)
    _assert_within_half(est, exact)
    s = np.linalg.svd(A, compute_uv=False)
    assert est.sum() == pytest.approx(np.sum(s**2 / (s**2 + ridge)), rel=0.1)


def test_sketch_rank_deficient(rng):
    A = rng.standard_normal((30_000, 7)) @ rng.standard_normal((7, 40))
    exact = leverage_scores(A)
    est = leverage_scores(A, method="sketch", seed=11)
    _assert_within_half(est, exact)
    assert est.sum() == pytest.approx(7.0, rel=0.1)


def test_sketch_float32_input(big):
    A = big["gaussian"]
    exact = leverage_scores(A)
    _assert_within_half(leverage_scores(A.astype(np.float32), method="sketch", seed=0), exact)


def test_sketch_explicit_jl_dim_is_unbiased_chi_square(big):
    # With k < d the JL map multiplies a row's pre-JL estimate by
    # x^T G G^T x / (k |x|^2), distributed as chi^2_k / k over the draw of G.
    # One G is shared by all rows, so pool 20 seeds to see that law.
    A = big["gaussian"][:10_000]
    k = 16
    ratios = []
    for seed in range(20):
        pre = leverage_scores(A, method="sketch", seed=seed)
        est = leverage_scores(A, method="sketch", seed=seed, jl_dim=k)
        ratios.append(est / pre)
    ratio = np.concatenate(ratios)
    assert ratio.mean() == pytest.approx(1.0, abs=0.04)
    assert ratio.std() == pytest.approx(math.sqrt(2.0 / k), rel=0.06)
    # P(chi^2_16 / 16 < 0.5) = 0.0511 and P(> 1.5) = 0.0895.
    assert np.mean(ratio < 0.5) == pytest.approx(0.0511, abs=0.015)
    assert np.mean(ratio > 1.5) == pytest.approx(0.0895, abs=0.015)


def test_sketch_jl_dim_at_least_rank_is_no_projection(big):
    A = big["gaussian"][:20_000]
    a = leverage_scores(A, method="sketch", seed=9)
    b = leverage_scores(A, method="sketch", seed=9, jl_dim=64)
    c = leverage_scores(A, method="sketch", seed=9, jl_dim=10_000)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_default_jl_dim_rule():
    # Smallest k with n (exp(-k r_up) + exp(-k r_low)) <= 0.01, up to the
    # bound's slack: check it against the Chernoff exponents directly.
    r_up = 0.5 * (0.25 - math.log(1.25))
    for n in (1, 1000, 200_000, 10**8):
        k = _default_jl_dim(n)
        assert n * (math.exp(-k * r_up) + math.exp(-k * 2 * r_up)) <= 0.0101
        assert n * math.exp(-(k - 2) * r_up) > 0.005  # not wastefully large
    assert 1250 < _default_jl_dim(200_000) < 1350


def test_sketch_seeds_reproducible(big):
    A = big["coherent"][:20_000]
    a = leverage_scores(A, method="sketch", seed=123)
    b = leverage_scores(A, method="sketch", seed=123)
    np.testing.assert_array_equal(a, b)
    c = leverage_scores(A, method="sketch", seed=124)
    assert not np.array_equal(a, c)
    g1 = leverage_scores(A, method="sketch", seed=np.random.default_rng(5))
    g2 = leverage_scores(A, method="sketch", seed=np.random.default_rng(5))
    np.testing.assert_array_equal(g1, g2)
    j1 = leverage_scores(A, method="sketch", seed=8, jl_dim=20)
    j2 = leverage_scores(A, method="sketch", seed=8, jl_dim=20)
    np.testing.assert_array_equal(j1, j2)


def test_sketch_jl_does_not_depend_on_svd_signs(big, monkeypatch):
    # Singular vectors are defined up to sign, and LAPACK's choice changes
    # with the BLAS thread count; the JL map must act through a
    # sign-invariant matrix so that a seed fixes the scores everywhere.
    A = big["gaussian"][:20_000]
    ref = leverage_scores(A, method="sketch", seed=3, jl_dim=12)
    svd = np.linalg.svd
    flip = np.where(np.arange(64) % 3 == 0, -1.0, 1.0)

    def flipped_svd(M, *args, **kwargs):
        U, s, Vt = svd(M, *args, **kwargs)
        return U * flip[: len(s)], s, Vt * flip[: len(s), None]

    monkeypatch.setattr(np.linalg, "svd", flipped_svd)
    np.testing.assert_allclose(
        leverage_scores(A, method="sketch", seed=3, jl_dim=12), ref, rtol=1e-10
    )


def test_sketch_not_smaller_than_matrix_gives_exact(rng):
    A = rng.standard_normal((1500, 10))  # default sketch_size 2000 >= n
    np.testing.assert_array_equal(leverage_scores(A, method="sketch", seed=0), leverage_scores(A))
    np.testing.assert_array_equal(
        leverage_scores(A, ridge=2.0, method="sketch", sketch_size=1500, seed=0),
        leverage_scores(A, ridge=2.0),
    )


def test_sketch_explicit_sketch_size(rng):
    A = rng.standard_normal((20_000, 8))
    exact = leverage_scores(A)
    _assert_within_half(leverage_scores(A, method="sketch", sketch_size=4000, seed=1), exact)


@pytest.mark.slow
def test_sketch_full_size_gaussian_and_coherent():
    rng = np.random.default_rng(2024)
    for A in (rng.standard_normal((200_000, 128)), _coherent(rng, 200_000, 128)[0]):
        _assert_within_half(leverage_scores(A, method="sketch", seed=0), leverage_scores(A))


# --- validation ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_bad_matrix(rng, method):
    A = rng.standard_normal((3000, 4))
    for bad in (A[0], A[None], "abc", A.astype(bool), A.astype(complex), A.astype(np.float16)):
        with pytest.raises((TypeError, ValueError), match="A"):
            leverage_scores(bad, method=method, seed=0)
    for value in (np.nan, np.inf, -np.inf):
        B = A.copy()
        B[1234, 2] = value
        with pytest.raises(ValueError, match=r"A contains NaN or Inf"):
            leverage_scores(B, method=method, seed=0)
    with pytest.raises(ValueError, match="too large"):
        leverage_scores(np.full((3000, 4), 1e308), method=method, seed=0)


def test_torch_tensor_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy"):
        leverage_scores(torch.ones((5, 2)))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"ridge": -1.0}, ValueError, "ridge"),
        ({"ridge": float("nan")}, ValueError, "ridge"),
        ({"ridge": "1"}, TypeError, "ridge"),
        ({"ridge": True}, TypeError, "ridge"),
        ({"method": "qr"}, ValueError, "method"),
        ({"method": None}, TypeError, "method"),
        ({"sketch_size": 100}, ValueError, "sketch_size"),
        ({"jl_dim": 5}, ValueError, "jl_dim"),
        ({"method": "sketch", "sketch_size": 0}, ValueError, "sketch_size"),
        ({"method": "sketch", "sketch_size": 5}, ValueError, "sketch_size"),
        ({"method": "sketch", "sketch_size": 2.5}, TypeError, "sketch_size"),
        ({"method": "sketch", "sketch_size": True}, TypeError, "sketch_size"),
        ({"method": "sketch", "jl_dim": 0}, ValueError, "jl_dim"),
        ({"method": "sketch", "jl_dim": 3.0}, TypeError, "jl_dim"),
        ({"method": "sketch", "seed": "x"}, TypeError, "seed"),
        ({"method": "sketch", "seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments(rng, kwargs, exc, match):
    A = rng.standard_normal((3000, 8))
    with pytest.raises(exc, match=match):
        leverage_scores(A, **kwargs)


def test_rejected_call_does_not_advance_generator(rng):
    A = rng.standard_normal((3000, 8))
    g = np.random.default_rng(1)
    with pytest.raises(ValueError):
        leverage_scores(A, method="sketch", sketch_size=4, seed=g)
    assert g.integers(0, 2**63) == np.random.default_rng(1).integers(0, 2**63)
