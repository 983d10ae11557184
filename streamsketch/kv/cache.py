"""SketchCache: a transformers ``Cache`` whose layers keep a constant number of keys per head.

Each layer is a :class:`SketchCacheLayer` around one
:class:`~streamsketch.kv.KeySelector`, whose buffers of the final size are
written in place. A one-token step writes its key and value into the
selector's window ring and attends to the buffers themselves (the same
shapes at every step once they are full); a prompt chunk attends to the kept
keys followed by the chunk, with the model's own attention kernel (SDPA,
flash, eager: the scores are never materialised by the cache), and is then
evicted back to capacity. Query-aware scorers read the step's queries through
the attention hook that :func:`streamsketch.kv.enable` installs.

Positions: keys are cached after RoPE, so a kept key keeps the rotation of
its true position. ``get_seq_length`` is the *logical* length (tokens seen),
which gives new tokens their true positions; ``get_mask_sizes`` describes the
*physical* cache: ``kv_length`` is the number of keys attended and
``kv_offset = seen + new - kv_length``, so the causal mask lets every new
token see all kept keys (in whatever slot order) and the new tokens before it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .persist import pack, unpack
from .scorers import Scorer
from .selector import DEFAULT_INTERVAL, DEFAULT_POOL_KERNEL, KeySelector

__all__ = ["SketchCache", "SketchCacheLayer", "split_total"]

# The layer whose queries the next attention call should feed (set by update, read by the hook).
_PENDING = threading.local()

# Defaults measured with ``streamsketch eval`` and 1 536-token texts (see docs/kv.md).
DEFAULT_SINKS = 4
DEFAULT_WINDOW_FRACTION = 0.5
DEFAULT_SCORER = "leverage+query"
DEFAULT_OBSERVATION_WINDOW = 8


def split_total(total: int, sinks: int = DEFAULT_SINKS) -> tuple[int, int, int]:
    """``(sinks, budget, window)`` for ``total`` keys per head by the measured default split.

    Half of what is left after the sinks goes to the recent window and the
    rest to selected older keys (on three texts of 1 536 tokens with a total
    of 256, a half window beat a quarter and three quarters on average).
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int, got {total!r}")
    sinks = min(sinks, total)
    window = int((total - sinks) * DEFAULT_WINDOW_FRACTION)
    return sinks, total - sinks - window, window


