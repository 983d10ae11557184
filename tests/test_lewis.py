import warnings

import numpy as np
import pytest
import scipy.optimize

from streamsketch.rows.lewis import lewis_weights, lp_sensitivity_bound


def lewis_residual(A, w, p, ridge=0.0):
    """max_i |log w_i - (p/2) log(a_i^T (A^T W^{1-2/p} A + ridge I)^+ a_i)|, computed from A."""
    live = w > 0
    A = A[live]
    wl = w[live]
    M = A.T @ (A * (wl ** (1.0 - 2.0 / p))[:, None]) + ridge * np.eye(A.shape[1])
    Minv = np.linalg.pinv(M, rcond=1e-12, hermitian=True)
    tau = np.einsum("ij,jk,ik->i", A, Minv, A)
    return float(np.max(np.abs(np.log(wl) - 0.5 * p * np.log(tau))))


def leverage(A):
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    r = int(np.sum(s > s[0] * max(A.shape) * np.finfo(float).eps))
    return np.sum(U[:, :r] ** 2, axis=1)


@pytest.fixture
def A(rng):
    # Rows of very different norms so the weights differ from uniform and from
    # one another across p.
    X = rng.standard_normal((300, 6))
    return X * np.exp(rng.standard_normal((300, 1)))


@pytest.fixture
def heavy(rng):
    return rng.standard_cauchy((400, 5))


# ---------------------------------------------------------------- definition


def test_p2_is_exactly_the_leverage_scores(A, heavy):
    for X in (A, heavy):
        np.testing.assert_allclose(lewis_weights(X, 2.0), leverage(X), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(
            lewis_weights(X, 2, method="fixed_point"), leverage(X), rtol=1e-12, atol=1e-15
        )


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 3.0, 4.0, 6.0])
def test_fixed_point_equation_holds_to_tol(A, heavy, p):
    for X in (A, heavy):
        for tol in (1e-6, 1e-10):
            w = lewis_weights(X, p, tol=tol)
            assert w.dtype == np.float64 and w.shape == (X.shape[0],)
            assert lewis_residual(X, w, p) <= tol + 1e-11
            assert np.all(w > 0) and np.all(w <= 1 + 1e-12)
            assert w.sum() == pytest.approx(X.shape[1], rel=10 * tol)


@pytest.mark.parametrize("p", [2.2, 2.5, 3.0, 3.5])
def test_fixed_point_and_newton_agree(heavy, p):
    a = lewis_weights(heavy, p, method="fixed_point", tol=1e-11)
    b = lewis_weights(heavy, p, method="newton", tol=1e-11)
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_large_p_and_small_p(heavy):
    for p in (0.2, 10.0, 20.0):
        w = lewis_weights(heavy, p)
        assert lewis_residual(heavy, w, p) <= 1e-8 + 1e-11
        assert w.sum() == pytest.approx(5.0, rel=1e-7)


def test_weights_differ_from_leverage_and_move_monotonically_with_p(heavy):
    # Sanity that p matters: the largest weight relative to the leverage
    # score of the same row grows with p (l_p for larger p favours outliers).
    lev = leverage(heavy)
    top = np.argmax(lev)
    ws = [lewis_weights(heavy, p)[top] for p in (1.0, 2.0, 4.0)]
    assert ws[0] < ws[1] < ws[2]
    assert np.max(np.abs(lewis_weights(heavy, 1.0) - lev)) > 1e-2


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("p", [1.0, 3.0, 6.0])
def test_scale_invariance(A, p):
    w = lewis_weights(A, p)
    for c in (2.0**-600, 2.0**500):  # powers of two: exact
        np.testing.assert_array_equal(lewis_weights(c * A, p), w)
    for c in (1e-150, 3.7, 1e150):
        np.testing.assert_allclose(lewis_weights(c * A, p), w, rtol=1e-9)


@pytest.mark.parametrize("p", [1.0, 3.0, 6.0])
def test_invariant_under_right_multiplication(A, rng, p):
    # w depends on A only through its column space.
    G = rng.standard_normal((6, 6))
    np.testing.assert_allclose(lewis_weights(A @ G, p), lewis_weights(A, p), rtol=1e-8)


