"""How the training loop is wired, pinned before the loop moves (trainer ``fit`` / ``_fit`` /
``_train_epoch`` / ``evaluate`` and ``normkd merge``).

Each test here pins one behaviour that no other test noticed breaking: per-epoch reshuffling,
the evaluation cadence, when ``best.pt`` is written, top-5, linear lr scaling, bf16 autocast on
CPU, and what ``normkd merge`` reports and merges. Everything is built through public entry
points; the only engine internals used live in :func:`_restore` below.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import normkd
from normkd.cli import main
from normkd.config import Recipe, load_recipe
from normkd.engine import evaluate, run_recipe
from normkd.engine.checkpoint import load_checkpoint, load_model_file, save_checkpoint
from normkd.engine.schedule import lr_at
from normkd.models import create_model
from normkd.norm import FTStudent, merge_ft
from support import DEMO, FAST, build_job, recipe_data, sets

CPU = torch.device("cpu")


def _restore(recipe: Recipe, checkpoint: Path | None = None) -> tuple[object, nn.Module | None]:
    """The recipe's test loader on CPU and, given a training checkpoint, the student as trained
    (with FT for NORM) restored from it, in eval mode.

    The one place this file builds engine internals (``assemble``, through tests/support.py).
    """
    if checkpoint is None:
        return recipe_data(recipe).test, None
    job = build_job(recipe, untrained_teacher=True)
    job.distiller.load_state_dict(load_checkpoint(checkpoint)["distiller"])
    return job.data.test, job.student.eval()


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _tensor_set(n: int, seed: int, classes: int = 3) -> TensorDataset:
    """16x16 images whose class is a bright colour channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory) -> Path:
    """A plain student, 4 epochs, evaluated every 2nd epoch, lr scaled linearly by 64/256.

    The scaled-down lr keeps the model weak (top-1 well below top-5) after 2 epochs.
    """
    out = tmp_path_factory.mktemp("vanilla")
    recipe = load_recipe(
        DEMO / "vanilla.yaml",
        [
            *FAST,
            f"engine.out_dir={out}",
            "optim.epochs=4",
            "engine.eval_every=2",
            "optim.lr_scaling=linear",
            "optim.lr_reference_batch=256",
        ],
    )
    run_recipe(recipe)
    return out / "demo_vanilla"


@pytest.fixture(scope="module")
def norm_run(tmp_path_factory, demo_teacher) -> tuple[Path, object]:
    """A NORM run whose last epoch is NOT its best one, so best.pt and last.pt hold different
    epochs. By construction, not by a lucky swing: the lr warms up over all 8 epochs to 3.0
    (gradients clipped, so nothing overflows), so the student learns in the middle epochs and
    is thrown back near chance by the last. A constant high lr left it to chance: on 2 threads,
    or without native bf16, that run's best was its last. Evaluated every 2nd epoch, so the
    epoch after the best one is not evaluated (and must not take over best.pt on the figure it
    carries over). Asserted here, so the tests using it cannot silently compare a checkpoint
    with itself."""
    out = tmp_path_factory.mktemp("norm")
    recipe = load_recipe(
        DEMO / "norm.yaml",
        [
            *FAST,
            f"engine.out_dir={out}",
            "teacher.model=resnet8",
            f"teacher.weights={demo_teacher}",
            "optim.epochs=8",
            "data.batch_size=16",
            "optim.lr=3.0",
            "optim.schedule=constant",
            "optim.warmup_epochs=8",
            "optim.grad_clip=1.0",
            "engine.eval_every=2",
        ],
    )
    result = run_recipe(recipe)
    assert result.best_epoch < 8 and result.final_top1 < result.best_top1 - 1.0, (
        "precondition: the run's final accuracy must be below its best; history "
        f"{[round(h['val_top1'], 1) for h in result.history]}"
    )
    return out / "demo_norm", result


def test_resume_carries_the_best_so_far_and_drops_rows_it_redoes(norm_run, tmp_path):
    """A resumed run ends with the uninterrupted run's best (top-1 and epoch) although its own
    epochs after the resume are worse, and metrics.csv keeps only the epochs the checkpoint
    holds: rows written after it (a kill between the CSV row and the checkpoint) are redone."""
    run_dir, full = norm_run
    recipe = load_recipe(run_dir / "config.yaml", [f"engine.out_dir={tmp_path}"])
    run_recipe(recipe, stop_after_epoch=full.best_epoch)
    part = tmp_path / "demo_norm"
    held = (part / "last.pt").read_bytes()  # the checkpoint right after the best epoch
    run_recipe(recipe, resume=True, stop_after_epoch=full.best_epoch + 1)
    (part / "last.pt").write_bytes(held)  # as if killed after the next row, before its ckpt
    resumed = run_recipe(recipe, resume=True)
    assert (resumed.best_top1, resumed.best_epoch) == (full.best_top1, full.best_epoch)
    assert resumed.final_top1 == full.final_top1
    rows = _rows(part)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))  # counted from 1
    assert [r["best_top1"] for r in rows] == [r["best_top1"] for r in _rows(run_dir)]


