import itertools

import numpy as np
import pytest

from streamsketch import _serialization
from streamsketch.linear.countsketch import CountSketch
from streamsketch.rows.frequent_directions import FrequentDirections

D, ELL = 40, 16


def low_rank_plus_noise(rng, n=3000, d=D, rank=6, noise=0.3):
    scales = np.geomspace(10.0, 1.0, rank)
    U = rng.standard_normal((n, rank)) * scales
    return U @ rng.standard_normal((rank, d)) + noise * rng.standard_normal((n, d))


@pytest.fixture
def A(rng):
    return low_rank_plus_noise(rng)


def tails(A):
    s = np.linalg.svd(A, compute_uv=False)
    return np.array([np.sum(s[k:] ** 2) for k in range(len(s))])


def check_fd_guarantee(A, fd, ks, rtol=1e-9):
    """‖AᵀA − BᵀB‖₂ ≤ Δ ≤ ‖A − A_k‖_F²/(ℓ−k), and BᵀB ≼ AᵀA."""
    ell = fd.sketch_size
    C = A.T @ A
    scale = np.trace(C)
    E = C - fd.covariance().astype(np.float64)
    delta = fd.error_bound
    assert np.linalg.norm(E, 2) <= delta + rtol * scale
    assert np.linalg.eigvalsh(E).min() >= -rtol * scale
    tail = tails(A)
    for k in ks:
        assert k < ell
        assert delta <= tail[k] / (ell - k) + rtol * scale, k
    return np.linalg.norm(E, 2), delta


@pytest.mark.parametrize("chunk", [1, 7, 100, 3000])
def test_covariance_bound_for_several_k(A, chunk):
    fd = FrequentDirections(D, ELL)
    for lo in range(0, len(A), chunk):
        fd.extend(A[lo : lo + chunk])
    err, delta = check_fd_guarantee(A, fd, ks=[0, 2, 4, 6, 8, 12, 15])
    # The data are not low rank enough for a lossless sketch: the bound is
    # exercised, and on this data it is nearly attained.
    assert delta > 0 and err > 0.5 * delta
    assert fd.n_seen == len(A)
    np.testing.assert_allclose(fd.frobenius_norm_sq, np.sum(A**2), rtol=1e-12)
    # The bound with k = rank is far better than the trivial one.
    assert delta < 0.1 * np.sum(A**2) / ELL


def test_exactly_low_rank_stream_is_recovered(rng):
    A = rng.standard_normal((2000, 5)) @ rng.standard_normal((5, D))
    fd = FrequentDirections(D, 8).extend(A)
    # Δ ≤ ‖A − A_5‖_F²/(8 − 5) = 0: nothing is lost.
    assert fd.error_bound <= 1e-9 * np.sum(A**2)
    np.testing.assert_allclose(fd.covariance(), A.T @ A, atol=1e-8 * np.sum(A**2))


def test_fewer_features_than_sketch_size_is_lossless(rng):
    A = rng.standard_normal((1000, 6))
    fd = FrequentDirections(6, 10).extend(A)
    assert fd.error_bound == 0.0 and fd.shrinkage == 0.0
    np.testing.assert_allclose(fd.covariance(), A.T @ A, rtol=1e-10, atol=1e-9)


def test_extend_equals_update_loop_exactly(A):
    X = A[:1000]
    whole = FrequentDirections(D, ELL).extend(X)
    rows = FrequentDirections(D, ELL)
    for a in X:
        rows.update(a)
    chunked = FrequentDirections(D, ELL)
    for lo in range(0, len(X), 37):
        chunked.extend(X[lo : lo + 37])
    assert whole.shrinkage > 0
    for other in (rows, chunked):
        assert other.n_seen == whole.n_seen == len(X)
        assert other._buf.tobytes() == whole._buf.tobytes()
        assert other._n_filled == whole._n_filled
        assert other.shrinkage == whole.shrinkage
        assert other.sketch().tobytes() == whole.sketch().tobytes()
        np.testing.assert_allclose(other.frobenius_norm_sq, whole.frobenius_norm_sq, rtol=1e-12)


def test_deterministic(A):
    a = FrequentDirections(D, ELL).extend(A).to_bytes()
    assert a == FrequentDirections(D, ELL).extend(A).to_bytes()


def test_reading_does_not_change_state_and_is_consistent(A):
    # 2ℓ − 1 rows: the buffer holds more than ℓ rows and sketch() must compact.
    fd = FrequentDirections(D, ELL).extend(A[: 2 * ELL - 1])
    assert fd._n_filled == 2 * ELL - 1
    before = fd.to_bytes()
    B1, B2 = fd.sketch(), fd.sketch()
    assert B1.shape == (ELL, D) and B1.dtype == np.float64
    assert B1.tobytes() == B2.tobytes()
    np.testing.assert_allclose(fd.covariance(), B1.T @ B1, rtol=1e-12, atol=1e-12)
    assert fd.error_bound > fd.shrinkage == 0.0
    fd.ridge_leverage(A[:3], 1.0)
    assert fd.to_bytes() == before
    # The read-time shrink keeps the guarantee for the rows seen.
    check_fd_guarantee(A[: 2 * ELL - 1], fd, ks=[0, 3, 10])
    B1[:] = 0
    assert fd.to_bytes() == before


