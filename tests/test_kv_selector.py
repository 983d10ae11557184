"""KeySelector and scorers: layout, capacity, exact scorer states, merges, errors."""

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamsketch.kv import (  # noqa: E402
    SCORERS,
    KeySelector,
    KNormScorer,
    LeverageScorer,
    QueryGaussianScorer,
    QueryMeanScorer,
)
from streamsketch.kv.evaluate import (  # noqa: E402
    attention_mass_kept,
    foresight_mass_kept,
    oracle_mass_kept,
)

QUERY_SCORERS = [name for name, cls in SCORERS.items() if cls.needs_queries]


def _stream(n, B=2, Hkv=2, g=2, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, n, d, generator=gen).to(dtype)
    q = torch.randn(B, Hkv * g, n, d, generator=gen).to(dtype)
    return q, k, v


def _feed(sel, q, k, v, weights=False):
    """One update, feeding attention weights over the physical keys for h2o."""
    if not weights:
        return sel.update(k, v, queries=q)
    sel.append(k, v)
    sel.observe_queries(q)
    Hq, d = q.shape[1], q.shape[3]
    keys = sel.keys.repeat_interleave(Hq // sel.num_kv_heads, dim=1)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(d)
    sel.observe_attention(torch.softmax(logits, -1))
    sel.compress()
    return sel.keys, sel.values, sel.positions


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_capacity_and_layout_over_long_stream(scorer):
    sinks, budget, window = 3, 10, 5
    sel = KeySelector(2, 8, budget, sinks=sinks, window=window, scorer=scorer)
    q, k, v = _stream(400)
    h2o = scorer == "h2o"
    # Prefill a chunk, then decode one token at a time.
    _feed(sel, q[:, :, :50], k[:, :, :50], v[:, :, :50], h2o)
    assert len(sel) == sinks + budget + window
    for t in range(50, 400):
        keys, values, pos = _feed(
            sel, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], h2o
        )
        assert keys.shape == (2, 2, sinks + budget + window, 8)
        assert sel.n_seen == t + 1
        # Layout [sinks | selected | window ring], each region in no fixed order: the sinks
        # stay in their slots, every one of the last `window` tokens is held, no token twice.
        assert torch.equal(pos[..., :sinks], torch.arange(sinks).expand(2, 2, sinks))
        recent = torch.arange(t + 1 - window, t + 1)
        assert bool((pos[..., :, None] == recent).any(dim=-2).all())
        assert bool((torch.sort(pos, dim=-1).values.diff(dim=-1) > 0).all())
        assert bool((pos >= 0).all()) and bool((pos <= t).all())
        idx = pos[..., None].expand(-1, -1, -1, 8)
        assert torch.equal(keys, torch.gather(k, 2, idx))
        assert torch.equal(values, torch.gather(v, 2, idx))


def test_short_streams_keep_everything():
    sel = KeySelector(2, 8, budget=4, sinks=2, window=3, scorer="knorm")
    _, k, v = _stream(9)
    for t in range(9):
        keys, _, pos = sel.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert keys.shape[2] == min(t + 1, 9)
        assert torch.equal(pos[0, 0], torch.arange(t + 1))
    keys, _, pos = sel.update(k[:, :, :1], v[:, :, :1])
    assert keys.shape[2] == 9 and sel.n_seen == 10


@pytest.mark.parametrize("scorer", ["knorm", "window"])
def test_static_scores_chunking_invariant(scorer):
    """With scores that do not change, streaming top-budget equals one-shot top-budget."""
    _, k, v = _stream(300, seed=3)
    one = KeySelector(2, 8, 20, sinks=4, window=16, scorer=scorer)
    one.update(k, v)
    many = KeySelector(2, 8, 20, sinks=4, window=16, scorer=scorer)
    for lo in range(0, 300, 7):
        many.update(k[:, :, lo : lo + 7], v[:, :, lo : lo + 7])
    assert torch.equal(one.positions, many.positions)
    assert torch.equal(one.keys, many.keys)
    if scorer == "knorm":
        # The selected keys are the smallest-norm older keys.
        norms = torch.linalg.vector_norm(k[..., 4 : 300 - 16, :], dim=-1)
        want = torch.sort(torch.topk(-norms, 20, dim=-1).indices, dim=-1).values + 4
        assert torch.equal(one.positions[..., 4:-16], want)


