"""streamsketch.dask: sketches of dask arrays by dask's own tree reduction."""

import numpy as np
import pytest
import scipy.linalg

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from streamsketch import (  # noqa: E402
    CountSketch,
    FrequentDirections,
    LinearAttentionState,
    MergeReduce,
    OnlineRidgeLeverage,
    UniversalSet,
)
from streamsketch.dask import leverage_scores, sketch  # noqa: E402
from streamsketch.rows.leverage import leverage_scores as exact_leverage  # noqa: E402

D, EPS = 8, 0.01
# Uneven row chunks, an empty one, and two column chunks (joined by sketch()).
CHUNKS = ((3000, 5000, 0, 7000, 1, 4999), (5, 3))
SCHEDULERS = ["sync", "threads"]


@pytest.fixture(scope="module")
def A():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((20000, D))
    A[:, -1] *= 1e-2
    A[[3, 7999, 8000, 15000]] *= 30.0  # 7999 / 8000 straddle a chunk boundary
    A[12345] = 0.0
    A[12345, -1] = 2.0
    return A


@pytest.fixture(scope="module")
def X(A):
    return da.from_array(A, chunks=CHUNKS)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("split_every", [None, 2, 3])
def test_countsketch_equals_in_memory(X, A, scheduler, split_every):
    with dask.config.set(scheduler=scheduler):
        got = sketch(X, lambda: CountSketch(D, 64, seed=1), split_every=split_every)
    ref = CountSketch(D, 64, seed=1).extend(A)
    np.testing.assert_allclose(got.result(), ref.result(), rtol=1e-12, atol=1e-12)
    assert (got.n_seen, got.next_index) == (20000, 20000)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("split_every", [None, 2])
def test_universal_set_same_indices_as_in_memory(X, A, scheduler, split_every):
    with dask.config.set(scheduler=scheduler):
        got = sketch(X, lambda: UniversalSet(D, EPS), split_every=split_every)
    ref = UniversalSet(D, EPS).extend(A)
    tau = exact_leverage(A)
    assert np.min(np.abs(tau - EPS)) > 1e-4  # nothing sits on the threshold
    np.testing.assert_array_equal(ref.indices, np.flatnonzero(tau >= EPS))
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.rows, ref.rows)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9)
    assert (got.n_seen, got.next_index) == (20000, 20000)


def test_online_ridge_leverage_gram_and_scores(X, A):
    got = sketch(X, lambda: OnlineRidgeLeverage(D, 1e-3), split_every=2)
    ref = OnlineRidgeLeverage(D, 1e-3)
    ref.extend(A)
    assert got.n_seen == 20000
    np.testing.assert_allclose(got.gram, ref.gram, rtol=1e-12)
    # The final Gram is exact, so current ridge leverage of any row is.
    np.testing.assert_allclose(got.scores(A[:500]), ref.scores(A[:500]), rtol=1e-9)


def test_frequent_directions_within_bound(X, A):
    fd = sketch(X, lambda: FrequentDirections(D, 4), split_every=2)
    assert fd.n_seen == 20000
    E = A.T @ A - fd.covariance()
    slack = 1e-9 * np.sum(A**2)
    assert np.linalg.eigvalsh(E).min() >= -slack
    assert np.linalg.norm(E, 2) <= fd.error_bound + slack
    s = np.linalg.svd(A, compute_uv=False)
    assert fd.error_bound <= np.sum(s[2:] ** 2) / (4 - 2) + slack


def test_merge_reduce_of_positional_reducer(X, A):
    tree = sketch(X, lambda: MergeReduce(lambda: CountSketch(D, 32, seed=5), 4096))
    np.testing.assert_allclose(
        tree.result().result(),
        CountSketch(D, 32, seed=5).extend(A).result(),
        rtol=1e-12,
        atol=1e-12,
    )


def test_distributed_local_cluster(X, A):
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        us = sketch(X, lambda: UniversalSet(D, EPS))
        cs = sketch(X, lambda: CountSketch(D, 64, seed=1))
    np.testing.assert_array_equal(us.indices, UniversalSet(D, EPS).extend(A).indices)
    np.testing.assert_allclose(
        cs.result(), CountSketch(D, 64, seed=1).extend(A).result(), rtol=1e-12, atol=1e-12
    )


def test_single_chunk_and_empty_array(A):
    one = sketch(da.from_array(A[:100], chunks=-1), lambda: CountSketch(D, 16, seed=2))
    assert one.to_bytes() == CountSketch(D, 16, seed=2).extend(A[:100]).to_bytes()
    empty = sketch(da.zeros((0, D), chunks=(1, D)), lambda: UniversalSet(D, EPS))
    assert empty.n_seen == 0 and empty.n_kept == 0


def test_leverage_scores_within_documented_factor(X, A):
    tau = exact_leverage(A)
    est = leverage_scores(X, seed=0)
    assert est.shape == (20000,) and est.chunks[0] == CHUNKS[0]
    est = est.compute()
    assert np.all(est >= 0.5 * tau) and np.all(est <= 1.5 * tau)
    ridge = leverage_scores(X, ridge=1.0, seed=0).compute()
    tau_r = exact_leverage(A, ridge=1.0)
    assert np.all(ridge >= 0.5 * tau_r) and np.all(ridge <= 1.5 * tau_r)


