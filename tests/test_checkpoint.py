"""Checkpointing (issue 8): ``to_bytes`` anywhere, ``from_bytes`` and carry on.

A worker that checkpoints with ``to_bytes`` and crashes loses nothing it had
checkpointed: loading the last blob and replaying the rows fed since gives the
same final bytes (bit for bit) as a stream that never stopped, for every
serialisable class, wherever the chunks are cut and wherever the checkpoint
and the crash fall (hypothesis draws them). Merges and sharded positions are
checkpointed too.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    load,
)

D = 4
N = 90


def _las(dt):
    return LinearAttentionState(TensorSketch(D, 2, 8, seed=5), 2, dtype=dt)


MAKERS = {
    "CountSketch": lambda dt: CountSketch(D, 8, dtype=dt, seed=1),
    "GaussianSketch": lambda dt: GaussianSketch(D, 6, dtype=dt, seed=2),
    "SRHT": lambda dt: SRHT(D, 8, dtype=dt, seed=3),
    "LinearAttentionState": _las,
    "OnlineRidgeLeverage": lambda dt: OnlineRidgeLeverage(D, 0.05, dtype=dt, refactor_every=17),
    "FrequentDirections": lambda dt: FrequentDirections(D, 2, dtype=dt),
    "UniversalSet": lambda dt: UniversalSet(D, 0.25, dtype=dt),
    "UniversalSet-p1": lambda dt: UniversalSet(D, 0.4, p=1.0, dtype=dt),
    "UniversalSet-p3": lambda dt: UniversalSet(D, 0.4, p=3.0, dtype=dt),
    "UniversalSet-capacity": lambda dt: UniversalSet(D, 0.0, capacity=5, dtype=dt),
    "MergeReduce-FD": lambda dt: MergeReduce(lambda: FrequentDirections(D, 2, dtype=dt), 7),
    "MergeReduce-US": lambda dt: MergeReduce(lambda: UniversalSet(D, 0.25, dtype=dt), 7),
}
CASES = [(name, dt) for name in MAKERS for dt in (np.float64, np.float32)]
CASE_IDS = [f"{n}-{'f64' if dt == np.float64 else 'f32'}" for n, dt in CASES]

STREAM = (
    np.random.default_rng(11).standard_normal((N, D))
    * np.exp(np.random.default_rng(12).uniform(-2, 2, N))[:, None]
)


def _feed(sk, X):
    """One chunk: ``update`` for single rows (another code path), ``extend`` otherwise."""
    if isinstance(sk, LinearAttentionState):
        Y = X[:, :2] * 0.5
        return sk.update(X[0], Y[0]) if len(X) == 1 else sk.extend(X, Y)
    if len(X) == 1:
        return sk.update(X[0])
    return sk.extend(X)


def _returned(out):
    return None if out is None or not isinstance(out, (np.ndarray, float)) else np.asarray(out)


def _same(a, b):
    if a is None or b is None:
        return a is b
    return np.array_equal(a, b)


@st.composite
def schedules(draw):
    """Chunk cuts, the chunk after which the blob is written, and the crash point."""
    cuts = sorted(draw(st.sets(st.integers(1, N - 1), max_size=8)))
    bounds = [0, *cuts, N]
    chunks = list(itertools.pairwise(bounds))
    checkpoint = draw(st.integers(0, len(chunks)))
    crash = draw(st.integers(checkpoint, len(chunks)))
    return chunks, checkpoint, crash


def _resume_equals_uninterrupted(name, dt, schedule):
    chunks, checkpoint, crash = schedule
    make = MAKERS[name]
    ref = make(dt)
    ref_out = [_returned(_feed(ref, STREAM[lo:hi])) for lo, hi in chunks]
    worker, blob = make(dt), None
    for i, (lo, hi) in enumerate(chunks):
        if i == checkpoint:
            blob = worker.to_bytes()
        if i == crash:
            break  # the process dies: everything after the checkpoint is lost
        _feed(worker, STREAM[lo:hi])
    if blob is None:  # checkpoint after the last chunk
        blob = worker.to_bytes()
    resumed = load(blob)
    assert type(resumed) is type(ref)
    assert type(resumed).from_bytes(blob).to_bytes() == blob
    for i, (lo, hi) in enumerate(chunks[checkpoint:], start=checkpoint):
        assert _same(_returned(_feed(resumed, STREAM[lo:hi])), ref_out[i])
    assert resumed.n_seen == ref.n_seen == N
    assert resumed.to_bytes() == ref.to_bytes()


def _settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


@pytest.mark.parametrize(("name", "dt"), CASES, ids=CASE_IDS)
@_settings(12)
@given(schedule=schedules())
def test_resume_from_checkpoint_is_bit_identical(name, dt, schedule):
    _resume_equals_uninterrupted(name, dt, schedule)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dt"), CASES, ids=CASE_IDS)
@_settings(150)
@given(schedule=schedules())
def test_resume_from_checkpoint_is_bit_identical_many(name, dt, schedule):
    _resume_equals_uninterrupted(name, dt, schedule)


POSITIONAL = ("CountSketch", "GaussianSketch", "SRHT", "UniversalSet", "MergeReduce-US")


@pytest.mark.parametrize("name", [n for n in MAKERS if n.startswith(POSITIONAL)])
@_settings(10)
@given(split=st.integers(1, N - 1), crash=st.integers(0, 3))
def test_sharded_worker_resumes_from_checkpoint_and_merges(name, split, crash):
    """Two workers own positions [0, split) and [split, N); the second one crashes."""
    make = MAKERS[name]
    a, b = make(np.float64), make(np.float64)
    a.extend(STREAM[:split])
    pieces = np.array_split(np.arange(split, N), 4)
    b_ref = make(np.float64)
    for p in pieces:
        if p.size:
            b_ref.extend(STREAM[p], start_index=int(p[0]))
    blob = None
    for i, p in enumerate(pieces):
        if i == crash:
            blob = b.to_bytes()
            break
        if p.size:
            b.extend(STREAM[p], start_index=int(p[0]))
    b2 = load(blob)
    for p in pieces[crash:]:
        if p.size:
            b2.extend(STREAM[p], start_index=int(p[0]))
    assert b2.to_bytes() == b_ref.to_bytes()
    merged = a.copy().merge(b2)
    assert merged.to_bytes() == a.copy().merge(b_ref).to_bytes()
    assert load(merged.to_bytes()).to_bytes() == merged.to_bytes()


@pytest.mark.parametrize(("name", "dt"), CASES, ids=CASE_IDS)
def test_checkpoint_after_merge_then_continue(name, dt):
    make = MAKERS[name]
    x1, x2, x3 = STREAM[:30], STREAM[30:60], STREAM[60:]

    def run(checkpoint: bool):
        a, b = make(dt), make(dt)
        _feed(a, x1)
        if name.startswith(POSITIONAL):  # shards own their stream positions
            b.extend(x2, start_index=30)
        else:
            _feed(b, x2)
        a.merge(b)
        if checkpoint:
            a = load(a.to_bytes())
        _feed(a, x3)
        return a.to_bytes()

    assert run(True) == run(False)


@pytest.mark.parametrize(
    "fmap",
    [
        TensorSketch(D, 3, 16, seed=1),
        PolySketch(D, 4, 6, symmetric=True, seed=2),
        CountSketch(D, 8, seed=3),
        SRHT(D, 8, dtype=np.float32, seed=4),
    ],
    ids=["TensorSketch", "PolySketch", "CountSketch", "SRHT"],
)
def test_feature_maps_reload_to_the_same_map(fmap):
    again = load(fmap.to_bytes())
    assert np.array_equal(again.transform(STREAM), fmap.transform(STREAM))
