"""The benchmark scripts' smoke runs: each ``--quick`` writes its report, tables and figure.

Mostly the plumbing is tested (files, environment line, table headers); speed and accuracy
values are benchmark figures, not test facts. The deploy report's size and equivalence figures
are facts (merging FT is exact), so those are checked too. The scripts run with one thread: on a
shared 2-core machine two spinning OpenMP threads beside another job make a smoke run several
times slower.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HEADERS = {
    "accuracy": [
        "| method | final top-1 % (mean ± std) |",
        "| target (paired, final top-1) | measured (mean ± std) |",
    ],
    "throughput": [
        "| variant | images/s (median) | spread | ms per batch |",
        "| pair | figure | measured | target | verdict |",
    ],
    "deploy": [
        "| student | FT sized for teacher | N | params plain |",
        "b1 merged/plain",
        "| figure | measured | target | verdict |",
    ],
    "scale": [
        "| batch | ms / step | spread | images / s |",
        "| step | ms / step | spread | images / s | time / KD-only time |",
    ],
    "peer": [
        "| variant | tool | precision | images/s (median) | spread | ms per batch |",
        "| figure | measured | target | verdict |",
    ],
    "precision": [
        "| method | off (fp32) top-1 % | auto top-1 % | auto - off, paired |",
        "| target | measured | verdict |",
    ],
    "methods": [
        "| method | loss terms | ms / step | spread | time / KD | GFLOPs / step |",
        "| figure | measured | target | verdict |",
    ],
}


def _table(md: str, header_start: str) -> list[dict[str, str]]:
    """The rows (header -> cell) of the Markdown table whose header line starts so."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    headers = cells(lines[start])
    rows = []
    for line in lines[start + 2 :]:  # skip the | --- | line
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, cells(line), strict=True)))
    return rows


def _check_deploy_merges(md: str, stdout: str) -> None:
    """The deploy report's figures show a real merge, so a benchmark that skipped merge_ft (or
    reported the FT student as the merged one) fails: the merged student has exactly the plain
    student's parameters (and FLOPs), fewer than the FT student, and the FT student's logits.

    Exact parameter counts come from the script's progress lines; the report rounds to 0.01M.
    """
    rows = _table(md, "| student | FT sized for teacher |")
    assert rows, md
    for row in rows:
        assert row["params merged"] == row["params plain"], row
        assert float(row["params merged"][:-1]) < float(row["params FT"][:-1]), row
        assert row["FLOPs merged"] == row["FLOPs plain"], row
        assert row["merged = plain"] == "yes", row
        assert float(row["max logit diff FT vs merged"].split()[0]) <= 1e-4, row
    progress = re.findall(r"params (\{[^}]*\}), max logit diff (\S+),", stdout)
    assert len(progress) == len(rows), stdout
    for params, diff in progress:
        counts = ast.literal_eval(params)
        assert counts["merged"] == counts["plain"] < counts["ft"], counts
        assert float(diff) <= 1e-4, diff


def _check_peer(md: str, stdout: str) -> None:
    """normkd's own rows are measured in any environment; torchdistill's are measured where it is
    installed (.venv-bench) and otherwise say so, in the table and in every target's verdict, so
    a report can never pass a missing peer off as a comparison."""
    rows = {r["variant"]: r for r in _table(md, "| variant | tool | precision |")}
    for row in rows.values():
        if row["tool"] in ("normkd", "ceiling", "classic"):
            assert float(row["images/s (median)"]) > 0, row
    summary = _table(md, "| figure | measured | target | verdict |")
    targets = [r for r in summary if r["target"] != "—"]
    assert [r["target"] for r in targets] == ["≥ 1.5x", "≥ 1.0x", "≥ 1.0x"], summary
    peer_rows = [r for r in rows.values() if r["tool"] == "torchdistill"]
    assert len(peer_rows) == 3, rows
    if importlib.util.find_spec("torchdistill") is None:  # the interpreter the script ran under
        assert "torchdistill: not installed" in stdout, stdout
        for row in peer_rows:
            assert row["images/s (median)"].startswith("not measured: torchdistill not installed")
        for row in targets:
            assert row["measured"].startswith("not measured: torchdistill not installed"), row
            assert row["verdict"] == "torchdistill: not installed", row
    else:  # its plain fp32 loop always runs; a broken AMP route is reported, not hidden
        fp32 = next(r for r in peer_rows if r["precision"] == "fp32")
        assert float(fp32["images/s (median)"]) > 0, fp32
        assert targets[0]["verdict"] in ("met", "**not met**"), targets[0]


