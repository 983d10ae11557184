"""LevAttention: attention restricted to a universal set of heavy keys.

Kannan, Bhattacharyya, Kacham & Woodruff ("LevAttention: Time, Space, and
Streaming Efficient Algorithm for Heavy Attentions", 2024) observe that for
polynomial attention ``f(x) = |x|^p`` the weight of key ``j`` for query ``q``,
``A_qj = |q.k_j|^p / sum_l |q.k_l|^p``, is at most the ``l_p`` sensitivity
``s_j = sup_q A_qj`` of row ``j`` of ``K``, and that the keys with
``s_j >= eps`` (or an upper bound on it) form a *universal set* ``U`` whose
size does not depend on the number of keys: ``sum_j s_j <= d`` for
``p <= 2`` and ``<= d^(p/2)`` for ``p > 2``. Every query then attends only to
``U`` plus a few local keys. This module is the batched torch counterpart of
:class:`streamsketch.rows.universal.UniversalSet` (numpy, one stream): the
same scores and the same keep/evict logic, over all ``(batch, kv head)``
pairs at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ._common import check_qkv, parse_f
from ._layer import AttentionLayer
from .exact import poly_weights

__all__ = ["LevAttention", "lev_attention"]

_DEFAULT_CHUNK = 256
# Singular values of the key factor below this fraction of the largest are
# numerically zero (as in rows/universal.py): the only way a key can be
# under-scored with ridge = 0.
_RANK_RTOL = 1e-12
_LEWIS_MAX_ITER = 60
_LEWIS_TOL = 1e-10


# ----------------------------------------------------------------------------
# argument checks


def _check_options(
    eps: Any,
    budget: Any,
    window: Any,
    sinks: Any,
    p: Any,
    f: Any,
    causal: Any,
    ridge: Any,
    chunk_size: Any,
    scale: Any,
) -> tuple[float | None, int | None, int, int, float, str, int, float, int, float | None]:
    def nonneg_int(name: str, val: Any, minimum: int = 0) -> int:
        if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {val!r}")
        return int(val)

    def real(name: str, val: Any) -> float:
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(val).__name__}")
        x = float(val)
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x!r}")
        return x

    if (eps is None) == (budget is None):
        raise ValueError("give exactly one of eps and budget")
    if eps is not None:
        eps = real("eps", eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
    if budget is not None:
        budget = nonneg_int("budget", budget)
    window = nonneg_int("window", window)
    sinks = nonneg_int("sinks", sinks)
    p = real("p", p)
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p!r}")
    kind, fp = parse_f(f)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    ridge = real("ridge", ridge)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    chunk_size = _DEFAULT_CHUNK if chunk_size is None else nonneg_int("chunk_size", chunk_size, 1)
    if scale is not None:
        scale = real("scale", scale)
    return eps, budget, window, sinks, p, kind, fp, ridge, chunk_size, scale


# ----------------------------------------------------------------------------
# scores (all float64, under no_grad)


@contextlib.contextmanager
def _selection_mode(device: torch.device) -> Iterator[None]:
    """The selection runs without autograd: keys are chosen, not differentiated.

    It deliberately leaves torch's thread count alone (a process-wide
    setting): on a quiet 2-core machine batched small factorisations ran as
    fast with 2 threads as with 1 (16 SVDs of 64 x 64: 6.6 vs 6.7 ms); only an
    oversubscribed machine makes threaded LAPACK slow, and that is the
    caller's to tune with ``torch.set_num_threads``.
    """
    del device
    with torch.no_grad():
        yield


def _whitener(R: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W`` (B, H, d, r) with ``W W^T = (R^T R + ridge I)^+`` on the row space of ``R``.

    From the SVD ``R = U S V^T``: ``W = V (S^2 + ridge)^(-1/2)``. With
    ``ridge = 0`` singular values below ``_RANK_RTOL * s_max`` count as zero.
    A key in the row space of the keys ``R`` was built from has no component
    outside ``V``, so ``||k W||^2`` is its exact (ridge) leverage.
    """
    if R.is_cuda:
        # cuSOLVER's float64 SVD of a batch of 8 d x d (d = 64) factors took 19 ms on an
        # H100, the host's LAPACK 5.6 ms copies included; the selection syncs anyway.
        _, s, vh = (t.to(R.device) for t in torch.linalg.svd(R.cpu(), full_matrices=False))
    else:
        _, s, vh = torch.linalg.svd(R, full_matrices=False)
    if ridge > 0:
        inv = (s * s + ridge).rsqrt()
    else:
        top = s[..., :1]
        keep = (s > _RANK_RTOL * top) & (top > 0)
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), 0.0)
    W: torch.Tensor = vh.transpose(-1, -2) * inv[..., None, :]
    return W


