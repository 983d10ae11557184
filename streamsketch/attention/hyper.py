"""HyperAttention: sortLSH heavy blocks plus uniformly sampled residual, in torch.

Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention:
Long-context Attention in Near-Linear Time" (ICLR 2024).

Non-causal attention is split into a *heavy* part, found by sorting the keys
by an angular LSH code, cutting them into blocks and attending each query
exactly to the block its own code falls in, and a *light* part estimated from
keys sampled uniformly at random from the other blocks with importance
weight. Causal attention uses the paper's recursion: the two diagonal
quarters are causal sub-problems, the lower-left quarter is an unmasked
HyperAttention. Every part returns its output and its log-sum-exp (lse) of
the logits it covers, so the parts combine into one properly normalised
softmax estimate. A query's output never depends on other queries or on keys
it may not see.
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
# Rows of a small tile (queries beyond their block's big tiles).
_SMALL_TILE = 64
# Key rows gathered per kernel call on the CPU without autograd (see _hyper_rows).
_CHUNK_ROWS = 16384


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

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.rand(shape, generator=self.gen, device=self.draw_device, dtype=dtype)
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
            hd = max(d, d_v)  # the kernel wants one head size; zero columns change nothing
            qw, kw, vw = (
                F.pad(t, (0, hd - t.shape[-1])) if t.shape[-1] < hd else t for t in (q, k, v)
            )
            ke, ve = kw.expand(N, G, L_k, hd), vw.expand(N, G, L_k, hd)
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


def _lsh_values(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Sort key of each row of ``x (..., n, d)``: float64 ``(..., n)``.

    ``proj (d, r + 1)``: the integer part is the Gray rank of the angular LSH
    bucket (signs of the first ``r`` projections), the fraction the cosine with
    the last projection, mapped into ``(0, 1)``. The fraction spreads the rows
    of one bucket along a direction, so a query falls *inside* its bucket's run
    of sorted keys instead of at its start (which would pile every query of a
    large bucket onto one block); it is a function of the row alone.
    """
    r = proj.shape[1] - 1
    with torch.no_grad():
        t = x.detach() @ proj
        pow2 = 2.0 ** torch.arange(r, device=x.device, dtype=t.dtype)
        # Exact in float32: a sum of distinct powers of two below 2**24.
        code = ((t[..., :r] > 0).to(t.dtype) @ pow2).to(torch.int64)
        rank = _gray_rank(r, x.device)[code]
        norm: torch.Tensor = x.detach().norm(dim=-1) * proj[:, r].norm()
        cos = (t[..., r] / norm.clamp_min(torch.finfo(t.dtype).tiny)).clamp(-1.0, 1.0)
        return rank.to(torch.float64) + (0.5 + 0.49 * cos.to(torch.float64))


class _Cfg:
    def __init__(
        self,
        scale: float,
        block_size: int,
        sample_size: int,
        min_seq_len: int,
        proj: torch.Tensor,
        rng: _Rng,
        grad: bool,
    ) -> None:
        self.scale, self.block_size, self.sample_size = scale, block_size, sample_size
        self.min_seq_len, self.proj, self.rng, self.grad = min_seq_len, proj, rng, grad


