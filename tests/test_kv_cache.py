"""SketchCache on a small random Llama (GQA, RoPE): exactness, masks, memory, hook."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny_llama import tiny_llama, tiny_llama_config  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from streamsketch.kv import SCORERS, SketchCache, disable, enable  # noqa: E402
from streamsketch.kv.cache import split_total  # noqa: E402


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config()


def _model(config, seed=0):
    return tiny_llama(config, seed)


def _ids(n, seed=1):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _decode(model, ids, prefill, cache):
    with torch.no_grad():
        outs = [model(ids[:, :prefill], past_key_values=cache).logits]
        for t in range(prefill, ids.shape[1]):
            outs.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_room_for_everything_equals_full_cache(config, scorer):
    model = enable(_model(config))
    ids = _ids(160)
    with torch.no_grad():
        full = model(ids).logits
    got = _decode(model, ids, 60, SketchCache(budget=500, sinks=4, window=16, scorer=scorer))
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_window_scorer_equals_streaming_mask(config):
    """Decoding with sinks + a sliding window equals one forward with that attention mask."""
    model = _model(config)
    ids = _ids(150)
    prefill, sinks, budget, window = 40, 3, 5, 8
    keep = sinks + budget + window
    cache = SketchCache(budget=budget, sinks=sinks, window=window, scorer="window", interval=1)
    got = _decode(model, ids, prefill, cache)
    n = ids.shape[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    # Prefill rows are plainly causal; a decode row sees the sinks and the last `keep - sinks`
    # tokens, itself included (the window scorer spends the budget on the most recent keys;
    # ranking at every step, the window slides by one token per step).
    allowed = (j <= i) & ((i < prefill) | (j < sinks) | (j > i - (keep - sinks)))
    mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_physical_cache_bounded_over_long_stream(config):
    model = enable(_model(config))
    ids = _ids(4000, seed=3)
    cache = SketchCache(budget=24, sinks=4, window=8, scorer="leverage+query")
    with torch.no_grad():
        model(ids[:, :500], past_key_values=cache)
        sizes = set()
        nbytes = set()
        for t in range(500, 4000):
            kv_len, kv_off = cache.get_mask_sizes(1, 0)
            assert kv_len == cache.capacity and kv_off == t - kv_len + 1
            model(ids[:, t : t + 1], past_key_values=cache)
            for layer in cache.layers:
                sizes.add(layer.keys.shape[2])
                assert layer.keys.shape[:2] == (1, 2)
            nbytes.add(cache.nbytes)
            assert cache.get_seq_length() == t + 1
    assert sizes == {36}
    assert len(nbytes) == 1


@pytest.mark.parametrize("scorer", ["leverage+query", "knorm"])
def test_batch_of_different_prompts_decodes_each_as_alone(config, scorer):
    """Two different prompts in one batch: each row's logits equal decoding that prompt alone.

    The selection is per (batch, KV head), so a small cache that evicts must
    keep for each row what it keeps when that row is decoded by itself. Each
    prompt holds distinct tokens: RoPE keeps a key's norm, so a repeated token
    ties with itself under ``knorm`` and batched rounding may break the tie
    the other way.
    """
    model = enable(_model(config))
    vocab = config.vocab_size
    ids = torch.stack(
        [torch.randperm(vocab, generator=torch.Generator().manual_seed(s))[:90] for s in (4, 5)]
    )
    both = _decode(model, ids, 40, SketchCache(budget=12, sinks=2, window=6, scorer=scorer))
    for row in range(2):
        alone = _decode(
            model, ids[row : row + 1], 40, SketchCache(budget=12, sinks=2, window=6, scorer=scorer)
        )
        torch.testing.assert_close(both[row : row + 1], alone, rtol=1e-4, atol=1e-4)
    # And with room for every key, the batch equals the full cache.
    with torch.no_grad():
        full = model(ids).logits
    roomy = _decode(model, ids, 40, SketchCache(budget=500, sinks=2, window=6, scorer=scorer))
    torch.testing.assert_close(roomy, full, rtol=1e-4, atol=1e-4)


def test_query_scorer_without_hook_fails_clearly(config):
    model = _model(config)
    ids = _ids(40)
    cache = SketchCache(budget=8, sinks=2, window=4, scorer="query")
    with torch.no_grad():
        model(ids[:, :20], past_key_values=cache)
        with pytest.raises(RuntimeError, match="enable"):
            model(ids[:, 20:21], past_key_values=cache)


def test_enable_is_idempotent_and_harmless_for_other_caches(config):
    model = _model(config)
    ids = _ids(50)
    with torch.no_grad():
        want = model(ids, past_key_values=DynamicCache()).logits
        enable(model)
        impl = model.config._attn_implementation
        enable(model)
        assert model.config._attn_implementation == impl == "streamsketch_sdpa"
        got = model(ids, past_key_values=DynamicCache()).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        disable(model)
        assert model.config._attn_implementation == "sdpa"


def test_generate_with_sketch_cache(config):
    model = enable(_model(config))
    ids = _ids(64)
    kwargs = {"max_new_tokens": 24, "do_sample": False}
    with torch.no_grad():
        full = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
        big = model.generate(ids, past_key_values=SketchCache(budget=200), **kwargs)
        small_cache = SketchCache(16)
        small = model.generate(ids, past_key_values=small_cache, **kwargs)
    assert torch.equal(big, full)
    assert small.shape == full.shape
    assert small_cache.get_seq_length() == 64 + 24 - 1
    assert all(layer.keys.shape[2] <= 16 for layer in small_cache.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(config, dtype):
    model = enable(_model(config)).to(dtype)
    ids = _ids(80)
    cache = SketchCache(20, scorer="leverage+query")
    logits = _decode(model, ids, 30, cache)
    assert logits.dtype == dtype and bool(torch.isfinite(logits).all())
    layer = cache.layers[0]
    assert layer.keys.dtype == dtype and layer.keys.shape[2] == 20
    assert all(t.dtype == torch.float32 for t in layer.scorer.state().values() if t.ndim > 0)


def test_split_total_and_argument_errors():
    for total in (8, 128, 256, 512):
        s, b, w = split_total(total)
        assert s + b + w == total and min(s, b, w) >= 0
    cache = SketchCache(256)
    assert cache.capacity == 256
    cache = SketchCache(128, window=32)
    assert (cache.sinks, cache.budget, cache.window) == (4, 92, 32)
    for kwargs, match in (
        ({}, "exactly one"),
        ({"total": 100, "budget": 10}, "exactly one"),
        ({"total": 0}, "total"),
        ({"total": 10, "window": 20}, "total"),
        ({"budget": -3}, "budget"),
        ({"budget": 3, "scorer": "bogus"}, "scorer"),
        ({"budget": 3, "scorer": "query", "half_life": -1.0}, "half_life"),
    ):
        with pytest.raises(ValueError, match=match):
            SketchCache(**kwargs)
