"""Concurrency (issue 8): what may be shared between threads, and that it works.

The contract (``docs/reliability.md``):

- distinct objects may be driven from different threads at the same time;
  their results are bit-identical to running them one after the other (the
  compiled kernels release the GIL and the library's worker pool is shared
  safely; no result depends on the thread count);
- one object that no thread mutates may be read from many threads at once
  (``transform``, ``result``, ``scores``, ``to_bytes``, ``copy``...);
- one object must not be mutated (``update``, ``extend``, ``merge``,
  ``refactor``, the KV selector's ``update``) while another thread uses it:
  guard it with a lock.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from streamsketch import (
    SRHT,
    CountSketch,
    FrequentDirections,
    GaussianSketch,
    LinearAttentionState,
    MergeReduce,
    OnlineRidgeLeverage,
    PolySketch,
    TensorSketch,
    UniversalSet,
)

D = 16

MAKERS = {
    "CountSketch": lambda: CountSketch(D, 64, seed=1),
    "GaussianSketch": lambda: GaussianSketch(D, 32, seed=2),
    "SRHT": lambda: SRHT(D, 64, seed=3),
    "LinearAttentionState": lambda: LinearAttentionState(TensorSketch(D, 2, 64, seed=4), 3),
    "OnlineRidgeLeverage": lambda: OnlineRidgeLeverage(D, 1e-2),
    "FrequentDirections": lambda: FrequentDirections(D, 8),
    "UniversalSet": lambda: UniversalSet(D, 0.05),
    "UniversalSet-capacity": lambda: UniversalSet(D, 0.0, capacity=40),
    "MergeReduce": lambda: MergeReduce(lambda: FrequentDirections(D, 8), 5000),
}


def _stream(seed, n=40_000):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, D))
    X[rng.integers(0, n, 20)] *= 40.0
    return X


def _drive(sk, X, chunk=4096):
    for lo in range(0, X.shape[0], chunk):
        if isinstance(sk, LinearAttentionState):
            sk.extend(X[lo : lo + chunk], X[lo : lo + chunk, :3])
        else:
            sk.extend(X[lo : lo + chunk])
    return sk


def _in_threads(jobs):
    """Run callables in threads released together; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_two_threads_extend_distinct_sketches_like_sequential(name):
    make = MAKERS[name]
    X1, X2 = _stream(1), _stream(2)
    seq = [_drive(make(), X1).to_bytes(), _drive(make(), X2).to_bytes()]
    for _ in range(2):
        par = _in_threads([lambda: _drive(make(), X1), lambda: _drive(make(), X2)])
        assert [p.to_bytes() for p in par] == seq


def test_threads_mixing_every_class_at_once():
    """Every class in its own thread, all running together: the shared pool holds up."""
    X = _stream(5, 20_000)
    names = sorted(MAKERS)
    seq = {n: _drive(MAKERS[n](), X).to_bytes() for n in names}
    par = _in_threads([lambda n=n: _drive(MAKERS[n](), X) for n in names])
    assert {n: p.to_bytes() for n, p in zip(names, par, strict=True)} == seq


def test_shared_read_only_objects_from_many_threads():
    X = _stream(3, 5000)
    Q = _stream(4, 300)
    fmaps = [
        CountSketch(D, 64, seed=1),
        GaussianSketch(D, 32, seed=2),
        SRHT(D, 64, seed=3),
        TensorSketch(D, 3, 64, seed=4),
        PolySketch(D, 4, 8, seed=5),
    ]
    ol = _drive(OnlineRidgeLeverage(D, 1e-2), X)
    fd = _drive(FrequentDirections(D, 8), X)
    us = _drive(UniversalSet(D, 0.05), X)
    las = _drive(LinearAttentionState(PolySketch(D, 2, 8, seed=6), 3), X)

    def reads():
        return (
            [f.transform(Q) for f in fmaps],
            ol.scores(Q),
            fd.ridge_leverage(Q, 0.5),
            fd.sketch(),
            us.indices,
            las.query(Q),
            [o.to_bytes() for o in (ol, fd, us, las)],
        )

    want = reads()
    for got in _in_threads([reads] * 6):
        for a, b in zip(_flat(got), _flat(want), strict=True):
            assert (a == b) if isinstance(a, bytes) else np.array_equal(a, b, equal_nan=True)


def _flat(xs):
    for x in xs:
        if isinstance(x, list):
            yield from _flat(x)
        else:
            yield x


def test_one_sketch_shared_under_a_lock_equals_the_sum_of_its_parts():
    """Mutating one object from several threads is fine when a lock serialises it."""
    lock = threading.Lock()
    sk = CountSketch(D, 64, seed=7)
    X = _stream(6, 32_000)
    parts = np.array_split(np.arange(X.shape[0]), 8)

    def job(idx):
        def run():
            for lo in range(0, idx.size, 1000):
                rows = idx[lo : lo + 1000]
                with lock:
                    sk.extend(X[rows], start_index=int(rows[0]))

        return run

    _in_threads([job(p) for p in parts])
    ref = CountSketch(D, 64, seed=7).extend(X).result()
    np.testing.assert_allclose(sk.result(), ref, rtol=1e-12, atol=1e-9)
    assert sk.n_seen == X.shape[0]


def test_kv_selectors_in_threads_like_sequential():
    torch = pytest.importorskip("torch")
    from streamsketch.kv import KeySelector

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(1, 4, 3000, 16, generator=gen)
        k = torch.randn(1, 2, 3000, 16, generator=gen)
        v = torch.randn(1, 2, 3000, 16, generator=gen)
        sel = KeySelector(2, 16, 32, sinks=4, window=16, scorer="leverage+query")
        for lo in range(0, 3000, 100):
            sel.update(k[:, :, lo : lo + 100], v[:, :, lo : lo + 100], q[:, :, lo : lo + 100])
        return sel.positions.clone(), sel.keys.clone()

    seq = [run(1), run(2)]
    par = _in_threads([lambda: run(1), lambda: run(2)])
    for (p1, k1), (p2, k2) in zip(par, seq, strict=True):
        assert torch.equal(p1, p2) and torch.equal(k1, k2)