def test_sketch_with_few_rows_is_the_rows(A):
    fd = FrequentDirections(D, ELL).extend(A[:5])
    B = fd.sketch()
    np.testing.assert_array_equal(B[:5], A[:5])
    assert not B[5:].any()
    assert fd.error_bound == 0.0


def test_float32(A):
    fd = FrequentDirections(D, ELL, dtype=np.float32).extend(A)
    assert fd.sketch().dtype == np.float32 and fd.covariance().dtype == np.float32
    # float32 rounding of the stored rows accumulates over the ~180 shrinks
    # (about 1e-5 of trace(AᵀA) here), on top of the exact-arithmetic bound.
    check_fd_guarantee(A, fd, ks=[0, 6, 10], rtol=1e-4)
    back = FrequentDirections.from_bytes(fd.to_bytes())
    assert back.sketch().tobytes() == fd.sketch().tobytes()


@pytest.mark.parametrize("order", ["sequential", "pairwise"])
def test_merge_of_four_shards_satisfies_bound_for_whole_stream(A, order):
    bounds = [0, 1, 700, 2100, 3000]
    shards = [FrequentDirections(D, ELL).extend(A[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    saved = [s.to_bytes() for s in shards]
    if order == "sequential":
        merged = shards[2].copy()
        for i in (0, 3, 1):
            merged.merge(shards[i])
    else:
        merged = shards[0].copy().merge(shards[1]).merge(shards[2].copy().merge(shards[3]))
    assert [s.to_bytes() for s in shards] == saved  # other is never modified
    assert merged.n_seen == len(A)
    np.testing.assert_allclose(merged.frobenius_norm_sq, np.sum(A**2), rtol=1e-12)
    _, delta = check_fd_guarantee(A, merged, ks=[0, 2, 4, 6, 8, 12, 15])
    assert delta >= sum(s.shrinkage for s in shards)


def test_merge_with_itself(A):
    fd = FrequentDirections(D, ELL).extend(A)
    fd.merge(fd)
    assert fd.n_seen == 2 * len(A)
    check_fd_guarantee(np.vstack([A, A]), fd, ks=[0, 6, 10])


def test_merge_refuses_incompatible_and_leaves_state(A):
    fd = FrequentDirections(D, ELL).extend(A[:100])
    before = fd.to_bytes()
    with pytest.raises(ValueError, match="sketch_size"):
        fd.merge(FrequentDirections(D, ELL + 1))
    with pytest.raises(ValueError, match="dtype"):
        fd.merge(FrequentDirections(D, ELL, dtype=np.float32))
    with pytest.raises(ValueError, match="n_features"):
        fd.merge(FrequentDirections(D + 1, ELL))
    with pytest.raises(TypeError):
        fd.merge(CountSketch(D, ELL, seed=0))
    huge = FrequentDirections(D, ELL).extend(np.full((1, D), 1.7e153))
    with pytest.raises(ValueError, match="too large"):
        huge.merge(huge)
    assert fd.to_bytes() == before


def test_bytes_roundtrip_then_continue(A):
    fd = FrequentDirections(D, ELL).extend(A[:1234])
    back = FrequentDirections.from_bytes(fd.to_bytes())
    assert back.to_bytes() == fd.to_bytes()
    assert back.n_seen == 1234 and back.error_bound == fd.error_bound
    fd.extend(A[1234:])
    back.extend(A[1234:])
    assert back.to_bytes() == fd.to_bytes()


def _forge(fd, **changes):
    name, fields = _serialization.loads(fd.to_bytes())
    fields.update(changes)
    return _serialization.dumps(name, fields)


def test_corrupted_bytes_raise_value_error(A):
    fd = FrequentDirections(D, ELL).extend(A[:100])
    blob = fd.to_bytes()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    buf = fd._buf.copy()
    buf[-1, 0] = 1.0
    nan_buf = fd._buf.copy()
    nan_buf[0, 0] = np.nan
    bad = [
        bytes(flipped),
        blob[:-7],
        b"",
        CountSketch(D, ELL, seed=0).to_bytes(),
        _forge(fd, **{"scalar.n_filled": 2 * ELL}),
        _forge(fd, **{"scalar.n_filled": 0}),  # rows beyond n_filled are not zero
        _forge(fd, **{"scalar.n_seen": 1}),
        _forge(fd, **{"array.buffer": buf}),
        _forge(fd, **{"array.buffer": nan_buf}),
        _forge(fd, **{"array.buffer": fd._buf[:-1]}),
        _forge(fd, **{"array.buffer": fd._buf.astype(np.float32)}),
        _forge(fd, **{"array.stats": np.array([-1.0, 5.0])}),
        _forge(fd, **{"array.stats": np.array([0.0, np.inf])}),
        _forge(fd, **{"param.sketch_size": 0}),
        _forge(fd, **{"param.dtype": "int8"}),
        _forge(fd, **{"scalar.n_seen": -3}),
        _forge(FrequentDirections(D, ELL), **{"array.stats": np.array([1.0, 1.0])}),
    ]
    for i, b in enumerate(bad):
        with pytest.raises(ValueError):
            FrequentDirections.from_bytes(b)
            pytest.fail(f"forged blob {i} was accepted")


@pytest.mark.parametrize(
    "bad, err",
    [
        (np.full((3, D), np.nan), ValueError),
        (np.ones((3, D + 1)), ValueError),
        (np.ones((3, D), bool), TypeError),
        (np.ones(D), ValueError),
        (np.full((3, D), 1e160), ValueError),  # ‖A‖_F² overflows
        ("abc", TypeError),
    ],
)
def test_validation_leaves_state_unchanged(A, bad, err):
    fd = FrequentDirections(D, ELL).extend(A[: 2 * ELL - 3])
    before = fd.to_bytes()
    with pytest.raises(err):
        fd.extend(bad)
    if np.ndim(bad) == 2:
        with pytest.raises((ValueError, TypeError)):
            fd.update(bad[0])
    assert fd.to_bytes() == before
    with pytest.raises(ValueError, match="ridge"):
        fd.ridge_leverage(A[:2], 0.0)
    with pytest.raises(ValueError, match="ridge"):
        fd.ridge_leverage(A[:2], np.nan)
    with pytest.raises(ValueError, match="X"):
        fd.ridge_leverage(np.ones((2, D - 1)), 1.0)


def test_float32_overflow_is_refused():
    fd = FrequentDirections(4, 2, dtype=np.float32)
    with pytest.raises(ValueError, match="too large"):
        fd.extend(np.full((3, 4), 5e37, np.float32))
    assert fd.n_seen == 0 and not fd._buf.any()


def test_constructor_validation():
    with pytest.raises(ValueError):
        FrequentDirections(0, 4)
    with pytest.raises(ValueError):
        FrequentDirections(4, 0)
    with pytest.raises(TypeError):
        FrequentDirections(4, 2.0)
    with pytest.raises(TypeError):
        FrequentDirections(4, 2, dtype=np.int64)


def test_nbytes_constant_in_n_seen(rng):
    fd = FrequentDirections(D, ELL)
    sizes = []
    for n in (0, 1, 100, 5000):
        fd.extend(rng.standard_normal((n, D)))
        sizes.append(fd.nbytes)
    assert sizes == [2 * ELL * D * 8 + 16] * 4


def exact_ridge_leverage(A, X, lam):
    M = A.T @ A + lam * np.eye(A.shape[1])
    return np.einsum("ij,ji->i", X, np.linalg.solve(M, X.T))


@pytest.mark.parametrize("lam", [1e-3, 1.0, 100.0, 1e4])
def test_ridge_leverage_sandwich(A, rng, lam):
    fd = FrequentDirections(D, ELL).extend(A)
    delta = fd.error_bound
    X = np.vstack([A[:50], rng.standard_normal((50, D)), 5 * rng.standard_normal((5, D))])
    lower, upper = fd.ridge_leverage_bounds(X, lam)
    exact = exact_ridge_leverage(A, X, lam)
    assert np.all(lower <= exact * (1 + 1e-7))
    assert np.all(exact <= upper * (1 + 1e-7))
    assert np.all(upper <= (1 + delta / lam) * lower * (1 + 1e-7))
    # ridge_leverage is the upper score, and both match the direct formulas.
    np.testing.assert_array_equal(fd.ridge_leverage(X, lam), upper)
    G = fd.covariance()
    np.testing.assert_allclose(upper, exact_ridge_leverage_from_gram(G, X, lam), rtol=1e-6)
    np.testing.assert_allclose(lower, exact_ridge_leverage_from_gram(G, X, lam + delta), rtol=1e-6)


def exact_ridge_leverage_from_gram(G, X, lam):
    M = G + lam * np.eye(G.shape[0])
    return np.einsum("ij,ji->i", X, np.linalg.solve(M, X.T))


def test_ridge_leverage_large_ridge_is_tight(A):
    # When λ ≫ Δ the bracket closes: the sketch's scores are near exact.
    fd = FrequentDirections(D, ELL).extend(A)
    lam = 1e4 * fd.error_bound
    lower, upper = fd.ridge_leverage_bounds(A[:20], lam)
    np.testing.assert_allclose(lower, upper, rtol=2e-4)


def test_ridge_leverage_of_empty_sketch_and_blocks(rng):
    fd = FrequentDirections(5, 3)
    X = rng.standard_normal((10000, 5))  # more than one block of rows
    lower, upper = fd.ridge_leverage_bounds(X, 2.0)
    np.testing.assert_allclose(upper, np.sum(X**2, axis=1) / 2.0, rtol=1e-12)
    np.testing.assert_allclose(lower, upper, rtol=1e-12)
    fd.extend(rng.standard_normal((500, 5)))
    scores = fd.ridge_leverage(X, 0.5)
    np.testing.assert_allclose(
        scores, exact_ridge_leverage_from_gram(fd.covariance(), X, 0.5), rtol=1e-9
    )
