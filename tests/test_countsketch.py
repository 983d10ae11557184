import itertools

import numpy as np
import pytest
import scipy.linalg

from streamsketch import CountSketch, countsketch
from streamsketch.linear.updater import LinearAttentionState


@pytest.fixture
def A(rng):
    return rng.standard_normal((3000, 7))


def test_result_equals_explicit_matrix(A):
    sk = CountSketch(7, 50, seed=3).extend(A)
    S = sk.sketch_matrix(len(A))
    assert S.shape == (50, 3000)
    assert np.all((S != 0).sum(axis=0) == 1) and set(np.unique(S)) == {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(sk.result(), S @ A, atol=1e-12)


def test_extend_equals_update_loop_and_any_chunking(A):
    whole = CountSketch(7, 32, seed=1).extend(A)
    rows = CountSketch(7, 32, seed=1)
    for a in A[:200]:
        rows.update(a)
    rows.extend(A[200:])
    np.testing.assert_allclose(rows.result(), whole.result(), atol=1e-12)
    chunked = CountSketch(7, 32, seed=1)
    for lo in range(0, len(A), 777):
        chunked.extend(A[lo : lo + 777])
    np.testing.assert_allclose(chunked.result(), whole.result(), atol=1e-12)
    assert whole.n_seen == rows.n_seen == chunked.n_seen == len(A)


def test_shards_with_start_index_merge_into_whole_stream(A):
    whole = CountSketch(7, 40, seed=9).extend(A)
    bounds = [0, 1000, 1001, 2500, 3000]
    shards = [
        CountSketch(7, 40, seed=9).extend(A[lo:hi], start_index=lo)
        for lo, hi in itertools.pairwise(bounds)
    ]
    merged = shards[3].copy()
    for s in shards[:3]:
        merged.merge(s)
    np.testing.assert_allclose(merged.result(), whole.result(), atol=1e-12)
    assert merged.n_seen == len(A) and merged.next_index == len(A)


def test_same_seed_bit_identical_and_generator_seeds(A):
    a = CountSketch(7, 64, seed=5).extend(A).result()
    b = CountSketch(7, 64, seed=5).extend(A).result()
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, CountSketch(7, 64, seed=6).extend(A).result())
    g1, g2 = np.random.default_rng(1), np.random.default_rng(1)
    assert np.array_equal(
        CountSketch(7, 64, seed=g1).extend(A).result(),
        CountSketch(7, 64, seed=g2).extend(A).result(),
    )


def test_bytes_roundtrip_then_continue(A):
    sk = CountSketch(7, 16, dtype=np.float32, seed=2).extend(A[:1000])
    back = CountSketch.from_bytes(sk.to_bytes())
    assert back.result().dtype == np.float32
    assert back.result().tobytes() == sk.result().tobytes() and back.n_seen == 1000
    back.extend(A[1000:])
    sk.extend(A[1000:])
    assert back.result().tobytes() == sk.result().tobytes()


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (np.full((5, 7), np.nan), ValueError, "NaN or Inf"),
        (np.ones((5, 6)), ValueError, "7 columns"),
        (np.ones((5, 7), bool), TypeError, "X must have a float32"),
        (np.ones(7), ValueError, "2-D"),
    ],
)
@pytest.mark.parametrize("n_good", [0, 100])
def test_rejected_extend_leaves_state_unchanged(A, bad, err, match, n_good):
    sk = CountSketch(7, 16, seed=0).extend(A[:n_good])
    before, n = sk.result(), sk.n_seen
    big = (
        np.concatenate([A[:500], bad])
        if bad.dtype == float and bad.shape[-1] == 7 and bad.ndim == 2
        else bad
    )
    for X in (bad, big):
        with pytest.raises(err, match=match):
            sk.extend(X)
    assert np.array_equal(sk.result(), before) and sk.n_seen == n
    with pytest.raises(ValueError, match="start_index must be >= 0"):
        sk.extend(A[:3], start_index=-1)
    with pytest.raises(ValueError, match="x contains NaN"):
        sk.update(np.full(7, np.inf))
    assert np.array_equal(sk.result(), before) and sk.n_seen == n and sk.next_index == n_good


def test_overflow_is_refused_not_stored():
    sk = CountSketch(2, 1, seed=0)
    sk.extend(np.full((1, 2), 1e308))
    before = sk.result()
    with pytest.raises(ValueError, match="overflows"):
        sk.extend(np.full((200, 2), 1e308))
    assert np.array_equal(sk.result(), before)


def test_merge_incompatible(A):
    sk = CountSketch(7, 16, seed=0)
    with pytest.raises(ValueError, match="different seed"):
        sk.merge(CountSketch(7, 16, seed=1))
    with pytest.raises(ValueError, match="sketch_size differs"):
        sk.merge(CountSketch(7, 17, seed=0))
    with pytest.raises(ValueError, match="dtype differs"):
        sk.merge(CountSketch(7, 16, seed=0, dtype=np.float32))
    with pytest.raises(TypeError, match="other must be a CountSketch"):
        sk.merge(LinearAttentionState(CountSketch(7, 16, seed=0), 2))


def test_nbytes_constant_in_stream(A):
    sk = CountSketch(7, 16, seed=0)
    n0 = sk.nbytes
    sk.extend(A)
    assert sk.nbytes == n0 == 16 * 7 * 8


def test_subspace_embedding_and_unbiased_gram(rng):
    A = rng.standard_normal((20000, 5)) * np.array([1, 10, 0.1, 3, 1])
    SA = countsketch(A, 2000, seed=0)
    s_A = np.linalg.svd(A, compute_uv=False)
    s_SA = np.linalg.svd(SA, compute_uv=False)
    assert np.all(np.abs(s_SA / s_A - 1) < 0.2)
    # E[(SA)^T(SA)] = A^T A: average over seeds
    G = np.mean(
        [countsketch(A[:200], 8, seed=s).T @ countsketch(A[:200], 8, seed=s) for s in range(300)],
        axis=0,
    )
    np.testing.assert_allclose(
        G, A[:200].T @ A[:200], rtol=0.25, atol=0.25 * np.abs(A[:200].T @ A[:200]).max()
    )


def test_function_equals_object_and_keeps_dtype(A):
    for dt in (np.float32, np.float64):
        Ad = A.astype(dt)
        out = countsketch(Ad, 64, seed=4)
        assert out.dtype == dt
        assert np.array_equal(out, CountSketch(7, 64, dtype=dt, seed=4).extend(Ad).result())
    assert countsketch(np.arange(12).reshape(4, 3), 2, seed=0).dtype == np.float64


def test_same_hash_family_as_scipy_shape_contract(A):
    # Same contract as scipy's clarkson_woodruff_transform: (sketch_size, d) output
    # that preserves the Gram matrix in expectation.
    ours = countsketch(A, 100, seed=0)
    theirs = scipy.linalg.clarkson_woodruff_transform(A, 100, seed=0)
    assert ours.shape == theirs.shape


def test_transform_is_feature_map_of_same_matrix(A):
    sk = CountSketch(7, 5, seed=8)
    np.testing.assert_allclose(sk.transform(A), A @ sk.sketch_matrix(7).T, atol=1e-12)