def test_a_resumed_run_counts_the_seconds_its_checkpoint_carries(vanilla_run, tmp_path):
    """A run's seconds are its whole time: a resume adds what the checkpoint says was spent
    before (here a checkpoint edited to say 10^6 s), so a table's records of runs that a
    restart resumed do not count only the part after the restart."""
    recipe = load_recipe(vanilla_run / "config.yaml", [f"engine.out_dir={tmp_path}"])
    first = run_recipe(recipe, stop_after_epoch=3)
    part = tmp_path / vanilla_run.name
    state = load_checkpoint(part / "last.pt")
    assert 0 < state["seconds"] <= first.seconds
    state.pop("format")
    save_checkpoint(part / "last.pt", state | {"seconds": 1e6})
    t0 = time.perf_counter()
    resumed = run_recipe(recipe, resume=True)
    wall = time.perf_counter() - t0
    assert 1e6 < resumed.seconds <= 1e6 + wall
    assert json.loads((part / "summary.json").read_text())["seconds"] == resumed.seconds


# ---- 1. reshuffling every epoch -------------------------------------------------------------


class _EpochSampler(Sampler[int]):
    """A DistributedSampler-like sampler whose order is a function of the epoch set on it; it
    logs every ``set_epoch`` and every iteration (with the epoch the order was drawn for)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0
        self.events: list[tuple[str, int]] = []
        self.orders: list[list[int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.events.append(("set_epoch", epoch))
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        self.events.append(("iter", self.epoch))
        self.orders.append(order)
        return iter(order)


def test_distill_sets_the_epoch_on_the_train_sampler_before_each_epoch(tmp_path):
    """``normkd.distill`` with a DataLoader: the loop calls ``set_epoch(epoch)`` on its sampler
    before each epoch's pass (so DistributedSampler-style samplers reshuffle every epoch), and
    each epoch trains on the order drawn for that epoch."""
    sampler = _EpochSampler(48)
    normkd.distill(
        None,
        create_model("resnet8", num_classes=3),
        DataLoader(_tensor_set(48, 0), batch_size=16, sampler=sampler),
        DataLoader(_tensor_set(24, 1), batch_size=24),
        method="vanilla",
        epochs=3,
        out_dir=tmp_path,
        device="cpu",
        quiet=True,
    )
    assert [e for kind, e in sampler.events if kind == "set_epoch"] == [0, 1, 2]
    # The last three passes are the training epochs, each right after its set_epoch.
    assert sampler.events[-6:] == [
        ("set_epoch", 0),
        ("iter", 0),
        ("set_epoch", 1),
        ("iter", 1),
        ("set_epoch", 2),
        ("iter", 2),
    ]
    assert len({tuple(o) for o in sampler.orders[-3:]}) == 3


def test_recipe_run_trains_each_epoch_on_a_new_order(tmp_path):
    """The CLI path (device-resident digits loader): epoch 1 is trained on another order than
    epoch 0.

    With lr 1e-30 the weights cannot move, and without augmentation an epoch's mean train loss
    then depends only on how the samples are grouped into batches (BatchNorm uses the batch's
    statistics in training). Had epoch 1 reused epoch 0's order, its loss would equal epoch 0's.
    """
    argv = ["train", str(DEMO / "vanilla.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    overrides = sets(
        *FAST,
        "optim.epochs=2",
        "optim.lr=1e-30",
        "optim.schedule=constant",
        "optim.warmup_epochs=0",
        "data.augment=false",
    )
    assert main([*argv, *overrides]) == 0
    rows = _rows(tmp_path / "demo_vanilla")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    loss0, loss1 = float(rows[0]["loss"]), float(rows[1]["loss"])
    assert math.isfinite(loss0) and math.isfinite(loss1)
    assert abs(loss0 - loss1) > 1e-5, (loss0, loss1)


# ---- 2. evaluation cadence ------------------------------------------------------------------


def test_evaluation_runs_every_eval_every_epochs_and_at_the_end(vanilla_run):
    """``engine.eval_every: 2`` over 4 epochs: epochs 2 and 4 are evaluated afresh; epoch 1 has
    no evaluation yet (val_loss nan) and epoch 3 repeats epoch 2's figures."""
    rows = _rows(vanilla_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert math.isnan(float(rows[0]["val_loss"]))
    assert math.isfinite(float(rows[1]["val_loss"]))
    assert math.isfinite(float(rows[3]["val_loss"]))
    for col in ("val_top1", "val_top5", "val_loss"):
        assert rows[2][col] == rows[1][col], col
    # Epoch 3 is a fresh evaluation of later weights, not a copy of epoch 1's.
    assert rows[3]["val_loss"] != rows[1]["val_loss"]


# ---- 3. best.pt -----------------------------------------------------------------------------


def test_best_checkpoint_holds_the_best_epoch_not_the_last(norm_run):
    """best.pt is written only when the best test top-1 improves: in a run whose accuracy falls
    after its best epoch, best.pt holds that epoch and its student scores best_top1, while
    last.pt holds the final epoch and scores final_top1. Evaluated every 2nd epoch, the best is
    an evaluated epoch: the next one, not evaluated, repeats its figure without improving on it."""
    run_dir, result = norm_run
    rows = _rows(run_dir)
    assert result.best_epoch % 2 == 0
    assert rows[result.best_epoch]["val_top1"] == rows[result.best_epoch - 1]["val_top1"]
    best = load_checkpoint(run_dir / "best.pt")
    last = load_checkpoint(run_dir / "last.pt")
    assert best["epoch"] == result.best_epoch  # both count epochs from 1
    assert last["epoch"] == 8 and best["epoch"] < last["epoch"]
    recipe = load_recipe(run_dir / "config.yaml")
    test, best_student = _restore(recipe, run_dir / "best.pt")
    _test, last_student = _restore(recipe, run_dir / "last.pt")
    assert evaluate(best_student, test, CPU)["top1"] == pytest.approx(result.best_top1, abs=1e-9)
    assert evaluate(last_student, test, CPU)["top1"] == pytest.approx(result.final_top1, abs=1e-9)


# ---- 4. top-5 -------------------------------------------------------------------------------


def test_evaluate_matches_hand_computed_top1_top5_and_loss():
    """``evaluate`` on a model whose logits are known (the identity on logit rows): top-1 and
    top-5 counted separately over two batches, loss the mean cross-entropy."""
    down = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0]  # ranking: classes 0, 1, 2, 3, 4 | 5, 6
    up = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # ranking: classes 6, 5, 4, 3, 2 | 1, 0
    logits = torch.tensor([down, down, up, up])
    y = torch.tensor([0, 3, 0, 2])  # top-1 hit; top-5 only; miss; top-5 only
    loader = [(logits[:2], y[:2], torch.arange(2)), (logits[2:], y[2:], torch.arange(2, 4))]
    res = evaluate(nn.Identity(), loader, CPU)

    def ce(row: list[float], label: int) -> float:  # -log softmax(row)[label], by hand
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    hand_loss = (ce(down, 0) + ce(down, 3) + ce(up, 0) + ce(up, 2)) / 4
    assert res["top1"] == 25.0
    assert res["top5"] == 75.0
    assert res["loss"] == pytest.approx(hand_loss, rel=1e-6)


