import numpy as np
import pytest

from streamsketch import _serialization
from streamsketch.base import load
from streamsketch.linear.countsketch import CountSketch
from streamsketch.rows.frequent_directions import FrequentDirections
from streamsketch.rows.merge_reduce import MergeReduce

D, ELL, LEAF = 30, 10, 128


def make_fd():
    return FrequentDirections(D, ELL)


@pytest.fixture
def A(rng):
    rank = 5
    U = rng.standard_normal((4000, rank)) * np.geomspace(8.0, 1.0, rank)
    return U @ rng.standard_normal((rank, D)) + 0.3 * rng.standard_normal((4000, D))


def fd_check(A, fd, ks=(0, 2, 5, 8), rtol=1e-9):
    C = A.T @ A
    scale = np.trace(C)
    E = C - fd.covariance()
    delta = fd.error_bound
    assert np.linalg.norm(E, 2) <= delta + rtol * scale
    assert np.linalg.eigvalsh(E).min() >= -rtol * scale
    s = np.linalg.svd(A, compute_uv=False)
    for k in ks:
        assert delta <= np.sum(s[k:] ** 2) / (fd.sketch_size - k) + rtol * scale
    return delta


def test_result_satisfies_fd_bound_and_is_within_bound_of_flat(A):
    tree = MergeReduce(make_fd, LEAF).extend(A)
    before = tree.to_bytes()
    res = tree.result()
    assert tree.to_bytes() == before  # result() does not mutate
    assert isinstance(res, FrequentDirections) and res.n_seen == len(A) == tree.n_seen
    np.testing.assert_allclose(res.frobenius_norm_sq, np.sum(A**2), rtol=1e-12)
    d_tree = fd_check(A, res)
    flat = make_fd().extend(A)
    d_flat = fd_check(A, flat)
    # Both Gram matrices lie in [AᵀA − Δ I, AᵀA], so they differ by at most max Δ.
    diff = np.linalg.norm(res.covariance() - flat.covariance(), 2)
    assert diff <= max(d_tree, d_flat) * (1 + 1e-9)
    assert d_tree > 0


def test_lossless_reducer_loses_no_leaf(rng):
    # With d < ℓ the reducer is exact, so any lost or doubled leaf would show.
    A = rng.standard_normal((3001, 6))
    tree = MergeReduce(lambda: FrequentDirections(6, 8), 50)
    for lo in range(0, len(A), 233):
        tree.extend(A[lo : lo + 233])
    res = tree.result()
    assert res.error_bound == 0.0
    np.testing.assert_allclose(res.covariance(), A.T @ A, rtol=1e-10, atol=1e-8)
    other = MergeReduce(lambda: FrequentDirections(6, 8), 50).extend(A[:1111])
    tree.merge(other)
    np.testing.assert_allclose(
        tree.result().covariance(), A.T @ A + A[:1111].T @ A[:1111], rtol=1e-10, atol=1e-8
    )
    tree.merge(tree)
    assert tree.n_seen == 2 * (3001 + 1111)
    np.testing.assert_allclose(
        tree.result().covariance(),
        2 * (A.T @ A + A[:1111].T @ A[:1111]),
        rtol=1e-10,
        atol=1e-8,
    )


def test_bucket_levels_are_the_binary_counter(rng):
    tree = MergeReduce(lambda: FrequentDirections(4, 3), 16)
    n = 0
    for size in rng.integers(0, 300, size=60):
        tree.extend(rng.standard_normal((size, 4)))
        n += int(size)
        leaves = n // 16
        want = [i for i in range(leaves.bit_length()) if leaves >> i & 1]
        assert tree.bucket_levels == want
        assert tree.n_buckets <= max(1, int(np.log2(max(n, 1) / 16)) + 1)
        assert tree._leaf.n_seen == n % 16 and tree.n_seen == n
        # Workspace grows with the number of buckets only.
        assert tree.nbytes == (tree.n_buckets + 2) * FrequentDirections(4, 3).nbytes


