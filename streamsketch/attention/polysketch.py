"""PolySketch attention (Kacham, Mirrokni & Zhong, 2023, *PolySketchFormer*).

Degree-``p`` polynomial attention, ``w_ij = (q_i . k_j)^p / sum_l (q_i . k_l)^p``
with even ``p``, computed in time linear in the sequence length through the
non-negative random feature map ``phi(x) = psi(x) (x) psi(x)`` of
:mod:`streamsketch.linear.polysketch` (``psi`` is the degree-``p/2`` Gaussian
product tree), and, when causal, the paper's block algorithm: keys in earlier
blocks through a prefix sum of sketched states, keys in the query's own block
exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._common import check_qkv
from ._layer import AttentionLayer

__all__ = ["PolySketchAttention", "PolySketchMap", "polysketch_attention"]

_MAX_DEGREE = 64
_MAX_SKETCH = 4096


# -- argument checks -----------------------------------------------------------
def _check_int(value: Any, name: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def _check_degree(degree: Any) -> int:
    checked = _check_int(degree, "degree", 2, _MAX_DEGREE)
    if checked % 2:
        raise ValueError(f"degree must be even (phi is a tensor square), got {checked}")
    return checked


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _generator(seed: Any, device: torch.device) -> torch.Generator | None:
    """A torch Generator on ``device`` from ``seed``; ``None`` -> torch's global RNG."""
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        if torch.device(seed.device).type != torch.device(device).type:
            raise ValueError(f"seed is a Generator on {seed.device}, the tensors are on {device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}"
        )
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.Generator(device=device).manual_seed(seed)


