"""KeySelector: a constant-size KV cache per head, chosen by a streaming scorer.

Per (batch, KV head) the selector keeps the first ``sinks`` tokens, the last
``window`` tokens and up to ``budget`` older tokens chosen by a
:mod:`~streamsketch.kv.scorers` scorer, in preallocated buffers laid out
``[sinks | selected | window ring]`` and written in place. All heads keep the
same *number* of keys (it follows from the stream length alone), only which
older keys are selected differs per head, so every step is a fixed-shape
tensor program: no Python loop over heads, no host synchronisation, and
once the buffers are full a one-token step has the same shapes at every
position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .._validation import check_int
from .persist import pack, unpack
from .scorers import (
    Scorer,
    check_head_tensor,
    make_scorer,
    observation_attention,
)

__all__ = ["KeySelector"]

#: One-token steps between two rankings of the selected keys against the window tokens
#: about to leave it (each ranking scores ``budget + interval`` candidates). 4 stays within
#: half a point of the perplexity of ranking at every step on three texts, 8 and 16 do not
#: (benchmarks/results/kv_interval.md).
DEFAULT_INTERVAL = 4

#: Width of the pooling of observation-window attention: a short phrase around an attended
#: token (15 recalled one pass key more than 7 on six hard cases; see the issue-20 note).
DEFAULT_POOL_KERNEL = 15


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``(B, H, m)`` of ``t`` ``(B, H, n, d)`` along the slot axis."""
    return torch.gather(t, 2, _expand(idx, t))


