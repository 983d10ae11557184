import itertools

import numpy as np
import pytest
import scipy.linalg
from scipy.optimize import minimize

from streamsketch import _serialization
from streamsketch.rows.universal import UniversalSet

# Keys whose reference weight is within this relative margin of eps are not
# asserted either way: the reference and the sketch round differently there.
MARGIN = 1e-7


def leverage(K, rtol=1e-12):
    """Reference pseudo-inverse leverage of the rows of K (SVD of K itself)."""
    U, s, _ = np.linalg.svd(K, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros(K.shape[0])
    r = int((s > rtol * s[0]).sum())
    return (U[:, :r] ** 2).sum(axis=1)


def pinv_queries(K, js):
    """Worst-case f(x)=x^2 queries q = M^+ k_j (one column per j)."""
    return np.linalg.pinv(K.T @ K, rcond=1e-13, hermitian=True) @ K[js].T


def attention(Q, K, p=2):
    """A_ij = |q_i.k_j|^p / sum_l |q_i.k_l|^p, shape (n_queries, n_keys)."""
    A = np.abs(Q @ K.T) ** p
    tot = A.sum(axis=1, keepdims=True)
    return np.divide(A, tot, out=np.zeros_like(A), where=tot > 0)


def heavy_keys(Q, K, eps, p=2):
    A = attention(Q, K, p)
    return set(np.flatnonzero((A >= eps * (1 + MARGIN)).any(axis=0)).tolist())


def make_keys(kind, n, d, rng):
    if kind == "gaussian":
        return rng.standard_normal((n, d))
    if kind == "planted":
        K = rng.standard_normal((n, d))
        # A few keys in a direction almost nobody else uses, and some large ones.
        K[:, -1] *= 1e-3
        for j in rng.choice(n, 4, replace=False):
            K[j] = 0.0
            K[j, -1] = 3.0
        K[rng.choice(n, 3, replace=False)] *= 40.0
        return K
    if kind == "norms":
        scale = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), n))
        return rng.standard_normal((n, d)) * scale[:, None]
    if kind == "lowrank":
        return rng.standard_normal((n, 3)) @ rng.standard_normal((3, d))
    if kind == "late_direction":
        # Rank-deficient for a long prefix, then a new direction appears.
        K = rng.standard_normal((n, d))
        K[:, d // 2 :] = 0.0
        K[n // 2, d // 2] = 0.01
        return K
    raise ValueError(kind)


def check_set(us, K, eps, rng, n_random=200):
    """The guarantee at the current prefix K, for p = 2, ridge = 0."""
    lev = leverage(K)
    got = set(us.indices.tolist())
    must = set(np.flatnonzero(lev >= eps * (1 + MARGIN)).tolist())
    may = set(np.flatnonzero(lev >= eps * (1 - MARGIN)).tolist())
    assert must <= got, f"missing heavy keys {sorted(must - got)}"
    assert got <= may, f"kept light keys {sorted(got - may)}"
    # The queries themselves, independently of any leverage computation.
    js = np.flatnonzero(lev >= eps / 2)
    Q = rng.standard_normal((n_random, K.shape[1]))
    if js.size:
        Q = np.vstack([Q, pinv_queries(K, js).T])
    assert heavy_keys(Q, K, eps) <= got
    assert len(got) <= K.shape[1] / eps
    assert np.all(np.diff(us.indices) > 0)
    np.testing.assert_allclose(us.scores, lev[us.indices], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "planted", "norms", "lowrank", "late_direction"])
def test_guarantee_after_every_update(kind, rng):
    d, n, eps = 6, 240, 0.15
    K = make_keys(kind, n, d, rng)
    us = UniversalSet(d, eps)
    for t in range(n):
        us.update(K[t])
        check_set(us, K[: t + 1], eps, rng, n_random=50)
    assert us.n_seen == n and us.next_index == n


@pytest.mark.parametrize("kind", ["planted", "norms"])
def test_guarantee_after_every_chunk_long_stream(kind, rng):
    d, n, eps = 16, 30_000, 0.05
    K = make_keys(kind, n, d, rng)
    us = UniversalSet(d, eps)
    sizes = [1, 5, 17, 300, 2000, 4096, 9000]
    pos, i = 0, 0
    while pos < n:
        hi = min(n, pos + sizes[i % len(sizes)])
        us.extend(K[pos:hi])
        pos, i = hi, i + 1
        if i % 3 == 0 or pos == n:
            check_set(us, K[:pos], eps, rng, n_random=500)
    if kind == "planted":
        assert us.n_kept >= 4  # the four keys alone in their direction


def test_extend_equals_update_loop(rng):
    d, eps = 5, 0.1
    K = make_keys("norms", 400, d, rng)
    one = UniversalSet(d, eps)
    for x in K:
        one.update(x)
    for chunk in (7, 400):
        blk = UniversalSet(d, eps)
        for lo in range(0, len(K), chunk):
            blk.extend(K[lo : lo + chunk])
        np.testing.assert_array_equal(blk.indices, one.indices)
        np.testing.assert_allclose(blk.scores, one.scores, rtol=1e-9)
        np.testing.assert_array_equal(blk.rows, one.rows)


@pytest.mark.parametrize("ridge", [0.0, 2.0])
def test_shards_merge_into_single_stream(ridge, rng):
    d, eps, n = 8, 0.05, 6000
    K = make_keys("norms", n, d, rng)
    K[4321] = 0.0
    K[4321, 0] = 1e4  # heavy in the last shard
    whole = UniversalSet(d, eps, ridge=ridge).extend(K)
    bounds = [0, 1, 2500, 2501, n]
    shards = [
        UniversalSet(d, eps, ridge=ridge).extend(K[lo:hi], start_index=lo)
        for lo, hi in itertools.pairwise(bounds)
    ]
    merged = shards[2].copy().merge(shards[0]).merge(shards[3]).merge(shards[1])
    np.testing.assert_array_equal(merged.indices, whole.indices)
    np.testing.assert_allclose(merged.scores, whole.scores, rtol=1e-8)
    np.testing.assert_allclose(merged.gram(), K.T @ K, rtol=1e-10, atol=1e-6 * np.abs(K).max())
    assert merged.n_seen == n and merged.next_index == n
    assert 4321 in merged.indices
    # Tree order does not matter either.
    tree = shards[0].copy().merge(shards[1])
    tree.merge(shards[2].copy().merge(shards[3]))
    np.testing.assert_array_equal(tree.indices, whole.indices)


def test_merge_refuses_overlap_and_mismatch(rng):
    K = rng.standard_normal((50, 4))
    a = UniversalSet(4, 0.2).extend(K)
    b = UniversalSet(4, 0.2).extend(K)
    before = a.to_bytes()
    with pytest.raises(ValueError, match="stream position"):
        a.merge(b)
    with pytest.raises(ValueError, match="eps"):
        a.merge(UniversalSet(4, 0.3))
    with pytest.raises(TypeError):
        a.merge(object())
    assert a.to_bytes() == before


def test_ridge_scores_and_ridge_attention_guarantee(rng):
    d, eps, lam = 6, 0.1, 5.0
    K = make_keys("planted", 2000, d, rng)
    us = UniversalSet(d, eps, ridge=lam)
    for lo in range(0, len(K), 333):
        us.extend(K[lo : lo + 333])
        Kp = K[: lo + 333]
        M = Kp.T @ Kp + lam * np.eye(d)
        tau = np.einsum("ij,ji->i", Kp, np.linalg.solve(M, Kp.T))
        want = np.flatnonzero(tau >= eps)
        np.testing.assert_array_equal(us.indices, want)
        # Ridge attention: (q.k_j)^2 / (sum_l (q.k_l)^2 + lam |q|^2) <= tau_j.
        Q = np.vstack([rng.standard_normal((100, d)), np.linalg.solve(M, Kp[want].T).T])
        num = (Q @ Kp.T) ** 2
        A = num / (num.sum(axis=1, keepdims=True) + lam * (Q**2).sum(axis=1, keepdims=True))
        assert set(np.flatnonzero((A >= eps * (1 + MARGIN)).any(axis=0))) <= set(us.indices)


def reference_capacity(K, eps, C, p=2.0, decimals=None):
    kept = []
    for t in range(len(K)):
        kept.append(t)
        sc = leverage(K[: t + 1]) ** (p / 2)
        if decimals is not None:  # make exact ties exact in the reference too
            sc = np.round(sc, decimals)
        kept = [j for j in kept if sc[j] >= eps]
        if len(kept) > C:
            kept = sorted(sorted(kept, key=lambda j: (-sc[j], j))[:C])
    return kept


@pytest.mark.parametrize("kind", ["gaussian", "norms", "lowrank", "late_direction"])
@pytest.mark.parametrize(("C", "eps", "p"), [(5, 0.0, 2.0), (12, 0.01, 2.0), (20, 0.001, 1.0)])
def test_capacity_keeps_top_c_after_every_row(kind, C, eps, p, rng):
    d, n = 6, 500
    K = make_keys(kind, n, d, rng)
    want = reference_capacity(K, eps, C, p)
    for chunk in (1, 13, 500):
        us = UniversalSet(d, eps, p=p, capacity=C)
        for lo in range(0, n, chunk):
            us.extend(K[lo : lo + chunk])
        assert us.indices.tolist() == want, chunk
        assert us.n_kept <= C and us.max_kept == C
        sc = leverage(K) ** (p / 2)
        np.testing.assert_allclose(us.scores, sc[us.indices], rtol=1e-6, atol=1e-12)


def test_capacity_ties_broken_by_index():
    # Identical keys have identical scores: the earliest ones are kept.
    K = np.tile(np.eye(3), (4, 1))  # 12 keys, each direction 4 times
    us = UniversalSet(3, 0.0, capacity=5).extend(K)
    ref = reference_capacity(K, 0.0, 5, decimals=12)
    assert ref == [0, 1, 2, 3, 4]
    assert us.indices.tolist() == ref
    one = UniversalSet(3, 0.0, capacity=5)
    for x in K:
        one.update(x)
    assert one.indices.tolist() == ref


def test_large_capacity_is_the_threshold_set(rng):
    d, eps = 6, 0.1
    K = make_keys("norms", 3000, d, rng)
    a = UniversalSet(d, eps).extend(K)
    b = UniversalSet(d, eps, capacity=int(d / eps)).extend(K)
    np.testing.assert_array_equal(a.indices, b.indices)


def optimized_weight(K, j, p, rng, starts=4):
    """Local maxima of |q.k_j|^p / sum_l |q.k_l|^p over q (adversarial queries)."""
    best, best_q = 0.0, None

    def f(q):
        num = p * np.log(abs(q @ K[j]) + 1e-300)
        return -(num - np.log((np.abs(K @ q) ** p).sum() + 1e-300))

    for x0 in [np.linalg.pinv(K.T @ K) @ K[j], *rng.standard_normal((starts, K.shape[1]))]:
        res = minimize(f, x0, method="BFGS")
        val = float(np.exp(-res.fun))
        if val > best:
            best, best_q = val, res.x
    return best, best_q


@pytest.mark.parametrize("p", [1.0, 3.0, 4.0])
def test_lp_sensitivity_guarantee(p, rng):
    d, eps, n = 5, 0.1, 3000
    K = make_keys("norms", n, d, rng)
    K[1000] = 0.0
    K[1000, 2] = 1e5  # heavy in the stream
    us = UniversalSet(d, eps, p=p)
    bound = d / eps if p <= 2 else d ** (p / 2) / eps
    assert us.max_kept == int(np.floor(bound * (1 + 1e-12)))
    for lo in range(0, n, 600):
        us.extend(K[lo : lo + 600])
        Kp = K[: lo + 600]
        got = set(us.indices.tolist())
        assert len(got) <= bound
        Q = rng.standard_normal((2000, d))
        # l2-worst queries of the top keys, and local optimisation on a few.
        lev = leverage(Kp)
        top = np.argsort(-lev)[:20]
        Q = np.vstack([Q, pinv_queries(Kp, top).T])
        assert heavy_keys(Q, Kp, eps, p) <= got
        for j in top[:4]:
            w, _ = optimized_weight(Kp, j, p, rng)
            if w >= eps * (1 + 1e-4):
                assert j in got
        # Scores are upper bounds of every weight we can find.
        A = attention(Q, Kp, p)
        assert np.all(A[:, us.indices].max(axis=0) <= us.scores * (1 + 1e-9) + 1e-12)
    assert 1000 in got


def test_p_below_two_scores_bounded_by_leverage_power(rng):
    # p < 2: scores are min(tau^(p/2), Lewis certificate), so never above
    # tau^(p/2), every key with tau^(p/2) below eps is gone, and the set obeys
    # the Lewis size bound d / eps rather than d / eps^(2/p).
    d, eps, p = 4, 0.2, 1.0
    K = make_keys("norms", 800, d, rng)
    one = UniversalSet(d, eps, p=p)
    for x in K:
        one.update(x)
    blk = UniversalSet(d, eps, p=p).extend(K)
    lev = leverage(K)
    for us in (one, blk):
        assert set(us.indices) <= set(np.flatnonzero(lev ** (p / 2) >= eps))
        assert np.all(us.scores <= lev[us.indices] ** (p / 2) * (1 + 1e-9))
        assert us.n_kept <= d / eps
    Q = np.vstack([rng.standard_normal((5000, d)), pinv_queries(K, np.arange(800)).T])
    heavy = heavy_keys(Q, K, eps, p)
    assert heavy <= set(one.indices) and heavy <= set(blk.indices)


def test_capacity_p_below_two_uses_leverage_power(rng):
    d, eps, p = 4, 0.2, 1.0
    K = make_keys("norms", 600, d, rng)
    us = UniversalSet(d, eps, p=p, capacity=1000).extend(K)
    assert us.max_kept == int(np.floor(d / eps**2 * (1 + 1e-12)))
    np.testing.assert_array_equal(us.indices, np.flatnonzero(leverage(K) ** 0.5 >= eps))


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_lp_merge_never_misses_heavy_keys(p, rng):
    d, eps, n = 4, 0.1, 2000
    K = make_keys("norms", n, d, rng)
    shards = [
        UniversalSet(d, eps, p=p).extend(K[lo : lo + 500], start_index=lo)
        for lo in range(0, n, 500)
    ]
    merged = shards[0].copy()
    for s in shards[1:]:
        merged.merge(s)
    Q = np.vstack([rng.standard_normal((3000, d)), pinv_queries(K, np.arange(0, n, 7)).T])
    assert heavy_keys(Q, K, eps, p) <= set(merged.indices.tolist())
    assert merged.n_kept <= max(d, d ** (p / 2)) / eps and merged.n_seen == n


@pytest.mark.slow
def test_nbytes_constant_in_stream_length(rng):
    d, eps = 32, 0.05
    us = UniversalSet(d, eps)
    assert us.max_kept == 640
    K = rng.standard_normal((1_010_000, d))
    K[rng.choice(len(K), 20, replace=False)] *= 300.0
    us.extend(K[:10_000])
    small = us.nbytes
    for lo in range(10_000, len(K), 100_000):
        us.extend(K[lo : lo + 100_000])
    assert us.n_seen == 1_010_000
    assert abs(us.nbytes - small) <= 0.1 * small
    assert us.nbytes == 640 * (32 * 8 + 16) + 32 * 32 * 8
    L = np.linalg.cholesky(K.T @ K)
    lev = (scipy.linalg.solve_triangular(L, K.T, lower=True) ** 2).sum(axis=0)
    assert set(np.flatnonzero(lev >= eps * (1 + MARGIN))) <= set(us.indices)
    assert set(us.indices) <= set(np.flatnonzero(lev >= eps * (1 - MARGIN)))
    assert us.n_kept >= 15


def test_float32_keys(rng):
    d, eps = 8, 0.05
    K = make_keys("planted", 5000, d, rng).astype(np.float32)
    us = UniversalSet(d, eps, dtype=np.float32).extend(K)
    assert us.rows.dtype == np.float32 and us.scores.dtype == np.float64
    check_set(us, K.astype(np.float64), eps, rng)
    # float64 input is rounded to float32 keys first.
    us2 = UniversalSet(d, eps, dtype=np.float32).extend(K.astype(np.float64))
    assert us2.to_bytes() == us.to_bytes()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"p": 3.0}, {"p": 1.5}, {"capacity": 7}, {"ridge": 0.5, "dtype": np.float32}],
)
def test_bytes_round_trip_and_continue(kwargs, rng):
    d = 5
    K = make_keys("norms", 1500, d, rng)
    us = UniversalSet(d, 0.1, **kwargs).extend(K[:1000])
    blob = us.to_bytes()
    back = UniversalSet.from_bytes(blob)
    assert back.to_bytes() == blob
    assert back.nbytes == us.nbytes
    np.testing.assert_array_equal(back.indices, us.indices)
    us.extend(K[1000:])
    back.extend(K[1000:])
    assert back.to_bytes() == us.to_bytes()


