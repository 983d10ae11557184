"""``streamsketch bench``: runs benchmarks/run_all.py and writes one report."""

from streamsketch.cli import main


def test_bench_writes_a_report(tmp_path, capsys):
    assert main(["bench", "--quick", "--only", "leverage", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| leverage | ok |" in report
    assert "This machine:" in report and "numpy" in report
    # The leverage table itself, with a ratio against numpy's QR.
    assert "numpy" in (tmp_path / "leverage.md").read_text()
    assert (tmp_path / "logs" / "leverage.log").is_file()


def test_bench_unknown_name_is_one_line_error(capsys):
    assert main(["bench", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown benchmark 'nope'" in err


def test_collect_gathers_existing_results_without_running(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all_collect", script)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    (tmp_path / "leverage.md").write_text("# Leverage\n\n| a | b |\n|---|---|\n| 1 | 2.5x |\n")
    assert module.main(["--collect", "--only", "leverage", "linear", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| leverage | collected (written" in report and "| 1 | 2.5x |" in report
    assert "| linear | skipped: no result file yet |" in report
    assert not (tmp_path / "logs").exists()  # nothing ran
