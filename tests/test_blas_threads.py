"""single_threaded_blas: one BLAS thread inside, the original count after, across threads."""

import threading

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

import streamsketch._parallel as P  # noqa: E402
from streamsketch._parallel import single_threaded_blas  # noqa: E402
from streamsketch.rows import FrequentDirections, OnlineRidgeLeverage  # noqa: E402


def _blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def two_blas_threads():
    """Run the test with BLAS on two threads, so 'one thread' is a change that can be seen."""
    if not _blas_threads():
        pytest.skip("no BLAS library that threadpoolctl can control")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        yield


def test_limits_and_restores_nested(two_blas_threads):
    assert _blas_threads() == {2}
    with single_threaded_blas():
        assert _blas_threads() == {1}
        with single_threaded_blas():
            assert _blas_threads() == {1}
        assert _blas_threads() == {1}  # still inside the outer block
    assert _blas_threads() == {2}
    with single_threaded_blas(enabled=False):
        assert _blas_threads() == {2}


def test_overlapping_blocks_in_two_threads_restore_the_original(two_blas_threads):
    """A enters, B enters, A leaves, B leaves: the count comes back only when both have left."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with single_threaded_blas():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with single_threaded_blas():
            b_in.set()
            a_out.wait(5)
            # Still limited: B's block holds the limit although A's has ended. (Read
            # from the module, as OpenBLAS reports thread counts per calling thread.)
            seen["after A left"] = (P._BLAS_DEPTH, P._BLAS_LIMITER is not None)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["after A left"] == (1, True)
    assert P._BLAS_DEPTH == 0 and P._BLAS_LIMITER is None
    assert _blas_threads() == {2}


def test_frequent_directions_shrinks_small_buffers_on_one_thread(two_blas_threads, monkeypatch):
    seen = []
    shrink = FrequentDirections._shrink

    def spy(self):
        seen.append(_blas_threads())
        shrink(self)

    monkeypatch.setattr(FrequentDirections, "_shrink", spy)
    rng = np.random.default_rng(0)
    FrequentDirections(64, 16).extend(rng.standard_normal((200, 64)))
    assert seen and all(s == {1} for s in seen)
    assert _blas_threads() == {2}
    # A large shrink keeps the BLAS threads.
    seen.clear()
    FrequentDirections(1024, 128).extend(rng.standard_normal((300, 1024)))
    assert seen and all(s == {2} for s in seen)


def test_results_do_not_depend_on_the_blas_thread_switch(two_blas_threads, monkeypatch):
    """Same buffer bits with the switch and without it (the shrink math is unchanged)."""
    import streamsketch.rows.frequent_directions as fd_module

    X = np.random.default_rng(1).standard_normal((500, 48))
    with_switch = FrequentDirections(48, 12).extend(X)
    monkeypatch.setattr(fd_module, "SINGLE_THREAD_BLAS_WORK", 0)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        without_switch = FrequentDirections(48, 12).extend(X)
    np.testing.assert_array_equal(with_switch._buf, without_switch._buf)
    assert with_switch._stats[0] == without_switch._stats[0]  # the shrinkage total


def test_online_ridge_leverage_blocks_run_on_one_thread_up_to_width_256(
    two_blas_threads, monkeypatch
):
    seen = []
    block = OnlineRidgeLeverage._block

    def spy(self, *args):
        seen.append(_blas_threads())
        return block(self, *args)

    monkeypatch.setattr(OnlineRidgeLeverage, "_block", spy)
    rng = np.random.default_rng(0)
    for d, threads in ((8, 1), (256, 1), (512, 2)):
        seen.clear()
        ol = OnlineRidgeLeverage(d, 1.0)
        ol.extend(rng.standard_normal((300, d)))
        assert seen and all(s == {threads} for s in seen), d
        assert _blas_threads() == {2}
        # One row at a time skips the ~20 us switch: its products are vectors.
        seen.clear()
        ol.update(rng.standard_normal(d))
        assert seen == [{2}]


def test_online_ridge_leverage_scores_do_not_depend_on_the_switch(two_blas_threads, monkeypatch):
    import streamsketch.rows.online as online_module

    X = np.random.default_rng(2).standard_normal((700, 40))
    with_switch = OnlineRidgeLeverage(40, 0.5).extend(X)
    monkeypatch.setattr(online_module, "SINGLE_THREAD_BLAS_WORK", 0)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        without_switch = OnlineRidgeLeverage(40, 0.5).extend(X)
    np.testing.assert_array_equal(with_switch, without_switch)