def _forge(us, **changes):
    fields = {"layout_version": us._layout_version}
    for k, v in us._params().items():
        fields["param." + k] = v
    for k, v in us._state_scalars().items():
        fields["scalar." + k] = v
    for k, v in us._state_arrays().items():
        fields["array." + k] = v.copy()
    for k, fn in changes.items():
        fields[k] = fn(fields[k])
    return _serialization.dumps("UniversalSet", fields)


def _swap_first_two(a):
    a[[0, 1]] = a[[1, 0]]
    return a


def _poke(i, value):
    def f(a):
        a.reshape(-1)[i] = value
        return a

    return f


@pytest.mark.parametrize(
    "change",
    [
        {"scalar.n_kept": lambda v: v + 1},
        {"scalar.n_kept": lambda v: 10**6},
        {"array.indices": _swap_first_two},
        {"array.scores": lambda a: a * 0.5},
        {"array.rows": lambda a: a * 3.0},
        {"array.R": lambda a: a.T.copy()},
        {"array.R": _poke(-1, 1e30)},
        {"array.scores": _poke(-1, 0.5)},
        {"array.rows": lambda a: a[:-1]},
        {"param.eps": lambda v: 0.0},
        {"param.p": lambda v: -1.0},
    ],
)
def test_corrupt_blobs_refused(change, rng):
    us = UniversalSet(4, 0.2).extend(make_keys("norms", 300, 4, rng))
    assert 2 <= us.n_kept < us.max_kept
    with pytest.raises(ValueError):
        UniversalSet.from_bytes(_forge(us, **change))


