"""Scorers: constant-size streaming state that ranks cached keys for eviction.

A scorer sees every key (and, if it asks for them, every query) of one
attention layer and keeps a state whose size does not depend on the stream
length: O(d) or O(d^2) floats per head. ``score(keys)`` ranks candidate keys;
the :class:`~streamsketch.kv.KeySelector` keeps the top ``budget`` of them.
No scorer reads attention scores except :class:`AccumulatedAttentionScorer`
(H2O), which exists as a baseline for comparison.

Shapes: keys ``(B, H_kv, c, d)``, queries ``(B, H_q, c, d)`` with ``H_q`` a
multiple of ``H_kv`` (grouped-query attention: query head ``h`` reads KV head
``h // (H_q // H_kv)``); scores ``(B, H_kv, m)`` float32, larger is kept. Every
state tensor is float32 on the scorer's device whatever the cache dtype.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .._validation import check_bool, check_int

__all__ = [
    "SCORERS",
    "AccumulatedAttentionScorer",
    "KNormScorer",
    "LeverageScorer",
    "QueryGaussianScorer",
    "QueryMeanScorer",
    "Scorer",
    "WindowScorer",
    "make_scorer",
    "observation_attention",
]


class Scorer:
    """Base class: streaming key/query state of one attention layer, batched over (B, H_kv).

    Parameters
    ----------
    num_kv_heads : int
        Key/value heads ``H_kv``.
    head_dim : int
        Head dimension ``d``.
    num_q_heads : int, optional
        Query heads ``H_q`` (a multiple of ``num_kv_heads``); taken from the
        first queries observed when None.
    scale : float, optional
        Logit scale of the attention, ``1/sqrt(d)`` by default.
    device : torch.device or str, optional
        Where the state lives.
    value_weighted : bool, optional
        Add ``log ||v||`` to each key's score: dropping a key moves the output
        by its weight times its value, so of two equally attended keys the one
        with the larger value matters more. Default: on for the query scorers
        (measured: 1 536-token texts, total 256, perplexity +11.9% vs +12.8%
        and +9.3% vs +9.9% on two texts, +6.3% vs +5.9% on a third), off
        for the others.
    value_centred : bool, default True
        With ``value_weighted``, use ``log ||v - v_bar||``, ``v_bar`` the
        mean value of the candidates being scored, instead of ``log ||v||``.
        Dropping key ``j`` moves the output ``o`` by about ``w_j (v_j - o)``,
        and ``v_bar`` is a better stand-in for ``o`` than the origin.
        Measured with ``leverage+query`` at total 256 on the four texts of
        ``docs/kv.md``: +4.60% / +8.44% / +9.37% against +5.00% / +8.63% /
        +9.57% uncentred on the 1 536-token texts, +22.0% against +22.5% on
        the 3 072-token one (``streamsketch eval`` for every total).

    Notes
    -----
    The state is allocated on the first ``observe_keys`` call, when the batch
    size is known.

    Non-finite data: refusing NaN/Inf would need a host synchronisation per
    step, so the scorers neutralise it on the device instead. A key or query
    row holding NaN/Inf, or whose squared norm overflows float32 (norm above
    about ``1.8e19``), enters the state as a zero row, and :meth:`score`
    gives ``-inf`` to candidates whose key or value is not finite (or whose
    score is NaN), so they are evicted first instead of being kept (``topk``
    ranks NaN highest). The float32 state itself stays finite as long as its
    running sums do (for the Gram matrix: the sum of squared key norms below
    ``3.4e38``); a leverage-scorer merge that would overflow is dropped for
    that (batch, head). The cache itself keeps whatever keys and values it
    is given: its sinks and window still hold them. Cost: a few element-wise
    operations per step, no host synchronisation.

    Subclasses set ``needs_queries`` when they read queries and
    ``needs_attention`` when they read attention weights.
    """

    name: ClassVar[str] = ""
    value_weighted_default: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_q_heads: int | None = None,
        scale: float | None = None,
        device: torch.device | str | None = None,
        value_weighted: bool | None = None,
        value_centred: bool = True,
    ) -> None:
        num_kv_heads = check_int(num_kv_heads, "num_kv_heads", minimum=1)
        head_dim = check_int(head_dim, "head_dim", minimum=1)
        if num_q_heads is not None:
            num_q_heads = check_int(num_q_heads, "num_q_heads", minimum=1)
            if num_q_heads % num_kv_heads:
                raise ValueError(
                    f"num_q_heads ({num_q_heads}) must be a multiple of "
                    f"num_kv_heads ({num_kv_heads})"
                )
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive float, got {scale!r}")
        self.num_kv_heads = num_kv_heads
        self.num_q_heads: int | None = num_q_heads
        self.head_dim = head_dim
        self.scale = float(scale)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.batch_size: int | None = None
        self.value_weighted = (
            type(self).value_weighted_default if value_weighted is None else bool(value_weighted)
        )
        self.value_centred = check_bool(value_centred, "value_centred")

    # ----------------------------------------------------------------- protocol
    def observe_keys(self, keys: torch.Tensor, *, validate: bool = True) -> None:
        """Fold new keys ``(B, H_kv, c, d)`` into the state. Cost O(c d) or O(c d^2) per head.

        ``validate=False`` skips the type and shape checks, for a caller that
        has checked these tensors at its own boundary (:class:`KeySelector`
        does); this holds for :meth:`observe_queries` and :meth:`score` too.
        """
        if validate:
            self._check_keys(keys)
        self._ensure_state(keys.shape[0])
        self._observe_keys(_as_float32(keys))

    def observe_queries(self, queries: torch.Tensor, *, validate: bool = True) -> None:
        """Fold new queries ``(B, H_q, c, d)`` into the state (no-op for key-only scorers)."""
        if not self.needs_queries:
            return
        if validate:
            if self.num_q_heads is None:
                check_head_tensor("queries", queries)
                if queries.shape[1] % self.num_kv_heads:
                    raise ValueError(
                        f"queries' heads ({queries.shape[1]}) must be a multiple of "
                        f"num_kv_heads ({self.num_kv_heads})"
                    )
            self._check_tensor("queries", queries, self.num_q_heads or queries.shape[1])
        self._ensure_state(queries.shape[0])
        self.num_q_heads = queries.shape[1]
        self._observe_queries(_as_float32(queries))

    def score(
        self,
        keys: torch.Tensor,
        positions: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        validate: bool = True,
    ) -> torch.Tensor:
        """Scores ``(B, H_kv, m)`` float32 of candidate keys ``(B, H_kv, m, d)``; larger is kept.

        ``positions`` ``(B, H_kv, m)`` int64 are the keys' stream positions and
        ``values`` ``(B, H_kv, m, d_v)`` their values (used by ``value_weighted``).
        Candidates whose key or value holds NaN/Inf score ``-inf``.
        """
        if validate:
            self._check_keys(keys)
        if self.batch_size is None:
            self._ensure_state(keys.shape[0])
        return self.finish_scores(self._score(_as_float32(keys), positions), keys, values)

    def finish_scores(
        self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None
    ) -> torch.Tensor:
        """Add the value term to raw log-scores ``(B, H_kv, m)``; non-finite candidates -> ``-inf``.

        Shared by :meth:`score` and by the selector's observation-window scores,
        so both rank candidates on the same footing.
        """
        if self.value_weighted and values is not None:
            # Dropping key j moves the output o by about w_j (v_j - o): its effect
            # scales with its value's distance from o, taken as the origin or, with
            # value_centred, as the candidates' mean value.
            v = values.float()
            if self.value_centred:
                v = v - v.mean(dim=2, keepdim=True)
            scores = scores + torch.log(torch.linalg.vector_norm(v, dim=-1) + 1e-12)
        # topk ranks NaN above everything: non-finite candidates go first instead.
        # NaN/Inf anywhere in a key or value turns its zero "poison" into NaN
        # (few element-wise ops: this runs on every decoding step).
        check = keys.sum(dim=-1) if values is None else keys.sum(dim=-1) + values.sum(dim=-1)
        inf = float("inf")
        return torch.nan_to_num(scores + check * 0.0, nan=-inf, posinf=inf, neginf=-inf)

    def merge(self, other: Scorer) -> None:
        """Fold ``other`` (same class and shape, another stream of the same layer) into ``self``.

        After the merge the state equals, to rounding, the state of one scorer
        that saw self's stream and then other's (the order matters only for
        exponentially weighted query moments). ``other`` is unchanged.
        """
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if (other.num_kv_heads, other.head_dim, other.scale) != (
            self.num_kv_heads,
            self.head_dim,
            self.scale,
        ) or (
            None not in (self.num_q_heads, other.num_q_heads)
            and self.num_q_heads != other.num_q_heads
        ):
            raise ValueError("other has different heads, head_dim or scale")
        if other.batch_size is None:
            return
        if self.batch_size is None:
            self._ensure_state(other.batch_size)
        if other.batch_size != self.batch_size:
            raise ValueError(f"other has batch size {other.batch_size}, self {self.batch_size}")
        self._merge(other)
        if self.num_q_heads is None:
            self.num_q_heads = other.num_q_heads

    def state(self) -> dict[str, torch.Tensor]:
        """The state tensors (views, not copies), by name."""
        return {}

    # ------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable), ``name`` included: ``make_scorer(**it)``
        rebuilds an empty scorer of the same kind (see :meth:`load_state_dict`)."""
        return {
            "name": self.name,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_q_heads": self.num_q_heads,
            "scale": self.scale,
            "value_weighted": self.value_weighted,
            "value_centred": self.value_centred,
            **self._extra_config(),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the state tensors and counters (0-d tensors), for :meth:`load_state_dict`."""
        out = {}
        if self.batch_size is not None:
            out = {name: t.detach().clone() for name, t in self.state().items()}
        out["batch_size"] = torch.tensor(-1 if self.batch_size is None else self.batch_size)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the state by ``state`` (from :meth:`state_dict` of a scorer of this config).

        Every tensor is checked against the configuration (names, shapes,
        dtypes, finite values) before anything changes; a mismatch raises
        ``ValueError`` naming the field. Tensors move to this scorer's device.
        """
        if not isinstance(state, dict) or "batch_size" not in state:
            raise ValueError("scorer state must be a dict holding 'batch_size'")
        batch = _scalar(state["batch_size"], "batch_size", torch.int64)
        if batch < -1 or batch == 0:
            raise ValueError(f"scorer state 'batch_size' must be positive or -1, got {batch}")
        expected = {} if batch == -1 else self._state_layout(int(batch))
        expected["batch_size"] = ((), torch.int64)
        if set(state) != set(expected):
            raise ValueError(f"scorer state must hold {sorted(expected)}, got {sorted(state)}")
        for name, (shape, dtype) in expected.items():
            t = state[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = (
                    f"{t.dtype} {tuple(t.shape)}"
                    if isinstance(t, torch.Tensor)
                    else type(t).__name__
                )
                raise ValueError(f"scorer state {name!r} must be {dtype} {shape}, got {got}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"scorer state {name!r} holds NaN or Inf")
        tensors = {n: state[n] for n in expected if n != "batch_size"}
        self._check_state(tensors)
        self.reset()
        if batch != -1:
            self._ensure_state(int(batch))
            self._set_state({n: t.to(self.device) for n, t in tensors.items()})

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def _state_layout(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each tensor :meth:`state_dict` holds for this batch size."""
        return {}

    def _check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse state tensors of the right layout but impossible values (``ValueError``)."""

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take validated state tensors (already on this device)."""

    @property
    def nbytes(self) -> int:
        """Bytes of state tensors: constant in the stream length."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def reset(self) -> None:
        """Forget everything seen (the state is reallocated on the next observation)."""
        self.batch_size = None
        self._alloc(0)

    # --------------------------------------------------------------- subclass
    def _alloc(self, batch_size: int) -> None:
        """Allocate zero state for ``batch_size``."""

    def _observe_keys(self, keys: torch.Tensor) -> None:
        pass

    def _observe_queries(self, queries: torch.Tensor) -> None:
        pass

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merge(self, other: Scorer) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def _ensure_state(self, batch_size: int) -> None:
        if self.batch_size is None:
            self.batch_size = batch_size
            self._alloc(batch_size)
        elif batch_size != self.batch_size:
            raise ValueError(
                f"batch size changed from {self.batch_size} to {batch_size}; call reset() first"
            )

    def _check_keys(self, keys: torch.Tensor) -> None:
        self._check_tensor("keys", keys, self.num_kv_heads)

    def _check_tensor(self, name: str, t: Any, heads: int) -> None:
        check_head_tensor(name, t)
        if t.shape[1] != heads or t.shape[3] != self.head_dim:
            raise ValueError(
                f"{name} must have shape (B, {heads}, n, {self.head_dim}), got {tuple(t.shape)}"
            )

    def _group(self, queries: torch.Tensor) -> torch.Tensor:
        """``(B, H_q, ...)`` -> ``(B, H_kv, g, ...)``."""
        B, Hq = queries.shape[:2]
        return queries.reshape(B, self.num_kv_heads, Hq // self.num_kv_heads, *queries.shape[2:])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_q_heads={self.num_q_heads})"
        )


class WindowScorer(Scorer):
    """StreamingLLM baseline: the most recent older keys win (the budget extends the window).

    No state. Cost O(m) per call.
    """

    name = "window"

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions.to(torch.float32)


class KNormScorer(Scorer):
    """KNorm baseline: keep the keys of smallest norm (Devoto et al., 2024).

    Small-norm keys tend to draw large attention in trained LLMs. No state;
    cost O(m d) per call.
    """

    name = "knorm"

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        norms: torch.Tensor = torch.linalg.vector_norm(keys, dim=-1)
        return -norms


class LeverageScorer(Scorer):
    """Ridge leverage of keys in the Gram matrix of every key seen (the universal-set score).

    ``score(k) = k^T (K^T K + lambda I)^{-1} k`` with ``lambda = ridge * tr(K^T K) / d``:
    the keys that no combination of others can stand in for, which are the
    keys that can draw attention from *some* query (LevAttention; exact for
    polynomial attention). Query-agnostic.

    State: the Gram matrix, ``(B, H_kv, d, d)`` float32. Cost: O(c d^2) per
    observed chunk, O(d^3 + m d^2) per ``score`` (one Cholesky per head).
    """

    name = "leverage"

    def __init__(self, *args: Any, ridge: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"ridge must be a positive float, got {ridge!r}")
        self.ridge = float(ridge)
        self.gram: torch.Tensor | None = None

    def _alloc(self, batch_size: int) -> None:
        d = self.head_dim
        self.gram = torch.zeros(batch_size, self.num_kv_heads, d, d, device=self.device)

    def _observe_keys(self, keys: torch.Tensor) -> None:
        assert self.gram is not None
        keys = _finite_rows(keys)
        self.gram += keys.transpose(-1, -2) @ keys

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.gram is not None
        d = self.head_dim
        trace = self.gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        # The floor keeps the solve defined before any key has been seen.
        lam = (self.ridge * trace / d).clamp_min(1e-12)
        eye = torch.eye(d, device=self.gram.device)
        # cholesky_ex reports failure in a tensor instead of raising, so the step never
        # waits for the device; the ridge keeps the matrix positive definite anyway.
        chol, _ = torch.linalg.cholesky_ex(self.gram + lam[..., None, None] * eye)
        z: torch.Tensor = torch.linalg.solve_triangular(chol, keys.transpose(-1, -2), upper=False)
        return (z * z).sum(-2)

    def _merge(self, other: Scorer) -> None:
        # merge() calls this only once both scorers hold state (batch_size set).
        assert isinstance(other, LeverageScorer) and self.gram is not None
        assert other.gram is not None
        _add_finite(self.gram, other.gram)

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.gram is None else {"gram": self.gram}

    def _extra_config(self) -> dict[str, Any]:
        return {"ridge": self.ridge}

    def _state_layout(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        d = self.head_dim
        return {"gram": ((batch_size, self.num_kv_heads, d, d), torch.float32)}

    def _check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        gram = tensors.get("gram")
        if gram is not None and not bool((gram.diagonal(dim1=-2, dim2=-1) >= 0).all()):
            raise ValueError("scorer state 'gram' has a negative diagonal: not a Gram matrix")

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "gram" in tensors:
            self.gram = tensors["gram"].clone()


class _QueryMoments(Scorer):
    """Shared state of the query scorers: count, mean and (optionally) centred second moment.

    Chunks combine by Chan et al.'s pairwise update, which is also the merge,
    so streaming, batching and merging give the same moments to rounding.
    With ``half_life`` the moments are exponentially weighted: a query ``t``
    tokens old weighs ``2^(-t / half_life)``, so the state follows the
    recent queries, which predict the next ones best.
    """

    _with_cov: ClassVar[bool] = False
    needs_queries = True

    value_weighted_default = True

    def __init__(self, *args: Any, half_life: float | None = 32.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if half_life is not None and (
            isinstance(half_life, bool)
            or not isinstance(half_life, (int, float))
            or not half_life > 0
            or not math.isfinite(half_life)
        ):
            raise ValueError(f"half_life must be a positive float or None, got {half_life!r}")
        self.half_life = None if half_life is None else float(half_life)
        # Python numbers: they follow from shapes alone, so updating them never syncs the device.
        self.count = 0.0
        self.tokens = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _alloc(self, batch_size: int) -> None:
        # The query state is allocated by the first queries, which fix H_q.
        self.count = 0.0
        self.tokens = 0
        self.mean = None
        self.m2 = None

    def _alloc_moments(self, batch_size: int, num_q_heads: int) -> None:
        d = self.head_dim
        self.mean = torch.zeros(batch_size, num_q_heads, d, device=self.device)
        if self._with_cov:
            self.m2 = torch.zeros(batch_size, num_q_heads, d, d, device=self.device)

    def _observe_queries(self, queries: torch.Tensor) -> None:
        if self.mean is None:
            self._alloc_moments(queries.shape[0], queries.shape[1])
        queries = _finite_rows(queries)
        c = queries.shape[2]
        if c == 1:
            # One query (a decode step): its mean is itself and its scatter zero.
            self._age(1)
            self.tokens += 1
            self._combine(1.0, queries[:, :, 0], None)
            return
        if self.half_life is None:
            weight = float(c)
            mean_c = queries.mean(dim=2)
            wq = None
        else:
            age = torch.arange(c - 1, -1, -1, device=queries.device, dtype=torch.float32)
            wq = torch.exp2(-age / self.half_life)
            weight = float(
                (1.0 - 2.0 ** (-c / self.half_life)) / (1.0 - 2.0 ** (-1 / self.half_life))
            )
            mean_c = (queries * wq[:, None]).sum(dim=2) / weight
        m2_c = None
        if self._with_cov:
            centred = queries - mean_c[:, :, None, :]
            weighted = centred if wq is None else centred * wq[:, None]
            m2_c = weighted.transpose(-1, -2) @ centred
        self._age(c)
        self.tokens += c
        self._combine(weight, mean_c, m2_c)

    def _age(self, c: int) -> None:
        """Discount what is there by ``c`` newer tokens (exponential weighting only)."""
        if self.half_life is not None:
            decay = 2.0 ** (-c / self.half_life)
            self.count *= decay
            if self.m2 is not None:
                self.m2 *= decay

    def _combine(self, n_b: float, mean_b: torch.Tensor, m2_b: torch.Tensor | None) -> None:
        assert self.mean is not None
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean
        w = n_b / total
        # The weights multiply tensors rather than pass as alpha=/value=, which
        # torch.compile would specialise on (one graph per value of the count).
        self.mean += delta * w
        if self._with_cov:
            # m2_b None: the batch's own scatter is zero (a single query).
            assert self.m2 is not None
            if m2_b is not None:
                self.m2 += m2_b
            self.m2.addcmul_(delta[..., :, None], delta[..., None, :] * (n_a * w))
        self.count = total

    def _merge(self, other: Scorer) -> None:
        assert isinstance(other, _QueryMoments)
        self._merge_check(other)
        if other.count == 0 or other.mean is None:
            return
        if self.mean is None:
            self._alloc_moments(other.mean.shape[0], other.mean.shape[1])
        m2 = None if other.m2 is None else other.m2.clone()
        # other's queries come after self's: self ages by other's length first.
        self._age(other.tokens)
        self.tokens += other.tokens
        self._combine(other.count, other.mean.clone(), m2)

    def _merge_check(self, other: Scorer) -> None:
        assert isinstance(other, _QueryMoments)
        if other.half_life != self.half_life:
            raise ValueError(f"other has half_life {other.half_life}, self {self.half_life}")

    def state(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            return {}
        out = {"count": torch.tensor(self.count), "mean": self.mean}
        if self.m2 is not None:
            out["m2"] = self.m2
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        if self.mean is not None:
            out["count"] = torch.tensor(self.count, dtype=torch.float64)
            out["tokens"] = torch.tensor(self.tokens, dtype=torch.int64)
        return out

    def _extra_config(self) -> dict[str, Any]:
        return {"half_life": self.half_life}

    def _state_layout(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        # No queries seen yet (or H_q unknown): no moments.
        if self.num_q_heads is None:
            return {}
        d, hq = self.head_dim, self.num_q_heads
        out = {
            "count": ((), torch.float64),
            "tokens": ((), torch.int64),
            "mean": ((batch_size, hq, d), torch.float32),
        }
        if self._with_cov:
            out["m2"] = ((batch_size, hq, d, d), torch.float32)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # A scorer configured with H_q but saved before its first queries holds no moments.
        if isinstance(state, dict) and "mean" not in state and self.num_q_heads is not None:
            saved, self.num_q_heads = self.num_q_heads, None
            try:
                super().load_state_dict(state)
            finally:
                self.num_q_heads = saved
            return
        super().load_state_dict(state)

    def _check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors and not (float(tensors["count"]) > 0 and int(tensors["tokens"]) >= 1):
            raise ValueError("scorer state 'count' and 'tokens' must be positive")

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        self.count, self.tokens = float(tensors["count"]), int(tensors["tokens"])
        self.mean = tensors["mean"].clone()
        self.m2 = None if "m2" not in tensors else tensors["m2"].clone()


class QueryMeanScorer(_QueryMoments):
    """Expected logit under the recent mean query: ``score(k) = s * mean(q)·k (+ log ||v||)``.

    The mean is exponentially weighted with ``half_life`` tokens (default 32;
    ``None`` for the plain running mean): decoding queries resemble the
    recent ones, and on SmolLM2 the recent mean keeps more attention mass
    (0.882 vs 0.861 on 30 layers, 2 048 tokens, total 128) and perplexity
    (+12.8% vs +14.6% at total 256) than the all-time mean. With grouped
    queries a key is scored by the best of its group's heads (log-sum-exp
    over the group), so a key one head needs is kept.

    State: ``(B, H_q, d)`` float32 plus a count. Cost O(c d) per observed
    chunk, O(m d g) per ``score``.
    """

    name = "query"

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        _require_queries(self)
        assert self.mean is not None
        mu = self._group(self.mean)  # (B, H_kv, g, d)
        logits = self.scale * (mu @ keys.transpose(-1, -2))  # (B, H_kv, g, m)
        return torch.logsumexp(logits, dim=2)


class QueryGaussianScorer(_QueryMoments):
    """Expected softmax weight of a key under a Gaussian model of past queries.

    With queries ``q ~ N(mu, Sigma)`` (running mean and covariance of the
    queries seen), the expected unnormalised attention weight of key ``k`` is
    ``E exp(s q.k) = exp(s mu.k + s^2 k^T Sigma k / 2)``; the score is its log.
    The quadratic term is the key's energy in the query-weighted metric: a
    key that lies along the directions in which queries *vary* can draw large
    logits from some future query even if the mean query ignores it, which is
    the leverage idea measured in the metric of the queries. Log-sum-exp over
    the heads of a group; moments exponentially weighted like
    :class:`QueryMeanScorer`.

    The default scorer of :class:`~streamsketch.kv.SketchCache`: on SmolLM2,
    at the same split, it gave the lowest perplexity of the library's
    scorers on every text measured (total 256, half window: +5.0%, +8.6%
    on two 1 536-token texts against +6.3%, +9.3% for
    :class:`QueryMeanScorer`; +22.5% vs +23.9% on a 3 072-token text),
    although it keeps slightly less attention *mass* (0.860 vs 0.880 at
    total 128). A plausible reading: the variance term keeps keys whose
    logits swing high for some queries, which a mass average undervalues.

    State: mean ``(B, H_q, d)`` and centred second moment ``(B, H_q, d, d)``,
    float32. Cost O(c d^2) per observed chunk, O(m d^2 g) per ``score``.
    """

    name = "leverage+query"
    _with_cov = True

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        _require_queries(self)
        assert self.mean is not None and self.m2 is not None
        mu = self._group(self.mean)  # (B, H_kv, g, d)
        cov = self._group(self.m2) / max(self.count, 1.0)  # (B, H_kv, g, d, d)
        kt = keys.transpose(-1, -2)  # (B, H_kv, d, m)
        linear = mu @ kt  # (B, H_kv, g, m)
        ck = cov @ kt[:, :, None]  # (B, H_kv, g, d, m)
        quad = (ck * kt[:, :, None]).sum(-2)  # (B, H_kv, g, m)
        s = self.scale
        return torch.logsumexp(s * linear + (0.5 * s * s) * quad, dim=2)


class AccumulatedAttentionScorer(Scorer):
    """H2O baseline: the attention weight each cached key has received so far.

    Needs the attention weights of every step, so it forces explicit
    attention scores (no fused kernel): a baseline for comparison, not a
    constant-memory sketch of the stream. Its state lives per cached slot and
    is kept by the :class:`~streamsketch.kv.KeySelector`; ``merge`` is not
    defined for it.
    """

    name = "h2o"
    needs_queries = True
    needs_attention = True

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("h2o scores come from the selector's accumulated attention")

    def merge(self, other: Scorer) -> None:
        raise TypeError(
            "h2o keeps per-slot attention totals of one cache; they cannot be merged across streams"
        )


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        WindowScorer,
        KNormScorer,
        LeverageScorer,
        QueryMeanScorer,
        QueryGaussianScorer,
        AccumulatedAttentionScorer,
    )
}


def make_scorer(scorer: str | Scorer, **kwargs: Any) -> Scorer:
    """A scorer from its name (one of ``SCORERS``) or an instance (returned as is)."""
    if isinstance(scorer, Scorer):
        return scorer
    if not isinstance(scorer, str):
        raise TypeError(f"scorer must be a name or a Scorer, got {type(scorer).__name__}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
    return SCORERS[scorer](**kwargs)


def observation_attention(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal softmax attention of a few queries, summed per KV head: ``(B, H_kv, n)`` float32.

    ``queries (B, H_q, w, d)`` at stream positions ``query_positions (w,)``
    attend to ``keys (B, H_kv, n, d)`` at ``key_positions (B, H_kv, n)``;
    each query's weights are normalised over the keys it can see and then
    summed over the ``w`` queries and the KV head's query group (SnapKV's
    observation window). A query whose position precedes every key (an empty
    slot) contributes nothing; non-finite keys draw no weight. Cost O(w g n d)
    per KV head and ``(B, H_q, w, n)`` floats transiently; the ``n x n``
    attention matrix is never formed.
    """
    B, Hq, w, d = queries.shape
    Hkv = keys.shape[1]
    q = queries.to(torch.float32).reshape(B, Hkv, (Hq // Hkv) * w, d)
    logits = scale * (q @ keys.to(torch.float32).transpose(-1, -2))  # (B, H_kv, g w, n)
    qpos = query_positions.repeat(Hq // Hkv)  # (g w,)
    future = key_positions[:, :, None, :] > qpos[None, None, :, None]
    # A non-finite key draws no weight here (the caller evicts it anyway), and a query
    # that sees no key at all (an empty slot of a ring buffer) gives none.
    logits = logits.nan_to_num(nan=-math.inf, posinf=-math.inf).masked_fill(future, -math.inf)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=2)


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32; the tensor itself when it already is (no operator in a decode step)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every last-axis row that is not finite, or whose squared norm
    overflows, replaced by zeros; on the device, without a host synchronisation."""
    # A sum of squares is NaN, +inf or finite and >= 0, so one comparison tells
    # finiteness (isfinite decomposes into four kernels).
    ok = (t * t).sum(dim=-1, keepdim=True) < math.inf
    return torch.where(ok, t, 0.0)


def _scalar(t: Any, name: str, dtype: torch.dtype) -> int | float:
    """The value of a 0-d tensor of ``dtype`` (a saved counter), or ``ValueError`` naming it."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 0:
        raise ValueError(f"{name!r} must be a 0-d {dtype} tensor")
    return t.item()


def _add_finite(state: torch.Tensor, update: torch.Tensor) -> None:
    """``state += update`` per trailing ``(d, d)`` matrix, except where the sum overflows."""
    new = state + update
    ok = torch.isfinite(new).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    state.copy_(torch.where(ok, new, state))


def check_head_tensor(name: str, t: Any) -> None:
    """Refuse anything but a floating-point ``(B, H, n, d)`` tensor; the error names ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, n, d), got {tuple(t.shape)}")


def _require_queries(scorer: Scorer) -> None:
    if getattr(scorer, "mean", None) is None:
        raise RuntimeError(
            f"scorer {scorer.name!r} has seen no queries yet: pass queries to the selector "
            "(with a transformers model, call streamsketch.kv.enable(model) first)"
        )
