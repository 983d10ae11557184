import numpy as np
import pytest

from streamsketch import _serialization
from streamsketch.rows.online import OnlineRidgeLeverage


def exact_online(X, ridge):
    """tau_t = x_t^T (sum_{s<=t} x_s x_s^T + ridge I)^{-1} x_t, one solve per row."""
    d = X.shape[1]
    M = ridge * np.eye(d)
    out = np.empty(len(X))
    for t, x in enumerate(X.astype(np.float64)):
        M += np.outer(x, x)
        out[t] = x @ np.linalg.solve(M, x)
    return out


def exact_scores(gram, Q):
    Q = Q.astype(np.float64)
    return np.einsum("ij,ji->i", Q, np.linalg.solve(gram, Q.T))


def test_online_scores_match_definition(rng):
    X = rng.standard_normal((300, 6)) * np.exp(rng.uniform(-2, 2, 300))[:, None]
    ol = OnlineRidgeLeverage(6, ridge=0.1)
    got = ol.extend(X)
    np.testing.assert_allclose(got, exact_online(X, 0.1), rtol=1e-10)
    assert got.shape == (300,) and got.dtype == np.float64
    assert np.all((got >= 0) & (got < 1))
    np.testing.assert_allclose(ol.gram, X.T @ X + 0.1 * np.eye(6), rtol=1e-12)
    np.testing.assert_allclose(ol.inverse @ ol.gram, np.eye(6), atol=1e-10)
    # A row repeated right after itself: u/(1+u) with the smaller u.
    x = X[0]
    u = x @ np.linalg.solve(ol.gram, x)
    assert ol.update(x) == pytest.approx(u / (1 + u), rel=1e-10)


def test_first_row_and_tiny_scores(rng):
    ol = OnlineRidgeLeverage(3, ridge=0.5)
    x = np.array([1.0, 2.0, 2.0])
    assert ol.update(x) == pytest.approx(9 / (9 + 0.5), rel=1e-12)
    # Many copies: scores ~ 1/t keep full relative accuracy (no 1 - 1/C^2 rounding).
    taus = ol.extend(np.tile(x, (100_000, 1)))
    t = np.arange(2, 100_002)
    np.testing.assert_allclose(taus, 9 / (9 * t + 0.5), rtol=1e-9)


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_extend_equals_update_loop_and_chunking(dtype, rtol, rng):
    X = rng.standard_normal((2500, 7)).astype(dtype)
    whole = OnlineRidgeLeverage(7, 1e-2, dtype=dtype, refactor_every=700)
    a = whole.extend(X)
    loop = OnlineRidgeLeverage(7, 1e-2, dtype=dtype, refactor_every=700)
    b = np.array([loop.update(x) for x in X])
    np.testing.assert_allclose(a, b, rtol=rtol)
    chunked = OnlineRidgeLeverage(7, 1e-2, dtype=dtype, refactor_every=700)
    c = np.concatenate([chunked.extend(X[lo : lo + 333]) for lo in range(0, len(X), 333)])
    np.testing.assert_allclose(a, c, rtol=rtol)
    # Refactorisations happen at the same rows whatever the chunking.
    assert whole._since_refactor == loop._since_refactor == chunked._since_refactor == 2500 % 700
    np.testing.assert_allclose(whole.gram, loop.gram, rtol=1e-12)
    assert whole.n_seen == loop.n_seen == chunked.n_seen == 2500


def _drift(dtype, refactor_every, n, d, rng, checkpoints=5):
    """Max relative error of online and current scores against float64 exact ones."""
    ol = OnlineRidgeLeverage(d, 1e-3, dtype=dtype, refactor_every=refactor_every)
    Q = rng.standard_normal((64, d)).astype(dtype)
    worst_online = worst_current = 0.0
    step = n // checkpoints
    for _ in range(checkpoints):
        X = rng.standard_normal((step, d)).astype(dtype)
        X[::997] *= 30.0  # occasional large rows
        # The last rows of each chunk are scored exactly, after the chunk.
        tau = ol.extend(X)
        gram_before_tail = ol.gram - X[-8:].astype(np.float64).T @ X[-8:].astype(np.float64)
        M = gram_before_tail.copy()
        for i, x in enumerate(X[-8:].astype(np.float64)):
            M += np.outer(x, x)
            ref = x @ np.linalg.solve(M, x)
            worst_online = max(worst_online, abs(tau[-8 + i] / ref - 1))
        ref_q = exact_scores(ol.gram, Q)
        worst_current = max(worst_current, np.max(np.abs(ol.scores(Q) / ref_q - 1)))
    return worst_online, worst_current


