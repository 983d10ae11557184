"""all_merge / merge_to on real gloo process groups: 2 and 4 CPU processes on localhost.

One spawn per world size runs every scenario in turn (process start-up dominates
the cost); each rank writes what it ended with to a folder and the tests compare
it against the single-process sketch of the concatenated stream.
"""

import contextlib
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = torch.distributed
mp = pytest.importorskip("torch.multiprocessing")

if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from streamsketch import _serialization  # noqa: E402
from streamsketch.distributed import all_merge, merge_to  # noqa: E402
from streamsketch.kv.scorers import LeverageScorer, QueryGaussianScorer  # noqa: E402
from streamsketch.linear import CountSketch, LinearAttentionState  # noqa: E402
from streamsketch.rows import (  # noqa: E402
    FrequentDirections,
    MergeReduce,
    OnlineRidgeLeverage,
    UniversalSet,
)

D, D_FD, ELL, EPS = 6, 20, 5, 0.05
# Rows per rank; the 4-process run has an empty shard.
SHARDS = {2: (700, 1300), 4: (500, 0, 900, 600)}
# Spawned ranks must finish within this (start-up of 4 processes on 2 busy cores ~10 s).
DEADLINE_S = 150
# A rank with an incompatible sketch must make every rank raise within this.
RAISE_WITHIN_S = 10.0
TIMEOUT_S = 2.0


