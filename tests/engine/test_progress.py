"""Progress output: a bar on a terminal, one line per epoch in a log file (no redraw flood)."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from support import DEMO, sets

TINY = ["student.model=tinycnn", "student.kwargs={width: 8}", "data.n_train=128",
        "optim.epochs=2", "engine.device=cpu"]  # fmt: skip


def _argv(out) -> list[str]:
    return [sys.executable, "-m", "normkd", "train", str(DEMO / "teacher.yaml"), "--out-dir",
            str(out), *sets(*TINY)]  # fmt: skip


def test_a_log_file_gets_one_line_per_epoch_and_no_bar(tmp_path, capsys):
    """stderr captured (not a terminal, as in a log file): no bar redraws, a line per epoch."""
    from normkd.cli import main

    assert main(_argv(tmp_path)[3:]) == 0  # in process: the same CLI, its streams captured
    out, err = capsys.readouterr()
    assert "\r" not in err and "it/s" not in err, err[-500:]
    epochs = [line for line in out.splitlines() if line.startswith("[demo_teacher] epoch")]
    assert [e.split()[2] for e in epochs] == ["1/2", "2/2"]


def test_a_terminal_gets_the_bar(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 100 columns
    try:
        proc = subprocess.run(_argv(tmp_path), stdout=subprocess.PIPE, stderr=follower,
                              timeout=300)  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0
    assert b"demo_teacher 1/2" in seen and b"\r" in seen  # tqdm redraws in place