def _row_sq(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (X @ W).square().sum(-1)


def _factor(X: torch.Tensor) -> torch.Tensor:
    """Upper-triangular ``R`` with ``R^T R = X^T X`` (Householder QR, backward stable)."""
    R: torch.Tensor = torch.linalg.qr(X, mode="r").R
    return R


def _lewis_bound(A: torch.Tensor, valid: torch.Tensor, p: float, ridge: float) -> torch.Tensor:
    """Certified upper bounds on the ``l_p`` sensitivities of the valid rows of ``A``.

    Batched over the leading dims; the torch mirror of ``_lewis_bounds`` in
    ``rows/universal.py``. Approximate Lewis weights ``v`` come from the
    Cohen–Peng fixed point ``v <- h(v)^(p/2)`` for ``p < 2`` and
    ``v <- v^(1-2/p) h(v)`` for ``p > 2`` (the plain map diverges from
    ``p = 4`` on), with ``h_j(v) = a_j^T (A^T V^(1-2/p) A)^+ a_j``. For *any*
    ``v > 0``, Cauchy–Schwarz and Hölder give ``s_j <= h_j^(p/2)
    (sum v)^(p/2-1)`` (``p > 2``) and ``s_j <= c h_j^(p/2)`` with
    ``c = max_l v_l^(1-2/p) h_l^(1-p/2)`` (``p < 2``), so the bound is valid
    however far the iteration got; at the exact Lewis weights ``w`` it is
    ``d^(p/2-1) w_j`` resp. ``w_j`` (``lp_sensitivity_bound``). Zero and
    invalid rows get 0; a nonzero row whose direction is numerically absent
    gets 1 (it is left out, which only raises the other bounds: removing
    rows raises sensitivities). Clipped at 1.
    Cost: O(m d^2) per iteration, at most ``_LEWIS_MAX_ITER`` iterations.
    """
    a = 1.0 - 2.0 / p
    nonzero = valid & (A != 0).any(-1)

    def lev(weights: torch.Tensor) -> torch.Tensor:
        W = _whitener(_factor(A * weights.sqrt()[..., None]), ridge)
        return _row_sq(A, W)

    v = lev(nonzero.to(A.dtype))
    alive = nonzero & (v > 0)
    absent = nonzero & ~alive
    one = torch.ones_like(v)
    v = torch.where(alive, v, one)
    done = torch.zeros(v.shape[:-1], dtype=torch.bool, device=A.device)

    def weights(v: torch.Tensor) -> torch.Tensor:
        return torch.where(alive, v.pow(a), 0.0)

    for _ in range(_LEWIS_MAX_ITER):
        w = weights(v)
        h = lev(w)
        v_new = w * h if p > 2 else h.pow(p / 2)
        v_new = torch.where(alive, v_new, one)
        # A head whose iterate lost a direction to rounding keeps its last one.
        ok = ((v_new > 0) & torch.isfinite(v_new)).all(-1)
        change = torch.where(alive, (v_new / v).log().abs(), 0.0).amax(-1)
        step = ok & ~done
        v = torch.where(step[..., None], v_new, v)
        done = done | ~ok | (change < _LEWIS_TOL)
        if bool(done.all()):
            break
    w = weights(v)
    h = lev(w)
    if p > 2:
        total = torch.where(alive, v, 0.0).sum(-1, keepdim=True)
        bound = h.pow(p / 2) * total.pow(p / 2 - 1)
    else:
        c = torch.where(alive, w * h.pow(1 - p / 2), 0.0).amax(-1, keepdim=True)
        bound = c * h.pow(p / 2)
    bound = torch.where(alive, bound, absent.to(A.dtype))
    return bound.clamp(max=1.0)


def _scores(
    Kc: torch.Tensor, valid: torch.Tensor, R: torch.Tensor, p: float, ridge: float
) -> torch.Tensor:
    """Scores of the candidate keys ``Kc`` (B, H, m, d); ``R`` factors the prefix Gram.

    ``p = 2``: ridge leverage against the whole prefix. ``p != 2``: the Lewis
    certificate on the candidate set (a subset of the prefix, so its bound
    holds for the prefix), and for ``p < 2`` also ``tau^(p/2)`` against the
    prefix (``||y||_p >= ||y||_2``).
    """
    if p == 2.0:
        return _row_sq(Kc, _whitener(R, ridge))
    sc = _lewis_bound(Kc, valid, p, ridge)
    if p < 2.0:
        tau = _row_sq(Kc, _whitener(R, ridge)).clamp(0.0, 1.0)
        sc = torch.minimum(sc, tau.pow(p / 2))
    return sc


class _Selector:
    """Streaming universal set per (batch, kv head): padded indices + validity."""

    def __init__(
        self, k64: torch.Tensor, eps: float | None, budget: int | None, p: float, ridge: float
    ) -> None:
        B, H, _, d = k64.shape
        dev = k64.device
        self.k64, self.eps, self.budget, self.p, self.ridge = k64, eps, budget, p, ridge
        self.R = k64.new_zeros(B, H, 0, d)
        self.idx = torch.zeros(B, H, 0, dtype=torch.long, device=dev)
        self.valid = torch.zeros(B, H, 0, dtype=torch.bool, device=dev)
        self.score = k64.new_zeros(B, H, 0)

    def advance(self, prefix_lo: int, prefix_hi: int, cand_lo: int, cand_hi: int) -> None:
        """Add keys ``[prefix_lo, prefix_hi)`` to the prefix and rescore.

        Only the new keys in ``[cand_lo, cand_hi)`` become candidates (the
        others are local keys for every query that can see them).
        """
        if prefix_hi <= prefix_lo:
            return
        B, H, _, d = self.k64.shape
        dev = self.k64.device
        self.R = _factor(torch.cat([self.R, self.k64[:, :, prefix_lo:prefix_hi]], dim=2))
        lo, hi = max(prefix_lo, cand_lo), min(prefix_hi, cand_hi)
        new = torch.arange(lo, max(lo, hi), device=dev).expand(B, H, -1)
        idx = torch.cat([self.idx, new], dim=2)
        if idx.shape[2] == 0:
            return
        valid = torch.cat([self.valid, torch.ones_like(new, dtype=torch.bool)], dim=2)
        prev = torch.cat([self.score, self.k64.new_full(new.shape, math.inf)], dim=2)
        Kc = torch.gather(self.k64, 2, idx[..., None].expand(-1, -1, -1, d))
        sc = _scores(Kc, valid, self.R, self.p, self.ridge)
        # Every score is a valid bound and true scores only fall as keys arrive.
        sc = torch.minimum(sc, prev)
        sc = torch.where(valid, sc, -math.inf)
        if self.budget is not None:
            top = torch.topk(sc, min(self.budget, idx.shape[2]), dim=-1)
            order, keep = top.indices, top.values > -math.inf
        else:
            # _check_options admits exactly one of eps and budget.
            assert self.eps is not None
            keep = sc >= self.eps
            size = int(keep.sum(-1).max()) if keep.numel() else 0
            srt = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True)
            order = srt.indices[..., :size]
            keep = torch.gather(keep, 2, order)
        self.idx = torch.gather(idx, 2, order)
        self.valid = keep
        self.score = torch.gather(sc, 2, order)