# ------------------------------------------------------------------ streams
def keys(n):
    """Keys with a few planted heavy ones (well away from eps) for the universal set."""
    rng = np.random.default_rng(7)
    K = rng.standard_normal((n, D))
    K[:, -1] *= 1e-2
    for j in (5, n // 3, n - 2):
        K[j] *= 25.0
    K[n // 2] = 0.0
    K[n // 2, -1] = 3.0
    return K


def fd_rows(n):
    rng = np.random.default_rng(8)
    U = rng.standard_normal((n, 4)) * np.array([9.0, 6.0, 4.0, 2.0])
    return U @ rng.standard_normal((4, D_FD)) + 0.3 * rng.standard_normal((n, D_FD))


def targets(n):
    return np.random.default_rng(9).standard_normal((n, 3))


def kv(world):
    """Per-rank keys (B=2, H_kv=2, c, 8) and queries (2, 4, c, 8); an empty shard has none."""
    g = torch.Generator().manual_seed(10)
    out = []
    for n in SHARDS[world]:
        c = n // 100
        out.append((torch.randn(2, 2, c, 8, generator=g), torch.randn(2, 4, c, 8, generator=g)))
    return out


def shard(world, rank):
    sizes = SHARDS[world]
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


# ---------------------------------------------------------------- the ranks
def _scenarios(rank, world):
    """(name, callable returning the object to save) in the order every rank runs them."""
    n = sum(SHARDS[world])
    lo, hi = shard(world, rank)
    K, A, Y = keys(n)[lo:hi], fd_rows(n)[lo:hi], targets(n)[lo:hi]
    last = world - 1

    def cs(seed=3):
        return CountSketch(D, 40, seed=seed).extend(K, start_index=lo)

    def online():
        ol = OnlineRidgeLeverage(D, 1e-2, refactor_every=256)
        ol.extend(K)  # returns the online scores, not the sketch
        return ol

    def merge_reduce():
        tree = all_merge(MergeReduce(lambda: FrequentDirections(D_FD, ELL), 128).extend(A))
        assert tree.n_seen == n
        return tree.result()

    def us():
        return UniversalSet(D, EPS).extend(K, start_index=lo)

    def scorers():
        k, q = kv(world)[rank]
        lev, gauss = LeverageScorer(2, 8), QueryGaussianScorer(2, 8, half_life=16.0)
        if k.shape[2]:
            lev.observe_keys(k)
            gauss.observe_queries(q[:, :, :3])
            gauss.observe_queries(q[:, :, 3:])
        all_merge(lev)
        all_merge(gauss)
        return {"gram": lev.gram, "mean": gauss.mean, "m2": gauss.m2, "count": gauss.count}

    def batch_mismatch():
        lev = LeverageScorer(2, 8)
        lev.observe_keys(torch.ones(1 + (rank == last), 2, 3, 8))
        return all_merge(lev)

    return [
        ("countsketch", lambda: all_merge(cs())),
        ("online", lambda: all_merge(online())),
        ("universal", lambda: all_merge(us())),
        ("fd", lambda: all_merge(FrequentDirections(D_FD, ELL).extend(A))),
        ("merge_reduce", merge_reduce),
        (
            "las",
            lambda: all_merge(LinearAttentionState(CountSketch(D, 16, seed=1), 3).extend(K, Y)),
        ),
        ("scorers", scorers),
        # Mismatches: every rank must raise the same error, and quickly.
        ("seed_mismatch", lambda: all_merge(cs(seed=4 if rank == last else 3))),
        (
            "param_mismatch",
            lambda: all_merge(FrequentDirections(D_FD, ELL + (rank == 0)).extend(A)),
        ),
        (
            "class_mismatch",
            lambda: all_merge(us() if rank == 0 else FrequentDirections(D_FD, ELL)),
        ),
        ("refused", lambda: all_merge(K if rank == last else cs())),
        ("op_mismatch", lambda: (merge_to if rank == 0 else all_merge)(cs())),
        ("batch_mismatch", batch_mismatch),
        ("overlap", lambda: all_merge(UniversalSet(D, EPS).extend(keys(n)[:300], start_index=0))),
        # The group is still usable after those errors.
        ("countsketch_after", lambda: all_merge(cs())),
        ("merge_to_cs", lambda: merge_to(cs(), dst=last)),
        ("merge_to_us", lambda: merge_to(us(), dst=last)),
    ]


def _save(stem, obj):
    if isinstance(obj, dict):
        arrays = {
            k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()
        }
        np.savez(f"{stem}.npz", **arrays)
    else:
        Path(f"{stem}.bin").write_bytes(obj.to_bytes())


def _worker(rank, world, port, folder):
    torch.set_num_threads(1)
    out = Path(folder)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for name, make in _scenarios(rank, world):
            t0 = time.perf_counter()
            try:
                _save(out / f"{name}.{rank}", make())
            except Exception as exc:
                took = time.perf_counter() - t0
                text = f"{type(exc).__name__}|{took:.3f}|{exc}"
                (out / f"{name}.{rank}.err").write_text(text)
                if not isinstance(exc, (ValueError, TypeError)):
                    (out / f"{name}.{rank}.tb").write_text(traceback.format_exc())
        if world == 2:
            # Last: rank 1 never calls in, so rank 0 must time out (the group is
            # unusable afterwards).
            t0 = time.perf_counter()
            if rank == 0:
                try:
                    all_merge(CountSketch(D, 40, seed=3), timeout=TIMEOUT_S)
                    (out / "timeout.0.err").write_text("none|0|returned")
                except Exception as exc:
                    took = time.perf_counter() - t0
                    (out / "timeout.0.err").write_text(f"{type(exc).__name__}|{took:.3f}|{exc}")
            else:
                time.sleep(TIMEOUT_S + 2.0)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, folder):
    env = dict.fromkeys(
        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "STREAMSKETCH_NUM_THREADS"),
        "1",
    )
    with pytest.MonkeyPatch.context() as mpatch:
        for k, v in env.items():
            mpatch.setenv(k, v)
        ctx = mp.start_processes(
            _worker, args=(world, _free_port(), str(folder)), nprocs=world, join=False
        )
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                with contextlib.suppress(Exception):
                    p.kill()
            pytest.fail(f"{world} ranks did not finish within {DEADLINE_S} s (a hang?)")
    return folder


class Ranks:
    """What each rank ended with, by scenario."""

    def __init__(self, world, folder):
        self.world, self.folder = world, Path(folder)
        self.n = sum(SHARDS[world])

    def blobs(self, name):
        for r in range(self.world):
            tb = self.folder / f"{name}.{r}.tb"
            assert not tb.exists(), tb.read_text()
            err = self.folder / f"{name}.{r}.err"
            assert not err.exists(), f"rank {r}: {err.read_text()}"
        return [(self.folder / f"{name}.{r}.bin").read_bytes() for r in range(self.world)]

    def sketches(self, cls, name):
        return [cls.from_bytes(b) for b in self.blobs(name)]

    def errors(self, name, ranks=None):
        out = []
        for r in range(self.world) if ranks is None else ranks:
            f = self.folder / f"{name}.{r}.err"
            assert f.exists(), f"rank {r} did not raise in {name}"
            kind, took, msg = f.read_text().split("|", 2)
            out.append((kind, float(took), msg))
        return out


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return Ranks(2, _spawn(2, tmp_path_factory.mktemp("dist2")))


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return Ranks(4, _spawn(4, tmp_path_factory.mktemp("dist4")))


WORLDS = [
    pytest.param("ranks2", id="2proc"),
    pytest.param("ranks4", id="4proc", marks=pytest.mark.slow),
]


@pytest.fixture(params=WORLDS)
def ranks(request):
    return request.getfixturevalue(request.param)


def same_on_every_rank(blobs):
    # The tree merge and the ring all-reduce hand every rank the same bits.
    assert all(b == blobs[0] for b in blobs)


# ------------------------------------------------------------------- tests
def test_countsketch_equals_single_process(ranks):
    ref = CountSketch(D, 40, seed=3).extend(keys(ranks.n))
    blobs = ranks.blobs("countsketch")
    same_on_every_rank(blobs)
    got = CountSketch.from_bytes(blobs[0])
    np.testing.assert_allclose(got.result(), ref.result(), rtol=1e-12, atol=1e-12)
    assert (got.n_seen, got.next_index) == (ref.n_seen, ref.next_index)
    after = ranks.sketches(CountSketch, "countsketch_after")[0]
    np.testing.assert_allclose(after.result(), ref.result(), rtol=1e-12, atol=1e-12)


def test_online_ridge_leverage_gram_equals_single_process(ranks):
    ref = OnlineRidgeLeverage(D, 1e-2, refactor_every=256)
    ref.extend(keys(ranks.n))
    blobs = ranks.blobs("online")
    same_on_every_rank(blobs)
    got = OnlineRidgeLeverage.from_bytes(blobs[0])
    assert got.n_seen == ranks.n
    np.testing.assert_allclose(got.gram, ref.gram, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(got.inverse, np.linalg.inv(ref.gram), rtol=1e-9, atol=1e-12)
    X = keys(ranks.n)[:50]
    np.testing.assert_allclose(got.scores(X), ref.scores(X), rtol=1e-9)


def test_universal_set_indices_identical(ranks):
    K = keys(ranks.n)
    ref = UniversalSet(D, EPS).extend(K)
    blobs = ranks.blobs("universal")
    same_on_every_rank(blobs)
    got = UniversalSet.from_bytes(blobs[0])
    # The planted keys sit far from eps, so rounding cannot move them across it.
    tau = np.einsum("ij,ji->i", K, np.linalg.solve(K.T @ K, K.T))
    assert np.min(np.abs(tau - EPS)) > 1e-3
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.indices, np.flatnonzero(tau >= EPS))
    np.testing.assert_array_equal(got.rows, ref.rows)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9)
    assert (got.n_seen, got.next_index) == (ranks.n, ranks.n)