def test_leverage_scorer_matches_exact_ridge_leverage():
    _, k, _ = _stream(200, B=1, Hkv=2, d=6, seed=5)
    sc = LeverageScorer(2, 6, ridge=1e-2)
    for lo in range(0, 200, 37):
        sc.observe_keys(k[:, :, lo : lo + 37])
    got = sc.score(k, torch.zeros(1, 2, 200, dtype=torch.long)).numpy()
    for h in range(2):
        K = k[0, h].double().numpy()
        G = K.T @ K
        lam = 1e-2 * np.trace(G) / 6
        want = np.einsum("ij,jk,ik->i", K, np.linalg.inv(G + lam * np.eye(6)), K)
        np.testing.assert_allclose(got[0, h], want, rtol=1e-4)


@pytest.mark.parametrize("half_life", [None, 7.0])
def test_query_moments_streaming_equals_exact(half_life):
    q, k, _ = _stream(120, B=2, Hkv=1, g=3, d=5, seed=2)
    sc = QueryGaussianScorer(1, 5, half_life=half_life)
    sc.observe_keys(k[:, :, :1])
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 120)]:
        sc.observe_queries(q[:, :, lo:hi])
    Q = q.double()
    if half_life is None:
        w = torch.ones(120, dtype=torch.float64)
    else:
        w = 2.0 ** (-torch.arange(119, -1, -1, dtype=torch.float64) / half_life)
    mean = (Q * w[:, None]).sum(2) / w.sum()
    C = Q - mean[:, :, None]
    m2 = (C * w[:, None]).transpose(-1, -2) @ C
    assert sc.count == pytest.approx(float(w.sum()), rel=1e-9)
    torch.testing.assert_close(sc.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sc.m2.double(), m2, rtol=1e-4, atol=1e-4)
    # The Gaussian score is log E exp(s q.k) under N(mean, cov), log-sum-exp over the group.
    keys = k[:, :, :4].double()
    cov = m2 / w.sum()
    s = 1 / math.sqrt(5)
    a = s * torch.einsum("bhd,bkmd->bhm", mean, keys) + 0.5 * s * s * torch.einsum(
        "bkmd,bhde,bkme->bhm", keys, cov, keys
    )
    want = torch.logsumexp(a, dim=1, keepdim=True)
    got = sc.score(k[:, :, :4], torch.zeros(2, 1, 4, dtype=torch.long))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [QueryMeanScorer, QueryGaussianScorer, LeverageScorer])
def test_merge_equals_one_stream(cls):
    q, k, _ = _stream(90, seed=7)
    a, b, whole = (cls(2, 8) for _ in range(3))
    for sc, lo, hi in ((a, 0, 50), (b, 50, 90), (whole, 0, 90)):
        sc.observe_keys(k[:, :, lo:hi])
        sc.observe_queries(q[:, :, lo:hi])
    before = {name: t.clone() for name, t in b.state().items()}
    a.merge(b)
    for name, t in whole.state().items():
        torch.testing.assert_close(a.state()[name], t, rtol=1e-5, atol=1e-4)
    for name, t in b.state().items():
        assert torch.equal(t, before[name])
    with pytest.raises(TypeError, match="merge"):
        a.merge(KNormLike())
    with pytest.raises(ValueError, match="head"):
        a.merge(cls(2, 4))


class KNormLike(QueryMeanScorer.__mro__[-2]):  # the Scorer base
    def __init__(self):
        super().__init__(2, 8)


def test_value_weighting_ranks_by_value_size_or_distance_from_the_mean():
    """Equal keys: the value term alone ranks them, uncentred by ||v||, centred by ||v - v_bar||."""
    keys = torch.ones(1, 1, 3, 2)
    values = torch.tensor([[[[10.0, 0.0], [10.5, 0.0], [0.0, 0.0]]]])
    pos = torch.arange(3).view(1, 1, 3)
    plain = KNormScorer(1, 2, value_weighted=True, value_centred=False)
    centred = KNormScorer(1, 2, value_weighted=True)  # centred by default
    off = KNormScorer(1, 2)
    for sc in (plain, centred, off):
        sc.observe_keys(keys)
    assert plain.score(keys, pos, values=values).argsort(-1).tolist() == [[[2, 0, 1]]]
    # Mean value (6.83, 0): the zero value is farthest from it.
    assert centred.score(keys, pos, values=values).argsort(-1).tolist() == [[[0, 1, 2]]]
    s = off.score(keys, pos, values=values)
    assert bool((s == s[..., :1]).all())  # no value term: all equal
    with pytest.raises(TypeError, match="value_centred"):
        KNormScorer(1, 2, value_centred=1)
    # It reaches the scorer through SketchCache-style keyword arguments.
    sel = KeySelector(1, 2, 2, scorer="query", scorer_kwargs={"value_centred": False})
    assert not sel.scorer.value_centred and sel.scorer.value_weighted
    assert KeySelector(1, 2, 2, scorer="query").scorer.value_centred