@pytest.mark.parametrize("split", [1024, 1500])
def test_merge_of_two_trees_equals_tree_of_concatenation(A, split):
    whole = MergeReduce(make_fd, LEAF).extend(A)
    left = MergeReduce(make_fd, LEAF).extend(A[:split])
    right = MergeReduce(make_fd, LEAF).extend(A[split:])
    saved = right.to_bytes()
    left.merge(right)
    assert right.to_bytes() == saved
    assert left.n_seen == whole.n_seen == len(A)
    assert left.n_buckets <= int(np.log2(len(A) / LEAF)) + 1
    if split % LEAF == 0:
        # Aligned leaves: binary addition gives the same buckets.
        assert left.bucket_levels == whole.bucket_levels
    d_merged = fd_check(A, left.result())
    d_whole = fd_check(A, whole.result())
    diff = np.linalg.norm(left.result().covariance() - whole.result().covariance(), 2)
    assert diff <= max(d_merged, d_whole) * (1 + 1e-9)
    # Both share the flat sketch's bound, so neither is much worse than the other.
    assert d_merged <= 2 * d_whole and d_whole <= 2 * d_merged


def test_many_shards_merged_as_a_tree(A):
    shards = [MergeReduce(make_fd, LEAF).extend(part) for part in np.array_split(A, 7)]
    while len(shards) > 1:
        shards = [
            shards[i].merge(shards[i + 1]) if i + 1 < len(shards) else shards[i]
            for i in range(0, len(shards), 2)
        ]
    assert shards[0].n_seen == len(A)
    fd_check(A, shards[0].result())


