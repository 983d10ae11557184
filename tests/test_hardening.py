"""Regression tests for failure modes found in review: untrusted bytes, overflow, fork, threads."""

import multiprocessing as mp

import numpy as np
import pytest

import streamsketch._parallel as parallel
from streamsketch import CountSketch, load
from streamsketch._serialization import dumps, loads
from streamsketch.linear import SRHT, GaussianSketch, LinearAttentionState, PolySketch, TensorSketch


def _edit(blob, **changes):
    name, fields = loads(blob)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is KeyError:
            del fields[k]
        else:
            fields[k] = v
    return dumps(name, fields)


@pytest.mark.parametrize(
    "obj, change",
    [
        (CountSketch(3, 4, seed=0), {"param__sketch_size": 2**20, "param__n_features": 2**20}),
        (SRHT(1, 4, seed=0), {"param__sketch_size": 2**40}),
        (TensorSketch(3, 2, 8, seed=0), {"param__n_features": 2**40}),
        (PolySketch(3, 4, 8, seed=0), {"param__sketch_size": 2**16, "param__degree": 64}),
    ],
)
def test_parameters_implying_huge_allocations_are_refused_before_allocating(obj, change):
    with pytest.raises(ValueError, match="workspace"):
        load(_edit(obj.to_bytes(), **change))


def test_nested_map_must_be_a_feature_map_and_empty():
    las = LinearAttentionState(CountSketch(3, 4, seed=0), 2)
    inner = LinearAttentionState(CountSketch(3, 4, seed=0), 2).to_bytes()
    with pytest.raises(ValueError, match="not a FeatureMap"):
        load(_edit(las.to_bytes(), param__feature_map=inner))
    busy = CountSketch(3, 4, seed=0).extend(np.ones((2, 3))).to_bytes()
    with pytest.raises(ValueError, match="empty map"):
        load(_edit(las.to_bytes(), param__feature_map=busy))


def test_parameters_must_round_trip_exactly():
    blob = CountSketch(3, 4, dtype=np.float32, seed=0).to_bytes()
    for change in (
        {"param__seed_key": KeyError},  # would otherwise draw fresh entropy
        {"param__dtype": KeyError},  # would otherwise default to float64
        {"param__seed_key": True},
        {"param__dtype": "f8,("},  # numpy would parse this with ast
        {"scalar__n_seen": True},
        {"param__extra": 1},
    ):
        with pytest.raises(ValueError):
            load(_edit(blob, **change))


def test_dtype_argument_is_strict():
    for bad in (None, "f8,(", "int32", np.float16):
        with pytest.raises(TypeError, match="dtype must be float32 or float64"):
            CountSketch(3, 4, dtype=bad)
    assert CountSketch(3, 4, dtype="f4").dtype == np.float32


@pytest.mark.parametrize("cls", [CountSketch, GaussianSketch, SRHT])
def test_state_overflow_refused_and_state_kept(cls):
    sk = cls(1, 1, dtype=np.float32, seed=0)
    x = np.full((100, 1), 1.5e38, np.float32)
    with pytest.raises(ValueError, match="overflow"):
        for _ in range(1000):
            before = sk.result()
            sk.extend(x)
    assert np.isfinite(sk.result()).all() and np.array_equal(sk.result(), before)


def test_float32_sketch_names_range_problem():
    sk = CountSketch(2, 4, dtype=np.float32, seed=0)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        sk.extend(np.array([[1.0, 1e300]]))
    assert sk.n_seen == 0


def test_masked_arrays_refused():
    X = np.ma.masked_array([[1.0, 2.0]], mask=[[False, True]])
    with pytest.raises(TypeError, match="masked"):
        CountSketch(2, 4, seed=0).extend(X)