def test_merge_refuses_other_half_life():
    a, b = QueryMeanScorer(1, 4, half_life=8), QueryMeanScorer(1, 4, half_life=16)
    q = torch.randn(1, 1, 3, 4)
    a.observe_queries(q)
    b.observe_queries(q)
    mean = a.mean.clone()
    with pytest.raises(ValueError, match="half_life"):
        a.merge(b)
    assert torch.equal(a.mean, mean)


def test_state_is_constant_size():
    sel = KeySelector(3, 16, budget=32, sinks=4, window=8, scorer="leverage+query")
    q, k, v = _stream(2000, B=1, Hkv=3, g=3, d=16, seed=1)
    sel.update(k[:, :, :100], v[:, :, :100], queries=q[:, :, :100])
    size = sel.nbytes
    for lo in range(100, 2000, 50):
        sel.update(k[:, :, lo : lo + 50], v[:, :, lo : lo + 50], queries=q[:, :, lo : lo + 50])
        assert sel.nbytes == size
    # O(d^2) scorer state per query head: mean and second moment, float32.
    assert sel.scorer.nbytes == 4 * 9 * (16 + 16 * 16) + 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cache_float32_state(dtype):
    q, k, v = _stream(200, dtype=dtype)
    sel = KeySelector(2, 8, 16, sinks=2, window=8, scorer="leverage+query")
    keys, values, _ = sel.update(k, v, queries=q)
    assert keys.dtype == dtype and values.dtype == dtype
    assert all(
        t.dtype == torch.float32 for t in sel.scorer.state().values() if t.is_floating_point()
    )
    assert keys.shape[2] == 26


