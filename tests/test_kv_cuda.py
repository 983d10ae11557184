"""The KV adapter on a CUDA device: same keys as on CPU, no host sync per step, real model.

Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_kv_cuda.py``.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from _tiny_llama import tiny_llama  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from streamsketch.kv import SCORERS, KeySelector, SketchCache, enable  # noqa: E402

CUDA = torch.device("cuda")
SCORES_FREE = [name for name, cls in SCORERS.items() if not cls.needs_attention]


def _stream(n, B=2, Hkv=3, g=3, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, d, generator=gen)
    v = torch.randn(B, Hkv, n, d, generator=gen)
    q = torch.randn(B, Hkv * g, n, d, generator=gen)
    return q, k, v


def _run(sel, q, k, v, prefill):
    sel.update(k[:, :, :prefill], v[:, :, :prefill], queries=q[:, :, :prefill])
    for t in range(prefill, k.shape[2]):
        sel.update(k[:, :, t : t + 1], v[:, :, t : t + 1], queries=q[:, :, t : t + 1])
    return sel


@pytest.mark.parametrize("scorer", sorted(SCORES_FREE))
def test_cuda_keeps_the_same_keys_as_cpu(scorer):
    q, k, v = _stream(300)
    kw = dict(sinks=4, window=16, scorer=scorer, num_q_heads=9)
    cpu = _run(KeySelector(3, 64, 32, **kw), q, k, v, 100)
    gpu = _run(KeySelector(3, 64, 32, device=CUDA, **kw), q.cuda(), k.cuda(), v.cuda(), 100)
    # Scores differ in the last bits between devices; ties aside, the kept set is the same.
    same = (cpu.positions.sort(-1).values == gpu.positions.cpu().sort(-1).values).float().mean()
    assert same >= 0.98
    assert gpu.keys.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scorer", sorted(SCORES_FREE))
def test_decode_steps_do_not_synchronise(scorer, dtype):
    """CUDA's sync debug mode turns any device-to-host copy during decode steps into an error."""
    q, k, v = (t.to(CUDA, dtype) for t in _stream(200, seed=1))
    sel = KeySelector(
        3, 64, 32, sinks=4, window=16, scorer=scorer, num_q_heads=9, device=CUDA, dtype=dtype
    )
    sel.update(k[:, :, :100], v[:, :, :100], queries=q[:, :, :100])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode does catch a device-to-host read
            k.sum().item()
        for t in range(100, 200):
            sel.update(k[:, :, t : t + 1], v[:, :, t : t + 1], queries=q[:, :, t : t + 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sel.keys.dtype == dtype and len(sel) == 52


def _tiny_llama():
    return tiny_llama(device=CUDA)


@pytest.mark.parametrize("scorer", sorted(SCORES_FREE))
def test_room_for_everything_equals_full_cache_on_cuda(scorer):
    model = enable(_tiny_llama())
    ids = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        full = model(ids).logits
        cache = SketchCache(budget=500, sinks=4, window=16, scorer=scorer)
        outs = [model(ids[:, :60], past_key_values=cache).logits]
        for t in range(60, 160):
            outs.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-3, atol=1e-3)
    assert cache.layers[0].keys.device.type == "cuda"


def test_real_model_greedy_agrees_on_cuda():
    """SmolLM2 on CUDA in bfloat16: a cache with room for everything generates what the full one
    does, and the default SketchCache stays within a small perplexity of it."""
    from streamsketch.kv.model import ModelMissingError, decode_nll, load_model, long_text_ids

    try:
        model, tok = load_model(CUDA, torch.bfloat16)
    except ModelMissingError as exc:
        pytest.skip(str(exc))
    enable(model)
    ids = long_text_ids(tok, 1024).to(CUDA)
    prompt = ids[:, :768]
    gen = dict(max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        full = model.generate(prompt, past_key_values=DynamicCache(), **gen)
        roomy = model.generate(prompt, past_key_values=SketchCache(budget=2048), **gen)
    assert torch.equal(full, roomy)
    nll_full, _ = decode_nll(model, ids, 512, DynamicCache())
    nll_sketch, _ = decode_nll(model, ids, 512, SketchCache(256))
    assert nll_sketch.mean() < nll_full.mean() + 0.25


def test_model_decode_steps_do_not_synchronise():
    """Whole-model decode steps through SketchCache (hook, masks, cache update) never sync."""
    model = enable(_tiny_llama())
    ids = torch.randint(0, 97, (2, 300), generator=torch.Generator().manual_seed(2)).to(CUDA)
    cache = SketchCache(64)
    with torch.no_grad():
        model(ids[:, :200], past_key_values=cache)
        model(ids[:, 200:201], past_key_values=cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(201, 300):
                model(ids[:, t : t + 1], past_key_values=cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.get_seq_length() == 300
