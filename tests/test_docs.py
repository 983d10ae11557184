"""The documentation: every public name has an API page, and ``sphinx-build -W`` passes."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: Public modules and the API page that lists their ``__all__``.
PAGES = {
    "streamsketch": "core",
    "streamsketch.linear": "linear",
    "streamsketch.rows": "rows",
    "streamsketch.attention": "attention",
    "streamsketch.kv": "kv",
    "streamsketch.kv.model": "kv",
    "streamsketch.kv.evaluate": "kv",
    "streamsketch.distributed": "distributed",
    "streamsketch.dask": "dask",
    "streamsketch.nla": "nla",
}
#: Re-exports in the top-level namespace that have their page under their subpackage.
REEXPORTED = {"linear", "rows"}


def _listed(page: str, module: str) -> set[str]:
    """Names under ``.. currentmodule:: module`` in ``docs/api/<page>.rst``."""
    text = (DOCS / "api" / f"{page}.rst").read_text()
    names, current = set(), None
    for line in text.splitlines():
        m = re.match(r"\.\. currentmodule:: (\S+)", line)
        if m:
            current = m.group(1)
        elif current == module and re.match(r"   [A-Za-z_]\w*$", line):
            names.add(line.strip())
    return names


@pytest.mark.parametrize("module", sorted(PAGES))
def test_every_public_name_has_an_api_entry(module):
    if module.startswith(("streamsketch.attention", "streamsketch.kv", "streamsketch.distrib")):
        pytest.importorskip("torch")
    if module == "streamsketch.dask":
        pytest.importorskip("dask")
    mod = importlib.import_module(module)
    public = set(mod.__all__)
    if module == "streamsketch":
        sub = set()
        for name in REEXPORTED:
            sub |= set(importlib.import_module(f"streamsketch.{name}").__all__)
        public = {n for n in public - sub if not n.startswith("__")}
    missing = public - _listed(PAGES[module], module)
    assert not missing, f"add to docs/api/{PAGES[module]}.rst: {sorted(missing)}"


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    for package in ("sphinx", "numpydoc", "myst_parser"):
        pytest.importorskip(package)
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-E", "-q", "-b", "html", str(DOCS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