def test_errors_name_argument_and_leave_state():
    q, k, v = _stream(40)
    sel = KeySelector(2, 8, 8, sinks=2, window=4, scorer="query")
    sel.update(k[:, :, :20], v[:, :, :20], queries=q[:, :, :20])
    snap = (sel.keys.clone(), sel.positions.clone(), sel.scorer.mean.clone(), sel.n_seen)
    bad_calls = [
        (ValueError, "queries", lambda: sel.update(k[:, :, 20:21], v[:, :, 20:21])),
        (
            ValueError,
            "queries",
            lambda: sel.update(k[:, :, 20:21], v[:, :, 20:21], q[:, :3, 20:21]),
        ),
        (ValueError, "keys", lambda: sel.update(k[:, :1, 20:21], v[:, :1, 20:21], q[:, :, 20:21])),
        (ValueError, "values", lambda: sel.update(k[:, :, 20:22], v[:, :, 20:21], q[:, :, 20:22])),
        (
            TypeError,
            "keys",
            lambda: sel.update(k[:, :, 20:21].numpy(), v[:, :, 20:21], q[:, :, 20:21]),
        ),
        (
            TypeError,
            "keys",
            lambda: sel.update(k[:, :, 20:21].long(), v[:, :, 20:21], q[:, :, 20:21]),
        ),
        (ValueError, "at least one", lambda: sel.update(k[:, :, :0], v[:, :, :0], q[:, :, :0])),
        (
            ValueError,
            "batch",
            lambda: sel.update(k[:1, :, 20:21], v[:1, :, 20:21], q[:1, :, 20:21]),
        ),
    ]
    for exc, match, call in bad_calls:
        with pytest.raises(exc, match=match):
            call()
        assert torch.equal(sel.keys, snap[0]) and torch.equal(sel.positions, snap[1])
        assert torch.equal(sel.scorer.mean, snap[2]) and sel.n_seen == snap[3]
    for kwargs, match in (
        ({"budget": -1}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"budget": 4, "sinks": -1}, "sinks"),
        ({"budget": 4, "scorer": "nope"}, "scorer"),
        ({"budget": 4, "dtype": torch.int32}, "dtype"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            KeySelector(2, 8, **kwargs)


@pytest.mark.parametrize("scorer", ["leverage+query", "knorm"])
def test_a_decode_step_checks_each_tensor_once(scorer, monkeypatch):
    """The selector validates at its boundary; the scorer does not check the same tensors again."""
    import streamsketch.kv.scorers as scorers_mod
    import streamsketch.kv.selector as selector_mod

    q, k, v = _stream(40)
    sel = KeySelector(2, 8, 8, sinks=2, window=4, scorer=scorer, interval=1)
    sel.update(k[:, :, :30], v[:, :, :30], queries=q[:, :, :30])
    seen = []

    def counting(name, t):
        seen.append(name)
        return check_head_tensor(name, t)

    check_head_tensor = scorers_mod.check_head_tensor
    monkeypatch.setattr(scorers_mod, "check_head_tensor", counting)
    monkeypatch.setattr(selector_mod, "check_head_tensor", counting)
    sel.update(k[:, :, 30:31], v[:, :, 30:31], queries=q[:, :, 30:31])
    assert sorted(seen) == ["keys", "queries", "values"]
    # The split path of a cache: append, then the queries observed on their own.
    seen.clear()
    sel.append(k[:, :, 31:32], v[:, :, 31:32])
    sel.observe_queries(q[:, :, 31:32])
    sel.compress()
    assert sorted(seen) == ["keys", "queries", "values"]
    with pytest.raises(ValueError, match="queries"):
        sel.observe_queries(q[:, :3, 32:33])
    with pytest.raises(ValueError, match="batch"):
        sel.observe_queries(q[:1, :, 32:33])


def test_mass_kept_measure_bounds():
    """Mass kept is in [0, 1], reaches 1 with room for everything, and the oracle bounds it."""
    q, k, v = _stream(160, B=1, Hkv=2, g=2, d=8, seed=4)
    k[..., 0] *= 3.0
    full = attention_mass_kept(
        q, k, v, lambda: KeySelector(2, 8, 200, sinks=4, window=8), prefill=60
    )
    torch.testing.assert_close(full, torch.ones_like(full))
    for scorer in ("window", "knorm", "query", "leverage"):
        m = attention_mass_kept(
            q, k, v, lambda s=scorer: KeySelector(2, 8, 12, sinks=4, window=8, scorer=s), prefill=60
        )
        assert m.shape == (1, 4, 100)
        assert bool((m > 0).all()) and bool((m <= 1 + 1e-5).all())
    oracle = oracle_mass_kept(q, k, budget=12, sinks=4, window=8, prefill=60)
    # Per KV head the oracle picks the older keys of largest group-summed mass, which no
    # selector with the same parts beats on the group total.
    for scorer in ("window", "knorm", "query"):
        m = attention_mass_kept(
            q, k, v, lambda s=scorer: KeySelector(2, 8, 12, sinks=4, window=8, scorer=s), prefill=60
        )
        grouped = m.reshape(1, 2, 2, 100).sum(2)
        assert bool((grouped <= oracle.reshape(1, 2, 2, 100).sum(2) + 1e-5).all())


def _foresight_reference(q, k, *, budget, sinks, window, prefill, horizon):
    """Plain-Python eviction with foresight for one KV head (B = 1, H_kv = 1)."""
    n = q.shape[2]
    w = torch.softmax(
        (q[0] @ k[0, 0].T / math.sqrt(q.shape[-1])).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf
        ),
        dim=-1,
    )  # (g, n, n)
    col = w.sum(0)  # (n queries, n keys), summed over the group
    kept, out = None, []
    for t in range(prefill, n):
        stop = n if horizon is None else min(n, t + horizon)
        future = col[t:stop].sum(0)
        hi = t + 1 - window
        if kept is None:
            older = list(range(sinks, hi))
            kept = sorted(older, key=lambda j: -float(future[j]))[:budget]
        else:
            kept = sorted([*kept, hi - 1], key=lambda j: -float(future[j]))[:budget]
        keep = [*range(sinks), *kept, *range(hi, t + 1)]
        out.append(w[:, t, keep].sum(-1))
    return torch.stack(out, dim=-1)[None]  # (1, g, n - prefill)