def _check_methods(md: str, stdout: str) -> None:
    """Every shipped recipe of the smoke pair is a row, measured against the KD row: vanilla runs
    no teacher (fewer FLOPs), NORM trains FT beside the student, a logit term adds nothing."""
    rows = {r["method"]: r for r in _table(md, "| method | loss terms |")}
    pair = Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "resnet20__resnet8"
    assert set(rows) == {p.stem for p in pair.glob("[!_]*.yaml")}, sorted(rows)
    assert rows["kd"]["time / KD"] == rows["kd"]["FLOPs / KD"] == "1.00x"
    assert float(rows["vanilla"]["FLOPs / KD"][:-1]) < 0.8, rows["vanilla"]
    assert float(rows["norm_kd"]["extra trainable params"][:-1]) > 0, rows["norm_kd"]
    assert rows["dist"]["extra trainable params"] == "+0.000M", rows["dist"]
    for row in rows.values():
        assert float(row["ms / step"]) > 0, row


FIGURE_CHECKS = {"deploy": _check_deploy_merges, "peer": _check_peer, "methods": _check_methods}


# The accuracy smoke run trains the methods its targets compare (the sweep is the same code for
# every method; the full list is the benchmark's, not the smoke run's).
QUICK_ARGS = {
    "bench_accuracy.py": ["--methods", "vanilla", "kd", "norm_kd"],
    "bench_precision.py": ["--methods", "norm_kd"],
}


def _quick(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    args = ["--quick", "--out", str(out), "--device", "cpu", *QUICK_ARGS.get(script, [])]
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        timeout=300,
    )