class SketchCacheLayer(CacheLayerMixin):
    """One layer of a :class:`SketchCache`: a KeySelector behind the transformers layer API.

    ``keys``/``values`` hold the physical cache ``(B, H_kv, n, d)`` with
    ``n <= capacity`` between forward steps (views of the selector's buffers).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        budget: int,
        sinks: int,
        window: int,
        scorer: str,
        scorer_kwargs: dict[str, Any] | None = None,
        layer_idx: int | None = None,
        observation_window: int = DEFAULT_OBSERVATION_WINDOW,
        pool_kernel: int = DEFAULT_POOL_KERNEL,
        interval: int = DEFAULT_INTERVAL,
    ) -> None:
        # CacheLayerMixin.__init__ is unannotated, and mypy's untyped_calls_exclude does
        # not reach calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self.layer_idx = layer_idx
        self.budget, self.sinks, self.window = budget, sinks, window
        self.scorer_name = scorer
        self.scorer_kwargs = dict(scorer_kwargs or {})
        self.observation_window, self.pool_kernel = observation_window, pool_kernel
        self.interval = interval
        self.selector: KeySelector | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.selector = KeySelector(
            key_states.shape[1],
            key_states.shape[3],
            self.budget,
            sinks=self.sinks,
            window=self.window,
            scorer=self.scorer_name,
            device=key_states.device,
            dtype=key_states.dtype,
            scorer_kwargs=self.scorer_kwargs,
            observation_window=self.observation_window,
            pool_kernel=self.pool_kernel,
            interval=self.interval,
        )
        self.is_initialized = True

    @property
    def scorer(self) -> Scorer | None:
        return None if self.selector is None else self.selector.scorer

    def attach(self, selector: KeySelector) -> None:
        """Take ``selector`` (a loaded or copied state) as this layer's cache."""
        theirs = (
            selector.budget,
            selector.sinks,
            selector.window,
            selector.interval,
            selector.observation_window,
            selector.pool_kernel,
            selector.scorer.name,
        )
        ours = (
            self.budget,
            self.sinks,
            self.window,
            self.interval,
            self.observation_window,
            self.pool_kernel,
            self.scorer_name,
        )
        if theirs != ours:
            raise ValueError(
                f"layer {self.layer_idx}: the selector's budget, sinks, window, interval, "
                f"observation_window, pool_kernel, scorer {theirs} differ from the cache's {ours}"
            )
        self.selector = selector
        if selector.dtype is not None:
            self.dtype = selector.dtype
        self.device = selector.device
        self.is_initialized = True
        self.keys, self.values = selector.keys, selector.values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the step's keys/values; return the keys/values this step's queries attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sel = self.selector
        assert sel is not None
        if sel.pending:
            # The previous step's queries never arrived: the attention hook is missing.
            raise RuntimeError(
                f"scorer {sel.scorer.name!r} needs the queries: call streamsketch.kv.enable(model) "
                "before decoding with this SketchCache"
            )
        keys, values = sel.append(key_states, value_states)
        if sel.scorer.needs_queries:
            _PENDING.layer = self
        else:
            sel.compress()
        self.keys, self.values = sel.keys, sel.values
        return keys, values

    def observe(self, queries: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Called by the attention hook after the layer's attention: feed queries, then evict."""
        sel = self.selector
        assert sel is not None
        if not sel.pending:
            return
        sel.observe_queries(queries)
        if weights is not None:
            sel.observe_attention(weights)
        sel.compress()
        self.keys, self.values = sel.keys, sel.values

    @property
    def positions(self) -> torch.Tensor | None:
        """Stream positions ``(B, H_kv, n)`` of the physical keys."""
        return None if self.selector is None else self.selector.positions

    def get_seq_length(self) -> int:
        return 0 if self.selector is None else self.selector.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.selector is None:
            return query_length, 0
        # The attended keys come first in any order; every one of them precedes the
        # chunk's first position, so an offset that places them all before it gives the
        # model's causal mask exactly "kept keys, then the chunk causally".
        length = self.selector.attended_length(query_length)
        return length, self.selector.n_seen + query_length - length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.selector is not None:
            self.selector.reset()
        self.keys = self.values = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SketchCache does not support beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SketchCache does not support batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SketchCache does not support batch selection")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SketchCache cannot be cropped: evicted keys are gone")


