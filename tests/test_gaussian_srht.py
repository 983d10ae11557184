import itertools

import numpy as np
import pytest

import streamsketch.linear.gaussian as gaussian_mod
import streamsketch.linear.srht as srht_mod
from streamsketch._random import hashed_normals, hashed_signs
from streamsketch.linear.countsketch import CountSketch
from streamsketch.linear.gaussian import GaussianSketch
from streamsketch.linear.srht import SRHT

CLASSES = [GaussianSketch, SRHT]
STARTS = [0, 3, 1000, 2**40 + 5]


def explicit_matrix(sk, n, start):
    """``S[:, start:start+n]`` straight from the definitions, in float64."""
    m = sk.sketch_size
    if isinstance(sk, GaussianSketch):
        G = np.empty((m, n))
        hashed_normals(sk._key, start, n, m, G)
        return G / np.sqrt(m)
    idx = np.arange(start, start + n, dtype=np.uint64)
    rows = sk.hadamard_rows.astype(np.uint64)
    parity = np.bitwise_count(rows[:, None] & idx[None, :]) & 1
    H = 1.0 - 2.0 * parity
    d = np.empty(n)
    hashed_signs(sk._sign_key, start, n, d)
    return H * d / np.sqrt(m)


def explicit_product(sk, X, start, chunk=1000):
    """``S[:, start:start+n] @ X`` from the definitions, a column chunk at a time."""
    out = np.zeros((sk.sketch_size, X.shape[1]))
    for lo in range(0, len(X), chunk):
        part = X[lo : lo + chunk]
        out += explicit_matrix(sk, len(part), start + lo) @ part
    return out


@pytest.fixture
def A(rng):
    return rng.standard_normal((5000, 7))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("start", STARTS)
def test_sketch_matrix_matches_definition(cls, start):
    sk = cls(4, 37, seed=11)
    for n in (1, 5, 300, 2100):
        S = sk.sketch_matrix(n, start_index=start)
        assert S.shape == (37, n) and S.dtype == np.float64
        np.testing.assert_allclose(S, explicit_matrix(sk, n, start), rtol=0, atol=1e-13)


def test_srht_matrix_structure():
    sk = SRHT(3, 50, seed=1)
    S = sk.sketch_matrix(64, start_index=2**40 + 5)
    # Entries are +-1/sqrt(m); the Sylvester rows are mutually orthogonal on an
    # aligned power-of-two window, so distinct sampled rows give orthogonal rows of S.
    assert set(np.unique(np.abs(S) * np.sqrt(50)).round(12)) == {1.0}
    rows = sk.hadamard_rows
    assert rows.dtype == np.int64 and rows.min() >= 0 and rows.max() < 2**62
    S = sk.sketch_matrix(1024, start_index=2**20)
    same = (rows[:, None] % 1024) == (rows[None, :] % 1024)
    G = S @ S.T * 50 / 1024
    np.testing.assert_allclose(G[~same], 0, atol=1e-12)
    np.testing.assert_allclose(np.abs(G[same]), 1, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("start", [0, 7, 2**40 + 5])
@pytest.mark.parametrize(("m", "n"), [(24, 40000), (3000, 9000)])
def test_long_extend_equals_explicit_product(cls, start, m, n, rng):
    # Long inputs cross several aligned units and blocks of every size; the
    # large m uses the largest SRHT blocks and small Gaussian blocks.
    if cls is GaussianSketch and m > 1000:
        n = 2000  # still several of its (m, 349) blocks, at a fraction of the cost
    X = rng.standard_normal((n, 3))
    sk = cls(3, m, seed=2).extend(X, start_index=start)
    ref = explicit_product(sk, X, start)
    np.testing.assert_allclose(sk.result(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    assert sk.n_seen == n and sk.next_index == start + n


@pytest.mark.parametrize("cls", CLASSES)
def test_extend_equals_update_loop_and_any_chunking(cls, A):
    whole = cls(7, 32, seed=1).extend(A)
    rows = cls(7, 32, seed=1)
    for a in A[:150]:
        rows.update(a)
    rows.extend(A[150:])
    np.testing.assert_allclose(rows.result(), whole.result(), rtol=0, atol=1e-11)
    for chunk in (1, 13, 777, 4096, 4099):
        chunked = cls(7, 32, seed=1)
        for lo in range(0, len(A) if chunk > 1 else 300, chunk):
            chunked.extend(A[lo : lo + chunk])
        if chunk == 1:
            chunked.extend(A[300:])
        np.testing.assert_allclose(chunked.result(), whole.result(), rtol=0, atol=1e-11)
        assert chunked.n_seen == len(A)
    assert whole.n_seen == rows.n_seen == len(A)


@pytest.mark.parametrize("cls", CLASSES)
def test_random_chunkings_agree(cls, rng):
    X = rng.standard_normal((20000, 4))
    whole = cls(4, 16, seed=3).extend(X, start_index=12345).result()
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, len(X)), size=6, replace=False))
        sk = cls(4, 16, seed=3)
        sk.extend(np.empty((0, 4)), start_index=12345)
        for part in np.split(X, cuts):
            sk.extend(part)
        np.testing.assert_allclose(sk.result(), whole, rtol=0, atol=1e-11)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("offset", [0, 2**40 + 5])
