"""Run records: written whole, read back checked, the teacher kept with its sha256."""

import hashlib
import json
from dataclasses import asdict

import pytest

from normkd.errors import UserError
from normkd.records import (
    Record,
    git_commit,
    keep_teacher,
    kept_teacher,
    machine_line,
    read_record,
    read_records,
    write_record,
)


def _record(method="kd_matched", seed=1, **kw):
    values = dict(pair="a__b", scale="short", epochs=15, precision="bf16", best_top1=51.5)
    values |= dict(best_epoch=14, final_top1=51.25, seconds=812.5, commit="abc", machine="cpu")
    values |= dict(finished="2026-12-06 10:00 UTC", teacher_sha256="00ff", recipe={"x": [1]})
    return Record(method=method, seed=seed, **(values | kw))


def test_a_record_reads_back_as_written(tmp_path):
    rec = _record()
    path = write_record(tmp_path, rec)
    assert path.name == "kd_matched_seed1.json" and read_record(path) == rec
    assert read_records(tmp_path) == [rec]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        json.dumps({"format": "other"}),
        json.dumps(asdict(_record()) | {"final_top1": "high"}),
        json.dumps(asdict(_record()) | {"seed": 1.5}),
        json.dumps(asdict(_record()) | {"seconds": 1e300}),
        json.dumps({k: v for k, v in asdict(_record()).items() if k != "commit"}),
    ],
)
def test_anything_else_is_refused_naming_the_file(tmp_path, text):
    (tmp_path / "x_seed0.json").write_text(text)
    with pytest.raises(UserError, match=r"x_seed0.json is not a normkd run record \(.+\)"):
        read_records(tmp_path)


def test_the_teacher_is_kept_with_its_sha256_and_checked_when_read(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"teacher weights")
    folder = tmp_path / "records"
    kept = keep_teacher(folder, weights, _record("teacher", 0, teacher_sha256=None))
    assert kept.read_bytes() == weights.read_bytes() and kept_teacher(folder) == kept
    want = hashlib.sha256(b"teacher weights").hexdigest()
    assert read_record(folder / "teacher.json").weights_sha256 == want
    kept.write_bytes(b"another teacher")
    with pytest.raises(UserError, match="does not match the sha256"):
        kept_teacher(folder)
    (folder / "teacher.json").unlink()
    with pytest.raises(UserError, match=r"no teacher\.json beside it"):
        kept_teacher(folder)
    assert kept_teacher(tmp_path / "none") is None


def test_commit_and_machine_lines():
    commit = git_commit()
    assert len(commit.removesuffix("+dirty")) == 40 or commit.startswith("unknown")
    line = machine_line()
    assert "torch " in line and " threads" in line