# ----------------------------------------------------------------------------
# masked attention over selected + local keys


def _attend_block(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel_idx: torch.Tensor,
    sel_valid: torch.Tensor,
    local: torch.Tensor,
    qmax: torch.Tensor,
    own_start: int,
    sinks: int,
    window: int,
    kind: str,
    fp: int,
    scale: float,
    compute: torch.dtype,
) -> torch.Tensor:
    """Attention of ``qg`` (B, H_kv, G, n_c, d) over selected + local keys, one mask.

    Query ``i`` (largest allowed key position ``qmax[i]``) sees a local key
    ``j <= qmax[i]`` if it is a sink, in its window (``j > qmax[i] - window``)
    or in its own chunk (``j >= own_start``); it sees a selected key unless
    that key is already local for it (no key is counted twice).
    """
    B, Hkv, G, n_c, _ = qg.shape
    idx = torch.cat([sel_idx, local.expand(B, Hkv, -1)], dim=-1)[..., None]
    keys = torch.take_along_dim(k, idx, dim=2).to(compute)
    vals = torch.take_along_dim(v, idx, dim=2).to(compute)
    qm = qmax[:, None]
    pos = sel_idx[..., None, :]
    m_sel = sel_valid[..., None, :] & (pos >= sinks) & (pos <= qm - window) & (pos <= qm)
    lp = local[None, :]
    m_loc = (lp <= qm) & ((lp < sinks) | (lp > qm - window) | (lp >= own_start))
    mask = torch.cat([m_sel, m_loc.expand(B, Hkv, n_c, -1)], dim=-1)[:, :, None]
    if kind == "poly":
        return poly_weights(qg @ keys.transpose(-1, -2)[:, :, None], fp, mask) @ vals[:, :, None]
    # Softmax through the fused kernel. A query with no allowed key (causal,
    # n_q > n_k) attends to one dummy key and is then zeroed: finite values
    # and gradients instead of 0/0.
    empty = ~mask.any(-1, keepdim=True)
    mask = mask | (empty & (torch.arange(mask.shape[-1], device=mask.device) == 0))
    n_s = mask.shape[-1]
    out = F.scaled_dot_product_attention(
        qg.reshape(B, Hkv * G, n_c, -1),
        keys,
        vals,
        attn_mask=mask.expand(B, Hkv, G, n_c, n_s).reshape(B, Hkv * G, n_c, n_s),
        scale=scale,
        enable_gqa=True,
    )
    return out.reshape(B, Hkv, G, n_c, -1).masked_fill(empty, 0.0)


