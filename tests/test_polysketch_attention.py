import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import streamsketch.attention.polysketch as ps_mod  # noqa: E402
from streamsketch.attention.exact import exact_attention  # noqa: E402
from streamsketch.attention.polysketch import (  # noqa: E402
    PolySketchAttention,
    PolySketchMap,
    polysketch_attention,
)
from streamsketch.linear.polysketch import PolySketch  # noqa: E402


def _qkv(B, H, H_kv, n_q, n_k, d, dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, d, generator=g, dtype=dtype)
    k = torch.randn(B, H_kv, n_k, d, generator=g, dtype=dtype)
    v = torch.randn(B, H_kv, n_k, dv or d, generator=g, dtype=dtype)
    return q, k, v


def _explicit(q, k, v, fmap, causal, block_size):
    """Reference from the public map: phi(q).phi(k) for earlier blocks, exact (q.k)^p inside."""
    H = q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    n_q, n_k = q.shape[2], k.shape[2]
    w = fmap(q) @ fmap(k).mT
    if causal:
        pos = torch.arange(n_q)[:, None] + (n_k - n_q)
        j = torch.arange(n_k)[None, :]
        same = (j // block_size) == (pos // block_size)
        exact = (q @ k.mT) ** fmap.degree
        w = torch.where(same, exact, w).masked_fill(j > pos, 0.0)
    s = w.sum(-1, keepdim=True)
    return torch.where(s > 0, w / s, 0.0) @ v


# -- the map ---------------------------------------------------------------------
@pytest.mark.parametrize("degree", [2, 4, 6, 8])
def test_map_matches_numpy_polysketch(degree):
    d, r = 6, 8
    fmap = PolySketchMap(d, degree, r, dtype=torch.float64)
    ref = PolySketch(d, degree, r, symmetric=True, seed=3)
    with torch.no_grad():
        for mine, theirs in zip(fmap.matrices(), ref._workspace_arrays(), strict=True):
            assert mine.shape == theirs.shape
            mine.copy_(torch.from_numpy(theirs))
    X = np.random.default_rng(0).standard_normal((7, d))
    np.testing.assert_allclose(
        fmap(torch.from_numpy(X)).numpy(), ref.transform(X), rtol=1e-12, atol=1e-12
    )
    full = PolySketch(d, degree, r, seed=3)
    np.testing.assert_allclose(
        fmap(torch.from_numpy(X), symmetric=False).numpy(),
        full.transform(X),
        rtol=1e-12,
        atol=1e-12,
    )
    assert fmap.n_components() == r * (r + 1) // 2 and fmap.n_components(False) == r * r


def test_phi_inner_products_non_negative_on_adversarial_inputs():
    d = 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    e = torch.eye(d, dtype=torch.float64)
    X = torch.stack(
        [x, -x, 1e6 * x, -1e-6 * x, e[0], e[1], e[0] - e[1], -(e[0] - e[1]), e[0] + 1e-9 * e[1]]
        + [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(20)]
    )
    X = X / X.norm(dim=-1, keepdim=True)
    for degree in (2, 4, 8):
        for seed in range(5):
            fmap = PolySketchMap(d, degree, 16, seed=seed, dtype=torch.float64)
            P = fmap(X)
            gram = P @ P.mT
            assert gram.min() >= -1e-12
            # equals the square of the inner sketch's Gram matrix
            S = fmap.psi(X)
            torch.testing.assert_close(gram, (S @ S.mT) ** 2, rtol=1e-10, atol=1e-12)
    # The attention weights themselves (values = identity) on adversarial keys:
    # the keys +-q and orthogonal ones, in float32.
    q = X[:4].float()[None, None]
    k = torch.cat([X, -X]).float()[None, None]
    v = torch.eye(k.shape[2])[None, None]
    for causal in (False, True):
        w = polysketch_attention(q, k, v, sketch_size=16, causal=causal, block_size=8, seed=1)
        assert w.min() >= -1e-6
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 4), atol=1e-5, rtol=0)


