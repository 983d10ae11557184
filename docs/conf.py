"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamsketch

project = "streamsketch"
author = "the streamsketch developers"
copyright = "2026, the streamsketch developers"
version = release = streamsketch.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autosummary_generate = True
autodoc_typehints = "none"  # numpydoc sections carry the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# Markdown pages link to code files in the repository (../streamsketch/...); those are not
# documents, so MyST may not resolve them as cross-references.
suppress_warnings = ["myst.xref_missing"]

html_theme = "alabaster"
html_title = f"streamsketch {release}"