def test_metrics_top5_is_its_own_figure(vanilla_run):
    """metrics.csv val_top5 is measured, not a copy of top-1: never below it, and above it for
    a weak model."""
    rows = _rows(vanilla_run)
    for r in rows[1:]:
        assert float(r["val_top5"]) >= float(r["val_top1"])
    top1, top5 = float(rows[1]["val_top1"]), float(rows[1]["val_top5"])
    assert top1 < 90.0, "precondition: the model must be weak for top-5 to exceed top-1"
    assert top5 > top1


# ---- 5. linear lr scaling -------------------------------------------------------------------


def test_linear_lr_scaling_reaches_the_optimizer(vanilla_run):
    """``optim.lr_scaling: linear``: the optimizer steps with lr * batch / lr_reference_batch.
    last.pt's optimizer holds the lr of the last step; metrics.csv logs each epoch's last-step
    lr, both scaled."""
    recipe = load_recipe(vanilla_run / "config.yaml")
    o = recipe.optim
    assert o.lr_scaling == "linear"
    scale = recipe.data.batch_size / o.lr_reference_batch
    assert scale == 0.25
    steps = math.ceil(recipe.data.n_train / recipe.data.batch_size)
    used = load_checkpoint(vanilla_run / "last.pt")["optimizer"]["param_groups"][0]["lr"]
    want = lr_at(o, o.epochs - 1, steps - 1, steps) * scale
    assert want > 0
    assert used == pytest.approx(want, rel=1e-9)
    rows = _rows(vanilla_run)
    for epoch, r in enumerate(rows):
        assert float(r["lr"]) == pytest.approx(lr_at(o, epoch, steps - 1, steps) * scale, rel=1e-5)