# -- accuracy ----------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_error_shrinks_with_sketch_size(causal):
    q, k, v = _qkv(1, 4, 4, 64, 64, 4, seed=2)
    ref = exact_attention(q, k, v, f=("poly", 4), causal=causal)
    sizes = [8, 32, 128, 256]
    errs = []
    for r in sizes:
        e = [
            float(
                (polysketch_attention(q, k, v, 4, r, causal, 16, seed=s) - ref).norm() / ref.norm()
            )
            for s in range(4)
        ]
        errs.append(np.mean(e))
    slope = np.polyfit(np.log(sizes), np.log(errs), 1)[0]
    # Relative error ~ r^(-1/2) (eps of the inner sketch); measured ~ -0.4.
    assert slope < -0.25, (errs, slope)
    assert errs[-1] < 0.3 and errs[-1] < 0.45 * errs[0], errs


@pytest.mark.parametrize("degree", [2, 4, 6])
@pytest.mark.parametrize("n_q", [37, 12, 1])
def test_one_block_is_exact_causal_poly_attention(degree, n_q):
    q, k, v = _qkv(2, 4, 2, n_q, 37, 8, dv=5, seed=degree)
    ref = exact_attention(q, k, v, f=("poly", degree), causal=True)
    out = polysketch_attention(q, k, v, degree, 16, True, block_size=37, seed=0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    out = polysketch_attention(q, k, v, degree, 16, True, block_size=1000, seed=0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(40, 40), (13, 40), (1, 40), (40, 27)])
def test_matches_explicit_phi(causal, n_q, n_k):
    q, k, v = _qkv(2, 4, 2, n_q, n_k, 6, dv=3, seed=n_q)
    fmap = PolySketchMap(6, 4, 8, seed=7, dtype=torch.float64)
    out = polysketch_attention(q, k, v, 4, 8, causal, block_size=8, learned=fmap)
    ref = _explicit(q, k, v, fmap, causal, 8)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    if causal and n_q > n_k:  # queries before the first key see nothing, like exact_attention
        assert torch.equal(out[:, :, : n_q - n_k], torch.zeros_like(out[:, :, : n_q - n_k]))


@pytest.mark.parametrize("causal", [False, True])
def test_chunking_does_not_change_the_result(causal, monkeypatch):
    q, k, v = _qkv(2, 4, 2, 70, 90, 6, seed=3)
    big = polysketch_attention(q, k, v, 4, 8, causal, block_size=8, seed=2)
    for rows in (1, 40):  # one block per chunk; a few blocks per chunk
        monkeypatch.setattr(ps_mod, "_CHUNK_ROWS", rows)
        small = polysketch_attention(q, k, v, 4, 8, causal, block_size=8, seed=2)
        torch.testing.assert_close(small, big, rtol=1e-10, atol=1e-12)