@pytest.mark.parametrize("horizon", [None, 1, 7])
def test_foresight_mass_matches_a_plain_eviction_loop(horizon):
    q, k, _ = _stream(90, B=1, Hkv=1, g=2, d=8, seed=11)
    k[..., 0] *= 3.0
    got = foresight_mass_kept(
        q, k, budget=6, sinks=2, window=5, prefill=30, horizon=horizon, chunk=16
    )
    ref = _foresight_reference(q, k, budget=6, sinks=2, window=5, prefill=30, horizon=horizon)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_foresight_mass_bounds():
    """In [0, 1], 1 with room for everything, never above the per-query oracle."""
    q, k, _ = _stream(160, B=2, Hkv=2, g=2, d=8, seed=4)
    k[..., 0] *= 3.0
    full = foresight_mass_kept(q, k, budget=200, sinks=4, window=8, prefill=60)
    torch.testing.assert_close(full, torch.ones_like(full))
    oracle = oracle_mass_kept(q, k, budget=12, sinks=4, window=8, prefill=60)
    for horizon in (None, 1, 16):
        m = foresight_mass_kept(q, k, budget=12, sinks=4, window=8, prefill=60, horizon=horizon)
        assert m.shape == (2, 4, 100)
        assert bool((m > 0).all()) and bool((m <= 1 + 1e-5).all())
        grouped, best = m.reshape(2, 2, 2, 100).sum(2), oracle.reshape(2, 2, 2, 100).sum(2)
        assert bool((grouped <= best + 1e-5).all())
    # Knowing only the next query, the first decode step is the oracle's choice.
    m1 = foresight_mass_kept(q, k, budget=12, sinks=4, window=8, prefill=60, horizon=1)
    torch.testing.assert_close(m1[..., 0], oracle[..., 0])
    for kwargs, match in (({"prefill": 0}, "prefill"), ({"horizon": 0}, "horizon")):
        args = {"budget": 12, "sinks": 4, "window": 8, "prefill": 60, **kwargs}
        with pytest.raises(ValueError, match=match):
            foresight_mass_kept(q, k, **args)
    for prefill in (0, 160):
        with pytest.raises(ValueError, match="prefill"):
            oracle_mass_kept(q, k, budget=12, sinks=4, window=8, prefill=prefill)


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that copies a tensor element to the host (what .item() does)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("observation_window", [0, 4])
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_decode_steps_never_read_device_scalars(scorer, observation_window):
    """No host synchronisation per step: no op pulls a tensor value to Python."""
    q, k, v = _stream(120, B=2, Hkv=2, g=3, d=8, seed=9)
    sel = KeySelector(
        2, 8, 12, sinks=2, window=6, scorer=scorer, observation_window=observation_window
    )
    h2o = scorer == "h2o"
    _feed(sel, q[:, :, :60], k[:, :, :60], v[:, :, :60], h2o)
    mode = _ScalarReads()
    with mode:
        for t in range(60, 120):
            _feed(sel, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], h2o)
    assert mode.reads == []
    assert len(sel) == 20