@pytest.mark.parametrize("name", list(HEADERS))
def test_quick_run_writes_markdown_and_plot(name: str, tmp_path: Path) -> None:
    proc = _quick(f"bench_{name}.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / f"{name}.md").read_text()
    assert "QUICK" in md
    # The environment line: device, torch version, threads and date, beside every table.
    env_lines = [line for line in md.splitlines() if line.startswith("Device: CPU")]
    assert len(env_lines) >= 2
    for line in env_lines:
        assert "torch " in line and "1 threads" in line and "20" in line
    for header in HEADERS[name]:
        assert header in md, f"{header!r} missing from {name}.md"
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert not (tmp_path / "runs").exists()  # training runs go to a temporary folder
    if name in FIGURE_CHECKS:
        FIGURE_CHECKS[name](md, proc.stdout)


def test_index_links_reports_and_copies_verdicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all

    (tmp_path / "deploy.md").write_text(
        "# x\n\n## Targets\n\n| figure | verdict |\n| --- | --- |\n| a | met |\n\nDevice: CPU\n"
    )
    (tmp_path / "deploy.png").write_bytes(b"png")
    index = run_all.write_index(
        tmp_path, {"deploy": (0, 12.0), "scale": (1, 3.0)}, "Device: CPU; torch x", quick=True
    )
    text = index.read_text()
    assert "[deploy](deploy.md)" in text and "![deploy](deploy.png)" in text
    assert "| a | met |" in text
    assert "failed (exit 1)" in text
    assert "Device: CPU; torch x" in text


def test_a_partial_run_keeps_every_earlier_report_in_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--only scale`` (or ``--index-only``) must not drop the reports it did not remake: they
    stay linked with their verdicts, dated from their own environment line."""
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all

    (tmp_path / "deploy.md").write_text(
        "# x\n\nDevice: CPU; 2026-12-03 20:00 UTC\n\n## Targets\n\n| figure | verdict |\n"
        "| --- | --- |\n| b | met |\n"
    )
    (tmp_path / "cifar100.md").write_text("# real data\n")
    text = run_all.write_index(
        tmp_path, {"scale": (0, 3.0)}, "Device: CPU", quick=False
    ).read_text()
    assert "| [deploy](deploy.md) |" in text and "earlier run (2026-12-03 20:00 UTC)" in text
    assert (
        "## deploy: targets (earlier run, 2026-12-03 20:00 UTC)" in text and "| b | met |" in text
    )
    assert "[cifar100](cifar100.md)" in text  # the table reports, listed under other commands
    assert "[accuracy]" not in text  # no report, no row
    assert run_all.main(["--index-only", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rewritten = (tmp_path / "README.md").read_text()
    assert "no benchmark ran for it" in rewritten and "| [deploy](deploy.md) |" in rewritten
    assert "| [scale]" not in rewritten  # scale.md was never written: nothing to link


def test_index_says_why_a_benchmark_was_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without .venv-bench the peer benchmark is skipped with its reason, not counted as failed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all

    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setitem(run_all.INTERPRETERS, "peer", missing)
    proc_rc = run_all.main(["--only", "peer", "--out", str(tmp_path), "--device", "cpu"])
    assert proc_rc == 0
    text = (tmp_path / "README.md").read_text()
    assert f"skipped: {missing} is missing (`make bench-env` creates it)" in text
    assert "failed" not in text


def test_tables_rebuild_each_report_and_the_trend_from_records_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/tables.py build reads only the records: a report per table, the trend."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tables

    from normkd.records import Record, write_record

    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "RUNS", tmp_path / "runs")
    for name, epochs, gap in (
        (tables.TEACHER_TABLE, 15, 1.0),
        ("cifar100_resnet20__resnet8_e30", 30, 0.5),
    ):
        for method, seeds in (("kd_matched", 3), ("norm_kd", 3)):
            for seed in range(seeds if epochs == 15 else 1):
                final = 40.0 + seed + (gap if method == "norm_kd" else 0.0) + 0.1 * seed**2
                write_record(
                    tmp_path / "runs" / name,
                    Record("resnet20__resnet8", method, seed, "short", epochs, "bf16", final, epochs,
                           final, 900.0, "abc", "cpu", "now", teacher_sha256="ff"),
                )  # fmt: skip
    assert tables.main(["build"]) == 0
    report = (tmp_path / "cifar100.md").read_text()
    assert "| NORM+KD | 3 | " in report and "| KD (matched) | 3 | " in report
    assert "- NORM+KD vs KD (matched): +1.00 [+1.00, +1.00]" in report
    assert (
        "Not recorded yet (`tables.py run cifar100_resnet20__resnet8_e15` trains them): " in report
    )
    assert "NORM seeds [0, 1, 2]" in report and "KD (matched) seeds" not in report
    assert "Not recorded yet" not in (tmp_path / "cifar100_trend.md").read_text()
    trend = (tmp_path / "cifar100_trend.md").read_text()
    assert "15 epochs: +1.00; 30 epochs: +0.50" in trend
    assert (tmp_path / "cifar100.png").is_file() and (tmp_path / "cifar100_trend.png").is_file()
    assert not (tmp_path / "cifar100_mixed.md").exists()  # no records: no report
    assert tables.main(["build", "nope"]) == 2
    # status: what is recorded and which seeds a run would still train, from the same records
    lines = tables.status().splitlines()
    first = dict(zip(tables.TABLES, lines, strict=True))
    spec = tables.TABLES[tables.TEACHER_TABLE]
    assert first[tables.TEACHER_TABLE].startswith(
        f"{tables.TEACHER_TABLE}: 6/{len(spec.methods) * spec.seeds} runs recorded; to run: "
    )
    assert "KD (matched)" not in first[tables.TEACHER_TABLE]  # its 3 seeds are recorded
    assert "NORM seeds [0, 1, 2]" in first[tables.TEACHER_TABLE]
    assert (
        first["cifar100_resnet20__resnet8_e30"]
        == "cifar100_resnet20__resnet8_e30: 2/2 runs recorded"
    )
    # a `run --seeds 2` past the trend table's one seed: counted apart, not as missing or done
    write_record(
        tmp_path / "runs" / "cifar100_resnet20__resnet8_e30",
        Record("resnet20__resnet8", "norm_kd", 1, "short", 30, "bf16", 41.0, 30, 41.0, 900.0,
               "abc", "cpu", "now", teacher_sha256="ff"),
    )  # fmt: skip
    assert tables.status(["cifar100_resnet20__resnet8_e30"]) == (
        "cifar100_resnet20__resnet8_e30: 2/2 runs recorded (+1 of seeds past the table's 1)"
    )


def test_the_trend_pairs_its_gaps_by_schedule_whichever_runs_finished_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NORM+KD at 30 epochs and KD (matched) at 60 recorded, their partners not yet: no gap is
    made of two schedules; each row sits at its own epochs."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tables

    from normkd.records import Record, write_record

    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "RUNS", tmp_path / "runs")
    for name, epochs, method, seed, final in (
        (tables.TEACHER_TABLE, 15, "kd_matched", 0, 50.0),
        (tables.TEACHER_TABLE, 15, "norm_kd", 0, 49.0),
        (tables.TEACHER_TABLE, 15, "kd_matched", 1, 52.0),
        (tables.TEACHER_TABLE, 15, "norm_kd", 1, 50.0),
        ("cifar100_resnet20__resnet8_e30", 30, "norm_kd", 0, 55.0),
        ("cifar100_resnet20__resnet8_e60", 60, "kd_matched", 0, 52.0),
    ):
        write_record(
            tmp_path / "runs" / name,
            Record("resnet20__resnet8", method, seed, "short", epochs, "bf16", final, epochs,
                   final, 900.0, "abc", "cpu", "now", teacher_sha256="ff"),
        )  # fmt: skip
    tables.trend()
    trend = (tmp_path / "cifar100_trend.md").read_text()
    assert "mean final top-1: 15 epochs: -1.50.\n" in trend  # the means of two seeds
    assert "like for like with the one-seed schedules: 15 epochs: -1.00.\n" in trend  # seed 0's
    assert "| NORM+KD | 30 | 1 | 55.00 |" in trend and "| KD (matched) | 60 | 1 | 52.00 |" in trend
    assert "Seeds with both methods recorded, per schedule: 15 epochs: 2." in trend
    # the gaps -1.00 and -2.00: sd 0.71; two one-seed gaps differ with sd 1.00; 1.96 x that
    assert "varies with sd 0.71 points over 2 seeds (-1.00, -2.00)" in trend
    assert "differ by chance with sd 1.00: a move of less than about 1.96 points" in trend


def test_the_committed_reports_are_what_the_committed_records_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row of a committed real-data report comes from a record a clone has: rebuilt from
    the committed records (and nothing else), each table's rows and headlines are the same."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tables

    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    tables.build()
    for spec in tables.TABLES.values():
        committed = BENCH / "results" / f"{spec.report}.md"
        if spec.report is None or not committed.is_file():
            continue

        def rows(md: str) -> list[str]:
            return [line for line in md.splitlines() if line.startswith(("|", "- "))]

        rebuilt = tmp_path / f"{spec.report}.md"
        assert rebuilt.is_file(), f"{committed.name}: its records are not in the clone"
        assert rows(rebuilt.read_text()) == rows(committed.read_text()), committed.name


@pytest.mark.parametrize("exit_code", [2, 143])
def test_an_interrupted_table_run_says_what_is_saved_and_how_to_go_on(
    exit_code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C (2) or SIGTERM (143) in ``tables.py run`` ends with the engine's note and the
    way to continue, not a traceback, and the exit code a scheduler reads."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tables

    from normkd.engine.loop import TrainingInterrupted

    note = "interrupted; RUN/last.pt holds epoch 2/60 (the last completed one)"

    def stopped(*_args: object) -> None:
        raise TrainingInterrupted(note, exit_code=exit_code)

    monkeypatch.setattr(tables, "run", stopped)
    table = next(iter(tables.TABLES))
    assert tables.main(["run", table, "--data-root", "DATA"]) == exit_code
    err = capsys.readouterr().err
    assert note in err and "same command continues" in err and "Traceback" not in err


def test_the_closing_environment_line_does_not_count_the_benchmarks_own_threads(monkeypatch):
    """The line after a run holds the run's own threads in the 1-minute load: 2 threads on a
    2-core machine are not "busy"; the same load before the run (someone else's) is."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.1, 2.0, 2.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu = torch.device("cpu")
    before, after = common.env_line(cpu), common.env_line(cpu, after=True)
    assert "Busy machine" in before and "Busy machine" not in after
    assert "load average 2.10 (up to 2 of it this benchmark's own threads)" in after
    monkeypatch.setattr(os, "getloadavg", lambda: (4.2, 4.0, 4.0))  # 2 more than its own
    assert "Busy machine" in common.env_line(cpu, after=True)
