"""benchmarks/gpu_check.py (``make gpu-check``) where there is no GPU: CI and this machine.

The checks themselves run here on the CPU (amp off, bf16 + channels_last, the device-resident
loader), so a change that breaks their logic fails here and not first on a lent GPU. Without a
CUDA device the default command must say so in one line and exit 0. The CIFAR subset it packs
for a GPU machine must read back through normkd's own reader and stay within the size limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from normkd.data import fake_split, load_cifar100

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check


def _cifar(root: Path, n_train: int, n_test: int) -> Path:
    """A generated CIFAR-100 in the original pickle layout under ``root``."""
    from common import write_cifar100_python

    s = fake_split(100, 32, n_train, n_test, seed=0)
    write_cifar100_python(root, (s.x_train, s.y_train), (s.x_test, s.y_test))
    return root


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "gpu-check: no CUDA device: nothing checked"
    assert not list(tmp_path.iterdir())  # nothing checked, nothing written


def test_checks_run_on_the_cpu_and_write_the_report(
    gpu_check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)  # a stray relative path would land here, not in the repo
    data = _cifar(tmp_path / "cifar", 48, 16)
    # ddp and reproduce are left out here for time (~30 s): tests/engine/test_ddp.py and
    # tests/test_reproduce.py cover the engine paths they drive.
    only = ["fp32", "loader", "cka"]
    argv = ["--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]
    rc = gpu_check.main([*argv, "--data-root", str(data), "--only", *only])
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert rc == 0, md
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("check", "---"):
            rows[cells[0]] = cells
    assert list(rows) == ["teacher", *only], md
    for name in ("fp32",):
        verdict, detail = rows[name][1], rows[name][3]
        assert verdict == "ok", rows[name]
        assert "resumed at epoch 2/2" in detail and "finite losses" in detail, detail
        diff = float(detail.split("merged = FT to ")[1].split(";")[0])
        assert diff <= gpu_check.MERGE_TOL, detail
    assert rows["loader"][1] == "ok" and "every image once" in rows["loader"][3]
    assert rows["cka"][1] == "ok" and "feature form" in rows["cka"][3], rows["cka"]
    assert "kernel form" in rows["cka"][3], rows["cka"]

    assert md.startswith("# GPU check (`make gpu-check`) on the CPU: not a GPU result")
    assert "Device: CPU" in md


def test_a_cpu_run_says_what_it_leaves_to_a_gpu(gpu_check, tmp_path: Path) -> None:
    """Unless --only names them, the slow GPU-sized checks are skipped on the CPU, each with its
    reason, and --skip leaves a check out altogether."""
    gpu_sized = ["compile", "throughput", "reproduce"]
    rest = [c for c in gpu_check.CHECKS if c not in gpu_sized and c != "loader"]
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--skip", *rest]) == 0
    md = (tmp_path / "gpu.md").read_text()
    for name in gpu_sized:
        assert f"| {name} | skipped | " in md, name
    assert "| loader | ok |" in md and "| teacher |" not in md and "| fp32 |" not in md


def test_a_failed_check_is_reported_and_fails_the_command(gpu_check, tmp_path: Path) -> None:
    """A missing data folder is a failed reproduce (the command names it), not a crash."""
    argv = ["--device", "cpu", "--out", str(tmp_path), "--only", "reproduce", "loader"]
    rc = gpu_check.main([*argv, "--data-root", str(tmp_path / "nowhere")])
    md = (tmp_path / "gpu.md").read_text()
    assert rc == 1
    assert "| reproduce | **FAILED** |" in md and "| loader | ok |" in md
    assert "**1 failed: reproduce**" in md


def test_packed_subset_reads_back_and_is_refused_when_too_large(
    gpu_check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _cifar(tmp_path / "full", 60, 30)
    full = load_cifar100(source)
    argv = ["--pack-data", str(tmp_path / "sub"), "--source", str(source)]
    assert gpu_check.main([*argv, "--train", "40", "--test", "20"]) == 0
    sub = load_cifar100(tmp_path / "sub")
    assert (len(sub.y_train), len(sub.y_test)) == (40, 20)
    # Every packed image is one of the source's, with its own label.
    rows = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(full.x_train, full.y_train)}
    assert all(rows[bytes(x.numpy().tobytes())] == int(y) for x, y in zip(sub.x_train, sub.y_train))
    size = sum(f.stat().st_size for f in (tmp_path / "sub" / "cifar-100-python").iterdir())
    assert size < 40 * 3072 + 20 * 3072 + 20_000
    monkeypatch.setattr(gpu_check, "MAX_CARRY_MB", 0.05)
    assert gpu_check.pack_data(tmp_path / "big", source, 40, 20) == 2
    assert not list((tmp_path / "big" / "cifar-100-python").iterdir())


def test_throughput_verdicts_are_read_from_the_report(gpu_check, tmp_path: Path) -> None:
    md = tmp_path / "throughput.md"
    md.write_text(
        "# t\n\n## Summary\n\n| pair | figure | measured | target | verdict |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| cifar | normkd / classic throughput | 3.10x | ≥ 2x | met |\n"
        "| cifar | NORM+KD step time / KD-only step time | 1.020 | ≤ 1.05 | met |\n"
        "| digits | normkd / classic throughput | 1.50x | ≥ 2x | **not met** |\n"
    )
    line = gpu_check.throughput_verdicts(md)
    assert line == "cifar normkd/classic 3.10x (met); digits normkd/classic 1.50x (**not met**)"


def test_wheels_to_carry_are_pinned_by_the_lock(gpu_check) -> None:
    """Every wheel a GPU machine needs has a version in requirements.lock (no download here)."""
    lock = (BENCH.parent / "requirements.lock").read_text().lower().replace("_", "-")
    for name in gpu_check.WHEELS:
        assert f"\n{name.lower().replace('_', '-')}==" in lock, name