def test_drift_float32_million_rows(rng):
    online, current = _drift(np.float32, None, 1_000_000, 16, rng)
    print(f"float32 drift after 1e6 rows: online {online:.2e}, current {current:.2e}")
    assert online < 1e-3 and current < 1e-3


def test_drift_float64_million_rows(rng):
    online, current = _drift(np.float64, None, 1_000_000, 16, rng)
    print(f"float64 drift after 1e6 rows: online {online:.2e}, current {current:.2e}")
    assert online < 1e-8 and current < 1e-8


def test_drift_grows_without_refactoring_and_refactor_resets_it(rng):
    # Measured: with refactoring switched off float32 drift accumulates far
    # beyond what the periodic refactorisation allows.
    d = 16
    X = rng.standard_normal((200_000, d)).astype(np.float32)
    Q = rng.standard_normal((64, d)).astype(np.float32)
    never = OnlineRidgeLeverage(d, 1e-3, dtype=np.float32, refactor_every=10**9)
    default = OnlineRidgeLeverage(d, 1e-3, dtype=np.float32)
    never.extend(X)
    default.extend(X)
    ref = exact_scores(never.gram, Q)
    drift_never = np.max(np.abs(never.scores(Q) / ref - 1))
    drift_default = np.max(np.abs(default.scores(Q) / ref - 1))
    print(f"float32 drift, 2e5 rows: no refactor {drift_never:.2e}, default {drift_default:.2e}")
    assert drift_default < 1e-4
    assert drift_never > drift_default
    never.refactor()
    assert np.max(np.abs(never.scores(Q) / ref - 1)) < 1e-4


def test_merge_equals_single_stream(rng):
    X = rng.standard_normal((3000, 5))
    whole = OnlineRidgeLeverage(5, 0.5)
    whole.extend(X)
    parts = [OnlineRidgeLeverage(5, 0.5) for _ in range(3)]
    for p, lo in zip(parts, (0, 1000, 2000), strict=True):
        p.extend(X[lo : lo + 1000])
    merged = parts[2].copy().merge(parts[0]).merge(parts[1])
    np.testing.assert_allclose(merged.gram, whole.gram, rtol=1e-12)
    np.testing.assert_allclose(merged.inverse, np.linalg.inv(whole.gram), rtol=1e-9)
    Q = rng.standard_normal((20, 5))
    np.testing.assert_allclose(merged.scores(Q), whole.scores(Q), rtol=1e-9)
    assert merged.n_seen == 3000
    with pytest.raises(ValueError, match="ridge"):
        merged.merge(OnlineRidgeLeverage(5, 0.25))
    with pytest.raises(TypeError):
        merged.merge(np.eye(5))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bytes_round_trip_and_continue(dtype, rng):
    X = rng.standard_normal((1500, 4)).astype(dtype)
    ol = OnlineRidgeLeverage(4, 1e-2, dtype=dtype, refactor_every=400)
    ol.extend(X[:1000])
    blob = ol.to_bytes()
    back = OnlineRidgeLeverage.from_bytes(blob)
    assert back.to_bytes() == blob and back.nbytes == ol.nbytes == 16 * 8 + 16 * 8
    a, b = ol.extend(X[1000:]), back.extend(X[1000:])
    np.testing.assert_array_equal(a, b)
    assert back.to_bytes() == ol.to_bytes()


def _forge(ol, key, fn):
    fields = {"layout_version": ol._layout_version}
    for k, v in ol._params().items():
        fields["param." + k] = v
    for k, v in ol._state_scalars().items():
        fields["scalar." + k] = v
    for k, v in ol._state_arrays().items():
        fields["array." + k] = v.copy()
    fields[key] = fn(fields[key])
    return _serialization.dumps("OnlineRidgeLeverage", fields)


def _bump(i, j, v):
    def f(a):
        a[i, j] += v
        return a

    return f