def test_validation_leaves_state_unchanged(rng):
    X = rng.standard_normal((100, 4))
    X[10] *= 100.0
    us = UniversalSet(4, 0.2).extend(X)
    assert us.n_kept >= 1
    before = us.to_bytes()
    bad = [
        (rng.standard_normal((3, 5)), {}, ValueError),
        (rng.standard_normal(12), {}, ValueError),
        (np.array([[1.0, np.nan, 0, 0]]), {}, ValueError),
        (np.array([[np.inf, 0, 0, 0]]), {}, ValueError),
        (np.ones((2, 4), dtype=bool), {}, TypeError),
        ("abc", {}, TypeError),
        (rng.standard_normal((3, 4)), {"start_index": -1}, ValueError),
        (rng.standard_normal((3, 4)), {"start_index": 1.5}, TypeError),
        (rng.standard_normal((3, 4)), {"start_index": 2**62}, ValueError),
        (rng.standard_normal((3, 4)), {"start_index": int(us.indices[0])}, ValueError),
        (np.full((3, 4), 1.5e308), {}, ValueError),
    ]
    for X, kw, err in bad:
        with pytest.raises(err):
            us.extend(X, **kw)
        assert us.to_bytes() == before
    with pytest.raises(ValueError):
        us.update(np.ones(3))
    assert us.to_bytes() == before
    for kwargs, err in [
        ({"eps": 0.0}, ValueError),
        ({"eps": 1.5}, ValueError),
        ({"eps": 0.1, "p": 0.0}, ValueError),
        ({"eps": 0.1, "p": 3.0, "ridge": 1.0}, ValueError),
        ({"eps": 0.1, "ridge": -1.0}, ValueError),
        ({"eps": 0.1, "capacity": 0}, ValueError),
        ({"eps": 0.1, "capacity": 2.0}, TypeError),
        ({"eps": 1e-9}, ValueError),
        ({"eps": 0.1, "dtype": np.int32}, TypeError),
    ]:
        with pytest.raises(err):
            UniversalSet(4, **kwargs)