@pytest.mark.parametrize("p", [0.5, 1.5, 4.0])
def test_permutation_equivariance(A, rng, p):
    perm = rng.permutation(A.shape[0])
    w = lewis_weights(A, p, tol=1e-11)
    np.testing.assert_allclose(lewis_weights(A[perm], p, tol=1e-11), w[perm], rtol=1e-9)


def test_deterministic(heavy):
    assert np.array_equal(lewis_weights(heavy, 3.0), lewis_weights(heavy, 3.0))


# ---------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("p", [0.5, 1.0, 3.0, 6.0])
def test_rank_deficient_sums_to_rank(rng, p):
    B = rng.standard_normal((200, 3)) * np.exp(rng.standard_normal((200, 1)))
    C = rng.standard_normal((3, 7))
    X = B @ C  # rank 3 in 7 columns
    X = np.hstack([X, X[:, :2]])  # duplicated columns
    w = lewis_weights(X, p)
    assert w.sum() == pytest.approx(3.0, rel=1e-7)
    # Same column space as B: the same weights.
    np.testing.assert_allclose(w, lewis_weights(B, p), rtol=1e-7)
    assert lewis_residual(X, w, p) <= 1e-7


@pytest.mark.parametrize("p", [0.5, 1.0, 3.0, 6.0])
def test_zero_rows_get_zero_weight(A, p):
    X = A.copy()
    X[[0, 17, 299]] = 0.0
    w = lewis_weights(X, p)
    assert np.all(w[[0, 17, 299]] == 0.0)
    keep = np.setdiff1d(np.arange(300), [0, 17, 299])
    np.testing.assert_allclose(w[keep], lewis_weights(X[keep], p), rtol=1e-9)
    assert w.sum() == pytest.approx(6.0, rel=1e-7)


@pytest.mark.parametrize("p", [1.0, 3.0, 6.0])
def test_tiny_row_next_to_normal_rows(A, rng, p):
    # A row with weight ~1e-120 does not move M, so its weight is
    # (a^T M_B^{-1} a)^{p/2} with M_B the Lewis matrix of the other rows.
    c = rng.standard_normal(6)
    scale = 10.0 ** (-120 / p)
    wB = lewis_weights(A, p, tol=1e-11)
    w = lewis_weights(np.vstack([A, scale * c]), p, tol=1e-11)
    np.testing.assert_allclose(w[:-1], wB, rtol=1e-9)
    M = A.T @ (A * (wB ** (1 - 2 / p))[:, None])
    expect = np.exp(0.5 * p * (np.log(c @ np.linalg.solve(M, c)) + 2 * np.log(scale)))
    assert w[-1] > 0
    assert w[-1] == pytest.approx(expect, rel=1e-8)


@pytest.mark.parametrize("p", [1.0, 3.0, 6.0])
def test_huge_row_takes_its_direction(A, rng, p):
    # A row 1e10 times larger gets weight 1 (to O(1e-20)); the others are the
    # weights of the rows projected off its direction. (The dynamic range is
    # limited by the numerical-rank rule: see the Notes of lewis_weights.)
    c = rng.standard_normal(6)
    c /= np.linalg.norm(c)
    w = lewis_weights(np.vstack([A, 1e10 * c]), p, tol=1e-11)
    assert w[-1] == pytest.approx(1.0, abs=1e-9)
    P = np.eye(6) - np.outer(c, c)
    np.testing.assert_allclose(w[:-1], lewis_weights(A @ P, p, tol=1e-11), rtol=1e-8)


def test_rows_spanning_400_orders_of_magnitude(rng):
    X = rng.standard_normal((100, 4)) * (10.0 ** rng.uniform(-200, 200, size=(100, 1)))
    for p in (1.0, 4.0):
        w = lewis_weights(X, p)
        assert np.all(np.isfinite(w)) and np.all(w >= 0) and np.all(w <= 1 + 1e-12)
        assert w.sum() == pytest.approx(4.0, rel=1e-7)


def test_empty_and_all_zero():
    assert lewis_weights(np.zeros((0, 3)), 1.0).shape == (0,)
    np.testing.assert_array_equal(lewis_weights(np.zeros((5, 3)), 3.0), np.zeros(5))
    np.testing.assert_array_equal(lewis_weights(np.zeros((4, 0)), 1.0), np.zeros(4))