def _expand(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return idx[..., None].expand(*idx.shape, like.shape[-1])


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


def _counter(state: dict[str, Any], name: str) -> int:
    t = state.get(name)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 0:
        raise ValueError(f"state {name!r} must be a 0-d int64 tensor")
    return int(t)


def _scorer_kwargs(scorer: Scorer) -> dict[str, Any]:
    config = scorer.get_config()
    config.pop("name")
    return config


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
        neighbouring positions, so a kept key keeps the span around it.
    interval : int, default 4
        One-token steps between two rankings. Every ``interval`` steps the
        ``budget`` selected keys and the next ``interval`` window tokens to be
        overwritten are ranked together; the best fill the selected slots, the
        rest stay in the window slots until new tokens take them. 1 ranks at
        every step (the window then slides by exactly one token per step).

    Notes
    -----
    Layout: keys, values and positions live in buffers of the final shape
    ``(B, H_kv, capacity, ·)``, allocated by the first chunk and written in
    place: ``[sinks | selected | window ring]``. A one-token step writes its
    token into the ring slot of the token ``window`` steps older, so it
    attends to the buffers themselves (``capacity`` keys, the new one
    included) and its shapes never change once they are full; slot order does
    not matter to attention (keys are cached after RoPE), and positions are
    tracked per slot. Every key of the last ``window`` tokens stays attended:
    a ranked-out window token stays in its slot until its successor arrives.

    Cost of a one-token step: the scorer's observation (O(d) to O(d^2) per
    head), the write, and every ``interval`` steps one scoring of ``budget +
    interval`` candidates (O(m d) to O(m d^2 g)) and a sort. A chunk of ``c >
    1`` tokens that overflows the buffers is scored with all ``capacity + c``
    kept and new keys and holds them transiently; memory between calls is
    ``capacity`` keys and values per head plus the scorer's O(d^2) state.

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
        interval: int = DEFAULT_INTERVAL,
    ) -> None:
        self.budget = check_int(budget, "budget", minimum=0)
        self.interval = check_int(interval, "interval", minimum=1)
        self.observation_window = check_int(observation_window, "observation_window", minimum=0)
        self.pool_kernel = check_int(pool_kernel, "pool_kernel", minimum=1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")
        self.sinks = check_int(sinks, "sinks", minimum=0)
        self.window = check_int(window, "window", minimum=0)
        # The ring holds at least the current token; a decision block fits in the ring.
        self._ring = max(self.window, 1)
        self._interval = min(self.interval, self._ring)
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
        """Empty the cache and the scorer state (the buffers are allocated again on first use)."""
        # Capacity buffers (B, H_kv, capacity, ...), allocated by the first chunk and then only
        # written in place; slot -> position is tracked in `_positions`.
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        # Accumulated attention per slot (only for scorers that read attention).
        self._slot_attention: torch.Tensor | None = None
        # Candidate slots of block decisions (see _decide_block): the selected slots, and the
        # ring slots followed by the first `interval` of them again, so the `interval` slots
        # from any ring offset on are one slice.
        self._selected_slots: torch.Tensor | None = None
        self._ring_slots: torch.Tensor | None = None
        # A prompt chunk that overflows the buffers waits here, concatenated after the kept
        # keys, until its queries are observed (`compress` then rebuilds the buffers).
        self._chunk: dict[str, torch.Tensor] | None = None
        self.n_seen = 0
        # Every position below `_decided` is settled: while the buffers fill, positions below
        # sinks + budget sit in their final region.
        self._decided = self.sinks + self.budget
        # (Once full: every position below it is in the selected region or dropped.)
        self._pending = 0
        # Ring buffer of the last `observation_window` queries (slot = position % w),
        # allocated by the first queries; `_prompt_step` marks a compress after a chunk of
        # more than one query (a prompt), which ranks by those queries alone.
        self.recent_queries: torch.Tensor | None = None
        self._prompt_step = False
        self.scorer.reset()

    @property
    def capacity(self) -> int:
        """``sinks + budget + max(window, 1)``: keys held per head once the stream is longer.

        A window of 0 still holds one slot: the current token, which its own
        query must see.
        """
        return self.sinks + self.budget + self._ring

    @property
    def pending(self) -> bool:
        """True between :meth:`append` and :meth:`compress` (the chunk's queries are awaited)."""
        return bool(self._pending)

    @property
    def keys(self) -> torch.Tensor | None:
        """``(B, H_kv, n, d)`` keys attended now: the kept keys, or kept + chunk after append."""
        return self._attended("keys", self._keys)

    @property
    def values(self) -> torch.Tensor | None:
        """``(B, H_kv, n, d)`` the values beside :attr:`keys`."""
        return self._attended("values", self._values)

    @property
    def positions(self) -> torch.Tensor | None:
        """``(B, H_kv, n)`` int64 stream positions of :attr:`keys` (slot order is arbitrary)."""
        return self._attended("positions", self._positions)

    @property
    def slot_attention(self) -> torch.Tensor | None:
        """``(B, H_kv, n)`` attention accumulated by each key of :attr:`keys` (h2o only)."""
        return self._attended("attention", self._slot_attention)

    def _attended(self, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
        # The pending chunk's concatenation while one is held, else the filled
        # slots of the buffer (the buffer itself once full: no view op per step).
        if self._chunk is not None:
            return self._chunk.get(name)
        if buffer is None or self.n_seen >= self.capacity:
            return buffer
        return buffer[:, :, : self.n_seen]

    @property
    def _n_valid(self) -> int:
        return min(self.n_seen, self.capacity)

    def __len__(self) -> int:
        """Physical keys per head attended now."""
        keys = self.keys
        return 0 if keys is None else keys.shape[2]

    def attended_length(self, query_length: int) -> int:
        """Keys per head the next chunk of ``query_length`` tokens attends to (kept + chunk).

        A one-token step attends to the capacity buffers themselves (the new
        token written into its ring slot), so its length stops growing once
        the stream fills them; a longer chunk attends to the kept keys
        followed by the chunk.
        """
        if query_length == 1:
            return min(self.n_seen + 1, self.capacity)
        return self._n_valid + query_length

    @property
    def nbytes(self) -> int:
        """Bytes of the capacity buffers and the scorer state (constant once allocated)."""
        total = self.scorer.nbytes
        for t in (self._keys, self._values, self._positions, self._slot_attention):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable; the scorer's as a nested dict)."""
        return {
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "budget": self.budget,
            "sinks": self.sinks,
            "window": self.window,
            "scorer": self.scorer.get_config(),
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "observation_window": self.observation_window,
            "pool_kernel": self.pool_kernel,
            "interval": self.interval,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, device: torch.device | str | None = None
    ) -> KeySelector:
        """An empty selector built from :meth:`get_config`'s output, on ``device``.

        Raises ``ValueError`` for a malformed configuration (unknown or
        missing fields, values the constructor refuses).
        """
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        expected = {
            "num_kv_heads", "head_dim", "budget", "sinks", "window", "scorer", "dtype",
            "observation_window", "pool_kernel", "interval",
        }  # fmt: skip
        if set(config) != expected:
            raise ValueError(f"config must hold {sorted(expected)}, got {sorted(config)}")
        scorer_config = config["scorer"]
        if not isinstance(scorer_config, dict) or not isinstance(scorer_config.get("name"), str):
            raise ValueError("config 'scorer' must be a dict with a 'name'")
        dtype = config["dtype"]
        if dtype is not None and dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"config 'dtype' must name a floating dtype, got {dtype!r}")
        try:
            kwargs = dict(scorer_config)
            scorer = make_scorer(kwargs.pop("name"), device=device, **kwargs)
            return cls(
                config["num_kv_heads"],
                config["head_dim"],
                config["budget"],
                sinks=config["sinks"],
                window=config["window"],
                scorer=scorer,
                device=device,
                dtype=None if dtype is None else getattr(torch, dtype),
                observation_window=config["observation_window"],
                pool_kernel=config["pool_kernel"],
                interval=config["interval"],
            )
        except TypeError as exc:  # a field of the wrong type, or an unknown scorer argument
            raise ValueError(f"config is malformed: {exc}") from exc

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the kept keys, values, positions, recent queries and scorer state.

        Counters are 0-d int64 tensors; the scorer's entries are prefixed
        ``scorer.``. Refused (``RuntimeError``) between :meth:`append` and
        :meth:`compress`, where a chunk is held transiently.
        """
        if self._pending:
            raise RuntimeError("cannot save between append and compress: a chunk is pending")
        out: dict[str, torch.Tensor] = {
            "n_seen": torch.tensor(self.n_seen),
            "decided": torch.tensor(self._decided),
        }
        for name, t in (
            ("keys", self._keys),
            ("values", self._values),
            ("positions", self._positions),
            ("slot_attention", self._slot_attention),
            ("recent_queries", self.recent_queries),
        ):
            if t is not None:
                out[name] = t.detach().clone()
        for name, t in self.scorer.state_dict().items():
            out[f"scorer.{name}"] = t
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the state by ``state`` (:meth:`state_dict` of a selector of this config).

        Every field is checked first: names, shapes and dtypes against the
        configuration, positions distinct, within the stream and laid out as
        the selector lays them out (sinks first, every one of the last
        ``window`` tokens kept). A mismatch raises ``ValueError`` naming the
        field and leaves the selector unchanged.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        scorer_state = {k[7:]: t for k, t in state.items() if k.startswith("scorer.")}
        own = {k: t for k, t in state.items() if not k.startswith("scorer.")}
        n_seen = _counter(own, "n_seen")
        decided = _counter(own, "decided")
        if n_seen < 0:
            raise ValueError(f"state 'n_seen' must be >= 0, got {n_seen}")
        buffers = ["keys", "values", "positions"]
        if self.scorer.needs_attention:
            buffers.append("slot_attention")
        expected = {"n_seen", "decided"} | (set(buffers) if n_seen else set())
        if self.observation_window and n_seen and "recent_queries" in own:
            expected.add("recent_queries")
        if set(own) != expected:
            raise ValueError(f"state must hold {sorted(expected)}, got {sorted(own)}")
        if n_seen:
            self._check_state_buffers(own, n_seen, decided)
        # A throwaway scorer checks the scorer's part, so a bad one leaves this one unchanged.
        probe = make_scorer(
            self.scorer.get_config()["name"], device=self.device, **_scorer_kwargs(self.scorer)
        )
        probe.load_state_dict(scorer_state)
        self.reset()
        self.scorer.load_state_dict(scorer_state)
        self.n_seen, self._decided = n_seen, decided
        if n_seen:
            keys = own["keys"]
            if self.dtype is None:
                self.dtype = keys.dtype
            self._allocate(keys.shape[0])
            assert self._keys is not None and self._values is not None
            assert self._positions is not None
            self._keys.copy_(keys)
            self._values.copy_(own["values"])
            self._positions.copy_(own["positions"])
            if self._slot_attention is not None:
                self._slot_attention.copy_(own["slot_attention"])
        if "recent_queries" in own:
            self.recent_queries = own["recent_queries"].to(self.device, torch.float32).clone()

    def copy(self) -> KeySelector:
        """An independent selector in the same state (a branch: both continue on their own).

        Cost: one copy of the capacity buffers and the scorer state.
        """
        other = KeySelector.from_config(self.get_config(), device=self.device)
        other.load_state_dict(self.state_dict())
        return other

    def to_bytes(self) -> bytes:
        """The selector's configuration and state as one safetensors blob (:mod:`.persist`)."""
        return pack("KeySelector", self.get_config(), self.state_dict())

    @classmethod
    def from_bytes(cls, blob: bytes, *, device: torch.device | str | None = None) -> KeySelector:
        """The selector saved by :meth:`to_bytes`, on ``device`` (CPU by default).

        Every field is validated (see :meth:`load_state_dict`); a corrupted or
        mismatched blob raises ``ValueError`` saying what is wrong.
        """
        config, state = unpack(blob, "KeySelector")
        selector = cls.from_config(config, device=device)
        selector.load_state_dict(state)
        return selector

    def _check_state_buffers(
        self, state: dict[str, torch.Tensor], n_seen: int, decided: int
    ) -> None:
        keys = state["keys"]
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            raise ValueError("state 'keys' must be a (B, H_kv, capacity, d) tensor")
        B, cap = keys.shape[0], self.capacity
        dtype = keys.dtype if self.dtype is None else self.dtype
        if B < 1 or dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"state 'keys' must be a floating tensor with B >= 1, got {keys.dtype}"
            )
        shapes = {
            "keys": ((B, self.num_kv_heads, cap, self.head_dim), dtype),
            "values": ((B, self.num_kv_heads, cap, self.head_dim), dtype),
            "positions": ((B, self.num_kv_heads, cap), torch.int64),
            "slot_attention": ((B, self.num_kv_heads, cap), torch.float32),
        }
        if "recent_queries" in state:
            hq = self.num_q_heads or state["recent_queries"].shape[1]
            if hq % self.num_kv_heads:
                raise ValueError("state 'recent_queries' heads must be a multiple of num_kv_heads")
            shapes["recent_queries"] = (
                (B, hq, self.observation_window, self.head_dim),
                torch.float32,
            )
        for name, (shape, dt) in shapes.items():
            if name not in state:
                continue
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
                raise ValueError(f"state {name!r} must be {dt} {shape}, got {got}")
        pos = state["positions"]
        filled = min(n_seen, cap)
        if bool((pos[..., filled:] != -1).any()):
            raise ValueError("state 'positions' marks an empty slot that should be filled")
        kept = pos[..., :filled]
        if n_seen <= cap:
            if not bool((kept == torch.arange(filled, device=kept.device)).all()):
                raise ValueError("state 'positions' must equal the slot while the cache fills")
        else:
            ordered = kept.sort(dim=-1).values
            if bool((ordered[..., 0] < 0).any()) or bool((ordered[..., -1] >= n_seen).any()):
                raise ValueError(f"state 'positions' must lie in [0, n_seen={n_seen})")
            if bool((ordered[..., 1:] <= ordered[..., :-1]).any()):
                raise ValueError("state 'positions' must be distinct within each head")
            sinks = torch.arange(self.sinks, device=kept.device)
            if self.sinks and not bool((kept[..., : self.sinks] == sinks).all()):
                raise ValueError("state 'positions' must hold the sinks in the first slots")
            recent = (kept >= n_seen - self._ring).sum(dim=-1)
            if not bool((recent == min(self._ring, n_seen)).all()):
                raise ValueError("state 'positions' must keep every one of the last window tokens")
        low = self.sinks + self.budget
        if not low <= decided <= max(n_seen, low) + self._interval:
            raise ValueError(f"state 'decided' {decided} is outside [{low}, n_seen + interval]")

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
            ``(B, H_kv, n, d)`` with ``n <= capacity``: views of the
            selector's buffers, in slot order (``[sinks | selected | window
            ring]``, each region in no particular order).
        positions : torch.Tensor
            ``(B, H_kv, n)`` int64 stream positions of the kept keys.
        """
        if queries is None and self.scorer.needs_queries:
            raise ValueError(f"scorer {self.scorer.name!r} needs the chunk's queries")
        if queries is not None:
            self._check_queries(queries, keys)
        self.append(keys, values)
        if queries is not None:
            self._observe_queries(queries)
        self.compress()
        assert self.keys is not None and self.values is not None and self.positions is not None
        return self.keys, self.values, self.positions

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First half of :meth:`update`: add the chunk; return what its queries attend to.

        A one-token step first settles the fate of the window tokens that the
        next steps will overwrite (every ``interval`` steps, one scoring of
        ``budget + interval`` candidates), then writes the token into its ring
        slot: the returned tensors are the capacity buffers themselves. A
        longer chunk that fits is written in place too; one that overflows is
        returned after the kept keys and evicted by :meth:`compress`, which a
        cache calls once the queries have been observed.
        """
        if self._pending:
            raise RuntimeError("append called twice without compress in between")
        self._check_kv(keys, values)
        B, _, c, _ = keys.shape
        if self._keys is not None and B != self._keys.shape[0]:
            raise ValueError(f"batch size changed from {self._keys.shape[0]} to {B}; call reset()")
        if self.dtype is None:
            self.dtype = keys.dtype
        if keys.dtype != self.dtype or keys.device != self.device:
            keys = keys.to(self.device, self.dtype)
        if values.dtype != self.dtype or values.device != self.device:
            values = values.to(self.device, self.dtype)
        # Validation is over, so the state may change from here on.
        if self._keys is None:
            self._allocate(B)
        assert self._keys is not None and self._values is not None and self._positions is not None
        p, cap = self.n_seen, self.capacity
        if p + c <= cap:
            # Still filling: slot = position.
            self._write(slice(p, p + c), keys, values, p)
        elif c == 1:
            slot = self._ring_slot(p)
            if self.budget and p - self._ring >= self._decided:
                self._decide_block((p - self._ring - self.sinks - self.budget) % self._ring)
                self._decided = p - self._ring + self._interval
            self._write(slice(slot, slot + 1), keys, values, p)
        else:
            chunk = {
                "keys": torch.cat([self._keys[:, :, : self._n_valid], keys], dim=2),
                "values": torch.cat([self._values[:, :, : self._n_valid], values], dim=2),
                "positions": torch.cat(
                    [
                        self._positions[:, :, : self._n_valid],
                        torch.arange(p, p + c, device=self.device).expand(B, self.num_kv_heads, c),
                    ],
                    dim=2,
                ),
            }
            if self._slot_attention is not None:
                fresh = self._slot_attention.new_zeros(B, self.num_kv_heads, c)
                chunk["attention"] = torch.cat(
                    [self._slot_attention[:, :, : self._n_valid], fresh], dim=2
                )
            self._chunk = chunk
        self.scorer.observe_keys(keys, validate=False)
        self.n_seen += c
        self._pending = c
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def observe_queries(self, queries: torch.Tensor) -> None:
        """Feed queries ``(B, H_q, c, d)`` to a query-aware scorer (others ignore them).

        With ``observation_window`` set, the chunk's last queries also enter
        the ring buffer ``recent_queries``: the next :meth:`compress` ranks an
        overflowing prompt's candidates by their exact attention alone, and
        the decisions of one-token steps rank by the scorer and them.
        """
        self._check_queries(queries, None)
        if self._keys is not None and queries.shape[0] != self._keys.shape[0]:
            raise ValueError(
                f"queries must have the cache's batch size {self._keys.shape[0]}, "
                f"got {queries.shape[0]}"
            )
        self._observe_queries(queries)

    def _observe_queries(self, queries: torch.Tensor) -> None:
        # Checked by the caller (observe_queries or update), so the scorer is told not to.
        self.scorer.observe_queries(queries, validate=False)
        w = self.observation_window
        if not w:
            return
        B, Hq, c, d = queries.shape
        if self.recent_queries is None:
            self.recent_queries = torch.zeros(B, Hq, w, d, device=self.device)
        if c == 1:
            # A Python slot index: one copy (which also casts), no index tensor per step.
            # Queries are stored raw: observation_attention gives a non-finite one no weight.
            slot = (self.n_seen - 1) % w
            self.recent_queries[:, :, slot : slot + 1].copy_(queries.detach())
        else:
            k = min(c, w)
            slots = torch.arange(self.n_seen - k, self.n_seen, device=self.device) % w
            recent = queries[:, :, -k:].detach().to(self.recent_queries)
            self.recent_queries.index_copy_(2, slots, recent)
        self._prompt_step = c > 1

    def observe_attention(self, weights: torch.Tensor) -> None:
        """Add attention weights ``(B, H_q, c, n)`` over the keys just attended (h2o only)."""
        if not self.scorer.needs_attention:
            return
        att = self.slot_attention
        if att is None or weights.shape[-1] != att.shape[-1]:
            raise ValueError("weights must cover the selector's current physical keys")
        B, Hq = weights.shape[:2]
        grouped = weights.to(torch.float32).reshape(
            B, self.num_kv_heads, Hq // self.num_kv_heads, -1, weights.shape[-1]
        )
        att += grouped.sum(dim=(2, 3))

    def compress(self) -> None:
        """Second half of :meth:`update`: evict an overflowing chunk down to capacity.

        One-token steps and chunks that fit were settled by :meth:`append`;
        here only the pending flag is cleared for them.
        """
        if not self._pending:
            return
        self._pending = 0
        prompt_step, self._prompt_step = self._prompt_step, False
        if self._chunk is not None:
            self._rebuild(self._chunk, prompt_step)
            self._chunk = None

    # --------------------------------------------------------------- helpers
    def _allocate(self, batch_size: int) -> None:
        shape = (batch_size, self.num_kv_heads, self.capacity)
        assert self.dtype is not None
        self._keys = torch.zeros(*shape, self.head_dim, device=self.device, dtype=self.dtype)
        self._values = torch.zeros_like(self._keys)
        # -1 marks an empty slot; it is never attended (the stream fills slots in order).
        self._positions = torch.full(shape, -1, dtype=torch.long, device=self.device)
        if self.scorer.needs_attention:
            self._slot_attention = torch.zeros(shape, device=self.device)
        if self.budget:
            # O(capacity) indices: a table with one row per ring offset would hold
            # window * budget of them (gigabytes at totals of several thousand).
            base = self.sinks + self.budget
            self._selected_slots = torch.arange(self.sinks, base, device=self.device)
            ring = torch.arange(self._ring + self._interval, device=self.device) % self._ring
            self._ring_slots = base + ring

    def _ring_slot(self, position: int) -> int:
        base = self.sinks + self.budget
        return base + (position - base) % self._ring

    def _write(self, slots: slice, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        assert self._keys is not None and self._values is not None and self._positions is not None
        c = keys.shape[2]
        self._keys[:, :, slots].copy_(keys)
        self._values[:, :, slots].copy_(values)
        if c == 1:
            self._positions[:, :, slots].fill_(first)
        else:
            self._positions[:, :, slots].copy_(torch.arange(first, first + c, device=self.device))
        if self._slot_attention is not None:
            self._slot_attention[:, :, slots].zero_()

    def _decide_block(self, ring_offset: int) -> None:
        """Rank the selected keys and the next ``interval`` window tokens to be overwritten.

        The best ``budget`` of these ``budget + interval`` candidates go to the
        selected slots and the rest to the ring slots, which the next
        ``interval`` tokens overwrite: a permutation written in place, so every
        key stays attended until its slot is taken.
        """
        assert self._keys is not None and self._values is not None and self._positions is not None
        assert self._selected_slots is not None and self._ring_slots is not None
        block = self._ring_slots[ring_offset : ring_offset + self._interval]
        slots = torch.cat([self._selected_slots, block])
        keys = self._keys.index_select(2, slots)
        values = self._values.index_select(2, slots)
        pos = self._positions.index_select(2, slots)
        if self.scorer.needs_attention:
            assert self._slot_attention is not None
            att = self._slot_attention.index_select(2, slots)
            scores = att
        else:
            scores = self.scorer.score(keys, pos, values=values, validate=False)
            if self.recent_queries is not None:
                raw = self._observation_scores(self._keys, self._positions)
                raw = raw.gather(2, slots.expand(*raw.shape[:2], -1))
                scores = _rank_union(scores, self.scorer.finish_scores(raw, keys, values))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        # The ranked-out keys go to the block's slots oldest first: block slot j is taken
        # at step j of the next `interval`, so a window token stays until it leaves the window.
        out = order[:, :, self.budget :]
        out = out.gather(2, torch.argsort(pos.gather(2, out), dim=-1))
        order = torch.cat([order[:, :, : self.budget], out], dim=2)
        self._keys.index_copy_(2, slots, _take(keys, order))
        self._values.index_copy_(2, slots, _take(values, order))
        self._positions.index_copy_(2, slots, pos.gather(2, order))
        if self.scorer.needs_attention:
            assert self._slot_attention is not None
            self._slot_attention.index_copy_(2, slots, att.gather(2, order))

    def _rebuild(self, chunk: dict[str, torch.Tensor], prompt_step: bool) -> None:
        """Evict an overflowing chunk: keep the sinks, the last window and the best older keys."""
        assert self._keys is not None and self._values is not None and self._positions is not None
        keys, values, pos = chunk["keys"], chunk["values"], chunk["positions"]
        s, b, ring = self.sinks, self.budget, self._ring
        cand_k, cand_v, cand_p = keys[:, :, s:], values[:, :, s:], pos[:, :, s:]
        if self.scorer.needs_attention:
            scores = chunk["attention"][:, :, s:]
        elif b and self.recent_queries is not None and prompt_step:
            raw = self._observation_scores(keys, pos)[:, :, s:]
            scores = self.scorer.finish_scores(raw, cand_k, cand_v)
        elif b:
            scores = self.scorer.score(cand_k, cand_p, values=cand_v, validate=False)
            if self.recent_queries is not None:
                raw = self._observation_scores(keys, pos)[:, :, s:]
                scores = _rank_union(scores, self.scorer.finish_scores(raw, cand_k, cand_v))
        else:
            scores = torch.zeros(cand_p.shape, device=self.device)
        # The last `ring` tokens are kept whatever they score.
        scores = scores.masked_fill(cand_p >= self.n_seen - ring, math.inf)
        keep = torch.topk(scores, b + ring, dim=-1).indices
        # In stream order the window comes last: the rest fill the selected region.
        kept_pos = cand_p.gather(2, keep)
        kept_pos, order = torch.sort(kept_pos, dim=-1)
        keep = keep.gather(2, order)
        base = s + b
        B, H = kept_pos.shape[:2]
        slots = torch.cat(
            [
                torch.arange(s, base, device=self.device).expand(B, H, -1),
                base + (kept_pos[:, :, b:] - base) % ring,
            ],
            dim=2,
        )
        self._keys[:, :, :s].copy_(keys[:, :, :s])
        self._values[:, :, :s].copy_(values[:, :, :s])
        self._positions[:, :, :s].copy_(pos[:, :, :s])
        self._keys[:, :, s:].scatter_(2, _expand(slots - s, keys), _take(cand_k, keep))
        self._values[:, :, s:].scatter_(2, _expand(slots - s, values), _take(cand_v, keep))
        self._positions[:, :, s:].scatter_(2, slots - s, kept_pos)
        if self._slot_attention is not None:
            att = chunk["attention"]
            self._slot_attention[:, :, :s].copy_(att[:, :, :s])
            self._slot_attention[:, :, s:].scatter_(2, slots - s, att[:, :, s:].gather(2, keep))
        self._decided = self.n_seen - ring

    def _observation_scores(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Log of the attention ``(B, H_kv, n)`` the recent queries give each of ``keys``, pooled.

        The caller picks its candidates out of it and adds the scorer's value
        term (:meth:`Scorer.finish_scores`), so both scores rank alike.
        """
        q = self.recent_queries
        assert q is not None
        w = q.shape[2]
        # Slot i holds the query at the latest position p < n_seen with p % w == i.
        slot = torch.arange(w, device=self.device)
        qpos = self.n_seen - 1 - (self.n_seen - 1 - slot) % w
        att = observation_attention(q, qpos, keys, positions, self.scorer.scale)
        if self.pool_kernel > 1:
            # A key next to a heavily attended one is kept with it (SnapKV's pooling): the
            # tokens of a retrieved span are read together. Slots are in no stream order,
            # so the pooling runs over the keys sorted by position. Adding the key's own
            # weight keeps the attended key itself ahead of the neighbours it lends its
            # score to.
            B, H, n = att.shape
            order = torch.argsort(positions, dim=-1)
            in_order = att.gather(2, order)
            pooled = F.max_pool1d(
                in_order.reshape(B * H, 1, n),
                self.pool_kernel,
                stride=1,
                padding=self.pool_kernel // 2,
            ).reshape(B, H, n)
            att = att + torch.empty_like(att).scatter_(2, order, pooled)
        return torch.log(att + 1e-30)

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