def _reference_observation_keep(q, k, w, n_sinks, budget, window, pool):
    """Brute force: indices a prompt chunk keeps when ranked by its last ``w`` queries."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    kk = k.repeat_interleave(g, dim=1)
    logits = q[:, :, -w:] @ kk.transpose(-1, -2) / math.sqrt(d)  # (B, Hq, w, n)
    qpos = torch.arange(n - w, n)[:, None]
    logits = logits.masked_fill(torch.arange(n)[None, :] > qpos, -math.inf)
    att = torch.softmax(logits, -1).sum(2).reshape(B, Hkv, g, n).sum(2)
    if pool > 1:
        att = att + torch.nn.functional.max_pool1d(
            att.reshape(B * Hkv, 1, n), pool, stride=1, padding=pool // 2
        ).reshape(B, Hkv, n)
    cand = att[:, :, n_sinks : n - window]
    top = torch.topk(cand, budget, dim=-1).indices + n_sinks
    return torch.sort(top, dim=-1).values


@pytest.mark.parametrize("pool", [1, 5])
def test_observation_window_keeps_what_the_last_queries_attend(pool):
    """A prompt chunk is ranked by its last queries' exact attention (knorm's value-free score)."""
    q, k, v = _stream(90, B=2, Hkv=2, g=3, d=8, seed=3)
    sinks, budget, window, w = 2, 10, 6, 4
    sel = KeySelector(
        2, 8, budget, sinks=sinks, window=window, scorer="knorm",
        observation_window=w, pool_kernel=pool,
    )  # fmt: skip
    _, _, pos = sel.update(k, v, queries=q)
    want = _reference_observation_keep(q, k, w, sinks, budget, window, pool)
    assert torch.equal(pos[:, :, sinks : sinks + budget], want)


def test_decode_steps_keep_a_key_the_recent_queries_read():
    """One-token steps rank by the scorer *and* the recent queries: either one keeps a key."""
    d, w = 8, 4
    q, k, v = _stream(60, B=1, Hkv=1, g=1, d=d, seed=7)
    # Key 20 has the largest norm (knorm evicts it first) and lies along every query.
    direction = torch.randn(d, generator=torch.Generator().manual_seed(8))
    k[0, 0, 20] = 6.0 * direction
    q[0, 0] = q[0, 0] * 0.1 + direction
    kept = {}
    for window_size in (0, w):
        sel = KeySelector(
            1, d, 6, sinks=1, window=3, scorer="knorm", observation_window=window_size
        )
        for t in range(60):
            sel.update(k[:, :, t : t + 1], v[:, :, t : t + 1], queries=q[:, :, t : t + 1])
        kept[window_size] = sel.positions[0, 0].tolist()
    assert 20 not in kept[0]
    assert 20 in kept[w]


def test_recent_queries_hold_the_last_queries_however_chunked():
    q, k, v = _stream(40, seed=5)
    w = 6
    states = []
    for cuts in ([0, 40], [0, 3, 4, 20, 21, 22, 40], [0, *range(1, 41)]):
        sel = KeySelector(2, 8, 8, sinks=2, window=4, observation_window=w)
        for a, b in itertools.pairwise(cuts):
            sel.update(k[:, :, a:b], v[:, :, a:b], queries=q[:, :, a:b])
        states.append(sel.recent_queries)
    # Slot i holds the query at the latest position p < 40 with p % w == i.
    want = q[:, :, [40 - 1 - (40 - 1 - i) % w for i in range(w)]]
    for state in states:
        torch.testing.assert_close(state, want)


def test_observation_window_arguments():
    for bad in (-1, 2.0, True):
        with pytest.raises((ValueError, TypeError), match="observation_window"):
            KeySelector(2, 8, 8, observation_window=bad)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="pool_kernel"):
            KeySelector(2, 8, 8, pool_kernel=bad)


def test_observation_window_evicts_non_finite_keys_first():
    q, k, v = _stream(40, B=1, Hkv=2, g=2, d=8, seed=6)
    k[0, 0, 10] = float("nan")
    v[0, 1, 12] = float("inf")
    sel = KeySelector(2, 8, 20, sinks=2, window=4, observation_window=8)
    _, _, pos = sel.update(k, v, queries=q)
    assert 10 not in pos[0, 0].tolist()
    assert 12 not in pos[0, 1].tolist()


def _by_position(sel):
    """The kept keys, values and positions in stream order (slot order is arbitrary)."""
    order = torch.argsort(sel.positions, dim=-1)
    take = order[..., None].expand(-1, -1, -1, sel.keys.shape[-1])
    return sel.keys.gather(2, take), sel.values.gather(2, take), sel.positions.gather(2, order)


@pytest.mark.slow
def test_one_token_step_compiles_to_few_graphs_matching_eager():
    """A decode step traces whole (fullgraph), recompiles only for its two kinds of step."""
    dynamo = pytest.importorskip("torch._dynamo")
    q, k, v = _stream(100, B=1, Hkv=2, g=3, d=16, seed=4)

    def build():
        sel = KeySelector(
            2, 16, 10, sinks=2, window=12, observation_window=4, interval=4, pool_kernel=3
        )
        sel.update(k[:, :, :40], v[:, :, :40], queries=q[:, :, :40])
        return sel

    def step(sel, key, value, query):
        sel.append(key, value)
        sel.observe_queries(query)
        sel.compress()

    eager, compiled = build(), build()
    dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled_step = torch.compile(step, fullgraph=True, backend=backend)
    for t in range(40, 100):
        args = (k[:, :, t : t + 1], v[:, :, t : t + 1], q[:, :, t : t + 1])
        step(eager, *args)
        compiled_step(compiled, *args)
        for got, want in zip(_by_position(compiled), _by_position(eager), strict=True):
            torch.testing.assert_close(got, want)
    # The first step specialises on the stream length, the second makes it symbolic;
    # then a re-ranking step and a plain step each have their graph.
    assert len(graphs) <= 4, len(graphs)