def _local_positions(lo: int, hi: int, sinks: int, n_k: int, device: torch.device) -> torch.Tensor:
    """Sorted, distinct positions ``[0, sinks) U [lo, hi)`` inside ``[0, n_k)``."""
    s_end = min(sinks, n_k)
    lo, hi = max(lo, s_end), min(hi, n_k)
    return torch.cat(
        [
            torch.arange(s_end, device=device),
            torch.arange(lo, max(lo, hi), device=device),
        ]
    )


# ----------------------------------------------------------------------------
# public API


def lev_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float | None = None,
    budget: int | None = None,
    window: int = 0,
    sinks: int = 0,
    p: float = 2,
    f: Any = "softmax",
    causal: bool = False,
    ridge: float = 0.0,
    chunk_size: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """LevAttention: each query attends to the universal set of keys plus local keys.

    Parameters
    ----------
    q : torch.Tensor, (B, H, n_q, d)
    k : torch.Tensor, (B, H_kv, n_k, d)
    v : torch.Tensor, (B, H_kv, n_k, d_v)
        ``H`` a multiple of ``H_kv`` (grouped-query attention); one floating
        dtype (float32, float64, bfloat16, float16) and one device. ``k`` must
        be finite.
    eps : float, optional
        Keep every key whose score is ``>= eps`` (``eps > 0``).
    budget : int, optional
        Keep the ``budget`` highest-scoring keys instead (``torch.topk``:
        static shapes). Exactly one of ``eps`` and ``budget``.
    window : int, default 0
        Each query also attends to the ``window`` most recent keys it is
        allowed to see (non-causal: the last ``window`` keys).
    sinks : int, default 0
        Each query also attends to the first ``sinks`` keys (if allowed).
        Sinks (and, non-causal, the window) are never candidates of the set,
        which they would only duplicate.
    p : float, default 2
        Exponent of the score: ``p = 2`` ridge leverage scores
        ``tau_j = k_j^T (K^T K + ridge I)^+ k_j``; ``p != 2`` a certified
        upper bound on the ``l_p`` sensitivity from Lewis weights (equal to
        ``min(1, w_j)`` for ``p <= 2`` and ``min(1, d^(p/2-1) w_j)`` for
        ``p > 2`` at the exact Lewis weights ``w``; for ``p < 2`` also capped
        by ``tau_j^(p/2)``). Match it to ``f = ("poly", p)`` for the guarantee.
    f : "softmax" or ("poly", p)
        The attention function, as in
        :func:`~streamsketch.attention.exact_attention`.
    causal : bool, default False
        Bottom-right aligned causal mask; the set is then streaming (below).
    ridge : float, default 0
        ``lambda >= 0`` in the scores. ``lambda > 0`` lowers every score (fewer
        keys); the guarantee then holds for
        ``A_ij = (q.k_j)^2 / (sum_l (q.k_l)^2 + lambda ||q||^2)`` at ``p = 2``.
    chunk_size : int, optional
        Queries per block, default 256. Causal: the granularity at which
        the set is updated (see below); both: bounds the score workspace.
    scale : float, optional
        Softmax temperature, default ``1/sqrt(d)``.

    Returns
    -------
    torch.Tensor, (B, H, n_q, d_v), dtype of ``q``, on ``q.device``.

    Notes
    -----
    **Selection.** Per (batch, kv head), from the keys only (one set serves
    every query head of the group). Non-causal: one set from all keys.
    Causal, queries in blocks of ``chunk_size``: block ``c`` (queries
    ``[a, b)``, offset ``o = n_k - n_q``) attends to the universal set of the
    prefix ``[0, a + o)`` scored against that prefix's Gram matrix, to all
    allowed keys of its own block ``[a + o, b + o)`` (exact, causally
    masked), and to its sinks and window. The set is kept as a stream: the
    candidates at block ``c`` are the keys kept at block ``c - 1`` plus the
    keys that entered the prefix since, and a key once dropped never
    returns. With ``eps`` and ``p = 2`` this loses nothing, since leverage
    only falls as keys arrive: the set equals ``{j < a + o : tau_j >= eps}``.
    With ``p != 2`` every stored score is the running minimum of valid bounds
    (the Lewis certificate on any subset of the prefix bounds the prefix's
    sensitivity). With ``budget`` it is the streaming top-``budget`` (the
    rule of a bounded KV cache). No query ever sees a key after its
    position. Selection runs under ``torch.no_grad()`` in float64: the keys
    are *chosen* without gradient, and the attention over the chosen keys
    is differentiable in ``q``, ``k`` and ``v`` as usual.

    **Guarantee** (``eps``, ``ridge = 0``, ``f = ("poly", p)`` with the same
    ``p``). Every pair with exact attention weight ``A_ij >= eps`` over all
    keys query ``i`` may see (causal or not) has key ``j`` in the set query
    ``i`` attends to: ``A_ij`` is at most the sensitivity of ``k_j`` among
    those keys, which is at most its sensitivity in any subset (in
    particular the prefix before ``i``'s block), which is at most the score.
    At ``p = 2`` the bound is attained by ``q = (K^T K)^+ k_j``. Sizes:
    ``|U| <= d / eps`` (``p <= 2``) and ``<= d^(p/2) / eps`` (``p > 2``) at
    the exact Lewis weights. Restricting attention to a superset of the heavy
    keys only raises their weights, so the output keeps every heavy
    attention entry. Softmax has no such guarantee; the set then plays the
    role of a query-agnostic key selector.

    **Numerics.** The prefix Gram is held as its QR factor ``R`` (float64,
    ``R^T R = K^T K``), updated by Householder QR of ``[R; K_new]``; scores
    are read from the SVD of ``R`` with singular values below
    ``1e-12 s_max`` counted as zero (rank-deficient keys are fine: a key
    outside the span of the others scores 1). Attention is computed in
    float32 for half-precision inputs and returned in ``q.dtype``. The
    selection leaves torch's thread count alone (see ``_selection_mode``).
    Deterministic: no randomness is involved, so there is no ``seed``.

    **Cost** per (batch, kv head), ``n = n_k`` and ``u`` the size of the
    universal set: selection O(n d^2) for the QR updates plus
    O((u + chunk) d^2 + d^3) per block to rescore the candidates
    (``p != 2``: times the Lewis iterations, at most 60); attention
    O(n_q (u + window + sinks + chunk) d) time. Workspace
    O((u + chunk) d + d^2) for the selection, O(G chunk (u + window +
    sinks + chunk)) for the scores of ``G = H / H_kv`` query heads, and a
    float64 copy of the keys (O(n d)).
    """
    eps, budget, window, sinks, p, kind, fp, ridge, chunk_size, scale = _check_options(
        eps, budget, window, sinks, p, f, causal, ridge, chunk_size, scale
    )
    H, H_kv = check_qkv(q, k, v)
    B, _, n_q, d = q.shape
    n_k = k.shape[2]
    dv = v.shape[3]
    G = H // H_kv
    dev = q.device
    if scale is None:
        scale = d**-0.5
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    # Phase 1, selection: the set each query block attends to (all blocks in
    # one no-grad section).
    blocks = []  # (a, b, own-block start, selected idx, valid)
    with _selection_mode(dev):
        if not bool(torch.isfinite(k).all()):
            raise ValueError("k must be finite (it is scored)")
        sel = _Selector(k.detach().to(torch.float64), eps, budget, p, ridge)
        if not causal:
            sel.advance(0, n_k, sinks, n_k - window)
        off, prefix = n_k - n_q, 0
        for a in range(0, n_q, chunk_size):
            b = min(a + chunk_size, n_q)
            start = n_k
            if causal:
                start = min(max(a + off, 0), n_k)
                sel.advance(prefix, start, sinks, n_k)
                prefix = start
            blocks.append((a, b, start, sel.idx, sel.valid))

    # Phase 2, attention over the selected + local keys (differentiable).
    qg = q.to(compute).reshape(B, H_kv, G, n_q, d)
    outs = []
    for a, b, start, idx, valid in blocks:
        if causal:
            qmax = torch.arange(a + off, b + off, device=dev)
            lo = max(a + off - max(window - 1, 0), 0)
            local = _local_positions(lo, b + off, sinks, n_k, dev)
        else:
            qmax = torch.full((b - a,), n_k - 1, dtype=torch.long, device=dev)
            local = _local_positions(n_k - window, n_k, sinks, n_k, dev)
        if idx.shape[2] + local.shape[0] == 0:  # nothing allowed (n_q > n_k, causal)
            outs.append(qg.new_zeros(B, H_kv, G, b - a, dv))
            continue
        outs.append(
            _attend_block(
                qg[:, :, :, a:b],
                k,
                v,
                idx,
                valid,
                local,
                qmax,
                start,
                sinks,
                window,
                kind,
                fp,
                scale,
                compute,
            )
        )
    if not outs:
        return q.new_zeros(B, H, 0, dv)
    out = torch.cat(outs, dim=3).reshape(B, H, n_q, dv)
    return out.to(q.dtype)


