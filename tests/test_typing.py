"""The package is typed: ``py.typed`` ships, and ``mypy --strict`` finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_marker_ships():
    assert (ROOT / "streamsketch" / "py.typed").is_file()
    assert "py.typed" in (ROOT / "setup.cfg").read_text()


@pytest.mark.slow
def test_mypy_strict_is_clean():
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "streamsketch"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
