"""normkd's messages are logging records: plain lines by default, silenced or redirected at will."""

import logging

import pytest

from normkd.config import load_recipe
from normkd.engine import run_recipe
from support import DEMO

TINY = ["student.model=tinycnn", "student.kwargs={width: 8}", "data.n_train=64",
        "optim.epochs=1", "engine.device=cpu"]  # fmt: skip


@pytest.fixture
def normkd_logger():
    log = logging.getLogger("normkd")
    level, handlers = log.level, list(log.handlers)
    yield log
    log.setLevel(level)
    log.handlers[:] = handlers


def _run(tmp_path, name):
    recipe = load_recipe(DEMO / "teacher.yaml", [*TINY, f"engine.out_dir={tmp_path}",
                                                 f"engine.run_name={name}"])  # fmt: skip
    run_recipe(recipe)


def test_default_lines_then_silenced_then_redirected(tmp_path, capsys, normkd_logger):
    _run(tmp_path, "a")
    assert "[demo_teacher] epoch 1/1 loss" in capsys.readouterr().out  # the plain line

    normkd_logger.setLevel(logging.WARNING)  # what a user does to keep only warnings
    _run(tmp_path, "b")
    assert "epoch 1/1" not in capsys.readouterr().out

    normkd_logger.setLevel(logging.INFO)
    records: list[logging.LogRecord] = []
    sink = logging.Handler()
    sink.emit = records.append  # type: ignore[method-assign]
    normkd_logger.handlers[:] = [sink]  # redirect: the user's handler only
    _run(tmp_path, "c")
    assert "epoch 1/1" not in capsys.readouterr().out
    assert any("[demo_teacher] epoch 1/1" in r.getMessage() for r in records)
    warned = [r for r in records if r.levelno == logging.WARNING]
    assert warned and "chance" in warned[0].getMessage()  # 1 epoch of 64 images: at chance