def test_huge_and_tiny_keys_are_scored():
    # The Gram matrix of these keys overflows / underflows float64; its
    # square-root factor does not, so the scores stay exact.
    for scale in (1e200, 1e-200):
        K = np.eye(4) * scale
        K = np.vstack([K, K[:2]])
        us = UniversalSet(4, 0.6).extend(K)
        assert us.indices.tolist() == [2, 3]
        np.testing.assert_allclose(us.scores, [1.0, 1.0], rtol=1e-12)


def test_empty_and_zero_keys():
    us = UniversalSet(3, 0.5)
    us.extend(np.zeros((0, 3)))
    assert us.n_seen == 0 and us.n_kept == 0
    us.extend(np.zeros((5, 3)))
    assert us.n_kept == 0 and us.next_index == 5
    us.update(np.array([0.0, 2.0, 0.0]))
    assert us.indices.tolist() == [5] and us.scores.tolist() == [1.0]


def test_same_stream_bit_identical(rng):
    K = make_keys("norms", 3000, 6, rng)
    a = UniversalSet(6, 0.05).extend(K).to_bytes()
    b = UniversalSet(6, 0.05).extend(K).to_bytes()
    assert a == b


@pytest.mark.parametrize("p", [0.05, 0.5, 1.0, 3.0])
def test_graded_keys_small_p_are_certified_not_crashing(p):
    """Row norms over e^-10..e^10: the Lewis certificate works in logs and stays an upper bound."""
    rng = np.random.default_rng(0)
    B = rng.standard_normal((2000, 5)) * np.exp(rng.uniform(-10, 10, 2000))[:, None]
    us = UniversalSet(5, 0.5, p=p).extend(B)
    big = np.argsort(-np.linalg.norm(B, axis=1))[:50]
    Q = np.vstack([rng.standard_normal((5000, 5)), (np.linalg.pinv(B.T @ B) @ B[big].T).T])
    assert heavy_keys(Q, B, 0.5, p) <= set(us.indices.tolist())


@pytest.mark.parametrize("kwargs", [dict(p=1e-3, capacity=10), dict(p=1000.0), dict(p=0.0)])
def test_extreme_parameters_give_value_errors_or_work(kwargs):
    try:
        us = UniversalSet(4, 0.5, **kwargs)
    except ValueError:
        return
    assert us.max_kept <= 10