# -- the product tree ----------------------------------------------------------
def _tree(q: int) -> list[tuple[int | None, int | None, int]]:
    """Internal nodes of the degree-``q`` tree in pre-order: ``(left, right, degree)``.

    A child is the index of another node, or ``None`` for the input ``x``.
    Node ``t`` owns matrices ``2t`` (left factor) and ``2t + 1`` (right factor),
    the order in which :class:`streamsketch.linear.polysketch.PolySketch`
    draws them. Empty for ``q = 1`` (one matrix, ``psi(x) = G x / sqrt(r)``).
    """
    nodes: list[Any] = []

    def build(deg: int) -> int | None:
        if deg == 1:
            return None
        t = len(nodes)
        nodes.append(None)
        left = build((deg + 1) // 2)
        right = build(deg // 2)
        nodes[t] = (left, right, deg)
        return t

    build(q)
    return nodes


def _shapes(head_dim: int, degree: int, r: int) -> list[tuple[int, int]]:
    """Shapes of the tree's matrices, in pre-order."""
    q = degree // 2
    if q == 1:
        return [(r, head_dim)]
    out = []
    for _, _, deg in _tree(q):
        out.append((r, head_dim if (deg + 1) // 2 == 1 else r))
        out.append((r, head_dim if deg // 2 == 1 else r))
    return out


def _draw(
    head_dim: int,
    degree: int,
    r: int,
    gen: torch.Generator | None,
    device: torch.device | None,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    # Drawn in float32 whatever the compute dtype, so one seed gives one
    # sketch in float32 and float64.
    return [
        torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)
        for s in _shapes(head_dim, degree, r)
    ]


def _psi(x: torch.Tensor, mats: list[torch.Tensor], degree: int) -> torch.Tensor:
    """Inner sketch ``psi(x)``, ``(..., d) -> (..., r)``, unbiased for ``<x, y>^(p/2)``."""
    r = mats[0].shape[0]
    scale: float = r**-0.5
    q = degree // 2
    if q == 1:
        return (x @ mats[0].mT) * scale
    nodes = _tree(q)

    def evaluate(t: int) -> torch.Tensor:
        left, right, _ = nodes[t]
        g1, g2 = mats[2 * t], mats[2 * t + 1]
        if left is None and right is None:
            # Both factors read x: one GEMM against the stacked matrices.
            both = x @ torch.cat([g1, g2]).mT
            a, b = both[..., :r], both[..., r:]
        else:
            a = (x if left is None else evaluate(left)) @ g1.mT
            b = (x if right is None else evaluate(right)) @ g2.mT
        return (a * scale) * b

    return evaluate(0)


_TRIU_CACHE: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _triu(r: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the upper triangle of an ``r x r`` matrix and its weights (1 / sqrt 2)."""
    key = (r, str(device), dtype)
    if key not in _TRIU_CACHE:
        iu, ju = torch.triu_indices(r, r, device=device)
        w = torch.full(iu.shape, math.sqrt(2.0), dtype=torch.float64, device=device)
        w = w.masked_fill(iu == ju, 1.0).to(dtype)
        _TRIU_CACHE[key] = (iu * r + ju, w)
    return _TRIU_CACHE[key]


def _self_tensor(psi: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """``phi = psi (x) psi`` flattened: ``r^2`` columns, or the upper triangle ``r(r+1)/2``."""
    r = psi.shape[-1]
    outer = (psi.unsqueeze(-1) * psi.unsqueeze(-2)).flatten(-2)
    if not symmetric:
        return outer
    idx, w = _triu(r, psi.device, psi.dtype)
    return outer.index_select(-1, idx) * w


# -- the feature map as a module ----------------------------------------------
class PolySketchMap(nn.Module):
    """The PolySketch feature map of one attention layer, fixed or trainable.

    Parameters
    ----------
    head_dim : int
        Input width ``d``.
    degree : int, default 4
        Even polynomial degree ``p``; ``psi`` has degree ``p / 2``.
    sketch_size : int, default 32
        Width ``r`` of ``psi``; ``phi`` has ``r (r + 1) / 2`` (symmetric) or
        ``r^2`` columns.
    learned : bool, default False
        Register the Gaussian matrices as ``nn.Parameter`` (trained with the
        model) rather than as buffers (fixed, but saved in ``state_dict`` and
        moved by ``.to``).
    seed : int, torch.Generator or None
        Draws the matrices (standard normal, float32, then cast to ``dtype``);
        ``None`` uses torch's global RNG.
    device, dtype : optional
        Where and in which dtype to keep the matrices (default CPU float32).

    Notes
    -----
    ``psi`` is the Gaussian product tree: for ``q = p/2 >= 2`` each internal
    node computes ``sqrt(1/r) (G1 left(x)) * (G2 right(x))`` with fresh
    ``G1, G2`` (children of degree ``ceil(q/2)`` and ``floor(q/2)``, the
    input at degree 1), and ``psi(x) = G x / sqrt(r)`` for ``q = 1``; then
    ``E <psi(x), psi(y)> = <x, y>^q`` and ``<phi(x), phi(y)> = <psi(x), psi(y)>^2 >= 0``.
    The matrices come in the pre-order of
    :class:`streamsketch.linear.polysketch.PolySketch` (see :meth:`matrices`),
    so loading that map's matrices gives the same ``phi`` up to rounding.
    ``psi`` of ``n`` rows costs ``O(n r (q d + q r))``, ``phi`` adds ``O(n r^2)``.
    """

    def __init__(
        self,
        head_dim: int,
        degree: int = 4,
        sketch_size: int = 32,
        learned: bool = False,
        seed: Any = None,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = _check_int(head_dim, "head_dim", 1, 2**20)
        self.degree = _check_degree(degree)
        self.sketch_size = _check_int(sketch_size, "sketch_size", 1, _MAX_SKETCH)
        self.learned = _check_bool(learned, "learned")
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        gen = _generator(seed, device)
        mats = _draw(self.head_dim, self.degree, self.sketch_size, gen, device, dtype)
        self._n = len(mats)
        for i, g in enumerate(mats):
            if self.learned:
                setattr(self, f"G{i}", nn.Parameter(g))
            else:
                self.register_buffer(f"G{i}", g)

    def matrices(self) -> list[torch.Tensor]:
        """The tree's Gaussian matrices in pre-order (``(r, d)`` or ``(r, r)`` each)."""
        return [getattr(self, f"G{i}") for i in range(self._n)]

    def n_components(self, symmetric: bool = True) -> int:
        """Width of ``phi``: ``r (r + 1) / 2`` if ``symmetric`` else ``r^2``."""
        r = self.sketch_size
        return r * (r + 1) // 2 if symmetric else r * r

    def _mats_for(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have last dim {self.head_dim}, got {tuple(x.shape)}")
        mats = self.matrices()
        if mats[0].device != x.device:
            raise ValueError(f"the map is on {mats[0].device}, x on {x.device}")
        return [g.to(x.dtype) for g in mats]

    def psi(self, x: torch.Tensor) -> torch.Tensor:
        """Inner sketch ``(..., d) -> (..., r)``, ``E psi(x).psi(y) = (x.y)^(p/2)``."""
        return _psi(x, self._mats_for(x), self.degree)

    def forward(self, x: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
        """``phi(x) = psi(x) (x) psi(x)``: ``(..., d) -> (..., n_components(symmetric))``.

        With ``symmetric`` only the upper triangle of the tensor square, off-
        diagonal entries times ``sqrt(2)``: the same inner products
        ``phi(x).phi(y) = (psi(x).psi(y))^2 >= 0`` at about half the width.
        """
        return _self_tensor(self.psi(x), _check_bool(symmetric, "symmetric"))


# -- attention -----------------------------------------------------------------
# Rows (over batch, heads and tokens) per chunk of work: keeps every
# intermediate (psi, phi, scores) at a few MiB, so it stays in cache and is
# recycled by the allocator instead of page-faulting fresh memory per op.
_CHUNK_ROWS = 8192


def _ipow(x: torch.Tensor, p: int, inplace: bool = False) -> torch.Tensor:
    """``x**p`` by repeated squaring (``torch.pow`` with an int exponent is much slower)."""
    result = None
    while p:
        if p & 1:
            result = x if result is None else result * x
        p >>= 1
        if p:
            x = x.square_() if inplace and result is None else torch.square(x)
    assert result is not None
    return result


def _phi_packed(psi: torch.Tensor, record: bool = True) -> torch.Tensor:
    """Unweighted upper triangle of ``psi (x) psi``, ordered by diagonal.

    Column block ``s`` holds ``psi_u psi_(u+s)``; with weights 1 (``s = 0``)
    and 2 (``s > 0``) on one side, ``sum_cols = (psi(x).psi(y))^2``. Built from
    ``r`` contiguous products, cheaper than gathering the triangle; without
    autograd they are written in place (no concatenation copy).
    """
    r = psi.shape[-1]
    if record:
        return torch.cat([psi[..., : r - s] * psi[..., s:] for s in range(r)], dim=-1)
    out = psi.new_empty(*psi.shape[:-1], r * (r + 1) // 2)
    col = 0
    for s in range(r):
        torch.mul(psi[..., : r - s], psi[..., s:], out=out[..., col : col + r - s])
        col += r - s
    return out


def _packed_weights(r: int, like: torch.Tensor) -> torch.Tensor:
    """Column weights of :func:`_phi_packed` (1 on the diagonal block, 2 elsewhere)."""
    w = like.new_full((r * (r + 1) // 2, 1), 2.0)
    w[:r] = 1.0
    return w


def _noncausal(
    qh: torch.Tensor,
    k: torch.Tensor,
    ve: torch.Tensor,
    mats: list[torch.Tensor],
    degree: int,
    record: bool,
) -> torch.Tensor:
    """``phi(Q) (phi(K)^T [V, 1])``; ``qh`` is ``(B, Hk, R, d)``, ``R = G n_q``."""
    B, Hk, R, _ = qh.shape
    n_k = k.shape[2]
    r = mats[0].shape[0]
    tiny = torch.finfo(k.dtype).tiny
    # A global key scale cancels between numerator and denominator (phi is
    # homogeneous of degree p); it only keeps the state in range.
    m = k.detach().norm(dim=-1).amax(dim=-1).clamp_min(tiny)[..., None, None]
    step = max(1, _CHUNK_ROWS // (B * Hk))
    state = None
    for a in range(0, n_k, step):
        phik = _phi_packed(_psi(k[:, :, a : a + step] / m, mats, degree), record)
        part = phik.mT @ ve[:, :, a : a + step]
        state = part if state is None else state + part
    assert state is not None
    state = state * _packed_weights(r, state)
    outs = [
        _phi_packed(_psi(qh[:, :, a : a + step], mats, degree), record) @ state
        for a in range(0, R, step)
    ]
    return torch.cat(outs, dim=2)


def _causal(
    qh: torch.Tensor,
    k: torch.Tensor,
    ve: torch.Tensor,
    mats: list[torch.Tensor],
    degree: int,
    bs: int,
    offset: int,
    record: bool,
) -> torch.Tensor:
    """Block algorithm. ``qh`` is ``(B, Hk, G, n_q, d)``, query ``i`` at position ``i + offset``.

    Returns ``(B, Hk, G, n_q, d_v + 1)``: numerator columns, the denominator last.
    """
    B, Hk, G, n_q, d = qh.shape
    n_k, dve = k.shape[2], ve.shape[-1]
    r = mats[0].shape[0]
    p = degree
    tiny = torch.finfo(k.dtype).tiny
    nkb = -(-n_k // bs)
    c0, front = divmod(offset, bs)
    nqb = nkb - c0
    # Keys and values in blocks; zero padding at the end is masked anyway.
    pad_k = nkb * bs - n_k
    kb = nn.functional.pad(k, (0, 0, 0, pad_k)).view(B, Hk, nkb, bs, d)
    vb = nn.functional.pad(ve, (0, 0, 0, pad_k)).view(B, Hk, nkb, bs, dve)
    # Queries aligned to key blocks (query block t sits on key block c0 + t),
    # the G query heads of a KV head side by side: (B, Hk, nqb, G * bs, d).
    pad_q = nqb * bs - front - n_q
    qb = nn.functional.pad(qh, (0, 0, front, pad_q)).view(B, Hk, G, nqb, bs, d)
    qb = qb.transpose(2, 3).reshape(B, Hk, nqb, G * bs, d)

    # Scales (detached: the output does not depend on them, see the docstring).
    # m_b: largest key norm of block b; cm: running max inside a block, so
    # the scale of query i reads only keys it may see.
    kn = kb.detach().norm(dim=-1)
    m = kn.amax(dim=-1).clamp_min(tiny)
    cm = torch.cummax(kn, dim=-1).values
    wcol = _packed_weights(r, k)

    blocks_per_chunk = max(1, _CHUNK_ROWS // (B * Hk * G * bs))
    S = k.new_zeros(B, Hk, wcol.shape[0], dve)  # prefix state of the blocks before the chunk
    s = k.new_zeros(B, Hk)  # its scale: largest key norm so far (0: none)
    outs = []
    for a in range(0, nkb, blocks_per_chunk):
        e = min(a + blocks_per_chunk, nkb)
        nc = e - a
        mm = m[:, :, a:e]
        # sc[j] = scale of the prefix before block a + j (j = 0..nc).
        sc = torch.cat([s[..., None], torch.maximum(s[..., None], torch.cummax(mm, -1).values)], -1)
        sc_safe = sc.clamp_min(tiny)
        n_t = nc if e < nkb else nc - 1  # the last block's state is never read
        if n_t > 0:
            kh = kb[:, :, a : a + n_t] / mm[:, :, :n_t, None, None]
            T = _phi_packed(_psi(kh, mats, degree), record).mT @ vb[:, :, a : a + n_t]
            T = T * wcol
            # W[j, b] = (m_b / sc_j)^p for blocks b < j of the chunk.
            W = (mm[:, :, None, :n_t] / sc_safe[..., None]) ** p
            earlier = torch.ones(nc + 1, n_t, dtype=torch.bool, device=W.device).tril(-1)
            W = W.masked_fill(~earlier, 0.0)  # (also drops inf from an empty prefix)
            prefix = (W @ T.flatten(-2)).view(B, Hk, nc + 1, *S.shape[-2:])
            prefix = torch.addcmul(
                prefix, ((s[..., None] / sc_safe) ** p)[..., None, None], S[:, :, None]
            )
        else:
            prefix = S[:, :, None].expand(B, Hk, nc + 1, *S.shape[-2:])
        qa = max(a, c0)
        if qa < e:
            t0, t1 = qa - c0, e - c0
            q_c = qb[:, :, t0:t1]
            s_q = sc[:, :, qa - a : e - a, None]  # (B, Hk, nq, 1)
            # Common per-row scale >= every weight's base, so weights are <= 1.
            scale = torch.maximum(s_q, cm[:, :, qa:e]).clamp_min(tiny)
            scale = scale[:, :, :, None, :].expand(-1, -1, -1, G, -1).reshape(B, Hk, -1, G * bs, 1)
            # Exact part: scores of keys a query may not see become exact
            # zeros (tril of each (bs, bs) tile), so they cannot leak.
            z = (q_c / scale) @ kb[:, :, qa:e].mT
            z = _ipow(z.view(*z.shape[:3], G, bs, bs).tril_().view(z.shape), p, not record)
            exact = z @ vb[:, :, qa:e]
            phiq = _phi_packed(_psi(q_c * (s_q[..., None] / scale), mats, degree), record)
            outs.append(exact + phiq @ prefix[:, :, qa - a : e - a])
        if e < nkb:
            S, s = prefix[:, :, nc], sc[:, :, nc]
    out = torch.cat(outs, dim=2)
    out = out.view(B, Hk, nqb, G, bs, dve).transpose(2, 3).reshape(B, Hk, G, nqb * bs, dve)
    return out[:, :, :, front : front + n_q]


def polysketch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    degree: int = 4,
    sketch_size: int = 32,
    causal: bool = False,
    block_size: int = 256,
    learned: PolySketchMap | None = None,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Polynomial attention of even degree ``p`` in linear time via PolySketch.

    Parameters
    ----------
    q : torch.Tensor, (B, H, n_q, d)
    k : torch.Tensor, (B, H_kv, n_k, d)
    v : torch.Tensor, (B, H_kv, n_k, d_v)
        One floating dtype (float16/bfloat16 are computed in float32, float64
        in float64) and one device; ``H`` a multiple of ``H_kv``.
    degree : int, default 4
        Even degree ``p``: the target weights are
        ``(q_i.k_j)^p / sum_l (q_i.k_l)^p`` (``exact_attention(f=("poly", p))``).
    sketch_size : int, default 32
        Width ``r`` of the inner sketch; the feature map has ``r (r + 1) / 2``
        columns (528 for ``r = 32``).
    causal : bool, default False
        Bottom-right aligned causal mask (query ``i`` sees keys
        ``j <= i + n_k - n_q``; queries that see no key give 0).
    block_size : int, default 256
        Causal block length ``b``: keys in the query's own block are attended
        exactly, earlier blocks through the sketch.
    learned : PolySketchMap, optional
        Use this map's (possibly trainable) matrices; its ``head_dim``,
        ``degree`` and ``sketch_size`` must match. Gradients flow into it.
    seed : int, torch.Generator or None
        Draws the Gaussian matrices on ``q.device`` when ``learned`` is None
        (``None``: torch's global RNG); the same seed gives the same output.

    Returns
    -------
    torch.Tensor, (B, H, n_q, d_v), dtype of ``q``.

    Notes
    -----
    **Map.** ``phi(x) = psi(x) (x) psi(x)`` (upper triangle, off-diagonal times
    ``sqrt 2``) with ``psi`` the degree-``p/2`` Gaussian product tree (see
    :class:`PolySketchMap`); ``<phi(x), phi(y)> = <psi(x), psi(y)>^2 >= 0``, so
    the approximate weights are non-negative and every output is a convex
    combination of the values (rows sum to one). If
    ``|<psi(x), psi(y)> - <x, y>^(p/2)| <= eps |x|^(p/2) |y|^(p/2)`` (which
    ``r = O(p eps^-2 log(1/delta))`` gives with probability ``1 - delta``,
    Kacham et al., 2023) then ``|<phi(x), phi(y)> - <x, y>^p| <= (2 eps + eps^2)
    |x|^p |y|^p`` for every pair.

    **Scaling.** The target is unchanged by a positive scale of a query row
    and by one common scale of all keys (not by a per-key scale), and so is
    the approximation, phi being homogeneous of degree ``p``. Queries are
    normalised to unit rows and keys divided by their largest norm (per
    block, with running maxima when causal) purely to keep float32 in range;
    unlike the paper's layer-normalised ``q, k`` this leaves the function
    unchanged. Very high degrees can still underflow when all
    ``|q.k| << |q| |k|``.

    **Causal** (the paper's block lower-triangular algorithm): for query
    block ``c``, numerator and denominator are
    ``phi(Q_c) S_c + mask((Q_c K_c^T)^p) [V_c, 1]`` with
    ``S_c = sum_{b<c} phi(K_b)^T [V_b, 1]`` (a prefix over blocks, never a
    per-token state). Outputs never depend on later keys or values.
    ``block_size >= n_k`` gives exact causal polynomial attention.

    **Cost** with ``F = r (r + 1) / 2``, ``n = n_k``: time
    ``O(n F d_v + n b d + n r (p d + p r))`` per head (about ``4 n F d_v +
    4 n b d`` flops: half the width of the full tensor square, measured 1.6x
    faster than ``F = r^2``). The work runs in chunks of about
    ``_CHUNK_ROWS`` (batch x heads x tokens) rows, so the workspace is
    ``O(F d_v)`` per head plus a few MiB, independent of ``n``; with autograd
    the chunks' ``phi`` and score tiles (``O(n (F + b))`` per head) are kept for
    the backward pass. Non-causal: ``O((n_q + n_k) F d_v)`` time, ``O(F d_v)``
    state per head. Keys and values are sketched once per KV head
    (grouped-query attention costs no copies of ``k, v``).
    """
    H, Hk = check_qkv(q, k, v)
    degree = _check_degree(degree)
    r = _check_int(sketch_size, "sketch_size", 1, _MAX_SKETCH)
    causal = _check_bool(causal, "causal")
    bs = _check_int(block_size, "block_size", 1, 2**30)
    B, _, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if learned is not None:
        if not isinstance(learned, PolySketchMap):
            raise TypeError(
                f"learned must be a PolySketchMap or None, got {type(learned).__name__}"
            )
        for name, want, got in (
            ("head_dim", d, learned.head_dim),
            ("degree", degree, learned.degree),
            ("sketch_size", r, learned.sketch_size),
        ):
            if want != got:
                raise ValueError(f"learned has {name}={got}, the call needs {want}")
        mats = learned.matrices()
        if mats[0].device != q.device:
            raise ValueError(f"learned is on {mats[0].device}, q on {q.device}")
        mats = [g.to(compute) for g in mats]
    else:
        mats = _draw(d, degree, r, _generator(seed, q.device), q.device, compute)
    if n_q == 0 or n_k == 0:
        return q.new_zeros(B, H, n_q, dv)

    G = H // Hk
    qc = q.to(compute).view(B, Hk, G, n_q, d)
    kc, vc = k.to(compute), v.to(compute)
    tiny = torch.finfo(compute).tiny
    qh = qc / qc.norm(dim=-1, keepdim=True).detach().clamp_min(tiny)
    # The denominator rides along as a column of ones: one GEMM for both, and
    # v = 1 gives exactly 1.
    ve = torch.cat([vc, vc.new_ones(B, Hk, n_k, 1)], dim=-1)
    record = torch.is_grad_enabled() and any(t.requires_grad for t in (qh, kc, ve, *mats))
    if not causal:
        res = _noncausal(qh.reshape(B, Hk, G * n_q, d), kc, ve, mats, degree, record)
        res = res.view(B, Hk, G, n_q, dv + 1)
        lead = 0
    else:
        offset = n_k - n_q
        lead = max(0, -offset)  # queries before the first key see nothing
        res = _causal(qh[:, :, :, lead:], kc, ve, mats, degree, bs, max(offset, 0), record)
    out = res[..., :dv] / res[..., dv:].clamp_min(tiny)
    if lead:
        out = torch.cat([out.new_zeros(B, Hk, G, lead, dv), out], dim=3)
    return out.reshape(B, H, n_q, dv).to(q.dtype)


class PolySketchAttention(AttentionLayer):
    """Multi-head attention layer with :func:`polysketch_attention`.

    Parameters
    ----------
    embed_dim, num_heads, num_kv_heads, causal, bias
        As :class:`streamsketch.attention.AttentionLayer`.
    degree, sketch_size, block_size
        As :func:`polysketch_attention`.
    learned : bool, default False
        Train the sketch matrices (one :class:`PolySketchMap` shared by the
        layer's heads, in ``self.sketch``) or keep them fixed buffers.
    seed : int, torch.Generator or None
        Draws the sketch matrices once, at construction.

    ``forward(x)``: ``(B, n, E) -> (B, n, E)``, linear time in ``n``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        degree: int = 4,
        sketch_size: int = 32,
        block_size: int = 256,
        learned: bool = False,
        seed: int | torch.Generator | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(embed_dim, num_heads, num_kv_heads, causal=causal, bias=bias)
        self.block_size = _check_int(block_size, "block_size", 1, 2**30)
        self.sketch = PolySketchMap(self.head_dim, degree, sketch_size, learned=learned, seed=seed)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return polysketch_attention(
            q,
            k,
            v,
            degree=self.sketch.degree,
            sketch_size=self.sketch.sketch_size,
            causal=self.causal,
            block_size=self.block_size,
            learned=self.sketch,
        )
