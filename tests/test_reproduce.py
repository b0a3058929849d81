"""``normkd reproduce``: the comparison runs end to end on CIFAR-format files, resumes, and sets
its table beside the published figures."""

from pathlib import Path

from normkd.cli import main
from normkd.config import load_recipe
from normkd.engine import RunResult, run_recipe
from normkd.published import CIFAR100
from normkd.reproduce import CONFIGS, Comparison, markdown, pairs, plan, scale_overrides
from support import write_cifar100

PAIR = "resnet20__resnet8"  # normkd's CPU-sized pair: the fastest to run here


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
    for row in ("| teacher |", "| vanilla (CE only) |", "| KD |", "| NORM+KD (authors' code) |"):
        assert row in table, row
    assert "Δ final vs vanilla" not in table  # one seed supports no difference
    assert "not in the NORM paper" in table
    assert (tmp_path / "report.png").stat().st_size > 1000
    # 2% of 200 / 100 images, on the recipes' own schedule otherwise
    data = (tmp_path / "runs" / PAIR / "smoke" / "kd_seed0" / "data.json").read_text()
    assert '"n_train": 4' in data and '"n_test": 2' in data

    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, read from") == 4
    assert (tmp_path / "runs" / PAIR / "smoke" / "results.md").read_text().split("wall time")[1:]


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
        comp.runs[method] = [RunResult("x", 240, top1 + 0.2, 200, top1, 90.0, 1, 60.0)]
    table = markdown(comp, None)
    assert "| KD | 73.30 | 73.10 | 73.33 |" in table
    assert "| NORM+KD | 76.70 | 76.50 | 76.98 |" in table
    assert "| NORM+KD (authors' code) | 77.10 | 76.90 | 76.98 |" in table
    assert "NORM authors' README" in table and "mdistiller README" in table


def test_pairs_and_methods_are_checked_before_anything_runs(tmp_path, capsys):
    base = ["reproduce", "cifar100", "--data-root", str(tmp_path), "--out-dir", str(tmp_path)]
    assert main([*base[:2], "resnet9__x", *base[2:]]) == 2
    assert "unknown pair 'resnet9__x'; valid: " in capsys.readouterr().err
    assert main([*base[:2], PAIR, *base[2:], "--methods", "magic"]) == 2
    assert f"pair {PAIR} has no recipe for ['magic']" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())