def test_optimizer_settings_reach_the_optimizer(vanilla_run):
    """The SGD the run steps has the recipe's weight decay, momentum and nesterov flag."""
    recipe = load_recipe(vanilla_run / "config.yaml")
    group = load_checkpoint(vanilla_run / "last.pt")["optimizer"]["param_groups"][0]
    o = recipe.optim
    assert o.weight_decay > 0 and o.momentum > 0
    assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (
        o.weight_decay,
        o.momentum,
        o.nesterov,
    )


# ---- 6. bf16 autocast on CPU ----------------------------------------------------------------


def test_bf16_amp_autocasts_training_not_evaluation_on_cpu(tmp_path):
    """``amp: bf16`` (engine.amp) runs the student's training forwards under bf16 autocast on
    CPU (its classifier outputs bfloat16) and evaluates in fp32, the deployed model's precision;
    the same 1-epoch run's losses differ from the fp32 run's by far more than float32 noise (yet
    stay close)."""
    train, val = _tensor_set(64, 0), _tensor_set(32, 1)
    student = create_model("resnet8", num_classes=3)
    runs = {}
    for amp in ("off", "bf16"):
        model = create_model("resnet8", num_classes=3)
        model.load_state_dict(student.state_dict())
        seen: list[tuple[bool, torch.dtype]] = []
        model.fc.register_forward_hook(
            lambda mod, _i, out, seen=seen: seen.append((mod.training, out.dtype))
        )
        res = normkd.distill(
            None,
            model,
            DataLoader(train, batch_size=16),
            DataLoader(val, batch_size=32),
            method="vanilla",
            epochs=1,
            amp=amp,
            out_dir=tmp_path,
            run_name=f"amp_{amp}",
            device="cpu",
            quiet=True,
        )
        runs[amp] = (res.history[0], set(seen))
    (off, off_dtypes), (bf, bf_dtypes) = runs["off"], runs["bf16"]
    assert {dt for _training, dt in off_dtypes} == {torch.float32}
    assert (True, torch.bfloat16) in bf_dtypes  # training steps
    assert {dt for training, dt in bf_dtypes if not training} == {torch.float32}  # evaluation
    for key in ("loss", "val_loss"):
        a, b = off[key], bf[key]
        assert math.isfinite(a) and math.isfinite(b), key
        assert 1e-5 * abs(a) < abs(a - b) < 0.05 * abs(a), (key, a, b)


# ---- 7. normkd merge ------------------------------------------------------------------------


def test_merge_cli_reports_the_real_logit_diff(norm_run, tmp_path, capsys):
    """``normkd merge RUN_DIR``: the printed max |logit diff| is the difference between the FT
    student restored from last.pt and the merged model, on the first test batch on CPU
    (recomputed here; a merge compared with itself would print 0)."""
    run_dir, _result = norm_run
    out = tmp_path / "merged.safetensors"
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = re.search(r"max \|logit diff\| vs the trained student on a batch of (\d+): (\S+)", printed)
    assert m is not None, printed
    test, ft = _restore(load_recipe(run_dir / "config.yaml"), run_dir / "last.pt")
    assert isinstance(ft, FTStudent)
    merged, meta = load_model_file(out)
    assert meta["merged_from_ft"]
    x, _y, _i = next(iter(test))
    with torch.no_grad():
        real = float((ft(x).float() - merged(x).float()).abs().max())
    assert 0 < real < 1e-3  # precondition: the FT student and its merge differ by float error
    assert int(m[1]) == x.shape[0]
    assert float(m[2]) == pytest.approx(real, rel=1e-2)


def test_merge_cli_best_merges_best_checkpoint(norm_run, tmp_path):
    """``normkd merge RUN_DIR --best`` merges best.pt's FT student, plain ``merge`` last.pt's
    (the run's best and last epochs differ, so their merges do too)."""
    run_dir, _result = norm_run
    outs = {"best": tmp_path / "best.safetensors", "last": tmp_path / "last.safetensors"}
    assert main(["merge", str(run_dir), "--out", str(outs["best"]), "--best"]) == 0
    assert main(["merge", str(run_dir), "--out", str(outs["last"])]) == 0
    recipe = load_recipe(run_dir / "config.yaml")
    want = {}
    for which in ("best", "last"):
        _test, ft = _restore(recipe, run_dir / f"{which}.pt")
        assert isinstance(ft, FTStudent)
        want[which] = merge_ft(ft).state_dict()
    for which, path in outs.items():
        got = load_file(path)
        assert got.keys() == want[which].keys(), which
        for k in got:
            assert torch.equal(got[k], want[which][k]), (which, k)
    got_best = load_file(outs["best"])
    assert any(not torch.equal(got_best[k], want["last"][k]) for k in got_best)