def test_scale_invariance_and_large_inputs():
    # The target ignores a per-query scale and a common key scale; so must we,
    # also where the raw polynomial would overflow float32 ((1e6)^8 = 1e48).
    q, k, v = _qkv(1, 2, 2, 50, 50, 8, seed=4, dtype=torch.float32)
    ref = polysketch_attention(q, k, v, 8, 16, True, 16, seed=0)
    rows = torch.rand(1, 2, 50, 1, generator=torch.Generator().manual_seed(0)) * 1e6 + 1e-3
    out = polysketch_attention(q * rows, k * 1e6, v, 8, 16, True, 16, seed=0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out = polysketch_attention(q, k * 1e-6, v, 8, 16, False, 16, seed=0)
    ref = polysketch_attention(q, k, v, 8, 16, False, 16, seed=0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# -- structure -----------------------------------------------------------------------
@pytest.mark.parametrize(("n_q", "n_k"), [(64, 64), (20, 64)])
def test_causal_outputs_ignore_future_tokens(n_q, n_k):
    q, k, v = _qkv(1, 4, 2, n_q, n_k, 8, seed=9, dtype=torch.float32)
    base = polysketch_attention(q, k, v, causal=True, sketch_size=8, block_size=16, seed=3)
    offset = n_k - n_q
    for t in (n_k - 1, 40, 33, 48):  # mid-block, block starts
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t:] = 1e3 * torch.randn_like(k2[:, :, t:])
        v2[:, :, t:] = -7.0
        out = polysketch_attention(q, k2, v2, causal=True, sketch_size=8, block_size=16, seed=3)
        past = max(0, t - offset)  # queries at positions < t
        assert torch.equal(out[:, :, :past], base[:, :, :past])
        assert not torch.equal(out[:, :, past:], base[:, :, past:])


@pytest.mark.parametrize("causal", [False, True])
def test_rows_sum_to_one(causal):
    q, k, _ = _qkv(2, 4, 1, 45, 45, 8, seed=1, dtype=torch.float32)
    v = torch.ones(2, 1, 45, 3)
    out = polysketch_attention(q, k, v, causal=causal, block_size=16, seed=0)
    torch.testing.assert_close(out, torch.ones(2, 4, 45, 3), rtol=0, atol=1e-6)


def test_gqa_equals_repeated_heads_and_seeding():
    q, k, v = _qkv(2, 6, 2, 30, 30, 8, seed=11)
    for causal in (False, True):
        a = polysketch_attention(q, k, v, causal=causal, block_size=8, seed=5)
        b = polysketch_attention(
            q,
            k.repeat_interleave(3, 1),
            v.repeat_interleave(3, 1),
            causal=causal,
            block_size=8,
            seed=5,
        )
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a = polysketch_attention(q, k, v, seed=5)
    assert torch.equal(a, polysketch_attention(q, k, v, seed=5))
    assert not torch.allclose(a, polysketch_attention(q, k, v, seed=6))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(
        polysketch_attention(q, k, v, seed=g1), polysketch_attention(q, k, v, seed=g2)
    )
    torch.manual_seed(0)
    c = polysketch_attention(q, k, v)
    torch.manual_seed(0)
    assert torch.equal(c, polysketch_attention(q, k, v))


def test_bfloat16_and_float16():
    q, k, v = _qkv(1, 4, 4, 80, 80, 16, seed=6, dtype=torch.float32)
    for causal in (False, True):
        ref = polysketch_attention(q, k, v, causal=causal, block_size=32, seed=1)
        for dt in (torch.bfloat16, torch.float16):
            out = polysketch_attention(
                q.to(dt), k.to(dt), v.to(dt), causal=causal, block_size=32, seed=1
            )
            assert out.dtype == dt
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_empty_inputs():
    q, k, v = _qkv(1, 2, 2, 0, 5, 4)
    assert polysketch_attention(q, k, v, causal=True).shape == (1, 2, 0, 4)
    q, k, v = _qkv(1, 2, 2, 3, 0, 4)
    out = polysketch_attention(q, k, v, causal=True)
    assert out.shape == (1, 2, 3, 4) and not out.any()


# -- gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = _qkv(1, 2, 1, 10, 10, 3, dv=2, seed=12)
    fmap = PolySketchMap(3, 4, 4, learned=True, seed=1, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    assert torch.autograd.gradcheck(
        lambda q, k, v: polysketch_attention(q, k, v, 4, 4, causal, block_size=4, learned=fmap),
        (q, k, v),
    )
    # gradient of the learned matrices against finite differences
    out = polysketch_attention(q, k, v, 4, 4, causal, block_size=4, learned=fmap)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()).sum().backward()
    grads = [g.grad.clone() for g in fmap.matrices()]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    h = 1e-6
    with torch.no_grad():
        weights = torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()
        G = fmap.matrices()[1]
        G[0, 1] += h
        up = (polysketch_attention(q, k, v, 4, 4, causal, 4, learned=fmap) * weights).sum()
        G[0, 1] -= 2 * h
        down = (polysketch_attention(q, k, v, 4, 4, causal, 4, learned=fmap) * weights).sum()
        G[0, 1] += h
    assert math.isclose(float((up - down) / (2 * h)), float(grads[1][0, 1]), rel_tol=1e-5)


def test_gradients_flow_float32_and_bf16():
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(2, 4, 2, 70, 70, 8, seed=13, dtype=dt)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fmap = PolySketchMap(8, 4, 8, learned=True, seed=0)
        out = polysketch_attention(q, k, v, 4, 8, True, block_size=16, learned=fmap)
        out.float().square().sum().backward()
        for t in (q, k, v, *fmap.matrices()):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# -- errors --------------------------------------------------------------------------
def test_errors_name_argument():
    q, k, v = _qkv(1, 2, 2, 5, 5, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="degree must be even"):
        polysketch_attention(q, k, v, degree=3)
    with pytest.raises(ValueError, match="degree"):
        polysketch_attention(q, k, v, degree=0)
    with pytest.raises(TypeError, match="degree"):
        polysketch_attention(q, k, v, degree=4.0)
    with pytest.raises(ValueError, match="sketch_size"):
        polysketch_attention(q, k, v, sketch_size=0)
    with pytest.raises(TypeError, match="block_size"):
        polysketch_attention(q, k, v, block_size=True)
    with pytest.raises(ValueError, match="block_size"):
        polysketch_attention(q, k, v, block_size=0)
    with pytest.raises(TypeError, match="causal"):
        polysketch_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="seed"):
        polysketch_attention(q, k, v, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        polysketch_attention(q, k, v, seed=-1)
    with pytest.raises(TypeError, match="learned"):
        polysketch_attention(q, k, v, learned=[torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="head_dim"):
        polysketch_attention(q, k, v, learned=PolySketchMap(5, 4, 32))
    with pytest.raises(ValueError, match="sketch_size"):
        polysketch_attention(q, k, v, learned=PolySketchMap(4, 4, 16))
    with pytest.raises(ValueError, match="k must have head dim"):
        polysketch_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="degree"):
        PolySketchMap(4, 5, 8)
    with pytest.raises(TypeError, match="learned"):
        PolySketchMap(4, 4, 8, learned="yes")
    with pytest.raises(ValueError, match="last dim 4"):
        PolySketchMap(4, 4, 8)(torch.zeros(3, 5))


# -- the layer -----------------------------------------------------------------------
@pytest.mark.parametrize("learned", [False, True])
def test_layer_forward_backward(learned):
    torch.manual_seed(0)
    layer = PolySketchAttention(32, 4, 2, degree=4, sketch_size=8, block_size=16, learned=learned)
    x = torch.randn(2, 50, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.q_proj.weight.grad.abs().sum() > 0
    sketch_params = [name for name, _ in layer.named_parameters() if name.startswith("sketch.")]
    if learned:
        assert sketch_params and all(g.grad.abs().sum() > 0 for g in layer.sketch.matrices())
    else:
        assert not sketch_params and "sketch.G0" in layer.state_dict()
    # causal layer: a later token never changes earlier outputs
    with torch.no_grad():
        x2 = x.detach().clone()
        x2[:, 30:] += 5.0
        assert torch.equal(layer(x2)[:, :30], layer(x.detach())[:, :30])
    # the layer computes polysketch_attention with its map
    q = layer.q_proj(x).view(2, 50, 4, 8).transpose(1, 2)
    kk = layer.k_proj(x).view(2, 50, 2, 8).transpose(1, 2)
    vv = layer.v_proj(x).view(2, 50, 2, 8).transpose(1, 2)
    att = polysketch_attention(q, kk, vv, 4, 8, True, 16, learned=layer.sketch)
    torch.testing.assert_close(layer.o_proj(att.transpose(1, 2).reshape(2, 50, 32)), y)


def test_layer_trains():
    torch.manual_seed(1)
    layer = PolySketchAttention(16, 2, causal=False, sketch_size=8, learned=True)
    x = torch.randn(4, 24, 16)
    target = x.flip(1)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    before = float(((layer(x) - target) ** 2).mean().detach())
    G0 = layer.sketch.matrices()[0].detach().clone()
    for _ in range(30):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < before
    assert not torch.equal(G0, layer.sketch.matrices()[0])
