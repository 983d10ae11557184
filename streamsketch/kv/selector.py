"""KeySelector: a constant-size KV cache per head, chosen by a streaming scorer.

Per (batch, KV head) the selector keeps the first ``sinks`` tokens, the last
``window`` tokens and up to ``budget`` older tokens chosen by a
:mod:`~streamsketch.kv.scorers` scorer. The physical layout of the kept
tensors is ``[sinks | selected | window]``; all heads keep the same *number*
of keys (it follows from the stream length alone), only which older keys are
selected differs per head, so every step is a fixed-shape tensor program:
no Python loop over heads and no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._validation import check_int
from .scorers import (
    Scorer,
    _finite_rows,
    check_head_tensor,
    make_scorer,
    observation_attention,
)

__all__ = ["KeySelector"]

#: Width of the pooling of observation-window attention: a short phrase around an attended
#: token (15 recalled one pass key more than 7 on six hard cases; see the issue-20 note).
DEFAULT_POOL_KERNEL = 15


def _rank_union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Scores ``(B, H, m)`` that keep a candidate while either ``a`` or ``b`` ranks it high.

    Each score becomes its rank among the candidates (0 .. m-1); the result is
    the better of the two ranks, ties broken by the sum, so the candidate that
    both rank low is evicted first. Two scores on different scales combine
    without a tuned weight.
    """
    ra = a.argsort(dim=-1).argsort(dim=-1).to(torch.float32)
    rb = b.argsort(dim=-1).argsort(dim=-1).to(torch.float32)
    m = a.shape[-1]
    return torch.maximum(ra, rb) + (ra + rb) / (2 * m + 2)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class KeySelector:
    """Keep ``sinks + budget + window`` keys/values per head of a growing stream.

    Parameters
    ----------
    num_kv_heads : int
        KV heads ``H_kv``.
    head_dim : int
        Head dimension ``d`` of keys and values.
    budget : int
        Selected older keys per head (``>= 0``).
    sinks : int, default 4
        First tokens always kept (attention sinks).
    window : int, default 64
        Most recent tokens always kept.
    scorer : str or Scorer, default "leverage+query"
        ``"leverage+query"`` (expected softmax weight under a Gaussian model of
        recent queries; the measured best), ``"query"`` (expected logit under
        the recent mean query),
        ``"leverage"`` (ridge leverage of keys), ``"knorm"``, ``"window"``,
        ``"h2o"`` (accumulated attention; a baseline that needs attention
        weights), or a :class:`~streamsketch.kv.scorers.Scorer` instance.
    num_q_heads : int, optional
        Query heads (for grouped-query attention), defaults to ``num_kv_heads``.
    scale : float, optional
        Attention logit scale, ``1/sqrt(head_dim)`` by default.
    device : torch.device or str, optional
        Device of the cache and the scorer state.
    dtype : torch.dtype, optional
        Dtype of the kept keys/values (float32, float16 or bfloat16); taken
        from the first chunk when None. Scorer state is float32 regardless.
    scorer_kwargs : dict, optional
        Extra arguments of a named scorer (e.g. ``{"half_life": 64}``).
    observation_window : int, default 0
        Keep the last ``w`` queries (a ring buffer, ``(B, H_q, w, d)``). A chunk
        of more than one token (a prompt) is then ranked by the exact softmax
        attention of its last ``w`` queries (SnapKV's observation window: the
        question at the end of a prompt says which keys it needs); a one-token
        step keeps a candidate while either the scorer or those recent queries
        rank it high (:func:`_rank_union`). 0 turns it off.
    pool_kernel : int, default 15
        Odd width of the max-pooling of the observation-window attention over
        neighbouring slots, so a kept key keeps the span around it.

    Notes
    -----
    Cost per call with a chunk of ``c`` tokens: the scorer's observation
    (O(c d) to O(c d^2) per head), scoring the ``m <= budget + c`` candidates
    (O(m d) to O(m d^2 g)) and one ``topk`` and gather over them. Memory:
    ``sinks + budget + window`` keys and values per head between calls, plus
    the scorer's O(d^2) state; a call holds ``c`` more keys transiently.

    Inputs are checked for type, dtype and shape before any state changes;
    NaN/Inf values are not refused (that would synchronise with the device
    every step): the scorer keeps them out of its state and evicts such keys
    first (see :class:`~streamsketch.kv.scorers.Scorer`).

    Examples
    --------
    >>> import torch
    >>> sel = KeySelector(num_kv_heads=2, head_dim=8, budget=16, sinks=2, window=8)
    >>> k, v = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    >>> keys, values, pos = sel.update(k, v, queries=torch.randn(1, 2, 100, 8))
    >>> keys.shape, sel.n_seen
    (torch.Size([1, 2, 26, 8]), 100)
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        budget: int,
        *,
        sinks: int = 4,
        window: int = 64,
        scorer: str | Scorer = "leverage+query",
        num_q_heads: int | None = None,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scorer_kwargs: dict[str, Any] | None = None,
        observation_window: int = 0,
        pool_kernel: int = DEFAULT_POOL_KERNEL,
    ) -> None:
        self.budget = check_int(budget, "budget", minimum=0)
        self.observation_window = check_int(observation_window, "observation_window", minimum=0)
        self.pool_kernel = check_int(pool_kernel, "pool_kernel", minimum=1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")
        self.sinks = check_int(sinks, "sinks", minimum=0)
        self.window = check_int(window, "window", minimum=0)
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if scorer_kwargs and not isinstance(scorer, str):
            raise ValueError("scorer_kwargs go with a scorer name, not a Scorer instance")
        self.scorer = make_scorer(
            scorer,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            num_q_heads=num_q_heads,
            scale=scale,
            device=self.device,
            **(scorer_kwargs or {}),
        )
        if self.scorer.num_kv_heads != num_kv_heads or self.scorer.head_dim != head_dim:
            raise ValueError("scorer's num_kv_heads/head_dim differ from the selector's")
        self.num_kv_heads = self.scorer.num_kv_heads
        self.head_dim = self.scorer.head_dim
        self.dtype = dtype
        self.reset()

    @property
    def num_q_heads(self) -> int | None:
        """Query heads, once known (from the constructor or the first queries)."""
        return self.scorer.num_q_heads

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the cache and the scorer state."""
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        # Accumulated attention per kept slot (only for scorers that read attention).
        self.slot_attention: torch.Tensor | None = None
        self.n_seen = 0
        self._pending = 0
        # Ring buffer of the last `observation_window` queries (slot = position % w),
        # allocated by the first queries; `_prompt_step` marks a compress after a chunk of
        # more than one query (a prompt), which ranks by those queries alone.
        self.recent_queries: torch.Tensor | None = None
        self._prompt_step = False
        self.scorer.reset()

    @property
    def capacity(self) -> int:
        """``sinks + budget + window``: the most keys kept per head between calls."""
        return self.sinks + self.budget + self.window

    def __len__(self) -> int:
        """Physical keys per head held now."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of kept keys, values, positions and scorer state."""
        total = self.scorer.nbytes
        for t in (self.keys, self.values, self.positions, self.slot_attention):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------- api
    def update(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add a chunk and evict down to capacity; return the kept keys, values, positions.

        Parameters
        ----------
        keys, values : torch.Tensor
            ``(B, H_kv, c, d)`` the chunk's keys and values (after RoPE for a
            rotary model), in stream order.
        queries : torch.Tensor, optional
            ``(B, H_q, c, d)`` the chunk's queries; required by query-aware
            scorers.

        Returns
        -------
        keys, values : torch.Tensor
            ``(B, H_kv, n, d)`` with ``n <= sinks + budget + window``, laid out
            ``[sinks | selected | window]``; views of the selector's buffers.
        positions : torch.Tensor
            ``(B, H_kv, n)`` int64 stream positions of the kept keys.
        """
        if queries is None and self.scorer.needs_queries:
            raise ValueError(f"scorer {self.scorer.name!r} needs the chunk's queries")
        if queries is not None:
            self._check_queries(queries, keys)
        self.append(keys, values)
        if queries is not None:
            self.observe_queries(queries)
        self.compress()
        assert self.keys is not None and self.values is not None and self.positions is not None
        return self.keys, self.values, self.positions

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First half of :meth:`update`: add the chunk without evicting.

        Returns the kept keys/values followed by the chunk, which is what the
        chunk's own queries attend to; call :meth:`compress` afterwards (a
        cache calls it once the queries have been observed).
        """
        if self._pending:
            raise RuntimeError("append called twice without compress in between")
        self._check_kv(keys, values)
        B, _, c, _ = keys.shape
        if self.keys is not None and B != self.keys.shape[0]:
            raise ValueError(f"batch size changed from {self.keys.shape[0]} to {B}; call reset()")
        if self.dtype is None:
            self.dtype = keys.dtype
        keys = keys.to(self.device, self.dtype)
        values = values.to(self.device, self.dtype)
        # Validation is over, so the state may change from here on.
        self.scorer.observe_keys(keys)
        pos = torch.arange(self.n_seen, self.n_seen + c, device=self.device)
        pos = pos.expand(B, self.num_kv_heads, c)
        if self.keys is None:
            # Own copies: the selector must not alias the caller's tensors.
            self.keys, self.values, self.positions = keys.clone(), values.clone(), pos
        else:
            assert self.values is not None and self.positions is not None
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
            self.positions = torch.cat([self.positions, pos], dim=2)
        if self.slot_attention is not None or self.scorer.needs_attention:
            fresh = torch.zeros(B, self.num_kv_heads, c, device=self.device)
            old = self.slot_attention
            self.slot_attention = fresh if old is None else torch.cat([old, fresh], dim=2)
        self.n_seen += c
        self._pending = c
        return self.keys, self.values

    def observe_queries(self, queries: torch.Tensor) -> None:
        """Feed queries ``(B, H_q, c, d)`` to a query-aware scorer (others ignore them).

        With ``observation_window`` set, the chunk's last queries also enter
        the ring buffer ``recent_queries``: the next :meth:`compress` ranks a
        prompt's candidates (a chunk of more than one token) by their exact
        attention alone, and a one-token step's by the scorer and them.
        """
        self.scorer.observe_queries(queries)
        w = self.observation_window
        if not w:
            return
        B, Hq, c, d = queries.shape
        if self.recent_queries is None:
            self.recent_queries = torch.zeros(B, Hq, w, d, device=self.device)
        k = min(c, w)
        slots = torch.arange(self.n_seen - k, self.n_seen, device=self.device) % w
        recent = _finite_rows(queries[:, :, -k:].detach().to(self.recent_queries))
        self.recent_queries.index_copy_(2, slots, recent)
        self._prompt_step = c > 1

    def observe_attention(self, weights: torch.Tensor) -> None:
        """Add attention weights ``(B, H_q, c, n)`` over the current physical keys (h2o only)."""
        if not self.scorer.needs_attention:
            return
        if self.slot_attention is None or weights.shape[-1] != self.slot_attention.shape[-1]:
            raise ValueError("weights must cover the selector's current physical keys")
        B, Hq = weights.shape[:2]
        grouped = weights.to(torch.float32).reshape(
            B, self.num_kv_heads, Hq // self.num_kv_heads, -1, weights.shape[-1]
        )
        self.slot_attention += grouped.sum(dim=(2, 3))

    def compress(self) -> None:
        """Second half of :meth:`update`: evict down to ``sinks + budget + window`` keys."""
        if not self._pending:
            return
        assert self.keys is not None and self.values is not None and self.positions is not None
        n_phys = self.keys.shape[2]
        n_sinks = min(self.sinks, self.n_seen)
        n_window = min(self.window, self.n_seen - n_sinks)
        n_cand = n_phys - n_sinks - n_window
        n_keep = min(self.budget, n_cand)
        self._pending = 0
        prompt_step, self._prompt_step = self._prompt_step, False
        if n_keep == n_cand:
            return
        lo, hi = n_sinks, n_phys - n_window
        cand_pos = self.positions[:, :, lo:hi]
        if n_keep == 0:
            idx = None
        else:
            if self.scorer.needs_attention:
                assert self.slot_attention is not None
                scores = self.slot_attention[:, :, lo:hi]
            elif self.recent_queries is not None and prompt_step:
                scores = self._observation_scores(lo, hi)
            else:
                scores = self.scorer.score(
                    self.keys[:, :, lo:hi], cand_pos, values=self.values[:, :, lo:hi]
                )
                if self.recent_queries is not None:
                    scores = _rank_union(scores, self._observation_scores(lo, hi))
            top = torch.topk(scores, n_keep, dim=-1, sorted=False).indices
            # Stream order inside the selected block keeps the layout deterministic.
            idx = torch.sort(top, dim=-1).values + lo
        self.keys = self._keep(self.keys, idx, lo, hi)
        self.values = self._keep(self.values, idx, lo, hi)
        self.positions = self._keep(self.positions, idx, lo, hi)
        if self.slot_attention is not None:
            self.slot_attention = self._keep(self.slot_attention, idx, lo, hi)

    # --------------------------------------------------------------- helpers
    def _observation_scores(self, lo: int, hi: int) -> torch.Tensor:
        """Log of the attention the recent queries give candidates ``lo:hi``, max-pooled."""
        assert self.keys is not None and self.values is not None and self.positions is not None
        q = self.recent_queries
        assert q is not None
        w = q.shape[2]
        # Slot i holds the query at the latest position p < n_seen with p % w == i.
        slot = torch.arange(w, device=self.device)
        qpos = self.n_seen - 1 - (self.n_seen - 1 - slot) % w
        att = observation_attention(q, qpos, self.keys, self.positions, self.scorer.scale)
        if self.pool_kernel > 1:
            # A key next to a heavily attended one is kept with it (SnapKV's pooling): the
            # tokens of a retrieved span are read together. Adding the key's own weight
            # keeps the attended key itself ahead of the neighbours it lends its score to.
            B, H, n = att.shape
            pooled = F.max_pool1d(
                att.reshape(B * H, 1, n), self.pool_kernel, stride=1, padding=self.pool_kernel // 2
            ).reshape(B, H, n)
            att = pooled + att
        raw = torch.log(att[:, :, lo:hi] + 1e-30)
        return self.scorer.finish_scores(raw, self.keys[:, :, lo:hi], self.values[:, :, lo:hi])

    @staticmethod
    def _keep(t: torch.Tensor, idx: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
        parts = [t[:, :, :lo]]
        if idx is not None:
            gather_idx = idx if t.dim() == 3 else idx[..., None].expand(*idx.shape, t.shape[-1])
            parts.append(torch.gather(t, 2, gather_idx))
        parts.append(t[:, :, hi:])
        return torch.cat(parts, dim=2)

    def _check_kv(self, keys: Any, values: Any) -> None:
        for name, t in (("keys", keys), ("values", values)):
            check_head_tensor(name, t)
            if t.shape[1] != self.num_kv_heads:
                raise ValueError(
                    f"{name} must have shape (B, {self.num_kv_heads}, c, d), got {tuple(t.shape)}"
                )
        if keys.shape[3] != self.head_dim:
            raise ValueError(f"keys must have head dim {self.head_dim}, got {keys.shape[3]}")
        if values.shape[:3] != keys.shape[:3]:
            raise ValueError(
                f"values must match keys in batch, heads and length, got {tuple(values.shape)}"
            )
        if keys.shape[2] == 0:
            raise ValueError("keys must hold at least one token")

    def _check_queries(self, queries: Any, keys: Any) -> None:
        check_head_tensor("queries", queries)
        expected = self.num_q_heads
        ok = queries.shape[3] == self.head_dim and (
            queries.shape[1] == expected
            if expected is not None
            else queries.shape[1] % self.num_kv_heads == 0
        )
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            ok = ok and queries.shape[0] == keys.shape[0] and queries.shape[2] == keys.shape[2]
        if not ok:
            heads = "H_q" if expected is None else expected
            raise ValueError(
                f"queries must have shape (B, {heads}, c, {self.head_dim}) matching keys' B "
                f"and c, got {tuple(queries.shape)}"
            )

    def __repr__(self) -> str:
        return (
            f"KeySelector(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"budget={self.budget}, sinks={self.sinks}, window={self.window}, "
            f"scorer={self.scorer.name!r}, n_seen={self.n_seen})"
        )
