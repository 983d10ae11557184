import math

import pytest

torch = pytest.importorskip("torch")

from streamsketch.attention._layer import AttentionLayer  # noqa: E402
from streamsketch.attention.exact import exact_attention  # noqa: E402
from streamsketch.attention.lev import LevAttention, lev_attention  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # The references below run many tiny LAPACK calls (pinv per query), which
    # threaded BLAS makes very slow on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Restricting attention to a superset of the heavy keys only raises their
# (renormalised) weights; float64 rounding of both sides is ~1e-15.
REL = 1e-9


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _allowed(n_q, n_k, causal):
    if not causal:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)


def _weights_through(q, k, **kw):
    """Weights each query gives each key, read through lev_attention with identity values.

    With ``v = I`` the output row of query ``i`` is its (renormalised) weight
    vector over the keys it attends to, and exactly 0 elsewhere.
    """
    B, H_kv, n_k, _ = k.shape
    eye = torch.eye(n_k, dtype=k.dtype).expand(B, H_kv, n_k, n_k).contiguous()
    return lev_attention(q, k, eye, **kw)


def _exact_weights(q, k, p, causal):
    eye = torch.eye(k.shape[2], dtype=k.dtype).expand(*k.shape[:3], k.shape[2]).contiguous()
    return exact_attention(q, k, eye, f=("poly", p), causal=causal)


def _check_heavy_kept(q, k, p, eps, causal, chunk_size, **kw):
    A = _exact_weights(q, k, p, causal)
    W = _weights_through(q, k, eps=eps, p=p, f=("poly", p), causal=causal, chunk_size=chunk_size)
    heavy = A >= eps * (1 + REL)
    assert int(heavy.sum()) > 0  # the check below is not vacuous
    assert torch.all(W[heavy] >= A[heavy] * (1 - REL)), (W[heavy] - A[heavy]).min()
    # ... and the set is a real restriction, not every allowed key.
    allowed = _allowed(q.shape[2], k.shape[2], causal).expand_as(A)
    attended = W > 0
    assert int(attended.sum()) < int((allowed & (A > 0)).sum())
    return int(heavy.sum())


def _pinv_gram(K):
    return torch.linalg.pinv(K.transpose(-1, -2) @ K, hermitian=True)


def _keys(n, d, rank, seed):
    g = _gen(seed)
    if rank == d:
        return torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    basis = torch.randn(rank, d, generator=g, dtype=torch.float64)
    K = torch.randn(1, 1, n, rank, generator=g, dtype=torch.float64) @ basis
    K[..., 5, :] = K[..., 3, :]  # a duplicate key
    return K


def _with_long_keys(K):
    K = K.clone()
    K[..., 10::11, :] *= 5.0  # keys heavy for some queries, scattered in time
    return K