def test_extend_equals_update_loop(A):
    X = A[:700]
    whole = MergeReduce(make_fd, 64).extend(X)
    rows = MergeReduce(make_fd, 64)
    for x in X:
        rows.update(x)
    assert rows.bucket_levels == whole.bucket_levels
    for a, b in zip([rows._leaf, *rows._buckets], [whole._leaf, *whole._buckets], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a._buf.tobytes() == b._buf.tobytes() and a.shrinkage == b.shrinkage
    assert rows.result().sketch().tobytes() == whole.result().sketch().tobytes()


def test_bytes_roundtrip(A):
    tree = MergeReduce(make_fd, LEAF).extend(A[:2500])
    blob = tree.to_bytes()
    back = MergeReduce.from_bytes(blob)
    assert back.to_bytes() == blob
    assert type(load(blob)) is MergeReduce
    assert back.bucket_levels == tree.bucket_levels and back.n_seen == 2500
    assert back.leaf_size == LEAF and back.reducer_class is FrequentDirections
    back.extend(A[2500:])
    tree.extend(A[2500:])
    assert back.to_bytes() == tree.to_bytes()
    # A loaded tree stays compatible with live ones.
    back.merge(MergeReduce(make_fd, LEAF).extend(A[:300]))
    assert back.n_seen == len(A) + 300


def _forge(tree, drop=(), **changes):
    name, fields = _serialization.loads(tree.to_bytes())
    fields.update(changes)
    for key in drop:
        del fields[key]
    return _serialization.dumps(name, fields)


def test_corrupted_bytes_raise_value_error(A):
    tree = MergeReduce(make_fd, LEAF).extend(A[:1000])  # 7 leaves + 104 rows
    assert tree.bucket_levels == [0, 1, 2]
    blob = tree.to_bytes()
    _, fields = _serialization.loads(blob)
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 0x01
    other_fd = FrequentDirections(D, ELL + 1).extend(A[:LEAF])
    full_leaf = make_fd().extend(A[:LEAF])
    bad = [
        bytes(flipped),
        blob[:100],
        make_fd().to_bytes(),
        _forge(tree, **{"scalar.n_seen": 999}),
        _forge(tree, **{"scalar.n_levels": 4}),
        _forge(tree, **{"scalar.n_levels": 2}),
        _forge(tree, **{"bucket.1": None}),  # n_seen no longer adds up
        _forge(tree, **{"bucket.0": other_fd.to_bytes()}),  # incompatible reducer
        _forge(tree, **{"bucket.0": CountSketch(D, 4, seed=0).to_bytes()}),
        _forge(tree, **{"bucket.0": b"garbage"}),
        _forge(tree, **{"bucket.2": fields["bucket.0"]}),  # too few rows for level 2
        _forge(tree, **{"leaf": full_leaf.to_bytes(), "scalar.n_seen": 1024}),
        _forge(tree, **{"leaf": 5}),
        _forge(tree, **{"param.leaf_size": 0}),
        _forge(tree, **{"param.reducer": b"nope"}),
        _forge(tree, **{"param.reducer": full_leaf.to_bytes()}),  # not empty
        _forge(tree, **{"param.extra": 1}),
        _forge(tree, **{"extra": 1}),
        _forge(tree, drop=["leaf"]),
        _forge(tree, **{"layout_version": 99}),
    ]
    for i, b in enumerate(bad):
        with pytest.raises(ValueError):
            MergeReduce.from_bytes(b)
            pytest.fail(f"forged blob {i} was accepted")


def test_validation_and_rollback_leave_tree_unchanged(A):
    tree = MergeReduce(make_fd, LEAF).extend(A[:1000])
    before = tree.to_bytes()
    nan_late = A[:500].copy()
    nan_late[-1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tree.extend(nan_late)
    with pytest.raises(ValueError):
        tree.extend(np.ones((3, D + 1)))
    with pytest.raises(TypeError):
        tree.extend(np.ones((3, D), bool))
    with pytest.raises(ValueError):
        tree.update(np.ones(D - 1))
    # Finite rows whose norm overflows only in the third leaf: the reducer
    # refuses them after two leaves were closed; the tree must roll back.
    late_huge = A[:500].copy()
    late_huge[400:] = 1e160
    with pytest.raises(ValueError, match="too large"):
        tree.extend(late_huge)
    assert tree.to_bytes() == before
    with pytest.raises(ValueError, match="too large"):
        tree.extend(np.full((2, D), 1e160))
    assert tree.to_bytes() == before


def test_constructor_and_merge_validation(A):
    with pytest.raises(TypeError, match="callable"):
        MergeReduce(make_fd(), LEAF)
    with pytest.raises(TypeError, match="Sketch"):
        MergeReduce(lambda: np.zeros(3), LEAF)
    with pytest.raises(ValueError, match="empty"):
        MergeReduce(lambda: make_fd().extend(A[:3]), LEAF)
    with pytest.raises(ValueError, match="leaf_size"):
        MergeReduce(make_fd, 0)
    tree = MergeReduce(make_fd, LEAF).extend(A[:300])
    before = tree.to_bytes()
    with pytest.raises(ValueError, match="leaf_size"):
        tree.merge(MergeReduce(make_fd, LEAF + 1))
    with pytest.raises(ValueError, match="reducer"):
        tree.merge(MergeReduce(lambda: FrequentDirections(D, ELL + 1), LEAF))
    with pytest.raises(TypeError):
        tree.merge(make_fd())
    assert tree.to_bytes() == before


def test_make_called_once_and_reducers_compatible(A):
    calls = []

    def make():
        calls.append(1)
        return make_fd()

    tree = MergeReduce(make, 32).extend(A[:1000])
    assert len(calls) == 1
    fresh = tree.make()
    assert isinstance(fresh, FrequentDirections) and fresh.n_seen == 0
    fresh.merge(tree.result())
    assert fresh.n_seen == 1000


def test_positional_reducers_get_global_positions():
    """Leaves of a position-aware reducer see each row's stream position."""
    from streamsketch import CountSketch, UniversalSet

    rng = np.random.default_rng(3)
    X = rng.standard_normal((5000, 8))
    X[[10, 700, 4000]] *= 100
    for p in (2, 1):
        left = MergeReduce(lambda p=p: UniversalSet(8, 0.1, p=p), 512).extend(X[:3000])
        right = MergeReduce(lambda p=p: UniversalSet(8, 0.1, p=p), 512)
        right.extend(X[3000:], start_index=3000)
        got = left.merge(right).result()
        assert np.array_equal(got.indices, [10, 700, 4000]) and got.n_seen == 5000
    tree = MergeReduce(lambda: CountSketch(8, 16, seed=1), 300).extend(X)
    np.testing.assert_allclose(
        tree.result().result(), CountSketch(8, 16, seed=1).extend(X).result(), atol=1e-9
    )
    with pytest.raises(ValueError, match="start_index needs a reducer"):
        MergeReduce(lambda: FrequentDirections(8, 4), 100).extend(X, start_index=5)