def fd_within_bound(A, fd):
    C = A.T @ A
    E = C - fd.covariance()
    slack = 1e-9 * np.trace(C)
    assert np.linalg.eigvalsh(E).min() >= -slack
    assert np.linalg.norm(E, 2) <= fd.error_bound + slack
    s = np.linalg.svd(A, compute_uv=False)
    for k in range(ELL):
        assert fd.error_bound <= np.sum(s[k:] ** 2) / (ELL - k) + slack


def test_frequent_directions_within_merge_bound(ranks):
    A = fd_rows(ranks.n)
    blobs = ranks.blobs("fd")
    same_on_every_rank(blobs)
    got = FrequentDirections.from_bytes(blobs[0])
    assert got.n_seen == ranks.n
    fd_within_bound(A, got)


def test_merge_reduce_tree_within_bound(ranks):
    blobs = ranks.blobs("merge_reduce")  # each rank's tree.result()
    same_on_every_rank(blobs)
    fd = FrequentDirections.from_bytes(blobs[0])
    assert fd.n_seen == ranks.n
    fd_within_bound(fd_rows(ranks.n), fd)


def test_linear_attention_state_sums(ranks):
    K, Y = keys(ranks.n), targets(ranks.n)
    ref = LinearAttentionState(CountSketch(D, 16, seed=1), 3).extend(K, Y)
    got = ranks.sketches(LinearAttentionState, "las")
    Q = K[:7]
    for g in got:
        assert g.n_seen == ranks.n
        np.testing.assert_allclose(g.query(Q), ref.query(Q), rtol=1e-10)