def _worst_case_queries(K, causal, n_q, g):
    """q_i = M_i^+ k_j for a random allowed j: attains A_ij = tau_j (prefix of query i)."""
    n_k = K.shape[2]
    off = n_k - n_q
    qs = []
    for i in range(n_q):
        hi = i + off + 1 if causal else n_k
        j = int(torch.randint(0, hi, (1,), generator=g))
        qs.append(_pinv_gram(K[0, 0, :hi]) @ K[0, 0, j])
    return torch.stack(qs)[None, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rank", [6, 4])
def test_guarantee_p2_random_and_worst_case_queries(causal, rank):
    n, d, eps = 96, 6, 0.12
    K = _with_long_keys(_keys(n, d, rank, seed=rank))
    g = _gen(10 + rank)
    q_rand = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    q_worst = _worst_case_queries(K, causal, n, g)
    for q in (q_rand, q_worst):
        _check_heavy_kept(q, K, 2, eps, causal, chunk_size=16)
    # The worst-case queries attain the bound: A_ij = tau_j for their target.
    A = _exact_weights(q_worst, K, 2, causal)
    assert int((A >= eps).sum()) >= 10


def _adversarial_queries(K, p, causal, n_q, g, steps=150):
    """Queries pushed by gradient ascent towards the largest weight on a chosen key."""
    n_k, d = K.shape[2], K.shape[3]
    off = n_k - n_q
    allowed = _allowed(n_q, n_k, causal)
    # Aim at the long keys (every 9th): those some query can weight heavily.
    targets = torch.tensor(
        [
            9 * int(torch.randint(0, (int(allowed[i].sum()) + 8) // 9, (1,), generator=g))
            for i in range(n_q)
        ]
    )
    start = torch.stack(
        [
            _pinv_gram(K[0, 0, : (i + off + 1 if causal else n_k)]) @ K[0, 0, targets[i]]
            for i in range(n_q)
        ]
    )
    qv = (start + 0.1 * torch.randn(n_q, d, generator=g, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([qv], lr=0.05)
    for _ in range(steps):
        s = (qv @ K[0, 0].T).abs().clamp_min(1e-30).log() * p
        s = s.masked_fill(~allowed, -math.inf)
        loss = -(s.gather(1, targets[:, None])[:, 0] - torch.logsumexp(s, dim=1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qv.detach()[None, None]


def _lp_keys(n, d, g):
    K = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    K[..., ::9, :] *= 4.0  # a few long keys: genuinely heavy for some queries
    return K


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_guarantee_lp_random_and_adversarial_queries(p, causal):
    n, d = 64, 4
    g = _gen(20 + p)
    K = _lp_keys(n, d, g)
    q_rand = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    q_adv = _adversarial_queries(K, p, causal, n, g)
    # eps where it bites: the median of the largest weight each long key
    # reaches, so about half the targeted keys are heavy, some just so.
    A = _exact_weights(q_adv, K, p, causal)[0, 0]
    eps = float(A.amax(0)[::9].median())
    _check_heavy_kept(q_rand, K, p, eps, causal, chunk_size=16)
    n_heavy = _check_heavy_kept(q_adv, K, p, eps, causal, chunk_size=16)
    assert n_heavy >= 10


@pytest.mark.parametrize(("p", "tight"), [(1, 0.55), (1.5, 0.7), (3, 0.8), (4, 0.9)])
def test_lp_scores_are_certified_and_tight(p, tight):
    """Each score bounds every weight its key reaches, and is reached to within a factor."""
    from streamsketch.attention.lev import _factor, _scores

    n, d = 64, 4
    g = _gen(30)
    K = _lp_keys(n, d, g)
    q = _adversarial_queries(K, p, False, n, g, steps=300)
    sc = _scores(K, torch.ones(1, 1, n, dtype=torch.bool), _factor(K), float(p), 0.0)[0, 0]
    y = (q[0, 0] @ K[0, 0].T).abs() ** p  # any real p, unlike f=("poly", p)
    reached = (y / y.sum(1, keepdim=True)).amax(0)
    ratio = reached / sc
    assert float(ratio.max()) <= 1 + REL
    assert float(ratio.max()) >= tight
    # The total is the classical sensitivity bound: d (p <= 2), d^(p/2) (p > 2).
    assert float(sc.sum()) <= (d if p <= 2 else d ** (p / 2)) * (1 + 1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_p2_set_is_exactly_the_leverage_set(causal):
    """eps, p = 2: the keys attended beyond the local ones are {j : tau_j(prefix) >= eps}."""
    n, d, eps, chunk = 80, 5, 0.1, 16
    g = _gen(3)
    K = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    K[..., 7, :] *= 10
    q = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    # Softmax: every attended key gets a positive weight, so W > 0 marks the set.
    W = _weights_through(q, K, eps=eps, causal=causal, chunk_size=chunk)
    for a in range(0, n, chunk):
        start = a if causal else n
        tau = torch.einsum(
            "id,de,ie->i", K[0, 0, :start], _pinv_gram(K[0, 0, :start]), K[0, 0, :start]
        )
        expect = set(torch.nonzero(tau >= eps).flatten().tolist())
        got = set(torch.nonzero(W[0, 0, a, :start] > 0).flatten().tolist())
        assert got == expect
        assert len(got) <= d / eps
        if causal:  # own block: exactly the keys up to the query
            assert torch.all(
                W[0, 0, a : a + chunk, start : a + chunk].gt(0) == _allowed(chunk, chunk, True)
            )


@pytest.mark.parametrize("p", [1, 3])
def test_lp_set_size_bound(p):
    n, d, eps = 300, 4, 0.1
    g = _gen(4)
    K = torch.randn(2, 2, n, d, generator=g)
    q = torch.randn(2, 2, n, d, generator=g)
    bound = d / eps if p < 2 else d ** (p / 2) / eps
    for causal, chunk in ((False, 64), (True, 32)):
        W = _weights_through(q, K, eps=eps, p=p, causal=causal, chunk_size=chunk)
        # The last query sees the set plus at most its own block.
        n_sel = (W[:, :, -1] > 0).sum(-1) - (chunk if causal else 0)
        assert int(n_sel.max()) <= bound
        assert int(n_sel.max()) < n - chunk


def test_budget_keeps_top_leverage_and_counts():
    n, d, budget = 60, 4, 9
    g = _gen(5)
    K = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    q = torch.randn(1, 2, 10, d, generator=g, dtype=torch.float64)
    W = _weights_through(q, K, budget=budget)
    tau = torch.einsum("bhid,bhde,bhie->bhi", K, _pinv_gram(K), K)
    top = torch.topk(tau, budget, dim=-1).indices
    for h in range(2):
        assert set(torch.nonzero(W[0, h, 0] > 0).flatten().tolist()) == set(top[0, h].tolist())
    # Causal: at most `budget` selected keys before the block, plus the block.
    Wc = _weights_through(
        torch.randn(1, 2, n, d, dtype=torch.float64), K, budget=budget, causal=True, chunk_size=8
    )
    for a in range(0, n, 8):
        assert int((Wc[:, :, a, :a] > 0).sum(-1).max()) == min(budget, a)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("f", ["softmax", ("poly", 2), ("poly", 3)])
@pytest.mark.parametrize("H_kv", [4, 2, 1])
def test_keeping_everything_is_exact_attention(causal, f, H_kv):
    g = _gen(6)
    n_q, n_k = 37, 37
    q = torch.randn(2, 4, n_q, 8, generator=g)
    k = torch.randn(2, H_kv, n_k, 8, generator=g)
    v = torch.randn(2, H_kv, n_k, 5, generator=g)
    ref = exact_attention(q, k, v, f=f, causal=causal)
    for kw in (
        {"budget": n_k},
        {"eps": 1e-12},
        {"eps": 1e-12, "p": 3, "window": 3, "sinks": 2},
        {"eps": 1e-12, "p": 1, "window": 5},
    ):
        out = lev_attention(q, k, v, f=f, causal=causal, chunk_size=8, **kw)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_decoding_alignment_matches_exact():
    """n_q < n_k: bottom-right aligned, like exact_attention; n_q > n_k: empty rows are 0."""
    g = _gen(7)
    q = torch.randn(1, 2, 5, 8, generator=g)
    k = torch.randn(1, 2, 40, 8, generator=g)
    v = torch.randn(1, 2, 40, 8, generator=g)
    ref = exact_attention(q, k, v, causal=True)
    torch.testing.assert_close(lev_attention(q, k, v, budget=40, causal=True, chunk_size=2), ref)
    q2 = torch.randn(1, 2, 50, 8, generator=g)
    out = lev_attention(q2, k, v, budget=40, causal=True, chunk_size=4)
    torch.testing.assert_close(out, exact_attention(q2, k, v, causal=True))
    assert torch.all(out[:, :, :10] == 0)


@pytest.mark.parametrize("kw", [{"eps": 0.05}, {"budget": 6, "p": 3}, {"eps": 0.2, "p": 1}])
def test_causal_never_sees_future_keys(kw):
    g = _gen(8)
    n, t = 70, 41
    q = torch.randn(1, 4, n, 8, generator=g)
    k = torch.randn(1, 2, n, 8, generator=g)
    v = torch.randn(1, 2, n, 8, generator=g)
    out = lev_attention(q, k, v, causal=True, window=4, sinks=2, chunk_size=16, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t] = 100 * torch.randn(2, 8, generator=g)
    v2[:, :, t:] += 7.0
    out2 = lev_attention(q, k2, v2, causal=True, window=4, sinks=2, chunk_size=16, **kw)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


def test_sinks_window_and_block_are_always_attended():
    g = _gen(9)
    n, d, sinks, window, chunk = 64, 4, 3, 5, 16
    K = torch.randn(1, 1, n, d, generator=g)
    q = torch.randn(1, 1, n, d, generator=g)
    W = _weights_through(q, K, eps=0.9, sinks=sinks, window=window, causal=True, chunk_size=chunk)
    allowed = _allowed(n, n, True)
    for i in range(n):
        local = set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1))
        local |= set(range(i - i % chunk, i + 1))
        got = set(torch.nonzero(W[0, 0, i] > 0).flatten().tolist())
        assert local <= got
        assert all(allowed[i, j] for j in got)
    Wn = _weights_through(q, K, eps=0.9, sinks=sinks, window=window, causal=False)
    got = set(torch.nonzero(Wn[0, 0, 0] > 0).flatten().tolist())
    assert set(range(sinks)) | set(range(n - window, n)) <= got
    torch.testing.assert_close(Wn.sum(-1), torch.ones(1, 1, n))


def test_ridge_only_lowers_scores():
    g = _gen(10)
    K = torch.randn(1, 1, 50, 4, generator=g, dtype=torch.float64)
    q = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64)
    sets = [
        set(
            torch.nonzero(_weights_through(q, K, eps=0.08, ridge=r)[0, 0, 0] > 0).flatten().tolist()
        )
        for r in (0.0, 5.0)
    ]
    assert sets[1] < sets[0]


def test_bfloat16_and_half_inputs():
    g = _gen(11)
    q = torch.randn(2, 4, 48, 16, generator=g)
    k = torch.randn(2, 2, 48, 16, generator=g)
    v = torch.randn(2, 2, 48, 16, generator=g)
    for dt in (torch.bfloat16, torch.float16):
        qb, kb, vb = q.to(dt), k.to(dt), v.to(dt)
        for causal in (False, True):
            out = lev_attention(qb, kb, vb, eps=0.02, window=4, causal=causal, chunk_size=16)
            assert out.dtype == dt and out.shape == (2, 4, 48, 16)
            ref = lev_attention(
                *(t.float() for t in (qb, kb, vb)), eps=0.02, window=4, causal=causal, chunk_size=16
            )
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_flows_through_attention(causal):
    g = _gen(12)
    q = torch.randn(1, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 4, 30, 8, generator=g, dtype=torch.float64)
    # Everything kept: the gradients are exact attention's.
    (lev_attention(q, k, v, budget=30, causal=causal, chunk_size=8) * w).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (exact_attention(q, k, v, causal=causal) * w).sum().backward()
    for a, b in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a, b)
    # A real selection: gradients still reach q, k, v (the selected keys).
    for t in (q, k, v):
        t.grad = None
    (lev_attention(q, k, v, eps=0.3, causal=causal, chunk_size=8) * w).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


class _ExactLayer(AttentionLayer):
    def _attend(self, q, k, v):
        return exact_attention(q, k, v, causal=self.causal)


def test_layer_forward_backward():
    torch.manual_seed(0)
    layer = LevAttention(32, 4, 2, eps=0.1, window=4, sinks=1, chunk_size=8)
    x = torch.randn(2, 20, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 20, 32)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, prm in layer.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
        assert prm.grad.abs().sum() > 0, name
    # Budget = sequence length: the same layer as exact attention.
    full = LevAttention(32, 4, 2, budget=20)
    ref = _ExactLayer(32, 4, 2)
    ref.load_state_dict(full.state_dict())
    torch.testing.assert_close(full(x), ref(x), atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="exactly one of eps and budget"):
        lev_attention(q, q, q)
    with pytest.raises(ValueError, match="exactly one of eps and budget"):
        lev_attention(q, q, q, eps=0.1, budget=3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        lev_attention(q, q, q, eps=0.0)
    with pytest.raises(ValueError, match="budget"):
        lev_attention(q, q, q, budget=-1)
    with pytest.raises(ValueError, match="window"):
        lev_attention(q, q, q, budget=2, window=1.5)
    with pytest.raises(ValueError, match="sinks"):
        lev_attention(q, q, q, budget=2, sinks=-2)
    with pytest.raises(ValueError, match="p must be > 0"):
        lev_attention(q, q, q, budget=2, p=0)
    with pytest.raises(ValueError, match="ridge"):
        lev_attention(q, q, q, budget=2, ridge=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        lev_attention(q, q, q, budget=2, chunk_size=0)
    with pytest.raises(TypeError, match="causal"):
        lev_attention(q, q, q, budget=2, causal="yes")
    with pytest.raises(ValueError, match="f must be"):
        lev_attention(q, q, q, budget=2, f="relu")
    with pytest.raises(ValueError, match="k must be finite"):
        lev_attention(q, q.clone().fill_(float("nan")), q, budget=2)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        lev_attention(q, torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4), budget=2)
    with pytest.raises(ValueError, match="exactly one of eps and budget"):
        LevAttention(16, 2)
    with pytest.raises(ValueError, match="window"):
        LevAttention(16, 2, eps=0.1, window=-1)