def test_countsketch_bits_do_not_depend_on_thread_count(monkeypatch, rng):
    A = rng.standard_normal((70000, 3))
    ref = CountSketch(3, 32, seed=2).extend(A, start_index=5).result()
    import sys

    cs = sys.modules["streamsketch.linear.countsketch"]

    for threads in (1, 3):
        monkeypatch.setattr(cs, "num_threads", lambda t=threads: t)
        monkeypatch.setattr(parallel, "num_threads", lambda t=threads: t)
        out = CountSketch(3, 32, seed=2).extend(A, start_index=5).result()
        assert out.tobytes() == ref.tobytes()


def _child_extend(queue):
    A = np.ones((200000, 4))
    queue.put(float(CountSketch(4, 8, seed=0).extend(A).result().sum()))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_child_can_use_the_thread_pool():
    CountSketch(4, 8, seed=0).extend(np.ones((200000, 4)))  # parent pool is up
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_extend, args=(q,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "child hung on the inherited thread pool"
    assert q.get(timeout=5) == pytest.approx(
        float(CountSketch(4, 8, seed=0).extend(np.ones((200000, 4))).result().sum())
    )


def test_user_class_cannot_hijack_library_name():
    import streamsketch

    class CountSketch(streamsketch.CountSketch):  # same name, defined by a user
        pass

    blob = CountSketch(3, 4, seed=0).to_bytes()
    assert type(load(blob)) is streamsketch.CountSketch


@pytest.mark.parametrize(
    "obj, change",
    [
        ("FrequentDirections(4, 2)", {"param__sketch_size": 2**30}),
        ("OnlineRidgeLeverage(4, 1.0)", {"param__n_features": 2**20}),
        ("UniversalSet(4, 0.5)", {"param__eps": 1e-12}),
        ("UniversalSet(4, 0.5)", {"param__n_features": 2**20}),
    ],
)
def test_row_sketch_parameters_implying_huge_buffers_are_refused(obj, change):
    import streamsketch

    blob = eval(obj, vars(streamsketch)).to_bytes()
    with pytest.raises(ValueError, match="workspace|bad parameters"):
        load(_edit(blob, **change))


def test_nested_merge_reduce_blobs_are_refused():
    from streamsketch import FrequentDirections, MergeReduce

    inner = MergeReduce(lambda: FrequentDirections(3, 2), 4)
    with pytest.raises(TypeError, match="make\\(\\) must return a Sketch"):
        MergeReduce(lambda: inner, 4)
    outer = MergeReduce(lambda: FrequentDirections(3, 2), 4).to_bytes()
    with pytest.raises(ValueError, match="cannot be a MergeReduce"):
        load(_edit(outer, param__reducer=inner.to_bytes()))


def test_forged_frequent_directions_buffer_is_refused():
    from streamsketch import FrequentDirections

    fd = FrequentDirections(3, 2).extend(np.arange(12.0).reshape(4, 3))
    name, fields = loads(fd.to_bytes())
    fields["array.buffer"] = fields["array.buffer"] * 1e100
    with pytest.raises(ValueError, match="exceed the stream's norm"):
        load(dumps(name, fields))


def test_frequent_directions_buffer_whose_square_overflows_is_refused():
    # Found by the slow byte fuzzer: an entry near -1.6e308 squared to inf
    # with a RuntimeWarning instead of a clean refusal.
    from streamsketch import FrequentDirections

    fd = FrequentDirections(4, 2).extend(np.arange(4.0).reshape(1, 4))
    name, fields = loads(fd.to_bytes())
    fields["array.buffer"] = fields["array.buffer"].copy()
    fields["array.buffer"][0, 0] = -1.6e308
    with pytest.raises(ValueError, match="exceed the stream's norm"):
        load(dumps(name, fields))


def test_reductions_do_not_depend_on_thread_count(monkeypatch, rng):
    from streamsketch import UniversalSet

    X = rng.standard_normal((40000, 16))
    ref = UniversalSet(16, 0.002).extend(X).to_bytes()
    for threads in (1, 3):
        monkeypatch.setattr(parallel, "num_threads", lambda t=threads: t)
        assert UniversalSet(16, 0.002).extend(X).to_bytes() == ref
