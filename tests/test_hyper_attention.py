import math

import pytest

torch = pytest.importorskip("torch")

from streamsketch.attention import hyper as hyper_mod  # noqa: E402
from streamsketch.attention.exact import exact_attention  # noqa: E402
from streamsketch.attention.hyper import HyperAttention, hyper_attention  # noqa: E402


def _qkv(B, H, H_kv, n_q, n_k, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, d, generator=g, dtype=dtype)
    k = torch.randn(B, H_kv, n_k, d, generator=g, dtype=dtype)
    v = torch.randn(B, H_kv, n_k, d, generator=g, dtype=dtype)
    return q, k, v


def _clustered(B, H, H_kv, n, d, n_clusters=16, radius=3.0, noise=0.3, seed=0):
    """Keys and queries near a few random centres: the regime LSH is built for."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, H_kv, n_clusters, d, generator=g)
    centres = radius * centres / centres.norm(dim=-1, keepdim=True) * math.sqrt(d) ** 0.5
    ck = torch.randint(n_clusters, (B, H_kv, n), generator=g)
    k = centres.gather(2, ck[..., None].expand(B, H_kv, n, d))
    k = k + noise * torch.randn(B, H_kv, n, d, generator=g)
    cq = torch.randint(n_clusters, (B, H, n), generator=g)
    cent_q = centres.repeat_interleave(H // H_kv, dim=1)
    q = cent_q.gather(2, cq[..., None].expand(B, H, n, d))
    q = q + noise * torch.randn(B, H, n, d, generator=g)
    # Values follow the clusters, as in trained models: attention mass within a
    # cluster then maps to one value, and the approximation error is measurable.
    vc = torch.randn(B, H_kv, n_clusters, d, generator=g)
    v = vc.gather(2, ck[..., None].expand(B, H_kv, n, d))
    v = v + 0.3 * torch.randn(B, H_kv, n, d, generator=g)
    return q, k, v


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H_kv", [4, 2, 1])
def test_below_min_seq_len_is_exact(causal, H_kv):
    q, k, v = _qkv(2, 4, H_kv, 70, 70, 16)
    out = hyper_attention(q, k, v, causal=causal, min_seq_len=128)
    torch.testing.assert_close(out, exact_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_q,n_k", [(30, 70), (70, 30)])
def test_causal_rectangular_is_bottom_right(n_q, n_k):
    q, k, v = _qkv(1, 2, 1, n_q, n_k, 8, seed=3)
    ref = exact_attention(q, k, v, causal=True)
    torch.testing.assert_close(hyper_attention(q, k, v, causal=True), ref, atol=1e-5, rtol=1e-5)
    # Through the recursion: one block per problem and no sampling keeps it exact.
    out = hyper_attention(q, k, v, causal=True, min_seq_len=8, block_size=512, seed=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_one_block_no_sampling_is_exact(causal):
    # Recursion and LSH sorting run (min_seq_len small), but every problem is one block.
    q, k, v = _qkv(2, 4, 2, 203, 203, 16, seed=1)
    ref = exact_attention(q, k, v, causal=causal)
    for sample_size in (0, 64):
        out = hyper_attention(
            q, k, v, causal=causal, min_seq_len=16, block_size=256, sample_size=sample_size, seed=5
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def _heavy_reference(q, k, v, block_size, seed):
    """Each query's exact softmax over the keys of its block (sample_size=0, non-causal).

    Keys sorted by their LSH sort key and cut into blocks; a query joins the
    block of the last sorted key below its own sort key (block 0 if none).
    """
    B, H, n_q, d = q.shape
    H_kv, n_k = k.shape[1], k.shape[2]
    proj = hyper_mod._Rng(seed, q.device).randn((d, 8), torch.float32)
    nb = -(-n_k // block_size)
    ref = torch.empty(B, H, n_q, v.shape[-1])
    for b in range(B):
        for h in range(H):
            hk = h // (H // H_kv)
            ks, order = torch.sort(hyper_mod._lsh_values(k[b, hk], proj), stable=True)
            below = torch.searchsorted(ks, hyper_mod._lsh_values(q[b, h], proj))
            blk = ((below - 1) // block_size).clamp(0, nb - 1)
            for i in range(n_q):
                kj = order[blk[i] * block_size : (blk[i] + 1) * block_size]
                w = torch.softmax(q[b, h, i] @ k[b, hk, kj].T / math.sqrt(d), dim=-1)
                ref[b, h, i] = w @ v[b, hk, kj]
    return ref


@pytest.mark.parametrize("data", ["gaussian", "clustered"])
def test_heavy_part_alone_is_block_softmax(data):
    # sample_size=0: each query gets the exact softmax over the keys of its own block.
    # Clustered queries crowd into a few blocks: big and small tiles both run.
    if data == "gaussian":
        q, k, v = _qkv(2, 4, 2, 96, 64, 8, seed=2)
    else:
        q, k, v = _clustered(2, 4, 2, 64, 8, n_clusters=3, seed=2)
    out = hyper_attention(q, k, v, block_size=16, sample_size=0, min_seq_len=1, seed=0)
    torch.testing.assert_close(out, _heavy_reference(q, k, v, 16, 0), atol=1e-5, rtol=1e-5)


def test_gray_rank_neighbours_differ_in_one_bit():
    rank = hyper_mod._gray_rank(7, torch.device("cpu"))
    order = torch.argsort(rank)  # buckets listed by rank
    flips = order[1:] ^ order[:-1]
    assert torch.all((flips & (flips - 1)) == 0) and torch.all(flips > 0)
    assert sorted(rank.tolist()) == list(range(128))


@pytest.mark.parametrize("d_v", [16, 24])
def test_causal_past_outputs_ignore_future_keys_values(d_v):
    # n=150 with min_seq_len=16: 4 levels of recursion, padding, sampling all run.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 150, 16, generator=g)
    k = torch.randn(1, 2, 150, 16, generator=g)
    v = torch.randn(1, 2, 150, d_v, generator=g)
    kw = dict(causal=True, min_seq_len=16, block_size=8, sample_size=8, seed=11)
    base = hyper_attention(q, k, v, **kw)
    for t in (40, 97, 149):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t:] += 5 * torch.randn(k2[:, :, t:].shape, generator=g)
        v2[:, :, t:] -= 3.0
        out = hyper_attention(q, k2, v2, **kw)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


def _planted(B, H, H_kv, n, d, n_centres=16, per_centre=4, logit=9.0, seed=0):
    """Queries near a few directions; each direction has a few planted keys along it
    with logit about ``logit`` (the heavy entries sortLSH must find) among weak keys."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, H_kv, n_centres, d, generator=g)
    c = c / c.norm(dim=-1, keepdim=True)
    z = torch.randint(n_centres, (B, H, n), generator=g)
    cq = c.repeat_interleave(H // H_kv, dim=1).gather(2, z[..., None].expand(B, H, n, d))
    q = math.sqrt(d) * cq + 0.1 * torch.randn(B, H, n, d, generator=g)
    k = 0.3 * torch.randn(B, H_kv, n, d, generator=g)
    v = torch.randn(B, H_kv, n, d, generator=g)
    pos = torch.randperm(n, generator=g)[: n_centres * per_centre].view(n_centres, per_centre)
    for ci in range(n_centres):
        k[:, :, pos[ci]] = logit * c[:, :, ci, None, :] + 0.1 * torch.randn(
            B, H_kv, per_centre, d, generator=g
        )
    return q, k, v


@pytest.mark.parametrize("data", ["gaussian", "clustered"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_causal_output_depends_on_own_query_and_past_keys_only(data, seed):
    # n=300 with min_seq_len=32: 4 levels (two through sortLSH + sampling), padding,
    # B=2, grouped-query heads; clustered queries crowd into few blocks (big + small tiles).
    make = _qkv if data == "gaussian" else _clustered
    args = (2, 4, 2, 300, 300, 16) if data == "gaussian" else (2, 4, 2, 300, 16)
    q, k, v = make(*args, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    kw = dict(causal=True, min_seq_len=32, block_size=16, sample_size=16, seed=seed)
    base = hyper_attention(q, k, v, **kw)
    for t in torch.randint(33, 300, (3,), generator=g).tolist():
        # Another token's query (every head), anywhere: only that token's output moves.
        q2 = q.clone()
        q2[:, :, t] = 3 * torch.randn(q2[:, :, t].shape, generator=g)
        out = hyper_attention(q2, k, v, **kw)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        assert torch.equal(out[:, :, t + 1 :], base[:, :, t + 1 :])
        assert not torch.equal(out[:, :, t], base[:, :, t])
        # A future key / value: earlier outputs are bit-equal.
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] = 3 * torch.randn(k2[:, :, t].shape, generator=g)
        v2[:, :, t] += 1.0
        out = hyper_attention(q, k2, v2, **kw)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        # The whole future of the token stream at once.
        q3, k3, v3 = q.clone(), k.clone(), v.clone()
        for x in (q3, k3, v3):
            x[:, :, t:] = torch.randn(x[:, :, t:].shape, generator=g)
        out = hyper_attention(q3, k3, v3, **kw)
        assert torch.equal(out[:, :, :t], base[:, :, :t])


def test_noncausal_query_output_ignores_other_queries():
    # Blocks and samples come from the keys and the seed: any subset of the queries
    # gets bit-identical outputs, whichever other queries share the call.
    q, k, v = _clustered(2, 4, 2, 256, 16, seed=3)
    kw = dict(block_size=16, sample_size=16, min_seq_len=32, seed=1)
    full = hyper_attention(q, k, v, **kw)
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:70].sort().values
    assert torch.equal(hyper_attention(q[:, :, idx], k, v, **kw), full[:, :, idx])
    q2 = q.clone()
    q2[:, :, 5] += 4.0
    out = hyper_attention(q2, k, v, **kw)
    assert torch.equal(out[:, :, :5], full[:, :, :5]) and torch.equal(out[:, :, 6:], full[:, :, 6:])


@pytest.mark.parametrize("causal", [False, True])
def test_planted_heavy_keys_error(causal):
    q, k, v = _planted(2, 4, 2, 1024, 32)
    ref = exact_attention(q, k, v, causal=causal)
    kw = dict(causal=causal, block_size=32, sample_size=32, min_seq_len=128)
    err = sum(_rel(hyper_attention(q, k, v, seed=s, **kw), ref) for s in range(3)) / 3
    # Measured, seeds 0-2, non-causal/causal: 0.72/0.42; the version that sorted
    # queries jointly and paired the i-th query block with the i-th key block:
    # 1.18/0.78.
    assert err < (0.9 if not causal else 0.55)


@pytest.mark.parametrize("causal", [False, True])
def test_error_small_on_clustered_keys_and_falls_with_samples(causal):
    q, k, v = _clustered(1, 4, 2, 2048, 32, seed=7)
    ref = exact_attention(q, k, v, causal=causal)
    kw = dict(causal=causal, min_seq_len=256, block_size=128)
    errs = {}
    for m in (16, 256, 2048):
        errs[m] = (
            sum(_rel(hyper_attention(q, k, v, sample_size=m, seed=s, **kw), ref) for s in range(3))
            / 3
        )
    # Measured, seeds 0-2, non-causal/causal: m=16 0.17/0.08, m=256 0.06/0.03, m=2048 0.02/0.01.
    assert errs[256] < 0.1
    assert errs[2048] < 0.5 * errs[16]
    assert errs[2048] < 0.05


def test_light_part_is_unbiased_normaliser():
    # Averaged over seeds the sampled estimate converges to exact attention.
    q, k, v = _qkv(1, 2, 2, 256, 256, 8, seed=9)
    q = q * 0.3
    ref = exact_attention(q, k, v)
    single = _rel(
        hyper_attention(q, k, v, block_size=32, sample_size=32, min_seq_len=1, seed=0), ref
    )
    mean = torch.stack(
        [
            hyper_attention(q, k, v, block_size=32, sample_size=32, min_seq_len=1, seed=s)
            for s in range(64)
        ]
    ).mean(0)
    assert _rel(mean, ref) < 0.35 * single


def test_seed_reproducible_and_seed_matters():
    q, k, v = _qkv(1, 2, 1, 300, 300, 16, seed=5)
    kw = dict(causal=True, min_seq_len=32, block_size=16, sample_size=16)
    a = hyper_attention(q, k, v, seed=3, **kw)
    assert torch.equal(a, hyper_attention(q, k, v, seed=3, **kw))
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(a, hyper_attention(q, k, v, seed=gen, **kw))
    assert not torch.equal(a, hyper_attention(q, k, v, seed=4, **kw))


def test_grad_path_matches_inference_path(monkeypatch):
    # With autograd the lse comes from matmuls / the probe column instead of the fused
    # CPU kernel; force the probe path everywhere and compare values.
    q, k, v = _clustered(1, 4, 2, 300, 16, seed=2)
    kw = dict(causal=True, min_seq_len=40, block_size=16, sample_size=16, seed=1)
    with torch.no_grad():
        fast = hyper_attention(q, k, v, **kw)
    monkeypatch.setattr(hyper_mod, "_DIRECT_MAX", 0)
    slow = hyper_attention(q.requires_grad_(), k, v, **kw)
    torch.testing.assert_close(slow, fast, atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(hyper_mod, "_DIRECT_MAX", 10**9)
    direct = hyper_attention(q, k, v, **kw)
    torch.testing.assert_close(direct, fast, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_probe_lse_is_exact(monkeypatch, causal):
    monkeypatch.setattr(hyper_mod, "_DIRECT_MAX", 0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = 3 * torch.randn(3, 1, 50, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 50, 8, generator=g, dtype=torch.float64)
    out, lse = hyper_mod._attn_lse(q, k, v, 0.7, causal=causal)
    s = (q @ k.transpose(-1, -2)) * 0.7
    if causal:
        s = s.masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


@pytest.mark.parametrize("n", [20, 40])
def test_gradcheck_through_recursion(n):
    # Fixed seed: LSH buckets are locally constant, so the map is smooth at the point.
    # n=20: one sortLSH level, full Jacobian; n=40: two levels, random directions
    # (fast_mode), which keeps the test to seconds.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, n, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return hyper_attention(
            q, k, v, causal=True, min_seq_len=8, block_size=4, sample_size=4, seed=2
        )

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=n > 20)


def test_gradient_flows_and_bf16():
    q, k, v = _clustered(1, 4, 2, 400, 16, seed=1)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    out = hyper_attention(q, k, v, causal=True, min_seq_len=64, block_size=32, seed=0)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    ob = hyper_attention(qb, kb, vb, causal=True, min_seq_len=64, block_size=32, seed=0)
    assert ob.dtype == torch.bfloat16
    of = hyper_attention(
        qb.float(), kb.float(), vb.float(), causal=True, min_seq_len=64, block_size=32, seed=0
    )
    assert _rel(ob.float(), of) < 1e-2
    oh = hyper_attention(qb.half(), kb.half(), vb.half(), min_seq_len=64, block_size=32, seed=0)
    assert oh.dtype == torch.float16 and torch.isfinite(oh).all()


def test_errors_name_argument():
    q, k, v = _qkv(1, 2, 1, 10, 10, 8)
    with pytest.raises(ValueError, match="block_size"):
        hyper_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="sample_size"):
        hyper_attention(q, k, v, sample_size=-1)
    with pytest.raises(ValueError, match="lsh_num_projs"):
        hyper_attention(q, k, v, lsh_num_projs=40)
    with pytest.raises(ValueError, match="min_seq_len"):
        hyper_attention(q, k, v, min_seq_len=1.5)
    with pytest.raises(TypeError, match="seed"):
        hyper_attention(q, k, v, seed="x")
    with pytest.raises(ValueError, match="scale"):
        hyper_attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="causal"):
        hyper_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        hyper_attention(torch.randn(1, 3, 10, 8), k.expand(1, 2, 10, 8), v.expand(1, 2, 10, 8))


def test_layer_forward_backward():
    torch.manual_seed(0)
    layer = HyperAttention(32, 4, 2, block_size=16, sample_size=16, min_seq_len=32, seed=0)
    x = torch.randn(2, 100, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 100, 32)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.equal(layer(x), y)  # int seed: deterministic layer
    # Below min_seq_len the layer is exact causal attention.
    big = HyperAttention(32, 4, 2, seed=0)
    big.load_state_dict(layer.state_dict())
    with torch.no_grad():
        B, n = 2, 100
        qh = big.q_proj(x).view(B, n, 4, 8).transpose(1, 2)
        kh = big.k_proj(x).view(B, n, 2, 8).transpose(1, 2)
        vh = big.v_proj(x).view(B, n, 2, 8).transpose(1, 2)
        ref = big.o_proj(exact_attention(qh, kh, vh, causal=True).transpose(1, 2).reshape(B, n, 32))
        torch.testing.assert_close(big(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        HyperAttention(32, 4, block_size=0)