def _hyper_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qval: torch.Tensor,
    kval: torch.Tensor,
    q_rows: torch.Tensor,
    k_base: torch.Tensor,
    n_k: int,
    exact: bool,
    cfg: _Cfg,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked HyperAttention of ``P`` problems given by rows of flat tensors.

    ``q (R_q, d)``, ``k (R_k, d)``, ``v (R_k, d_v)`` and their sort keys
    ``qval (R_q,)``, ``kval (R_k,)``; problem ``p`` has queries
    ``q_rows[p] (m_q,)`` (in time order) and keys ``k_base[p] + [0, n_k)``.
    Returns output ``(P, m_q, d_v)`` and lse ``(P, m_q)`` in ``q_rows`` order;
    ``exact`` attends every query to every key instead.

    Keys are sorted by their sort key and cut into ``nb`` blocks of
    ``block_size``; a query joins the block of the last sorted key below its
    own sort key (block 0 if none), and attends in one softmax to that block
    exactly and to ``sample_size`` keys drawn uniformly from the *other*
    blocks (so no pair counts twice), each with weight ``rest / sample_size``.
    Blocks and samples are functions of the keys and the seed only, so a
    query's output depends on no other query. The queries of a block are
    packed into tiles (padded; padding rows read an arbitrary query and are
    dropped) and each tile is one fused attention call against its block's
    ``block_size + sample_size`` keys. The kernel computes every row on its
    own, so which tile and row a query lands in does not change its result.
    """
    P, m_q = q_rows.shape
    d, d_v = q.shape[1], v.shape[1]
    dev = q.device
    k_rows = k_base[:, None] + torch.arange(n_k, device=dev)
    if exact:
        qg = q.index_select(0, q_rows.reshape(-1)).view(P, 1, m_q, d)
        kg = k.index_select(0, k_rows.reshape(-1)).view(P, 1, n_k, d)
        vg = v.index_select(0, k_rows.reshape(-1)).view(P, 1, n_k, d_v)
        out, lse = _attn_lse(qg, kg, vg, cfg.scale)
        return out.reshape(P, m_q, d_v), lse.view(P, m_q)
    bs, m = cfg.block_size, cfg.sample_size
    nb = -(-n_k // bs)
    ar = torch.arange(max(bs, nb), device=dev)
    ks, k_ord = torch.sort(kval[k_rows], dim=1, stable=True)
    # Block of each query: where its own key falls among the sorted keys, i.e.
    # how many block boundaries lie below it. Offset by the problem's first
    # block id, so one stable sort gives each query's rank in its block (the
    # earlier queries of the block come first).
    blk = torch.searchsorted(ks[:, bs::bs].contiguous(), qval[q_rows])
    blk += (torch.arange(P, device=dev) * nb)[:, None]
    fblk, order = torch.sort(blk, dim=1, stable=True)  # flat block id, sorted order
    counts = torch.bincount(fblk.view(-1), minlength=P * nb)
    rank = torch.arange(P * m_q, device=dev).view(P, m_q) - (counts.cumsum(0) - counts)[fblk]
    # A block's queries fill big tiles of C rows (a little over the balanced
    # share m_q / nb; one more, padded, when at least C/4 are left) and small
    # tiles of T rows for the rest: few padded rows when queries are balanced,
    # and no idle tiles when they crowd into a few blocks. Multiples of 8, so
    # no kernel call sees a one-row block.
    C = -(-(9 * m_q) // (64 * nb)) * 8
    T = min(C, _SMALL_TILE)
    nbig = (counts + (C - C // 4)).div_(C, rounding_mode="floor")
    nsmall = (counts - nbig * C).clamp_(min=0).add_(T - 1).div_(T, rounding_mode="floor")
    n_big, n_small = (int(x) for x in torch.stack([nbig.sum(), nsmall.sum()]).tolist())
    big_rows = n_big * C
    bigbase = (nbig.cumsum(0) - nbig) * C
    smallbase = big_rows + (nsmall.cumsum(0) - nsmall) * T - nbig * C
    slot = torch.where(rank < (nbig * C)[fblk], bigbase[fblk], smallbase[fblk]).add_(rank)
    # Unused slots read row 0: any valid row, their outputs are never read.
    src = torch.zeros(big_rows + n_small * T, dtype=torch.int64, device=dev)
    src[slot.view(-1)] = q_rows.gather(1, order).view(-1)
    slot_q = torch.empty_like(slot).scatter_(1, order, slot)

    # Keys of each block: its sorted keys (padded with key 0, masked) and its samples.
    k_idx = F.pad(k_ord, (0, nb * bs - n_k)).view(P, nb, bs)
    size = torch.full((nb,), bs, dtype=torch.int64, device=dev)
    size[-1] = n_k - (nb - 1) * bs
    bias = torch.zeros(nb, bs + m, dtype=q.dtype, device=dev)
    bias[:, :bs].masked_fill_(ar[:bs] >= size[:, None], _NEG)
    if m > 0:
        rest = n_k - size  # keys outside the block, > 0 as nb > 1
        u = cfg.rng.rand((P, nb, m), torch.float64)
        pos = (u * rest[:, None]).to(torch.int64).clamp_(max=rest[:, None] - 1)
        pos += (pos >= (ar[:nb] * bs)[:, None]) * size[:, None]  # skip the block itself
        samp = k_ord.gather(1, pos.view(P, nb * m)).view(P, nb, m)
        k_idx = torch.cat([k_idx, samp], dim=2)
        # Importance weight rest / m of each sampled key, in log space.
        bias[:, bs:] = torch.log(rest.to(torch.float64) / m).to(q.dtype)[:, None]
    K = bs + m
    k_idx = (k_idx + k_base[:, None, None]).view(P * nb, K)
    # On the CPU without autograd, tiles go through the kernel a few at a time so
    # each gathered block stays small: the allocator then reuses freed memory
    # instead of mapping (and page-faulting) fresh pages for every gather. At
    # n = 16 384 (block = sample = 256) a call took 0.58-0.60 s before, 0.50-0.52 s
    # with the chunks and the direct writes below, and 0.51 s unchunked with glibc
    # told never to map fresh pages. Each tile is still one kernel row block, so
    # the chunking changes no result.
    chunked = dev.type == "cpu" and not cfg.grad
    outs, lses = [], []
    if chunked:
        # Each chunk's rows go straight to their queries' places; padding
        # slots all land on one spare row at the end, which is dropped.
        n_out = P * m_q
        dest = torch.full((big_rows + n_small * T,), n_out, dtype=torch.int64, device=dev)
        dest[slot_q.view(-1)] = torch.arange(n_out, device=dev)
        out_all = torch.empty(n_out + 1, d_v, dtype=q.dtype, device=dev)
        lse_all = torch.empty(n_out + 1, dtype=q.dtype, device=dev)
    for n_t, rows, per, base in ((n_big, C, nbig, 0), (n_small, T, nsmall, big_rows)):
        if n_t == 0:
            continue
        tb = torch.repeat_interleave(torch.arange(P * nb, device=dev), per, output_size=n_t)
        step = max(1, _CHUNK_ROWS // K) if chunked else n_t
        for c0 in range(0, n_t, step):
            c1 = min(n_t, c0 + step)
            grow = k_idx.index_select(0, tb[c0:c1]).view(-1)
            o, lo = _attn_lse(
                q.index_select(0, src[base + c0 * rows : base + c1 * rows]).view(
                    c1 - c0, 1, rows, d
                ),
                k.index_select(0, grow).view(c1 - c0, 1, K, d),
                v.index_select(0, grow).view(c1 - c0, 1, K, d_v),
                cfg.scale,
                bias=bias.index_select(0, tb[c0:c1] % nb).view(c1 - c0, 1, 1, K),
            )
            if chunked:
                rows_to = dest[base + c0 * rows : base + c1 * rows]
                out_all.index_copy_(0, rows_to, o.reshape(-1, d_v))
                lse_all.index_copy_(0, rows_to, lo.reshape(-1).to(lse_all.dtype))
            else:
                outs.append(o.reshape(-1, d_v))
                lses.append(lo.reshape(-1))
    if chunked:
        return out_all[:n_out].view(P, m_q, d_v), lse_all[:n_out].view(P, m_q)
    # Slots in tile order: big tiles first, then small ones, as ``slot`` numbers them.
    sq = slot_q.view(-1)
    out = torch.cat(outs).index_select(0, sq) if len(outs) > 1 else outs[0].index_select(0, sq)
    lse = torch.cat(lses).index_select(0, sq) if len(lses) > 1 else lses[0].index_select(0, sq)
    return out.view(P, m_q, d_v), lse.view(P, m_q)


# --------------------------------------------------------------------------- drivers


def _combine_into(out: torch.Tensor, lse: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> None:
    """``_combine`` written into the views ``out, lse`` (no autograd: in place)."""
    out.lerp_(o2, torch.sigmoid(l2 - lse).unsqueeze(-1))
    torch.logaddexp(lse, l2, out=lse)


def _noncausal_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qval: torch.Tensor,
    kval: torch.Tensor,
    cfg: _Cfg,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (B, Hk, g, n_q, d)``, ``k, v (B, Hk, n_k, d)`` -> output and lse, unmasked."""
    B, Hk, g, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    dev = q.device
    bh = torch.arange(B * Hk, device=dev)
    # Queries of one KV head pooled in time order: (t, head) -> row.
    q_rows = (bh[:, None, None] * g + torch.arange(g, device=dev)) * n_q + torch.arange(
        n_q, device=dev
    )[:, None]
    exact = n_q < cfg.min_seq_len or n_k <= cfg.block_size + cfg.sample_size
    out, lse = _hyper_rows(
        q.reshape(-1, d),
        k.reshape(-1, d),
        v.reshape(-1, d_v),
        qval.reshape(-1),
        kval.reshape(-1),
        q_rows.view(B * Hk, n_q * g),
        bh * n_k,
        n_k,
        exact,
        cfg,
    )
    out = out.view(B, Hk, n_q, g, d_v).transpose(2, 3)
    return out, lse.view(B, Hk, n_q, g).transpose(2, 3)


