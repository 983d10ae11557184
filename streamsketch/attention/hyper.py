"""HyperAttention: sortLSH heavy blocks plus uniformly sampled residual, in torch.

Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention:
Long-context Attention in Near-Linear Time" (ICLR 2024).

Non-causal attention is split into a *heavy* part, found by sorting queries
and keys by an angular LSH code and attending exactly inside aligned blocks of
the sorted order, and a *light* part estimated from keys sampled uniformly at
random with importance weight ``n_k / m``. Causal attention uses the paper's
recursion: the two diagonal quarters are causal sub-problems, the lower-left
quarter is an unmasked HyperAttention. Every part returns its output and its
log-sum-exp (lse) of the logits it covers, so the parts combine into one
properly normalised softmax estimate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._common import causal_mask, check_qkv
from ._layer import AttentionLayer

__all__ = ["HyperAttention", "hyper_attention"]

# Keys whose logits anchor the probe estimate of the lse (see ``_attn_lse``).
_N_PROBE = 8
# With autograd, key sets up to this size are attended by plain matmuls.
_DIRECT_MAX = 1024
# Additive logit of a masked pair: finite, so empty rows give no NaN anywhere.
_NEG = -1e30


# --------------------------------------------------------------------------- checks


def _check_pos_int(name: str, val: Any, lo: int, hi: int | None = None) -> int:
    if (
        isinstance(val, bool)
        or not isinstance(val, int)
        or val < lo
        or (hi is not None and val > hi)
    ):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {rng}, got {val!r}")
    return int(val)


def _check_params(
    block_size: Any, sample_size: Any, lsh_num_projs: Any, min_seq_len: Any
) -> tuple[int, int, int, int]:
    return (
        _check_pos_int("block_size", block_size, 1),
        _check_pos_int("sample_size", sample_size, 0),
        # 2**lsh_num_projs buckets: the Gray-rank table must stay small.
        _check_pos_int("lsh_num_projs", lsh_num_projs, 1, 24),
        _check_pos_int("min_seq_len", min_seq_len, 1),
    )


def _check_seed(seed: Any) -> None:
    if seed is None or isinstance(seed, torch.Generator):
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, a torch.Generator or None, got {seed!r}")


def _check_scale(scale: Any) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    return float(scale)


class _Rng:
    """Draws on the seed's generator (made on ``device`` for an int) and moves to ``device``."""

    def __init__(self, seed: int | torch.Generator | None, device: torch.device) -> None:
        if isinstance(seed, int):
            self.gen: torch.Generator | None = torch.Generator(device=device)
            self.gen.manual_seed(seed)
        else:
            self.gen = seed
        self.draw_device = self.gen.device if self.gen is not None else device
        self.device = device

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.randn(shape, generator=self.gen, device=self.draw_device, dtype=dtype)
        return x.to(self.device)

    def randint(self, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randint(high, shape, generator=self.gen, device=self.draw_device)
        return x.to(self.device)


# --------------------------------------------------------------------------- pieces


def _combine(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax attentions over disjoint key sets from their outputs and lse.

    ``(Z1 o1 + Z2 o2) / (Z1 + Z2)`` with ``Z = exp(lse)``, written with a
    sigmoid so neither ``Z`` is ever formed; ``lerp`` returns ``o1`` exactly
    when the second part is empty (its lse is ``_NEG``).
    """
    c = torch.sigmoid(l1 - l2).unsqueeze(-1)
    return torch.lerp(o2, o1, c), torch.logaddexp(l1, l2)


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _attn_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention and its lse: ``q (N, G, L_q, d)``, ``k, v (N, 1, L_k, d)``.

    ``bias`` is an additive logit mask broadcastable to ``(N, G, L_q, L_k)``
    (masked entries hold ``_NEG``, finite, so an all-masked row has lse about
    ``_NEG`` and weight 0 when combined, and no NaN reaches autograd).
    ``causal`` needs ``L_q == L_k``. Returns ``(N, G, L_q, d_v)``, ``(N, G, L_q)``.

    SDPA does not return the lse. On CPU without autograd the fused kernel's
    entry point that does is used. With autograd, small key sets are done by
    matmul; large ones (the causal leaves) go through SDPA with one extra
    value column holding the weight ``w_i`` that softmax gives a probe set
    ``S`` of keys (the first ``_N_PROBE`` keys, visible to every query, and
    the ``_N_PROBE`` largest-norm keys): ``lse_i = logsumexp_{j in S} s_ij -
    log w_i`` is an identity, so autograd differentiates it exactly. ``w_i``
    underflows only when every probe logit is ~87 below the row's largest
    logit (float32); it is then clamped, which under-estimates that row's lse.
    """
    N, G, L_q, d = q.shape
    L_k, d_v = k.shape[2], v.shape[-1]
    if q.device.type == "cpu" and not _needs_grad(q, k, v, *(() if bias is None else (bias,))):
        op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is not None:
            w = max(d, d_v)  # the kernel wants one head size; zero columns change nothing
            qw, kw, vw = (
                F.pad(t, (0, w - t.shape[-1])) if t.shape[-1] < w else t for t in (q, k, v)
            )
            ke, ve = kw.expand(N, G, L_k, w), vw.expand(N, G, L_k, w)
            out, lse = op(qw, ke, ve, 0.0, causal, attn_mask=bias, scale=scale)
            return out[..., :d_v], lse
    if bias is not None or L_k <= _DIRECT_MAX:
        s = (q @ k.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        if causal:
            s = s.masked_fill(~causal_mask(L_q, L_k, q.device), _NEG)
        lse = torch.logsumexp(s, dim=-1)
        return torch.exp(s - lse[..., None]) @ v, lse
    # The fused kernels need equal q/k/v head dims that are multiples of 8.
    width = -(-(max(d, d_v + 1)) // 8) * 8
    p = min(_N_PROBE, L_k)
    top = k[:, 0].detach().norm(dim=-1).topk(p, dim=-1).indices  # (N, p)
    ind = torch.zeros(N, L_k, device=q.device, dtype=q.dtype)
    ind[:, :p] = 1.0
    ind.scatter_(1, top, 1.0)
    qp, kp = F.pad(q, (0, width - d)), F.pad(k, (0, width - d))
    vp = torch.cat([v, ind[:, None, :, None], v.new_zeros(N, 1, L_k, width - d_v - 1)], dim=-1)
    out = F.scaled_dot_product_attention(
        qp, kp.expand(N, G, L_k, width), vp.expand(N, G, L_k, width), is_causal=causal, scale=scale
    )
    w = out[..., d_v]
    # lse over the probe set, each key once, only the keys a query may see.
    idx = torch.cat([torch.arange(p, device=q.device).expand(N, p), top], dim=1)  # (N, 2p)
    dup = torch.cat([torch.zeros(N, p, dtype=torch.bool, device=q.device), top < p], dim=1)
    kS = k[:, 0].gather(1, idx[..., None].expand(N, 2 * p, d))  # (N, 2p, d)
    sS = (q @ kS[:, None].transpose(-1, -2)) * scale  # (N, G, L_q, 2p)
    hide = dup[:, None, None, :]
    if causal:
        hide = hide | (idx[:, None, None, :] > torch.arange(L_q, device=q.device)[:, None])
    sS = sS.masked_fill(hide, float("-inf"))
    tiny = torch.finfo(w.dtype).tiny
    lse = torch.logsumexp(sS, dim=-1) - torch.log(w.clamp_min(tiny))
    return out[..., :d_v], lse


_GRAY_RANK: dict[tuple[int, torch.device], torch.Tensor] = {}


def _gray_rank(r: int, device: torch.device) -> torch.Tensor:
    """``rank[b]``: position of bucket ``b`` in the reflected Gray sequence.

    Consecutive ranks are buckets one sign flip apart, so sorting by rank puts
    buckets at Hamming distance 1 next to each other.
    """
    key = (r, device)
    if key not in _GRAY_RANK:
        i = torch.arange(2**r, device=device)
        rank = torch.empty_like(i)
        rank[i ^ (i >> 1)] = i
        _GRAY_RANK[key] = rank
    return _GRAY_RANK[key]


def _lsh_order(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Stable argsort of ``x (P, n, d)`` by Gray rank of its angular LSH bucket."""
    r = proj.shape[1]
    bits = (x @ proj) > 0
    pow2 = 2 ** torch.arange(r, device=x.device)
    code = (bits.to(torch.int64) * pow2).sum(-1)
    return torch.sort(_gray_rank(r, x.device)[code], dim=-1, stable=True).indices


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (P, n, ...)`` rows ``idx (P, m)`` -> ``(P, m, ...)``."""
    # Advanced indexing copies whole rows; it is faster on CPU than an expanded-index gather.
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def _hyper_noncausal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_size: int,
    sample_size: int,
    proj: torch.Tensor,
    rng: _Rng,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked HyperAttention of ``q (P, m_q, d)`` on ``k, v (P, n_k, d)``; output and lse.

    The queries of one problem may come from several heads (grouped-query
    attention pools the heads that share a KV head): each query only ever
    attends to its own problem's keys, so pooling changes no query's target.
    """
    P, m_q, d = q.shape
    n_k, d_v = k.shape[1], v.shape[-1]
    nb = -(-n_k // block_size)
    bs = block_size if nb > 1 else n_k
    qbs = -(-m_q // nb)
    q_ord, k_ord = _lsh_order(q, proj), _lsh_order(k, proj)
    qs, ks, vs = _take(q, q_ord), _take(k, k_ord), _take(v, k_ord)
    pad_q, pad_k = nb * qbs - m_q, nb * bs - n_k
    if pad_q:
        qs = F.pad(qs, (0, 0, 0, pad_q))
    if pad_k:
        ks, vs = F.pad(ks, (0, 0, 0, pad_k)), F.pad(vs, (0, 0, 0, pad_k))
    # Heavy part: block b of the sorted queries against block b of the sorted keys.
    hb = None
    if pad_k:
        # Padding sits at the end of the last block; that block keeps >= 1 real key.
        pad = torch.arange(nb * bs, device=q.device).view(nb, 1, bs) >= n_k
        hb = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad, _NEG)
        hb = hb.expand(P, nb, 1, bs).reshape(P * nb, 1, 1, bs)
    out, lse = _attn_lse(
        qs.view(P * nb, 1, qbs, d),
        ks.view(P * nb, 1, bs, d),
        vs.view(P * nb, 1, bs, d_v),
        scale,
        bias=hb,
    )
    out, lse = out.view(P, nb, qbs, d_v), lse.view(P, nb, qbs)
    # A single block is the whole key set: exact, nothing left to sample.
    if sample_size > 0 and nb > 1:
        pick = rng.randint(n_k, (P, sample_size))  # positions in the sorted order
        # Keys of the query's own block are already in the heavy part.
        own = (pick // bs)[:, None, None, :] == torch.arange(nb, device=q.device)[:, None, None]
        lb = torch.zeros(own.shape, dtype=q.dtype, device=q.device).masked_fill(own, _NEG)
        ol, ll = _attn_lse(
            qs.view(P, nb, qbs, d),
            _take(ks, pick)[:, None],
            _take(vs, pick)[:, None],
            scale,
            bias=lb,
        )
        # Importance weight n_k / m of each sampled key, in log space.
        out, lse = _combine(out, lse, ol, ll + math.log(n_k / sample_size))
    out = out.reshape(P, nb * qbs, d_v)[:, :m_q]
    lse = lse.reshape(P, nb * qbs)[:, :m_q]
    inv = torch.empty_like(q_ord).scatter_(
        1, q_ord, torch.arange(m_q, device=q.device).expand(P, m_q)
    )
    return _take(out, inv), _take(lse, inv)


# --------------------------------------------------------------------------- drivers


class _Cfg:
    def __init__(
        self,
        scale: float,
        block_size: int,
        sample_size: int,
        min_seq_len: int,
        proj: torch.Tensor,
        rng: _Rng,
    ) -> None:
        self.scale, self.block_size, self.sample_size = scale, block_size, sample_size
        self.min_seq_len, self.proj, self.rng = min_seq_len, proj, rng


def _noncausal_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: _Cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (B, Hk, g, n_q, d)``, ``k, v (B, Hk, n_k, d)`` -> output and lse, unmasked."""
    B, Hk, g, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    if n_q < cfg.min_seq_len:
        out, lse = _attn_lse(
            q.reshape(B * Hk, g, n_q, d),
            k.reshape(B * Hk, 1, n_k, d),
            v.reshape(B * Hk, 1, n_k, d_v),
            cfg.scale,
        )
    else:
        out, lse = _hyper_noncausal(
            q.reshape(B * Hk, g * n_q, d),
            k.reshape(B * Hk, n_k, d),
            v.reshape(B * Hk, n_k, d_v),
            cfg.scale,
            cfg.block_size,
            cfg.sample_size,
            cfg.proj,
            cfg.rng,
        )
    return out.view(B, Hk, g, n_q, d_v), lse.view(B, Hk, g, n_q)


def _causal_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: _Cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square causal problem ``q (B, Hk, g, n, d)``, ``k, v (B, Hk, n, d)``: output and lse.

    The paper's recursion, unrolled: ``D`` halvings bring the diagonal blocks
    to ``L <= min_seq_len`` rows. All ``2^D`` diagonal leaves run as one
    batched exact causal call; then each level ``l = D..1`` adds, to the second
    half of each of its ``2^(l-1)`` blocks, one batched unmasked attention of
    that half's queries on the first half's keys. The sequence is zero-padded
    at the end to ``L * 2^D``; causality keeps padded keys away from real queries.
    """
    B, Hk, g, n, d = q.shape
    d_v = v.shape[-1]
    D = 0
    while -(-n // 2**D) > cfg.min_seq_len:
        D += 1
    L = -(-n // 2**D)
    n2 = L * 2**D
    if n2 != n:
        q = F.pad(q, (0, 0, 0, n2 - n))
        k, v = F.pad(k, (0, 0, 0, n2 - n)), F.pad(v, (0, 0, 0, n2 - n))
    nl = 2**D
    ql = q.view(B, Hk, g, nl, L, d).transpose(2, 3).reshape(B * Hk * nl, g, L, d)
    out, lse = _attn_lse(
        ql,
        k.reshape(B * Hk * nl, 1, L, d),
        v.reshape(B * Hk * nl, 1, L, d_v),
        cfg.scale,
        causal=True,
    )
    out = out.view(B, Hk, nl, g, L, d_v).transpose(2, 3).reshape(B, Hk, g, n2, d_v)
    lse = lse.view(B, Hk, nl, g, L).transpose(2, 3).reshape(B, Hk, g, n2)
    for lev in range(D, 0, -1):
        M, Ll = 2 ** (lev - 1), n2 // 2**lev
        qb = q.view(B, Hk, g, M, 2, Ll, d)[:, :, :, :, 1].transpose(2, 3)
        kb = k.view(B, Hk, M, 2, Ll, d)[:, :, :, 0]
        vb = v.view(B, Hk, M, 2, Ll, d_v)[:, :, :, 0]
        ob, lb = _noncausal_lse(
            qb.reshape(B, Hk * M, g, Ll, d),
            kb.reshape(B, Hk * M, Ll, d),
            vb.reshape(B, Hk * M, Ll, d_v),
            cfg,
        )
        ob = ob.view(B, Hk, M, g, Ll, d_v).transpose(2, 3)
        lb = lb.view(B, Hk, M, g, Ll).transpose(2, 3)
        o6 = out.view(B, Hk, g, M, 2, Ll, d_v)
        l6 = lse.view(B, Hk, g, M, 2, Ll)
        oc, lc = _combine(o6[:, :, :, :, 1], l6[:, :, :, :, 1], ob, lb)
        out = torch.stack([o6[:, :, :, :, 0], oc], dim=4).view(B, Hk, g, n2, d_v)
        lse = torch.stack([l6[:, :, :, :, 0], lc], dim=4).view(B, Hk, g, n2)
    return out[:, :, :, :n], lse[:, :, :, :n]


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_size: int = 256,
    sample_size: int = 256,
    lsh_num_projs: int = 7,
    min_seq_len: int = 4096,
    seed: int | torch.Generator | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """HyperAttention: near-linear-time approximate softmax attention.

    Parameters
    ----------
    q : torch.Tensor, (B, H, n_q, d)
    k : torch.Tensor, (B, H_kv, n_k, d)
    v : torch.Tensor, (B, H_kv, n_k, d_v)
        float32, float64, bfloat16 or float16, one device. ``H`` a multiple of
        ``H_kv`` (grouped-query attention: the query heads that share a KV head
        are sorted and sampled together).
    causal : bool, default False
        Bottom-right aligned causal mask (query ``i`` sees keys
        ``j <= i + n_k - n_q``).
    block_size : int, default 256
        Keys per block of the sorted order in the heavy (block-diagonal) part.
    sample_size : int, default 256
        Keys sampled uniformly (with replacement) per head for the light part;
        0 keeps only the heavy part.
    lsh_num_projs : int, default 7
        Random hyperplanes of the angular LSH (``2**lsh_num_projs`` buckets).
    min_seq_len : int, default 4096
        Below it attention is exact: non-causal problems with ``n_q <
        min_seq_len``, causal blocks with ``n <= min_seq_len`` (the leaves of
        the recursion).
    seed : int, torch.Generator or None
        Source of the LSH hyperplanes and the samples. An int makes a
        generator on ``q.device``; same seed and inputs give identical outputs.
        None draws from torch's global generator.
    scale : float, optional
        Softmax temperature, default ``1/sqrt(d)``.

    Returns
    -------
    torch.Tensor, (B, H, n_q, d_v), dtype of ``q``.
        Half-precision inputs are computed in float32.

    Notes
    -----
    Non-causal (sortLSH + sampling, Algorithm 3 of the paper): queries and keys
    are hashed by the signs of ``lsh_num_projs`` shared Gaussian projections,
    ordered by the Gray-code rank of their bucket (adjacent buckets differ in
    one sign), and sorted. The heavy part is exact attention inside the
    ``ceil(n_k / block_size)`` aligned blocks of the sorted order. The light
    part attends every query to ``sample_size`` uniformly sampled keys with
    logit ``+ log(n_k / sample_size)`` (importance weight), masking sampled
    keys in the query's own block so no pair counts twice. Both share one
    softmax, so each query's normaliser is the heavy sum plus an unbiased
    estimate of the rest. Guarantee (the paper's Theorem 1): if the LSH finds
    the large entries and the residual matrix has bounded column norms, the
    output has spectral error ``eps * ||softmax|| * ||V||`` with
    ``sample_size = O(polylog n / eps^2)``.

    Causal (Algorithm 4): split in halves; the two diagonal quarters are causal
    sub-problems, the lower-left quarter is the non-causal algorithm; parts
    merge through their log-sum-exps. Blocks of ``n <= min_seq_len`` are exact
    (fused ``scaled_dot_product_attention``).

    Causality caveat (shared with the paper's algorithm): no output depends
    on a future *key or value*, but inside a non-causal sub-problem the
    queries are sorted together, so a later *query* can move an earlier
    query to another block and change its output slightly. In a causal
    layer, where a token's q, k and v come together, a later token can
    therefore perturb earlier outputs; do not rely on strict causality of
    this approximation for training with teacher forcing.

    Cost per head with ``b = block_size``, ``m = sample_size``: non-causal
    ``O(n_q (b + m) d + n log n)`` time, ``O(n_q (b + m))`` workspace; causal
    ``O(n L d + n (b + m) d log(n / L))`` time with leaves of size
    ``L <= min_seq_len``. Nothing of size ``n_q x n_k`` is formed.
    """
    H, H_kv = check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    block_size, sample_size, lsh_num_projs, min_seq_len = _check_params(
        block_size, sample_size, lsh_num_projs, min_seq_len
    )
    _check_seed(seed)
    scale_ = _check_scale(scale)
    B, _, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    scale_ = d**-0.5 if scale_ is None else scale_
    out_dtype = q.dtype
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    # Contiguous so that every split of the sequence below is a view.
    q, k, v = (t.to(compute).contiguous() for t in (q, k, v))
    g = H // H_kv

    if n_q == 0 or n_k == 0:
        return q.new_zeros(B, H, n_q, d_v, dtype=out_dtype)
    if not causal and n_q < min_seq_len:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale_, enable_gqa=H != H_kv)
        return out.to(out_dtype)
    if causal and n_k <= min_seq_len:
        if n_q == n_k:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale_, enable_gqa=H != H_kv
            )
        else:
            mask = causal_mask(n_q, n_k, q.device, q_start=n_k - n_q)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale_, enable_gqa=H != H_kv
            )
            # Rows with no visible key (n_q > n_k) are 0, as in exact_attention.
            out = torch.nan_to_num(out, nan=0.0)
        return out.to(out_dtype)

    rng = _Rng(seed, q.device)
    cfg = _Cfg(
        scale_, block_size, sample_size, min_seq_len, rng.randn((d, lsh_num_projs), compute), rng
    )
    q5 = q.view(B, H_kv, g, n_q, d)
    if not causal:
        out, _ = _noncausal_lse(q5, k, v, cfg)
        return out.reshape(B, H, n_q, d_v).to(out_dtype)
    if n_q > n_k:
        # The first n_q - n_k queries see no key; the rest is a square problem.
        sq, _ = _causal_lse(q5[:, :, :, n_q - n_k :], k, v, cfg)
        out = torch.cat([sq.new_zeros(B, H_kv, g, n_q - n_k, d_v), sq], dim=3)
    elif n_q < n_k:
        # Bottom-right alignment: the first n_k - n_q keys are visible to every query.
        pre = n_k - n_q
        o1, l1 = _noncausal_lse(q5, k[:, :, :pre], v[:, :, :pre], cfg)
        o2, l2 = _causal_lse(q5, k[:, :, pre:], v[:, :, pre:], cfg)
        out, _ = _combine(o1, l1, o2, l2)
    else:
        out, _ = _causal_lse(q5, k, v, cfg)
    return out.reshape(B, H, n_q, d_v).to(out_dtype)


class HyperAttention(AttentionLayer):
    """Multi-head attention layer whose attention is :func:`hyper_attention`.

    Parameters
    ----------
    embed_dim, num_heads, num_kv_heads, causal, bias
        As in :class:`~streamsketch.attention.AttentionLayer`.
    block_size, sample_size, lsh_num_projs, min_seq_len
        As in :func:`hyper_attention`.
    seed : int or None
        An int gives every forward pass the same hyperplanes and samples
        (deterministic layer); None draws fresh ones from torch's global
        generator on each call.

    ``forward(x)`` maps ``(B, n, E) -> (B, n, E)``; cost as in
    :func:`hyper_attention` plus the four ``O(n E^2)`` projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        block_size: int = 256,
        sample_size: int = 256,
        lsh_num_projs: int = 7,
        min_seq_len: int = 4096,
        seed: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(embed_dim, num_heads, num_kv_heads, causal=causal, bias=bias)
        self.block_size, self.sample_size, self.lsh_num_projs, self.min_seq_len = _check_params(
            block_size, sample_size, lsh_num_projs, min_seq_len
        )
        if isinstance(seed, torch.Generator):
            raise TypeError("seed of a layer must be an int or None (a layer is re-run)")
        _check_seed(seed)
        self.seed = seed

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return hyper_attention(
            q,
            k,
            v,
            causal=self.causal,
            block_size=self.block_size,
            sample_size=self.sample_size,
            lsh_num_projs=self.lsh_num_projs,
            min_seq_len=self.min_seq_len,
            seed=self.seed,
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, causal={self.causal}, "
            f"block_size={self.block_size}, sample_size={self.sample_size}, "
            f"lsh_num_projs={self.lsh_num_projs}, min_seq_len={self.min_seq_len}"
        )
