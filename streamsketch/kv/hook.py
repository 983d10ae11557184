"""The attention hook that feeds queries to a SketchCache: ``enable(model)``.

transformers calls ``cache.update(k, v, layer)`` *before* the layer's
attention and never shows the cache the queries. ``enable`` registers an
attention function (under transformers' ``AttentionInterface``) that runs
the model's own implementation unchanged (SDPA, flash, eager) and then hands
the step's queries to the :class:`~streamsketch.kv.SketchCacheLayer` that
was just updated, which observes them and evicts. Models with a plain cache
are unaffected: the hook only acts when a SketchCache layer is waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .cache import _PENDING, SketchCacheLayer

__all__ = ["disable", "enable"]

_PREFIX = "streamsketch_"


def _attention_weights(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax weights ``(B, H_q, q, n)`` of one step (only for the h2o baseline)."""
    Hq, nq = query.shape[1], query.shape[2]
    Hkv, n = key.shape[1], key.shape[2]
    k = key.to(torch.float32).repeat_interleave(Hq // Hkv, dim=1)
    logits = scaling * (query.to(torch.float32) @ k.transpose(-1, -2))
    if mask is not None:
        m = mask[..., -n:]
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, -math.inf)
        else:
            logits = logits + m.to(torch.float32)
    elif nq > 1:
        qi = torch.arange(nq, device=query.device)[:, None] + (n - nq)
        logits = logits.masked_fill(torch.arange(n, device=query.device)[None, :] > qi, -math.inf)
    return torch.softmax(logits, dim=-1)


def _make_attention(base: Callable[..., Any]) -> Callable[..., Any]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        out = base(module, query, key, value, attention_mask, *args, **kwargs)
        layer = getattr(_PENDING, "layer", None)
        idx = getattr(module, "layer_idx", None)
        # The layer updated just before this attention call, and only that one.
        if isinstance(layer, SketchCacheLayer) and idx in (None, layer.layer_idx):
            _PENDING.layer = None
            weights = None
            scorer = layer.scorer
            if scorer is not None and scorer.needs_attention:
                scaling = kwargs.get("scaling")
                scale = float(
                    scaling
                    if scaling is not None
                    else getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
                )
                weights = _attention_weights(query, key, attention_mask, scale)
            layer.observe(query.detach(), weights)
        return out

    return attention


def enable(model: Any) -> Any:
    """Install the query hook on a transformers model; return the model.

    The model keeps its attention implementation (``sdpa`` by default): the
    hook registers ``"streamsketch_<impl>"``, which calls it and then feeds
    the queries to a waiting :class:`~streamsketch.kv.SketchCache` layer.
    Needed by query-aware scorers (``"query"``, ``"leverage+query"``,
    ``"h2o"``); harmless otherwise. Calling it twice is a no-op.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose attention goes through transformers'
        ``AttentionInterface`` (Llama, Mistral, Qwen2, ... in transformers >= 5).

    Examples
    --------
    >>> from streamsketch.kv import SketchCache, enable     # doctest: +SKIP
    >>> enable(model)                                       # doctest: +SKIP
    >>> model.generate(ids, past_key_values=SketchCache(256), max_new_tokens=32)  # doctest: +SKIP
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str):
        raise TypeError("model must be a transformers model with config._attn_implementation")
    if impl.startswith(_PREFIX):
        return model
    if impl == "eager":
        base = _eager_for(model)
    else:
        functions = AttentionInterface()
        if impl not in functions:
            raise ValueError(f"attention implementation {impl!r} is not in AttentionInterface")
        base = functions[impl]
    name = _PREFIX + impl
    AttentionInterface.register(name, _make_attention(base))
    masks = AttentionMaskInterface()
    AttentionMaskInterface.register(name, masks[impl] if impl in masks else masks["sdpa"])
    _set_implementation(model, name)
    return model


def disable(model: Any) -> Any:
    """Undo :func:`enable`: restore the model's original attention implementation."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith(_PREFIX):
        _set_implementation(model, impl[len(_PREFIX) :])
    return model


def _eager_for(model: Any) -> Callable[..., Any]:
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(model).__name__} has no eager_attention_forward to wrap")
    return fn  # type: ignore[no-any-return]


def _set_implementation(model: Any, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, ImportError):
        pass
    # Some versions validate names against a fixed list; set the configs directly as well.
    seen: set[int] = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            try:
                cfg._attn_implementation = name
            except AttributeError:
                cfg._attn_implementation_internal = name
