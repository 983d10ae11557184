"""``streamsketch bench``: runs benchmarks/run_all.py and writes one report."""

from streamsketch.cli import main


def test_bench_writes_a_report(tmp_path, capsys):
    assert main(["bench", "--quick", "--only", "leverage", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| leverage | ok |" in report
    assert "Machine:" in report and "numpy" in report
    # The leverage table itself, with a ratio against numpy's QR.
    assert "numpy" in (tmp_path / "leverage.md").read_text()
    assert (tmp_path / "logs" / "leverage.log").is_file()


def test_bench_unknown_name_is_one_line_error(capsys):
    assert main(["bench", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown benchmark 'nope'" in err