def test_single_row_and_fewer_rows_than_columns(rng):
    np.testing.assert_allclose(lewis_weights(np.array([[3.0, -1.0]]), 1.0), [1.0])
    X = rng.standard_normal((3, 8))  # rank 3: every row is needed
    np.testing.assert_allclose(lewis_weights(X, 6.0), np.ones(3), rtol=1e-9)


def test_dtypes(A):
    w64 = lewis_weights(A.astype(np.float32).astype(np.float64), 1.5)
    w32 = lewis_weights(A.astype(np.float32), 1.5)
    assert w32.dtype == np.float64
    np.testing.assert_array_equal(w32, w64)
    Xi = np.arange(12).reshape(6, 2) ** 2
    np.testing.assert_allclose(lewis_weights(Xi, 2.0), leverage(Xi.astype(float)), rtol=1e-12)


# ---------------------------------------------------------------- ridge


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 6.0])
def test_ridge_fixed_point_equation(A, p):
    for ridge in (1e-3, 1.0, 1e3):
        w = lewis_weights(A, p, ridge=ridge)
        assert lewis_residual(A, w, p, ridge=ridge) <= 1e-8 + 1e-11
        assert w.sum() < 6.0


def test_ridge_limits_and_methods_agree(A):
    np.testing.assert_allclose(lewis_weights(A, 1.0, ridge=1e-14), lewis_weights(A, 1.0), rtol=1e-6)
    # Huge ridge: M ~ ridge I, w_i ~ (||a_i||^2 / ridge)^{p/2}.
    big = 1e12
    expect = (np.sum(A**2, axis=1) / big) ** 1.5
    np.testing.assert_allclose(lewis_weights(A, 3.0, ridge=big), expect, rtol=1e-6)
    a = lewis_weights(A, 3.0, ridge=0.5, method="fixed_point", tol=1e-11)
    b = lewis_weights(A, 3.0, ridge=0.5, method="newton", tol=1e-11)
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_ridge_on_tiny_matrix_stays_finite(A):
    w = lewis_weights(1e-200 * A, 1.0, ridge=1.0)
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and w.max() < 1e-150


# ---------------------------------------------------------------- sensitivity bound


def _sensitivity_search(X, i, p, rng, w):
    """Crude maximisation of |a_i.x|^p / ||X x||_p^p: sampling plus Nelder–Mead."""
    d = X.shape[1]
    M = X.T @ (X * (w ** (1 - 2 / p))[:, None])

    def ratio(x):
        y = X @ x
        den = np.sum(np.abs(y) ** p)
        return np.abs(y[i]) ** p / den if den > 0 else 0.0

    starts = [np.linalg.solve(M, X[i]), np.linalg.lstsq(X, np.eye(X.shape[0])[i], rcond=None)[0]]
    cand = rng.standard_normal((3000, d))
    Y = cand @ X.T
    r = np.abs(Y[:, i]) ** p / np.sum(np.abs(Y) ** p, axis=1)
    starts += list(cand[np.argsort(r)[-2:]])
    best = max(ratio(x) for x in starts)
    for x0 in starts:
        res = scipy.optimize.minimize(
            lambda x: -ratio(x),
            x0,
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 3000},
        )
        best = max(best, -res.fun)
    return best


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_sensitivity_bound_holds_against_adversarial_directions(rng, p):
    n, d = 30, 3
    gauss = rng.standard_normal((n, d))
    outliers = rng.standard_normal((n, d))
    outliers[:3] *= 30.0  # a few dominant rows: sensitivities near 1
    for X in (gauss, outliers, rng.standard_cauchy((n, d))):
        w = lewis_weights(X, p, tol=1e-12)
        bound = lp_sensitivity_bound(w, p, d)
        rows = np.unique(np.r_[np.argsort(bound)[-4:], rng.choice(n, 3, replace=False)])
        for i in rows:
            s = _sensitivity_search(X, i, p, rng, w)
            assert s <= bound[i] * (1 + 1e-7), (p, i, s, bound[i])
            if p == 2.0:  # the bound is attained: the search is strong enough
                assert s == pytest.approx(bound[i], rel=1e-6)
        # Non-vacuous: totals are the classical d (p <= 2) and d^{p/2} (p >= 2).
        assert bound.sum() <= d ** max(1.0, p / 2) * (1 + 1e-9)


