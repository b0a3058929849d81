"""``normkd reproduce``: the comparison runs end to end on CIFAR-format files, resumes, and sets
its table beside the published figures."""

import shutil
from pathlib import Path

import pytest

from normkd.cli import main
from normkd.config import load_recipe
from normkd.engine import run_recipe
from normkd.errors import UserError
from normkd.published import CIFAR100
from normkd.records import Record, read_record, write_record
from normkd.reproduce import (
    CONFIGS,
    Comparison,
    build_table,
    markdown,
    pairs,
    plan,
    scale_overrides,
)
from support import write_cifar100

PAIR = "resnet20__resnet8"  # normkd's CPU-sized pair: the fastest to run here


def record(method, seed, final, best=None, **kw):
    """A record as a finished run leaves it (only what the table reads is set)."""
    values = dict(pair=PAIR, scale="short", epochs=15, precision="bf16", seconds=60.0)
    values |= dict(commit="c0ffee", machine="test CPU", finished="now", teacher_sha256="ab")
    values |= kw
    return Record(method=method, seed=seed, best_top1=best or final, best_epoch=15,
                  final_top1=final, **values)  # fmt: skip


def test_smoke_scale_through_the_cli_then_a_rerun_skips_every_run(tmp_path, capsys):
    root = write_cifar100(tmp_path / "data", n_train=200, n_test=100)
    argv = [
        "reproduce", "cifar100", PAIR, "--data-root", str(root), "--scale", "smoke",
        "--methods", "vanilla", "kd", "norm_kd_authors", "--out-dir", str(tmp_path / "runs"),
        "--set", "engine.device=cpu", "--report", str(tmp_path / "report.md"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    for i, what in enumerate(["teacher", "vanilla", "kd", "norm_kd_authors"], start=1):
        assert f"[reproduce] run {i}/4: {what} seed 0: 1 epochs" in out
    table = (tmp_path / "runs" / PAIR / "smoke" / "results.md").read_text()
    assert table == (tmp_path / "report.md").read_text()
    assert "smoke check: 1 epoch on 2% of the data, not a result" in table
    rows = ("| teacher |", "| vanilla (CE only) |", "| KD (CRD setting) |", "| NORM+KD (authors'")
    for row in rows:
        assert row in table, row
    assert "(n=1, no interval)" in table  # one seed supports no interval
    assert "not in the NORM paper" in table
    assert (tmp_path / "report.png").stat().st_size > 1000
    # 2% of 200 / 100 images, on the recipes' own schedule otherwise
    data = (tmp_path / "runs" / PAIR / "smoke" / "kd_seed0" / "data.json").read_text()
    assert '"n_train": 4' in data and '"n_test": 2' in data

    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, read from") == 4
    assert "min this command)" in (tmp_path / "runs" / PAIR / "smoke" / "results.md").read_text()


def test_an_unfinished_run_is_resumed_not_restarted(tmp_path, capsys):
    root = write_cifar100(tmp_path / "data", n_train=128, n_test=32)
    common = dict(pair=PAIR, methods=["vanilla"], seeds=1, scale="short", data_root=root)
    teacher, runs = plan(**common, out_dir=tmp_path, epochs=2, extra=["engine.device=cpu"])
    assert teacher is not None
    run_recipe(teacher.recipe)
    run_recipe(runs[0].recipe, stop_after_epoch=1)  # as if stopped after its first epoch
    argv = [
        "reproduce", "cifar100", PAIR, "--data-root", str(root), "--scale", "short",
        "--epochs", "2", "--methods", "vanilla", "--out-dir", str(tmp_path),
        "--set", "engine.device=cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "run 1/2: teacher seed 0: finished earlier" in out
    assert "run 2/2: vanilla seed 0: resuming at epoch 2/2" in out
    assert (runs[0].run_dir / "summary.json").is_file()


def test_short_scale_shrinks_the_schedule_and_its_ramps():
    recipe = load_recipe(CONFIGS / "resnet32x4__resnet8x4" / "dkd.yaml")
    over = scale_overrides(recipe, "short", 20)
    assert "optim.epochs=20" in over and "optim.milestones=[12, 15, 18]" in over
    assert "loss.1.warmup=2" in over  # DKD's 20-of-240 warm-up, scaled
    smoke = scale_overrides(recipe, "smoke", None)
    assert {"optim.epochs=1", "optim.milestones=[]", "data.fraction=0.02"} <= set(smoke)
    assert scale_overrides(recipe, "paper", None) == []


def test_the_users_set_items_win_over_the_scales_schedule(tmp_path):
    _, runs = plan(PAIR, ["kd"], 1, "short", tmp_path, tmp_path, 6, tmp_path / "t.safetensors")
    assert runs[0].recipe.optim.warmup_epochs == 0  # the scaled warm-up rounds to 0 here
    extra = ["optim.warmup_epochs=1"]
    _, runs = plan(
        PAIR, ["kd"], 1, "short", tmp_path, tmp_path, 6, tmp_path / "t.safetensors", extra
    )
    assert (runs[0].recipe.optim.warmup_epochs, runs[0].recipe.optim.epochs) == (1, 6)


def test_every_paper_pair_has_its_published_row_and_the_table_shows_it():
    own = {PAIR, "resnet32x4__vit_tiny_p4", "vit_small_p4__resnet8x4", "resnet20__vit_mini_p4"}
    assert set(CIFAR100) - {"resnet110__resnet20"} == set(pairs()) - own
    assert not own & set(CIFAR100)
    comp = Comparison("resnet32x4__resnet8x4", "paper", 240, None)
    for method, top1 in (("kd", 73.1), ("norm_kd", 76.5), ("norm_kd_authors", 76.9)):
        comp.runs[method] = [record(method, 0, top1, best=top1 + 0.2)]
    table = markdown(comp)
    assert "| KD (CRD setting) | 1 | 73.10 | 73.30 | — | 73.33 | 1.0 |" in table
    assert "| NORM+KD | 1 | 76.50 | 76.70 | +3.40 (n=1, no interval) ~ | 76.98 | 1.0 |" in table
    assert "| NORM+KD (authors' code) | 1 | 76.90 | 77.10 | +3.80 (n=1, no interval) ~ |" in table
    assert "NORM authors' README" in table and "mdistiller README" in table


def test_pairs_and_methods_are_checked_before_anything_runs(tmp_path, capsys):
    base = ["reproduce", "cifar100", "--data-root", str(tmp_path), "--out-dir", str(tmp_path)]
    assert main([*base[:2], "resnet9__x", *base[2:]]) == 2
    assert "unknown pair 'resnet9__x'; valid: " in capsys.readouterr().err
    assert main([*base[:2], PAIR, *base[2:], "--methods", "magic"]) == 2
    assert f"pair {PAIR} has no recipe for ['magic']" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())


def test_a_missing_data_folder_is_said_before_a_run_starts_or_a_file_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["reproduce", "cifar100", PAIR, "--data-root", str(tmp_path / "nope")]
    assert main([*args, "--out-dir", str(out), "--records", str(tmp_path / "rec")]) == 2
    captured = capsys.readouterr()
    assert "CIFAR-100 folder" in captured.err and "cifar-100-python" in captured.err
    assert "[reproduce] run" not in captured.err + captured.out
    assert not out.exists() and not (tmp_path / "rec").exists()


def test_records_grow_a_table_across_calls_and_rebuild_it_alone(tmp_path, capsys):
    root = write_cifar100(tmp_path / "data", n_train=200, n_test=100)
    records = tmp_path / "records"

    def run(seeds, *extra):
        argv = [
            "reproduce", "cifar100", PAIR, "--data-root", str(root), "--scale", "smoke",
            "--methods", "vanilla", "norm", "--seeds", str(seeds), "--records", str(records),
            "--out-dir", str(tmp_path / "runs"), "--set", "engine.device=cpu", *extra,
        ]  # fmt: skip
        code = main(argv)
        return code, capsys.readouterr()

    assert run(2)[0] == 0
    names = sorted(p.name for p in records.iterdir())
    assert names == [
        "norm_seed0.json", "norm_seed1.json", "teacher.json", "teacher.safetensors",
        "vanilla_seed0.json", "vanilla_seed1.json",
    ]  # fmt: skip
    first = read_record(records / "norm_seed1.json")
    assert first.teacher_sha256 == read_record(records / "teacher.json").weights_sha256
    assert (first.method, first.seed, first.epochs, first.scale) == ("norm", 1, 1, "smoke")
    assert first.recipe["engine"]["seed"] == 1 and first.recipe["loss"][1]["kind"] == "norm"
    assert first.precision in ("bf16", "fp32") and "torch" in first.machine

    shutil.rmtree(tmp_path / "runs")  # the records alone carry the table on
    code, out = run(3)
    assert code == 0
    log = out.out + out.err
    assert "teacher seed 0" not in log  # the kept teacher is reused, not retrained
    assert log.count(": recorded") == 4 and "run 5/6: vanilla seed 2: 1 epochs" in log
    table = (tmp_path / "runs" / PAIR / "smoke" / "results.md").read_text()
    assert "| vanilla (CE only) | 3 |" in table and "| NORM | 3 |" in table
    assert "Seeds [0, 1, 2]" in table and "| teacher | 1 |" in table
    assert "- NORM vs vanilla (CE only): " in table and "over 3 paired seeds" in table

    rebuilt = markdown(build_table(records))
    assert (
        rebuilt.split("Table written")[1].split("\n", 1)[1]
        == table.split("Table written")[1].split("\n", 1)[1]
    )  # same rows and headlines from the records alone


def test_a_record_of_another_setting_is_not_mixed_into_a_table(tmp_path):
    records = tmp_path / "records"
    write_record(records, record("kd_matched", 0, 50.0))
    write_record(records, record("norm_kd", 0, 51.0, epochs=30))
    with pytest.raises(UserError, match="mixes settings"):
        build_table(records)
    (records / "norm_kd_seed0.json").unlink()
    write_record(records, record("norm_kd", 0, 51.0, precision="fp32"))
    with pytest.raises(UserError, match="mixes settings"):
        build_table(records)


def test_the_headlines_say_when_a_gap_cannot_be_told_from_noise(tmp_path):
    comp = Comparison(PAIR, "short", 15, None)
    comp.runs["kd_matched"] = [record("kd_matched", s, v) for s, v in enumerate([50, 51, 52])]
    comp.runs["norm_kd"] = [record("norm_kd", s, v) for s, v in enumerate([50.5, 50.6, 52.4])]
    comp.runs["vanilla"] = [record("vanilla", s, v) for s, v in enumerate([47, 48, 49])]
    comp.runs["norm"] = [record("norm", s, v) for s, v in enumerate([49, 50.1, 50.9])]
    table = markdown(comp)
    assert "- NORM+KD vs KD (matched): +0.17 [" in table
    assert "over 3 paired seeds: NORM+KD cannot be told from seed noise." in table
    assert "- NORM vs vanilla (CE only): +2.00 [" in table and "NORM is ahead." in table
    assert "| NORM+KD | 3 | 51.17 ± 1.07 |" in table


def test_two_schedules_never_share_or_read_back_each_others_run_folder(tmp_path):
    """A 30-epoch plan in the folder of a finished 15-epoch run once read that run back as its
    own (a 30-epoch record of 15 epochs): each schedule has its folder, and a finished folder of
    another recipe is refused, not read."""
    import json

    import yaml

    from normkd.config import recipe_to_dict
    from normkd.reproduce import SHORT_EPOCHS, check_same_recipe, execute

    args = (PAIR, ["kd"], 1, "short", tmp_path, tmp_path)
    (e15,), (short,) = (plan(*args, e, tmp_path / "t.safetensors")[1] for e in (15, None))
    assert short.run_dir.parent.name == "short" and e15.run_dir.parent.name == "short_e15"
    same = plan(*args, SHORT_EPOCHS, tmp_path / "t.safetensors")[1][0]
    assert same.run_dir == short.run_dir  # the scale's own schedule keeps its folder
    # the 15-epoch run finished in its folder
    e15.run_dir.mkdir(parents=True)
    (e15.run_dir / "config.yaml").write_text(yaml.safe_dump(recipe_to_dict(e15.recipe)))
    summary = {"best_top1": 50.0, "best_epoch": 15, "final_top1": 49.0, "epochs": 15, "seconds": 1}
    summary |= {"run_dir": str(e15.run_dir), "final_top5": 80.0, "params": 1}
    (e15.run_dir / "summary.json").write_text(json.dumps(summary))
    assert execute(e15, 1, 1).final_top1 == 49.0  # its own plan reads it back
    with pytest.raises(UserError, match="holds a finished run of another recipe"):
        check_same_recipe(e15.run_dir, short.recipe)