def test_validation(X, A):
    with pytest.raises(TypeError, match="array must be a dask.array.Array"):
        sketch(A, lambda: CountSketch(D, 8, seed=0))
    with pytest.raises(ValueError, match="array must be 2-D"):
        sketch(da.zeros(10, chunks=5), lambda: CountSketch(D, 8, seed=0))
    with pytest.raises(TypeError, match="make_sketch must be a zero-argument callable"):
        sketch(X, CountSketch(D, 8, seed=0))
    with pytest.raises(TypeError, match="must return a Sketch"):
        sketch(X, lambda: np.zeros(3))
    with pytest.raises(ValueError, match="must return an empty sketch"):
        sketch(X, lambda: CountSketch(D, 8, seed=0).extend(A[:3]))
    with pytest.raises(ValueError, match="n_features=4, but array has 8 columns"):
        sketch(X, lambda: CountSketch(4, 8, seed=0))
    with pytest.raises(ValueError, match="split_every must be >= 2"):
        sketch(X, lambda: CountSketch(D, 8, seed=0), split_every=1)
    with pytest.raises(TypeError, match="extend takes rows alone"):
        sketch(X, lambda: LinearAttentionState(CountSketch(D, 8, seed=0), 2))
    with pytest.raises(ValueError, match="sketch_size must be >= 8"):
        leverage_scores(X, sketch_size=4)
    bad = da.from_array(np.where(np.arange(20000)[:, None] == 17, np.nan, A), chunks=5000)
    with pytest.raises(ValueError, match="NaN"):
        sketch(bad, lambda: CountSketch(D, 8, seed=0))


# ------------------------------------------------- the tall matrix
N_BIG, D_BIG, N_CHUNKS, EPS_BIG = 2_000_000, 64, 20, 0.02
ROWS = N_BIG // N_CHUNKS


def big_chunk(i):
    """Row chunk ``i`` of the tall matrix, from its own seed (never all in memory at once).

    Gaussian rows plus, per chunk, keys scaled by 5, 15 and 40 (final leverage
    about 0.0008, 0.007 and 0.05) and one key alone in a weak direction
    (about 0.05), so the final set is nonempty and nothing sits near eps.
    """
    rng = np.random.default_rng([2024, i])
    X = rng.standard_normal((ROWS, D_BIG))
    X[:, -1] *= 1e-3
    pos = rng.choice(ROWS, 4, replace=False)
    for p, scale in zip(pos[:3], (5.0, 15.0, 40.0), strict=True):
        X[p] *= scale
    X[pos[3]] = 0.0
    X[pos[3], -1] = 5.0
    return X


def big_array():
    parts = [
        da.from_delayed(dask.delayed(big_chunk)(i), (ROWS, D_BIG), dtype=np.float64)
        for i in range(N_CHUNKS)
    ]
    return da.concatenate(parts, axis=0)


@pytest.fixture(scope="module")
def big_exact():
    """Exact leverage of every row: Gram matrix by chunks, then ||L^-1 a_i||^2."""
    G = np.zeros((D_BIG, D_BIG))
    for i in range(N_CHUNKS):
        X = big_chunk(i)
        G += X.T @ X
    L = np.linalg.cholesky(G)
    tau = np.empty(N_BIG)
    for i in range(N_CHUNKS):
        Z = scipy.linalg.solve_triangular(L, big_chunk(i).T, lower=True)
        tau[i * ROWS : (i + 1) * ROWS] = np.einsum("ij,ij->j", Z, Z)
    return tau


@pytest.mark.slow
def test_big_universal_set_same_as_in_memory_stream(big_exact):
    got = sketch(big_array(), lambda: UniversalSet(D_BIG, EPS_BIG))
    # The in-memory stream: one set fed every row in order (20 extend calls;
    # for p = 2 the set does not depend on how extend is chunked).
    ref = UniversalSet(D_BIG, EPS_BIG)
    for i in range(N_CHUNKS):
        ref.extend(big_chunk(i))
    assert np.min(np.abs(big_exact - EPS_BIG)) > 0.1 * EPS_BIG
    want = np.flatnonzero(big_exact >= EPS_BIG)
    assert len(want) >= 2 * N_CHUNKS
    np.testing.assert_array_equal(ref.indices, want)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.rows, ref.rows)
    np.testing.assert_allclose(got.scores, big_exact[want], rtol=1e-9)
    assert (got.n_seen, got.next_index) == (N_BIG, N_BIG)


@pytest.mark.slow
def test_big_leverage_scores_within_documented_factor(big_exact):
    est = leverage_scores(big_array(), seed=0).compute()
    ratio = est / big_exact
    # The documented factor of the default sketch size (rows.leverage_scores).
    assert 0.5 < ratio.min() and ratio.max() < 1.5, (ratio.min(), ratio.max())


def test_merge_reduce_of_frequent_directions(X, A):
    tree = sketch(X, lambda: MergeReduce(lambda: FrequentDirections(D, 4), 2048), split_every=2)
    assert tree.n_seen == 20000