def test_sensitivity_bound_formula():
    w = np.array([0.0, 0.1, 0.5, 1.0])
    np.testing.assert_array_equal(lp_sensitivity_bound(w, 1.0, 4), w)
    np.testing.assert_array_equal(lp_sensitivity_bound(w, 2.0, 4), w)
    np.testing.assert_allclose(lp_sensitivity_bound(w, 4.0, 4), np.minimum(1.0, 4 * w))
    np.testing.assert_allclose(lp_sensitivity_bound(w, 3.0, 9), np.minimum(1.0, 3 * w))
    # It is at most the looser w^{p/2} for p < 2.
    assert np.all(lp_sensitivity_bound(w, 1.0, 4) <= w**0.5)
    assert lp_sensitivity_bound([], 3.0, 2).shape == (0,)


@pytest.mark.parametrize(
    "args, exc",
    [
        (([-0.1, 0.5], 1.0, 2), ValueError),
        (([np.nan], 1.0, 2), ValueError),
        (([[0.5]], 1.0, 2), ValueError),
        (([0.5], 0.0, 2), ValueError),
        (([0.5], np.inf, 2), ValueError),
        (([0.5], 1.0, 0), ValueError),
        (([0.5], 1.0, 2.5), TypeError),
        ((["a"], 1.0, 2), TypeError),
    ],
)
def test_sensitivity_bound_bad_input(args, exc):
    with pytest.raises(exc):
        lp_sensitivity_bound(*args)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "A, p, kw, exc, match",
    [
        (np.ones(3), 1.0, {}, ValueError, "A"),
        (np.ones((2, 2, 2)), 1.0, {}, ValueError, "A"),
        (np.array([[1.0, np.nan]]), 1.0, {}, ValueError, "A"),
        (np.array([[1.0, np.inf]]), 1.0, {}, ValueError, "A"),
        (np.array([[True, False]]), 1.0, {}, TypeError, "A"),
        (np.array([["a", "b"]]), 1.0, {}, TypeError, "A"),
        ("abc", 1.0, {}, TypeError, "A"),
        (np.eye(2), 0.0, {}, ValueError, "p"),
        (np.eye(2), -1.0, {}, ValueError, "p"),
        (np.eye(2), np.nan, {}, ValueError, "p"),
        (np.eye(2), np.inf, {}, ValueError, "p"),
        (np.eye(2), "2", {}, TypeError, "p"),
        (np.eye(2), True, {}, TypeError, "p"),
        (np.eye(2), 1.0, {"ridge": -1.0}, ValueError, "ridge"),
        (np.eye(2), 1.0, {"ridge": np.nan}, ValueError, "ridge"),
        (np.eye(2), 1.0, {"tol": 0.0}, ValueError, "tol"),
        (np.eye(2), 1.0, {"max_iter": 0}, ValueError, "max_iter"),
        (np.eye(2), 1.0, {"max_iter": 2.0}, TypeError, "max_iter"),
        (np.eye(2), 1.0, {"method": "lbfgs"}, ValueError, "method"),
        (np.eye(2), 4.0, {"method": "fixed_point"}, ValueError, "p < 4"),
        (np.eye(2), 2.0, {"method": "newton"}, ValueError, "p > 2"),
    ],
)
def test_bad_input(A, p, kw, exc, match):
    with pytest.raises(exc, match=match):
        lewis_weights(A, p, **kw)


def test_input_not_modified(A):
    before = A.copy()
    lewis_weights(A, 3.0, ridge=0.1)
    np.testing.assert_array_equal(A, before)


def test_non_convergence_warns(heavy):
    with pytest.warns(RuntimeWarning, match="fixed-point"):
        lewis_weights(heavy, 0.5, tol=1e-12, max_iter=3)
    with pytest.warns(RuntimeWarning, match="Newton"):
        lewis_weights(heavy, 8.0, tol=1e-12, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lewis_weights(heavy, 0.5)
        lewis_weights(heavy, 8.0)
