"""The attention functions on a CUDA device: exact where they should be, causal, low precision.

Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_attention_cuda.py``.
"""

import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from streamsketch.attention import (  # noqa: E402
    exact_attention,
    hyper_attention,
    lev_attention,
    polysketch_attention,
)

CUDA = torch.device("cuda")


def _qkv(B, H, H_kv, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=g)
    k = torch.randn(B, H_kv, n, d, generator=g)
    v = torch.randn(B, H_kv, n, d, generator=g)
    return [t.to(CUDA, dtype) for t in (q, k, v)]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("causal", [False, True])
def test_exact_where_they_should_be(causal):
    q, k, v = _qkv(2, 4, 2, 200, 16)
    ref = exact_attention(q, k, v, causal=causal)
    out = hyper_attention(q, k, v, causal=causal, min_seq_len=4096, seed=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out = lev_attention(q, k, v, budget=200, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref4 = exact_attention(q, k, v, f=("poly", 4), causal=causal)
    out = polysketch_attention(q, k, v, degree=4, sketch_size=1024, causal=causal, seed=0)
    if causal:  # one diagonal block (n < block_size): exact polynomial attention
        torch.testing.assert_close(out, ref4, atol=1e-5, rtol=1e-4)
    else:  # sketched throughout: the error of a 1024-wide sketch (about 0.29 on CPU)
        assert _rel(out, ref4) < 0.4


@pytest.mark.parametrize("name", ["hyper", "lev", "polysketch"])
def test_causal_past_outputs_ignore_the_future(name):
    q, k, v = _qkv(1, 4, 2, 2048, 32, seed=1)
    fns = {
        "hyper": lambda k, v: hyper_attention(
            q, k, v, causal=True, block_size=64, sample_size=64, min_seq_len=256, seed=3
        ),
        "lev": lambda k, v: lev_attention(q, k, v, budget=64, window=32, sinks=4, causal=True),
        "polysketch": lambda k, v: polysketch_attention(
            q, k, v, causal=True, sketch_size=16, block_size=128, seed=3
        ),
    }
    base = fns[name](k, v)
    t = 1500
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t:] += 5 * torch.randn_like(k2[:, :, t:])
    v2[:, :, t:] += 5 * torch.randn_like(v2[:, :, t:])
    out = fns[name](k2, v2)
    assert torch.equal(out[:, :, :t], base[:, :, :t])
    assert not torch.equal(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_as_accurate_as_float32(dtype):
    q, k, v = _qkv(1, 8, 8, 4096, 64, seed=2)
    ref = exact_attention(q, k, v, causal=True)
    lo = [t.to(dtype) for t in (q, k, v)]
    for fn in (
        lambda q, k, v: hyper_attention(q, k, v, causal=True, seed=0),
        lambda q, k, v: lev_attention(q, k, v, budget=256, window=64, sinks=4, causal=True),
    ):
        e32, elo = _rel(fn(q, k, v), ref), _rel(fn(*lo), ref)
        assert elo < e32 + 0.02, (e32, elo)
    out = polysketch_attention(*lo, causal=True, seed=0)
    assert out.dtype == dtype and torch.isfinite(out).all()