def test_shards_with_start_index_merge_into_whole_stream(cls, A, offset):
    whole = cls(7, 40, seed=9).extend(A, start_index=offset)
    bounds = [0, 1000, 1001, 2500, 4097, 5000]
    shards = [
        cls(7, 40, seed=9).extend(A[lo:hi], start_index=offset + lo)
        for lo, hi in itertools.pairwise(bounds)
    ]
    merged = shards[3].copy()
    for s in shards[:3] + shards[4:]:
        merged.merge(s)
    np.testing.assert_allclose(merged.result(), whole.result(), rtol=0, atol=1e-11)
    assert merged.n_seen == len(A) and merged.next_index == offset + len(A)


@pytest.mark.parametrize("cls", CLASSES)
def test_same_seed_bit_identical_and_generator_seeds(cls, A):
    a = cls(7, 64, seed=5).extend(A).result()
    b = cls(7, 64, seed=5).extend(A).result()
    assert a.tobytes() == b.tobytes()
    assert not np.allclose(a, cls(7, 64, seed=6).extend(A).result())
    g1, g2 = np.random.default_rng(1), np.random.default_rng(1)
    assert np.array_equal(
        cls(7, 64, seed=g1).extend(A).result(), cls(7, 64, seed=g2).extend(A).result()
    )