def test_kv_scorers_equal_one_scorer_of_all_streams(ranks):
    lev, gauss = LeverageScorer(2, 8), QueryGaussianScorer(2, 8, half_life=16.0)
    for k, q in kv(ranks.world):
        if k.shape[2]:
            lev.observe_keys(k)
            gauss.observe_queries(q[:, :, :3])
            gauss.observe_queries(q[:, :, 3:])
    for r in range(ranks.world):
        with np.load(ranks.folder / f"scorers.{r}.npz") as got:
            np.testing.assert_allclose(got["gram"], lev.gram.numpy(), rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(got["mean"], gauss.mean.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got["m2"], gauss.m2.numpy(), rtol=1e-4, atol=1e-4)
            assert float(got["count"]) == pytest.approx(gauss.count, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("seed_mismatch", "ValueError", "another seed than rank 0"),
        ("param_mismatch", "ValueError", "sketch_size=5 where rank 0 has 6"),
        ("class_mismatch", "ValueError", "a FrequentDirections where rank 0 has a UniversalSet"),
        ("refused", "TypeError", "must be a streamsketch Sketch"),
        ("op_mismatch", "ValueError", "different operations"),
        ("batch_mismatch", "ValueError", "scorer has different batch size across ranks"),
        ("overlap", "ValueError", "disjoint positions"),
    ],
)
def test_mismatch_raises_the_same_error_on_every_rank(ranks, name, kind, words):
    errors = ranks.errors(name)
    assert {e[0] for e in errors} == {kind}
    assert len({e[2] for e in errors}) == 1, errors
    assert words in errors[0][2]
    assert max(e[1] for e in errors) < RAISE_WITHIN_S


def test_seed_mismatch_names_the_rank(ranks):
    msg = ranks.errors("seed_mismatch")[0][2]
    assert f"(rank {ranks.world - 1}: another seed than rank 0)" in msg
    msg = ranks.errors("class_mismatch")[0][2]
    others = ", ".join(str(r) for r in range(1, ranks.world))
    plural = "s" if ranks.world > 2 else ""
    assert f"(rank{plural} {others}: a FrequentDirections where rank 0 has a UniversalSet)" in msg


def test_merge_to_merges_on_dst_only(ranks):
    last = ranks.world - 1
    K = keys(ranks.n)
    cs = ranks.sketches(CountSketch, "merge_to_cs")
    us = ranks.sketches(UniversalSet, "merge_to_us")
    ref_cs = CountSketch(D, 40, seed=3).extend(K)
    np.testing.assert_allclose(cs[last].result(), ref_cs.result(), rtol=1e-12, atol=1e-12)
    assert cs[last].n_seen == ranks.n
    np.testing.assert_array_equal(us[last].indices, UniversalSet(D, EPS).extend(K).indices)
    for r in range(last):
        lo, hi = shard(ranks.world, r)
        own = CountSketch(D, 40, seed=3).extend(K[lo:hi], start_index=lo)
        assert cs[r].to_bytes() == own.to_bytes()
        assert us[r].n_seen == hi - lo


def test_timeout_when_a_rank_never_calls(ranks2):
    ((kind, took, msg),) = ranks2.errors("timeout", ranks=[0])
    assert kind == "TimeoutError", msg
    assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + 5.0
    assert "did every rank" in msg


# ------------------------------------------------------------ one process
@pytest.fixture
def single_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_size_one_returns_the_sketch_unchanged(single_group):
    sk = CountSketch(D, 8, seed=0).extend(keys(50))
    before = sk.to_bytes()
    assert all_merge(sk) is sk
    assert merge_to(sk, dst=0) is sk
    assert sk.to_bytes() == before
    with pytest.raises(TypeError, match="must be a streamsketch Sketch"):
        all_merge(np.zeros(3))
    with pytest.raises(ValueError, match="dst must be a rank of the group"):
        merge_to(sk, dst=1)
    with pytest.raises(ValueError, match="timeout must be positive"):
        all_merge(sk, timeout=-1.0)
    with pytest.raises(TypeError, match="timeout must be seconds"):
        all_merge(sk, timeout="soon")


def test_uninitialised_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised.*init_process_group"):
        all_merge(CountSketch(D, 8, seed=0))


def test_descriptors_name_nested_differences():
    from streamsketch.distributed import _first_difference, _Route

    def describe(obj):
        return _Route(obj).descriptor()

    a = describe(MergeReduce(lambda: CountSketch(D, 8, seed=0), 64))
    b = describe(MergeReduce(lambda: CountSketch(D, 8, seed=1), 64))
    assert _first_difference(a, b) == "reducer: another seed than rank 0"
    c = describe(MergeReduce(lambda: CountSketch(D, 8, seed=0), 32))
    assert _first_difference(a, c) == "leaf_size=32 where rank 0 has 64"
    q = describe(QueryGaussianScorer(2, 8, half_life=16.0))
    assert _first_difference(q, describe(QueryGaussianScorer(2, 8, half_life=8.0))) == (
        "half_life=8.0 where rank 0 has 16.0"
    )
    name, fields = _serialization.loads(a)
    assert name == "MergeReduce" and set(fields) == {"param.leaf_size", "param.reducer"}