class SketchCache(Cache):
    """A transformers ``Cache`` that keeps ``sinks + budget + window`` keys per layer and KV head.

    Parameters
    ----------
    total : int, optional
        Keys kept per head; split into sinks / selected / window by the
        measured default (:func:`split_total`). Give either ``total`` or
        ``budget``.
    budget : int, optional
        Selected older keys per head (explicit split).
    sinks : int, optional
        First tokens always kept (default 4).
    window : int, optional
        Recent tokens always kept (default: half of ``budget + window`` when
        ``total`` is given, 64 with an explicit ``budget``).
    scorer : str, optional
        A name of :data:`streamsketch.kv.SCORERS`; default ``"leverage+query"``
        (lowest perplexity of the library's scorers on every text measured, see
        ``docs/kv.md``).
        Query-aware scorers need :func:`streamsketch.kv.enable` on the model.
    observation_window : int, default 8
        Recent queries whose exact attention ranks a prompt's keys and, at each
        decoding step, keeps what they read beside the scorer's choice (see
        :class:`~streamsketch.kv.KeySelector`); 0 turns it off (the previous
        behaviour).
    pool_kernel : int, default 15
        Odd width of the pooling that keeps the span around an attended key.
    interval : int, default 4
        Decoding steps between two rankings of the selected keys against the
        window tokens about to leave it (see :class:`~streamsketch.kv.KeySelector`);
        1 ranks at every step.
    **scorer_kwargs
        Passed to the scorer's constructor (e.g. ``half_life``).

    Examples
    --------
    >>> cache = SketchCache(256)                                  # doctest: +SKIP
    >>> streamsketch.kv.enable(model)                             # doctest: +SKIP
    >>> model.generate(ids, past_key_values=cache, max_new_tokens=64)  # doctest: +SKIP

    Notes
    -----
    Memory per layer and KV head: ``capacity`` keys and values in buffers
    allocated by the first step, plus the scorer's O(d^2) floats; a
    one-token step attends to exactly those (its own token included), a
    prompt chunk holds its own tokens on top until it is evicted. Beam search,
    cropping and batch reordering are not supported (evicted keys cannot be
    restored). Left-padded batches are not supported: the padding mask is
    indexed by physical slot.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        budget: int | None = None,
        sinks: int | None = None,
        window: int | None = None,
        scorer: str | None = None,
        observation_window: int = DEFAULT_OBSERVATION_WINDOW,
        pool_kernel: int = DEFAULT_POOL_KERNEL,
        interval: int = DEFAULT_INTERVAL,
        **scorer_kwargs: Any,
    ) -> None:
        if (total is None) == (budget is None):
            raise ValueError("give exactly one of total and budget")
        if total is not None:
            if window is not None:
                s = DEFAULT_SINKS if sinks is None else sinks
                if isinstance(total, bool) or not isinstance(total, int) or total < s + window:
                    raise ValueError(f"total must be an int >= sinks + window, got {total!r}")
                sinks, budget, window = s, total - s - window, window
            else:
                sinks, budget, window = split_total(
                    total, DEFAULT_SINKS if sinks is None else sinks
                )
        else:
            assert budget is not None  # exactly one of total and budget, checked above
        sinks = DEFAULT_SINKS if sinks is None else sinks
        window = 64 if window is None else window
        scorer = DEFAULT_SCORER if scorer is None else scorer
        # Validate everything now, not at the first forward step.
        KeySelector(
            1,
            1,
            budget,
            sinks=sinks,
            window=window,
            scorer=scorer,
            scorer_kwargs=scorer_kwargs,
            observation_window=observation_window,
            pool_kernel=pool_kernel,
            interval=interval,
        )
        self.budget, self.sinks, self.window, self.scorer = budget, sinks, window, scorer
        self.observation_window, self.pool_kernel = observation_window, pool_kernel
        self.interval = interval
        self.scorer_kwargs = scorer_kwargs
        super().__init__(layers=[])

    def _new_layer(self, layer_idx: int) -> SketchCacheLayer:
        return SketchCacheLayer(
            self.budget,
            self.sinks,
            self.window,
            self.scorer,
            self.scorer_kwargs,
            layer_idx,
            observation_window=self.observation_window,
            pool_kernel=self.pool_kernel,
            interval=self.interval,
        )

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, with an explicit split (JSON-serialisable)."""
        return {
            "budget": self.budget,
            "sinks": self.sinks,
            "window": self.window,
            "scorer": self.scorer,
            "observation_window": self.observation_window,
            "pool_kernel": self.pool_kernel,
            "interval": self.interval,
            "scorer_kwargs": dict(self.scorer_kwargs),
        }

    def _selectors(self) -> list[KeySelector | None]:
        return [
            layer.selector if isinstance(layer, SketchCacheLayer) else None for layer in self.layers
        ]

    def to_bytes(self) -> bytes:
        """Configuration and every layer's state (kept keys, values, positions, scorer state)
        as one safetensors blob (:mod:`streamsketch.kv.persist`); no pickle.

        Refused (``RuntimeError``) in the middle of a forward step.
        """
        tensors: dict[str, torch.Tensor] = {}
        layers: list[dict[str, Any] | None] = []
        for i, sel in enumerate(self._selectors()):
            layers.append(None if sel is None else sel.get_config())
            if sel is not None:
                for name, t in sel.state_dict().items():
                    tensors[f"layers.{i}.{name}"] = t
        return pack("SketchCache", {**self.get_config(), "layers": layers}, tensors)

    @classmethod
    def from_bytes(cls, blob: bytes, *, device: torch.device | str | None = None) -> SketchCache:
        """The cache saved by :meth:`to_bytes`, on ``device`` (CPU by default).

        Every field is validated (configuration, shapes against it, dtypes,
        positions); a corrupted or mismatched blob raises ``ValueError``
        saying what is wrong. The loaded cache continues exactly as the saved
        one would: the same tokens for the same inputs.
        """
        config, tensors = unpack(blob, "SketchCache")
        layers = config.pop("layers", None)
        if not isinstance(layers, list) or len(layers) > 4096:
            raise ValueError("blob's configuration must list its layers")
        scorer_kwargs = config.pop("scorer_kwargs", None)
        expected = {
            "budget", "sinks", "window", "scorer", "observation_window", "pool_kernel",
            "interval",
        }  # fmt: skip
        if set(config) != expected or not isinstance(scorer_kwargs, dict):
            raise ValueError(
                f"blob's configuration must hold {sorted(expected | {'layers', 'scorer_kwargs'})}"
            )
        try:
            cache = cls._empty_like_config({**config, "scorer_kwargs": scorer_kwargs})
        except TypeError as exc:
            raise ValueError(f"blob's configuration is malformed: {exc}") from exc
        known = {f"layers.{i}." for i, c in enumerate(layers) if c is not None}
        stray = [n for n in tensors if n[: n.find(".", 7) + 1] not in known]
        if stray:
            raise ValueError(f"blob holds tensors of no layer: {stray[:3]}")
        for i, layer_config in enumerate(layers):
            layer = cache._new_layer(i)
            if layer_config is not None:
                prefix = f"layers.{i}."
                state = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
                selector = KeySelector.from_config(layer_config, device=device)
                selector.load_state_dict(state)
                layer.attach(selector)
            cache.layers.append(layer)
        return cache

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_bytes` to ``path``."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, device: torch.device | str | None = None
    ) -> SketchCache:
        """Read a cache written by :meth:`save` (see :meth:`from_bytes`)."""
        return cls.from_bytes(Path(path).read_bytes(), device=device)

    def copy(self) -> SketchCache:
        """An independent cache in the same state: a branch point.

        Two questions can continue from one compressed document without
        prefilling it twice: ``a = cache.copy()``, then each is decoded on its
        own. The copy has the same batch size, device and dtype (every row
        branches; to branch one row, decode a batch of one). Cost: one copy
        of the capacity buffers and scorer state of every layer.
        """
        other = self._empty_like_config(self.get_config())
        for i, sel in enumerate(self._selectors()):
            layer = other._new_layer(i)
            if sel is not None:
                layer.attach(sel.copy())
            other.layers.append(layer)
        return other

    @classmethod
    def _empty_like_config(cls, config: dict[str, Any]) -> SketchCache:
        kwargs = {k: v for k, v in config.items() if k != "scorer_kwargs"}
        return cls(**kwargs, **config["scorer_kwargs"])

    @property
    def capacity(self) -> int:
        """Most keys kept per layer and head between steps."""
        return self.sinks + self.budget + self.window

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers: kept keys, values, positions and scorer state."""
        return sum(
            layer.selector.nbytes
            for layer in self.layers
            if isinstance(layer, SketchCacheLayer) and layer.selector is not None
        )

    def __repr__(self) -> str:
        return (
            f"SketchCache(sinks={self.sinks}, budget={self.budget}, window={self.window}, "
            f"scorer={self.scorer!r}, layers={len(self.layers)})"
        )