@pytest.mark.parametrize(("cls", "mod"), [(GaussianSketch, gaussian_mod), (SRHT, srht_mod)])
def test_state_does_not_depend_on_thread_count(cls, mod, rng, monkeypatch):
    X = rng.standard_normal((70000, 5))
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(mod, "num_threads", lambda t=threads: t)
        results.append(cls(5, 48, seed=4).extend(X, start_index=333).result())
        # Wide input takes the column-tiled path of SRHT.
        results.append(cls(5, 48, seed=4).transform(X[:3000]))
    assert all(
        r.tobytes() == s.tobytes() for r, s in zip(results[0::2], results[2::2], strict=False)
    )
    assert all(
        r.tobytes() == s.tobytes() for r, s in zip(results[1::2], results[3::2], strict=False)
    )


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("start", [0, 2**40 + 5])
def test_expected_gram_is_identity(cls, start):
    # E[S^T S] = I: average over seeds. Off-diagonal entries of one S^T S have
    # variance 1/m (both sketches), so the mean over N seeds has sd 1/sqrt(m N).
    n, m, N = 12, 4, 3000
    G = np.zeros((n, n))
    for seed in range(N):
        S = cls(1, m, seed=seed).sketch_matrix(n, start_index=start)
        G += S.T @ S
    G /= N
    sd = 1 / np.sqrt(m * N)
    assert np.abs(G - np.eye(n)).max() < 5 * sd
    if cls is SRHT:
        np.testing.assert_allclose(np.diag(G), 1, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_norms_concentrate_with_the_right_spread(cls, rng):
    # ||Sx||^2 / ||x||^2 has mean 1 and variance 2/m (Gaussian: chi^2_m / m) or
    # 2 (1 - sum x^4 / ||x||^4) / m (SRHT: the random signs make the rows
    # uncorrelated, each with variance 2 (||x||^4 - sum x^4)).
    m, N = 64, 1500
    x = rng.standard_normal(300) * np.linspace(0.1, 3, 300)
    X = x[:, None]
    ratios = np.array(
        [cls(1, m, seed=s).extend(X, start_index=77).result()[:, 0] for s in range(N)]
    )
    ratios = (ratios**2).sum(axis=1) / (x @ x)
    var = 2 / m if cls is GaussianSketch else 2 * (1 - (x**4).sum() / (x @ x) ** 2) / m
    assert abs(ratios.mean() - 1) < 4 * np.sqrt(var / N)
    assert abs(ratios.var() / var - 1) < 0.2
    # and a tail bound: the JL deviation is a few sd at most
    assert np.abs(ratios - 1).max() < 7 * np.sqrt(var)


@pytest.mark.parametrize("cls", CLASSES)
def test_subspace_embedding_on_tall_matrix(cls, rng):
    n, d, m = 30000, 10, 1200
    A = rng.standard_normal((n, d)) * np.logspace(-2, 2, d)
    # A few coherent rows: a sparse direction that row sampling alone would miss.
    A[rng.choice(n, 5, replace=False)] += 1e3 * np.eye(d)[:5]
    _, R = np.linalg.qr(A)
    SA = cls(d, m, seed=0).extend(A, start_index=2**33 + 1).result()
    # Singular values of S U (U an orthonormal basis of range(A)): every
    # ||S A x|| / ||A x|| lies within [1 - eps, 1 + eps]. Theory: eps ~ sqrt(d/m).
    sv = np.linalg.svd(SA @ np.linalg.inv(R), compute_uv=False)
    eps = 0.15
    assert sv.min() > 1 - eps and sv.max() < 1 + eps
    ratio = np.linalg.svd(SA, compute_uv=False) / np.linalg.svd(A, compute_uv=False)
    assert np.all(np.abs(ratio - 1) < eps)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_transform_is_feature_map_of_same_matrix(cls, dtype, rng):
    X = rng.standard_normal((1000, 7)).astype(dtype)
    sk = cls(7, 300, seed=8, dtype=dtype)
    out = sk.transform(X)
    assert out.shape == (1000, 300) and out.dtype == dtype and out.flags.c_contiguous
    tol = 1e-12 if dtype == np.float64 else 1e-4
    ref = X.astype(np.float64) @ explicit_matrix(sk, 7, 0).T
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(out, X @ sk.sketch_matrix(7).T, rtol=0, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("cls", CLASSES)
def test_bytes_roundtrip_then_continue(cls, A):
    sk = cls(7, 16, dtype=np.float32, seed=2).extend(A[:1000])
    back = cls.from_bytes(sk.to_bytes())
    assert back.result().dtype == np.float32 and back.n_seen == 1000 and back.next_index == 1000
    assert back.result().tobytes() == sk.result().tobytes()
    if cls is SRHT:
        assert np.array_equal(back.hadamard_rows, sk.hadamard_rows)
    back.extend(A[1000:])
    sk.extend(A[1000:])
    assert back.result().tobytes() == sk.result().tobytes()
    blob = bytearray(sk.to_bytes())
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        cls.from_bytes(bytes(blob))
    other = CountSketch if cls is GaussianSketch else GaussianSketch
    with pytest.raises(ValueError, match="blob holds"):
        other.from_bytes(sk.to_bytes())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("bad", "err", "match"),
    [
        (np.full((5, 7), np.nan), ValueError, "NaN or Inf"),
        (np.ones((5, 6)), ValueError, "7 columns"),
        (np.ones((5, 7), bool), TypeError, "X must have a float32"),
        (np.ones(7), ValueError, "2-D"),
    ],
)
@pytest.mark.parametrize("n_good", [0, 100])
def test_rejected_extend_leaves_state_unchanged(cls, A, bad, err, match, n_good):
    sk = cls(7, 16, seed=0).extend(A[:n_good])
    before, n = sk.result(), sk.n_seen
    # A NaN hidden deep inside a long block must be caught as well.
    mixable = bad.ndim == 2 and bad.shape[1] == 7 and bad.dtype != bool
    big = np.concatenate([A[:4500], bad, A[:300]]) if mixable else bad
    for X in (bad, big):
        with pytest.raises(err, match=match):
            sk.extend(X)
    assert np.array_equal(sk.result(), before) and sk.n_seen == n
    with pytest.raises(ValueError, match="start_index must be >= 0"):
        sk.extend(A[:3], start_index=-1)
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        sk.extend(A[:3], start_index=2**62 - 1)
    with pytest.raises(TypeError, match="start_index must be an integer"):
        sk.extend(A[:3], start_index=1.5)
    with pytest.raises(ValueError, match="x contains NaN"):
        sk.update(np.full(7, np.inf))
    assert np.array_equal(sk.result(), before) and sk.n_seen == n and sk.next_index == n_good


@pytest.mark.parametrize("cls", CLASSES)
def test_overflow_is_refused_not_stored(cls):
    sk = cls(2, 3, seed=0)
    sk.extend(np.full((1, 2), 1e307))
    before = sk.result()
    with pytest.raises(ValueError, match="overflows"):
        sk.extend(np.full((5000, 2), 1e307))
    assert np.array_equal(sk.result(), before) and sk.n_seen == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_merge_incompatible(cls):
    sk = cls(7, 16, seed=0)
    with pytest.raises(ValueError, match="different seed"):
        sk.merge(cls(7, 16, seed=1))
    with pytest.raises(ValueError, match="sketch_size differs"):
        sk.merge(cls(7, 17, seed=0))
    with pytest.raises(ValueError, match="n_features differs"):
        sk.merge(cls(8, 16, seed=0))
    with pytest.raises(ValueError, match="dtype differs"):
        sk.merge(cls(7, 16, seed=0, dtype=np.float32))
    for other in (CountSketch, SRHT if cls is GaussianSketch else GaussianSketch):
        with pytest.raises(TypeError, match=f"other must be a {cls.__name__}"):
            sk.merge(other(7, 16, seed=0))
    assert np.array_equal(sk.result(), np.zeros((16, 7))) and sk.n_seen == 0


@pytest.mark.parametrize("cls", CLASSES)
def test_float32_state_stays_float32_and_close_to_float64(cls, A):
    sk32 = cls(7, 50, dtype=np.float32, seed=3)
    sk32.update(A[0]).extend(A[1:3000]).extend(A[3000:].astype(np.float64))
    other = cls(7, 50, dtype=np.float32, seed=3).extend(A[:10], start_index=10**6)
    sk32.merge(other)
    assert sk32.result().dtype == np.float32 and sk32._SA.dtype == np.float32
    assert sk32.sketch_matrix(5).dtype == np.float32
    sk64 = cls(7, 50, seed=3).extend(A).merge(cls(7, 50, seed=3).extend(A[:10], start_index=10**6))
    ref = sk64.result()
    np.testing.assert_allclose(sk32.result(), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("cls", CLASSES)
def test_integer_input_and_nbytes(cls):
    sk = cls(3, 8, seed=0)
    n0 = sk.nbytes
    sk.extend(np.arange(30).reshape(10, 3))
    ref = cls(3, 8, seed=0).extend(np.arange(30, dtype=np.float64).reshape(10, 3)).result()
    assert np.array_equal(sk.result(), ref)
    assert sk.nbytes == n0 == 8 * 3 * 8 + (8 * 8 if cls is SRHT else 0)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_constructor_arguments(cls, bad):
    with pytest.raises((TypeError, ValueError), match="sketch_size"):
        cls(3, bad)
    with pytest.raises((TypeError, ValueError), match="n_features"):
        cls(bad, 4)
    with pytest.raises(TypeError, match="dtype"):
        cls(3, 4, dtype=np.float16)