@pytest.mark.parametrize(
    ("key", "fn"),
    [
        ("array.M", _bump(0, 1, 1.0)),
        ("array.M", lambda a: a - 10 * np.eye(len(a)) * np.abs(a).max()),
        ("array.P", lambda a: a * 3.0),
        ("array.P", _bump(1, 0, 1.0)),
        ("scalar.since_refactor", lambda v: 10**6),
        ("param.ridge", lambda v: 0.0),
        ("array.M", lambda a: a[:-1]),
    ],
)
def test_corrupt_blobs_refused(key, fn, rng):
    ol = OnlineRidgeLeverage(4, 1e-2, refactor_every=400)
    ol.extend(rng.standard_normal((500, 4)))
    with pytest.raises(ValueError):
        OnlineRidgeLeverage.from_bytes(_forge(ol, key, fn))


def test_validation_leaves_state_unchanged(rng):
    ol = OnlineRidgeLeverage(4, 1e-2)
    ol.extend(rng.standard_normal((50, 4)))
    before = ol.to_bytes()
    for X, err in [
        (rng.standard_normal((3, 5)), ValueError),
        (np.array([[1.0, np.nan, 0.0, 0.0]]), ValueError),
        (np.ones((2, 4), dtype=bool), TypeError),
        (np.full((300, 4), 1e300), ValueError),
        (np.vstack([rng.standard_normal((500, 4)), np.full((1, 4), 1e300)]), ValueError),
    ]:
        with pytest.raises(err):
            ol.extend(X)
        assert ol.to_bytes() == before
    with pytest.raises(ValueError):
        ol.update(np.ones(5))
    with pytest.raises(ValueError):
        ol.scores(np.ones((2, 3)))
    assert ol.to_bytes() == before
    for kwargs, err in [
        ({"ridge": 0.0}, ValueError),
        ({"ridge": -1.0}, ValueError),
        ({"ridge": 1.0, "refactor_every": 0}, ValueError),
        ({"ridge": 1.0, "dtype": np.float16}, TypeError),
    ]:
        with pytest.raises(err):
            OnlineRidgeLeverage(4, **kwargs)


def test_sum_of_online_scores_is_logarithmic(rng):
    # Cohen–Musco–Pachocki: sum_t tau_t <= d log(1 + ||X||_2^2 / ridge) (+ O(d)).
    d, ridge = 8, 1.0
    X = rng.standard_normal((20_000, d))
    tau = OnlineRidgeLeverage(d, ridge).extend(X)
    bound = d * np.log(1 + np.linalg.norm(X, 2) ** 2 / ridge)
    assert tau.sum() <= bound
    same_det = np.linalg.slogdet(X.T @ X + ridge * np.eye(d))[1] - d * np.log(ridge)
    # sum log(1 + u_t) is exactly that log-det ratio; u/(1+u) <= log(1+u).
    assert tau.sum() <= same_det + 1e-6


@pytest.mark.parametrize(
    "dtype, scale, ridge",
    [(np.float32, 1.0, 1e-4), (np.float32, 1.0, 1e-6), (np.float64, 1e2, 1e-4)],
)
def test_rank_deficient_ill_conditioned_streams(dtype, scale, ridge):
    """Rank-4 rows in R^16 with a tiny ridge: extend and an update loop both work and agree."""
    rng = np.random.default_rng(7)
    X = (rng.standard_normal((3000, 4)) @ rng.standard_normal((4, 16)) * scale).astype(dtype)
    whole = OnlineRidgeLeverage(16, ridge, dtype=dtype)
    tau = whole.extend(X)
    loop = OnlineRidgeLeverage(16, ridge, dtype=dtype)
    tau_loop = np.array([loop.update(x) for x in X[:300]])
    # cond(M) reaches ~1e13 here: agreement to ~eps * cond (~2e-3) is all one can ask
    np.testing.assert_allclose(tau_loop, tau[:300], rtol=1e-2, atol=1e-8)
    X64 = X.astype(np.float64)
    U, sv, _ = np.linalg.svd(X64, full_matrices=False)  # stable reference, no inverse of M
    exact = (U**2 * (sv**2 / (sv**2 + ridge))).sum(axis=1)
    np.testing.assert_allclose(whole.scores(X), exact, rtol=1e-2, atol=1e-9)