class LevAttention(AttentionLayer):
    """Multi-head attention layer whose heads run :func:`lev_attention`.

    Parameters
    ----------
    embed_dim, num_heads, num_kv_heads, causal, bias
        As in :class:`~streamsketch.attention.AttentionLayer`.
    eps, budget, window, sinks, p, f, ridge, chunk_size
        As in :func:`lev_attention` (exactly one of ``eps`` and ``budget``);
        checked here, at construction.

    ``forward(x)``: ``(B, n, E) -> (B, n, E)``; the key selection carries no
    gradient, the attention over the selected keys and the projections do.
    Cost per layer: the projections O(n E^2) plus :func:`lev_attention`'s
    O(n d^2) selection and O(n (u + window + sinks + chunk) d) attention
    per head (``u`` the size of the universal set).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        eps: float | None = None,
        budget: int | None = None,
        window: int = 0,
        sinks: int = 0,
        p: float = 2,
        f: Any = "softmax",
        ridge: float = 0.0,
        chunk_size: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(embed_dim, num_heads, num_kv_heads, causal=causal, bias=bias)
        self.eps, self.budget, self.window, self.sinks, self.p, _, _, self.ridge, _, _ = (
            _check_options(eps, budget, window, sinks, p, f, self.causal, ridge, chunk_size, None)
        )
        self.f = f
        self.chunk_size = chunk_size

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return lev_attention(
            q,
            k,
            v,
            eps=self.eps,
            budget=self.budget,
            window=self.window,
            sinks=self.sinks,
            p=self.p,
            f=self.f,
            causal=self.causal,
            ridge=self.ridge,
            chunk_size=self.chunk_size,
        )
