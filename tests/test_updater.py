import numpy as np
import pytest

from streamsketch import CountSketch, load
from streamsketch.linear.updater import LinearAttentionState


def _maps():
    """Every feature map available in this build (later modules join when present)."""
    maps = [CountSketch(6, 24, seed=1)]
    import streamsketch.linear as lin

    for name, args in (
        ("GaussianSketch", (6, 24)),
        ("SRHT", (6, 24)),
        ("TensorSketch", (6, 2, 32)),
        ("PolySketch", (6, 2, 8)),
    ):
        if hasattr(lin, name):
            maps.append(getattr(lin, name)(*args, seed=1))
    return maps


@pytest.fixture(params=_maps(), ids=lambda m: type(m).__name__)
def fmap(request):
    return request.param


def test_state_is_sum_of_outer_products(fmap, rng):
    X, Y = rng.standard_normal((300, 6)), rng.standard_normal((300, 3))
    st = LinearAttentionState(fmap, 3).extend(X, Y)
    phi = fmap.transform(X)
    S, z = st.result()
    np.testing.assert_allclose(S, phi.T @ Y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(z, phi.sum(0), rtol=1e-10, atol=1e-10)
    Q = rng.standard_normal((5, 6))
    phiq = fmap.transform(Q)
    np.testing.assert_allclose(st.query(Q, normalize=False), phiq @ phi.T @ Y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        st.query(Q), (phiq @ phi.T @ Y) / (phiq @ phi.T).sum(1)[:, None], rtol=1e-8, atol=1e-8
    )


def test_update_loop_merge_and_bytes(fmap, rng):
    X, Y = rng.standard_normal((120, 6)), rng.standard_normal((120, 2))
    whole = LinearAttentionState(fmap, 2).extend(X, Y)
    loop = LinearAttentionState(fmap, 2)
    for x, y in zip(X, Y, strict=True):
        loop.update(x, y)
    a = LinearAttentionState(fmap, 2).extend(X[:50], Y[:50])
    b = LinearAttentionState(fmap, 2).extend(X[50:], Y[50:])
    merged = a.merge(b)
    for other in (loop, merged):
        np.testing.assert_allclose(other.result()[0], whole.result()[0], atol=1e-10)
        assert other.n_seen == 120
    back = load(whole.to_bytes())
    assert isinstance(back, LinearAttentionState)
    assert back.result()[0].tobytes() == whole.result()[0].tobytes()
    np.testing.assert_array_equal(back.feature_map.transform(X), fmap.transform(X))


def test_rejections_leave_state_unchanged(rng):
    st = LinearAttentionState(CountSketch(4, 8, seed=0), 2).extend(np.ones((3, 4)), np.ones((3, 2)))
    before = st.result()[0]
    with pytest.raises(ValueError, match="as many rows"):
        st.extend(np.ones((3, 4)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="Y contains NaN"):
        st.extend(np.ones((3, 4)), np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="y must have length 2"):
        st.update(np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match="different seed"):
        st.merge(LinearAttentionState(CountSketch(4, 8, seed=1), 2))
    with pytest.raises(TypeError, match="feature_map must be"):
        LinearAttentionState(np.eye(3), 2)
    assert np.array_equal(st.result()[0], before) and st.n_seen == 3


def test_row_sketch_stream_state_is_not_the_map(rng):
    cs = CountSketch(4, 8, seed=0)
    st = LinearAttentionState(cs, 1)
    cs.extend(rng.standard_normal((10, 4)))  # the user's sketch goes on streaming
    fresh = LinearAttentionState(CountSketch(4, 8, seed=0), 1)
    st.merge(fresh)  # still compatible: only parameters and seed matter