def _causal_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qval: torch.Tensor,
    kval: torch.Tensor,
    cfg: _Cfg,
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
        qval, kval = F.pad(qval, (0, n2 - n)), F.pad(kval, (0, n2 - n))
    nl = 2**D
    ql = q.view(B, Hk, g, nl, L, d).transpose(2, 3).reshape(B * Hk * nl, g, L, d)
    out, lse = _attn_lse(
        ql,
        k.reshape(B * Hk * nl, 1, L, d),
        v.reshape(B * Hk * nl, 1, L, d_v),
        cfg.scale,
        causal=True,
    )
    out = out.reshape(B, Hk, nl, g, L, d_v).transpose(2, 3).reshape(B, Hk, g, n2, d_v)
    lse = lse.view(B, Hk, nl, g, L).transpose(2, 3).reshape(B, Hk, g, n2)
    qf, kf, vf = q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d_v)
    qvf, kvf = qval.reshape(-1), kval.reshape(-1)
    dev = q.device
    bh = torch.arange(B * Hk, device=dev)
    for lev in range(D, 0, -1):
        M, Ll = 2 ** (lev - 1), n2 // 2**lev
        mi = torch.arange(M, device=dev) * (2 * Ll)
        # Problem (bh, mi): keys are the first half of block mi, queries its second half.
        k_base = (bh[:, None] * n2 + mi).view(-1)
        q_rows = (
            (bh[:, None, None, None] * g + torch.arange(g, device=dev)) * n2
            + mi[:, None, None]
            + Ll
            + torch.arange(Ll, device=dev)[:, None]
        )  # (B*Hk, M, Ll, g): time-major inside a problem
        exact = Ll < cfg.min_seq_len or Ll <= cfg.block_size + cfg.sample_size
        ob, lb = _hyper_rows(qf, kf, vf, qvf, kvf, q_rows.view(-1, Ll * g), k_base, Ll, exact, cfg)
        ob = ob.view(B, Hk, M, Ll, g, d_v).permute(0, 1, 4, 2, 3, 5)
        lb = lb.view(B, Hk, M, Ll, g).permute(0, 1, 4, 2, 3)
        o6 = out.view(B, Hk, g, M, 2, Ll, d_v)
        l6 = lse.view(B, Hk, g, M, 2, Ll)
        if cfg.grad:
            oc, lc = _combine(o6[:, :, :, :, 1], l6[:, :, :, :, 1], ob, lb)
            out = torch.stack([o6[:, :, :, :, 0], oc], dim=4).view(B, Hk, g, n2, d_v)
            lse = torch.stack([l6[:, :, :, :, 0], lc], dim=4).view(B, Hk, g, n2)
        else:
            _combine_into(o6[:, :, :, :, 1], l6[:, :, :, :, 1], ob, lb)
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
    are hashed by the signs of ``lsh_num_projs`` shared Gaussian projections
    and ordered by the Gray-code rank of their bucket (adjacent buckets differ
    in one sign), ties inside a bucket ordered by the cosine with one more
    random direction. The keys are sorted and cut into ``ceil(n_k /
    block_size)`` blocks; each query joins the block where its own sort key
    falls among the sorted keys (a binary search: no other query takes part).
    The heavy part is exact attention of each query to its block. The light
    part attends every query to ``sample_size`` keys sampled uniformly from
    the other blocks, with logit ``+ log(rest / sample_size)`` (importance
    weight), so no pair counts twice. Both share one softmax, so each query's
    normaliser is the heavy sum plus an unbiased estimate of the rest.
    Guarantee (the paper's Theorem 1): if the LSH finds the large entries and
    the residual matrix has bounded column norms, the output has spectral
    error ``eps * ||softmax|| * ||V||`` with ``sample_size = O(polylog n /
    eps^2)``.

    Causal (Algorithm 4): split in halves; the two diagonal quarters are causal
    sub-problems, the lower-left quarter is the non-causal algorithm; parts
    merge through their log-sum-exps. Blocks of ``n <= min_seq_len`` are exact
    (fused ``scaled_dot_product_attention``). Each query's output is a
    function of that query, the keys and values it may see, and the seed:
    blocks and samples are drawn from keys only, so neither a later key nor
    any other query (earlier or later) changes it, bit for bit. (With
    autograd, a causal leaf longer than 1024 anchors its lse on its
    largest-norm keys, see ``_attn_lse``; there a later key can move an
    earlier output by rounding, never by more.)

    Cost per head with ``b = block_size``, ``m = sample_size``: non-causal
    ``O(n_q (b + m) d + (n_q + n_k) log n_k)`` time, ``O(n_q (b + m))``
    workspace; causal ``O(n L d + n (b + m) d log(n / L))`` time with leaves of
    size ``L <= min_seq_len``. Nothing of size ``n_q x n_k`` is formed. The
    queries of a block are packed into tiles of a little over ``n_q /
    n_blocks`` rows (smaller tiles for crowded blocks), so when queries crowd
    into few blocks the work stays ``O(n_q (b + m))``; sizing the tiles reads
    one count back to the host per non-causal sub-problem level (a device
    synchronisation on GPU).
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
    proj = rng.randn((d, lsh_num_projs + 1), compute)
    cfg = _Cfg(scale_, block_size, sample_size, min_seq_len, proj, rng, _needs_grad(q, k, v))
    q5 = q.view(B, H_kv, g, n_q, d)
    qval, kval = _lsh_values(q5, proj), _lsh_values(k, proj)
    if not causal:
        out, _ = _noncausal_lse(q5, k, v, qval, kval, cfg)
        return out.reshape(B, H, n_q, d_v).to(out_dtype)
    if n_q > n_k:
        # The first n_q - n_k queries see no key; the rest is a square problem.
        sq, _ = _causal_lse(q5[:, :, :, n_q - n_k :], k, v, qval[..., n_q - n_k :], kval, cfg)
        out = torch.cat([sq.new_zeros(B, H_kv, g, n_q - n_k, d_v), sq], dim=3)
    elif n_q < n_k:
        # Bottom-right alignment: the first n_k - n_q keys are visible to every query.
        pre = n_k - n_q
        o1, l1 = _noncausal_lse(q5, k[:, :, :pre], v[:, :, :pre], qval, kval[..., :pre], cfg)
        o2, l2 = _causal_lse(q5, k[:, :, pre:], v[:, :, pre:], qval, kval[..., pre:], cfg)
        out, _ = _combine(o1, l1, o2, l2)
    else:
        out, _ = _causal_lse(q5, k, v, qval, kval, cfg)
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
