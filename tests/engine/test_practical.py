"""What a user's own model and data need beyond the paper's recipes (issue "Your own models and
data, for real"): BatchNorm statistics re-estimated before evaluation, AdamW, weight decay spared
on normalisation layers and biases, gradient clipping, and warnings for runs that evaluate broken
or never leave chance.

Each test trains tiny real runs through public entry points (``normkd.distill``, the CLI,
``run_recipe``) and checks numbers they produce, with each precondition asserted so that a test
cannot pass without exercising its feature.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import normkd
from normkd.cli import main
from normkd.config import ConfigError, load_recipe, recipe_from_dict
from normkd.engine import calibrate, evaluate, run_recipe
from normkd.engine.checkpoint import load_checkpoint
from normkd.engine.schedule import lr_at
from normkd.models import create_model, load_weights
from support import DEMO, FAST, build_job, sets, write_image_folder

CPU = torch.device("cpu")


def _images(n: int, seed: int, classes: int = 4, offset: float = 0.0) -> TensorDataset:
    """16x16 images whose class is a bright colour channel (and, for class 3, a dark top half):
    learnable in a few steps. ``offset`` shifts every pixel: inputs far from BatchNorm's initial
    running mean 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + offset
    x[torch.arange(n), y % 3] += 1.5
    x[(y >= 3).nonzero().flatten(), :, :8] -= 1.0
    return TensorDataset(x, y)


def _student(momentum: float | None = 0.1) -> nn.Module:
    """tinycnn (width 8, three BatchNorms) with every BatchNorm's momentum set to ``momentum``."""
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, width=8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return model


def _distill(tmp_path: Path, name: str, student: nn.Module, train: Any, val: Any, **options: Any):
    """A vanilla (CE only) normkd.distill run on CPU, quiet, batches of 16."""
    options = {"epochs": 4, "batch_size": 16, "lr": 0.05, "workers": 0} | options
    return normkd.distill(
        None, student, train, val, method="vanilla", out_dir=str(tmp_path), run_name=name,
        quiet=True, device="cpu", **options,
    )  # fmt: skip


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    loader = [(x, y, torch.arange(len(y)))]
    return evaluate(model, loader, CPU)["top1"]


def _bn_momenta(model: nn.Module) -> list[float | None]:
    return [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# ---- BatchNorm recalibration -----------------------------------------------------------------


def test_slow_batchnorm_student_is_recalibrated_before_it_is_evaluated_and_saved(tmp_path, capsys):
    """A student whose BatchNorm momentum is 0.01 (torchvision's MobileNets) learns its training
    batches in 4 epochs of 16 steps, but its running statistics still sit near their initial
    (0, 1) while the inputs average 8: evaluated as trained it is far below its train accuracy,
    and the run says so. By default (auto) its statistics are re-estimated before each
    evaluation: the reported and the saved model score as on the training batches, the weights
    are the very ones the uncalibrated run trained, and every momentum is back at 0.01."""
    train, val = _images(256, 0, offset=8.0), _images(128, 1, offset=8.0)
    off = _distill(
        tmp_path, "off", _student(0.01), train, val, overrides=["engine.bn_recalibrate=off"]
    )
    off_err = capsys.readouterr().err
    train_top1 = off.history[-1]["train_top1"]
    assert train_top1 >= 95.0 and off.final_top1 <= 50.0, (train_top1, off.final_top1)
    assert f"scores {train_top1:.1f}% on training batches but {off.final_top1:.1f}%" in off_err

    auto = _distill(tmp_path, "auto", _student(0.01), train, val)
    auto_err = capsys.readouterr().err
    assert auto.history[-1]["train_top1"] == train_top1
    assert auto.final_top1 >= 95.0, auto.final_top1
    assert all(row["val_top1"] >= 90.0 for row in auto.history)  # every evaluation, best.pt too
    assert "normkd: warning" not in auto_err, auto_err
    saved = _student()
    load_weights(saved, auto.run_dir / "model.safetensors")
    assert _accuracy(saved, val) == _accuracy(auto.student, val) == auto.final_top1
    assert _accuracy(off.student, val) == off.final_top1
    assert _bn_momenta(auto.student) == [0.01] * 3
    trained = dict(off.student.named_parameters())
    assert all(torch.equal(p, trained[k]) for k, p in auto.student.named_parameters())


def test_recalibration_is_the_mean_of_the_eval_time_batch_statistics():
    """Over the first ``max_batches`` batches, each running statistic becomes the plain mean of
    the batch statistics of what evaluation feeds the layer (dropout before it off), whatever
    momentum and statistics it had; its momentum and every module's mode are restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3, momentum=0.01)).train()
    model[1].running_mean.fill_(-7.0)
    batches = [(torch.randn(8, 3) * 2 + 5, torch.zeros(8)) for _ in range(4)]
    assert calibrate.recalibrate(model, batches, 3, CPU, contextlib.nullcontext) == 3
    bn, xs = model[1], [x for x, _ in batches[:3]]
    assert torch.allclose(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    assert torch.allclose(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))
    assert bn.momentum == 0.01 and model.training and model[0].training and bn.training


def test_auto_leaves_default_momentum_runs_as_they_were(tmp_path):
    """BatchNorm momentum 0.1 (PyTorch's default, the zoo's): ``auto`` changes nothing, bit for
    bit; ``on`` re-estimates the statistics (they differ) and changes nothing else."""
    train, val = _images(128, 0), _images(64, 1)
    runs = {
        mode: _distill(tmp_path, mode, _student(), train, val, epochs=1, bn_recalibrate=mode)
        for mode in ("auto", "off", "on")
    }
    states = {m: load_checkpoint(tmp_path / m / "last.pt")["distiller"] for m in runs}
    assert all(torch.equal(v, states["off"][k]) for k, v in states["auto"].items())
    differ = {k for k, v in states["on"].items() if not torch.equal(v, states["off"][k])}
    assert differ and all("running_" in k or "num_batches" in k for k in differ), differ


def test_resume_is_bit_identical_with_recalibration_adamw_and_clipping(tmp_path):
    """2 epochs straight vs 1 + --resume, every new setting on. With eval_every 2 the run
    stopped after epoch 1 evaluates (and recalibrates) there, the uninterrupted one does not: the
    statistics it resumes from differ, and must leave no trace in the end state."""
    settings = [
        *FAST, "student.model=tinycnn", "student.kwargs={width: 4}", "optim.epochs=2",
        "engine.bn_recalibrate=on", "engine.bn_recalibrate_batches=3", "engine.eval_every=2",
        "optim.optimizer=adamw", "optim.lr=0.003", "optim.weight_decay_norm_bias=false",
        "optim.grad_clip=0.5", "optim.warmup_epochs=1", f"engine.out_dir={tmp_path}",
    ]  # fmt: skip
    full = load_recipe(DEMO / "teacher.yaml", [*settings, "engine.run_name=full"])
    part = load_recipe(DEMO / "teacher.yaml", [*settings, "engine.run_name=part"])
    run_recipe(full)
    run_recipe(part, stop_after_epoch=1)
    run_recipe(part, resume=True)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    differ = [k for k in a["distiller"] if not torch.equal(a["distiller"][k], b["distiller"][k])]
    assert not differ, f"resumed run differs in {differ}"
    assert a["optimizer"]["state"] and len(a["optimizer"]["param_groups"]) == 2


def test_two_processes_evaluate_and_save_rank_0s_recalibrated_statistics(tmp_path):
    """Under torchrun each rank re-estimates the statistics on its own shard of the training
    set; rank 0's are then given to every rank, so the val loss summed over the ranks' shards
    (a DistributedSampler-backed DataLoader) equals one process evaluating the saved ``last.pt``
    on the whole val set. With each rank's own statistics the shards are scored by different
    models (the top-1 of 6 images can hide that; the loss cannot)."""
    root = write_image_folder(tmp_path / "images", classes=3, size=20, split=(8, 2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    over = [
        "data.kind=folder", f"data.root={root}", "data.image_size=16", "data.workers=0",
        "data.batch_size=8", "data.eval_batch_size=2", "optim.epochs=2", "engine.device=cpu",
        "student.model=tinycnn", "student.kwargs={width: 8}", "engine.bn_recalibrate=on",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={port}", "--master_addr=127.0.0.1", "-m", "normkd", "train",
        str(DEMO / "teacher.yaml"), "--out-dir", str(tmp_path), "--quiet", *sets(*over),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "demo_teacher"
    job = build_job(load_recipe(run / "config.yaml"))
    assert len(job.data.test.dataset) == 6
    job.distiller.load_state_dict(load_checkpoint(run / "last.pt")["distiller"])
    whole = evaluate(job.student, job.data.test, CPU)
    assert float(_last_row(run)["val_loss"]) == pytest.approx(whole["loss"], rel=1e-5)


# ---- optimizers ------------------------------------------------------------------------------


def _moved(tmp_path: Path, name: str, **options: Any) -> tuple[float, Any]:
    """(L2 distance the student's parameters moved in one epoch of 16 steps, the run)."""
    student = _student()
    start = {k: p.detach().clone() for k, p in student.named_parameters()}
    options = {"epochs": 1, "schedule": "constant", "chance_check_epochs": 0} | options
    over = [f"engine.chance_check_epochs={options.pop('chance_check_epochs')}"]
    over += options.pop("overrides", [])
    run = _distill(
        tmp_path, name, student, _images(256, 0), _images(64, 1), overrides=over, **options
    )
    moved = sum(((p.detach() - start[k]) ** 2).sum() for k, p in run.student.named_parameters())
    return math.sqrt(float(moved)), run


def test_grad_clip_bounds_every_step(tmp_path):
    """Plain SGD (no momentum, no decay) moves each step by lr x gradient; clipped to norm 0.01
    at lr 0.1, 16 steps move at most 16 x 0.1 x 0.01 = 0.016, where unclipped they move ~1."""
    sgd = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}
    free, _ = _moved(tmp_path, "free", **sgd)
    clipped, _ = _moved(tmp_path, "clipped", grad_clip=0.01, **sgd)
    assert free > 0.2, free
    assert 0.0 < clipped <= 16 * 0.1 * 0.01 * (1 + 1e-4), clipped


def test_grad_clip_under_fp16_clips_the_true_gradients(tmp_path):
    """Under fp16 the GradScaler multiplies the loss by 65536. A bound of 1000 is far above the
    true gradients' norm, so it must change nothing; clipped before unscaling it would shrink
    every step ~100-fold."""
    free, a = _moved(tmp_path, "free", amp="fp16")
    clipped, b = _moved(tmp_path, "clipped", amp="fp16", grad_clip=1000.0)
    assert free > 0.2, free
    scaler = load_checkpoint(b.run_dir / "last.pt")["scaler"]
    assert scaler["scale"] >= 1000.0, scaler  # the gradients clipping sees are scaled ones
    assert clipped == pytest.approx(free, rel=1e-5)
    assert a.final_top1 == b.final_top1


def test_adamw_with_warmup_reaches_the_optimizer_and_learns(tmp_path):
    """optim.optimizer adamw: the run steps AdamW with the recipe's betas, eps and decay, its lr
    follows the linear warm-up (metrics.csv, the optimizer's last lr), and it learns."""
    over = ["optim.optimizer=adamw", "optim.betas=[0.8, 0.99]", "optim.eps=1e-6"]
    run = _distill(
        tmp_path, "adamw", _student(), _images(256, 0), _images(128, 1), epochs=4, lr=3e-3,
        warmup_epochs=2, weight_decay=0.05, overrides=over,
    )  # fmt: skip
    state = load_checkpoint(run.run_dir / "last.pt")["optimizer"]
    (group,) = state["param_groups"]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.8, 0.99), 1e-6, 0.05)
    assert "exp_avg_sq" in next(iter(state["state"].values()))  # Adam's moments, not momentum
    o = run.recipe.optim
    with open(run.run_dir / "metrics.csv", newline="") as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    steps = 256 // 16
    want = [lr_at(o, e, steps - 1, steps) for e in range(4)]
    assert want[0] == 1.5e-3 and want[1] == 3e-3 > want[2] > want[3]  # warm-up, then cosine
    assert lrs == pytest.approx(want, rel=1e-5)  # metrics.csv keeps 6 digits
    assert group["lr"] == pytest.approx(want[-1], rel=1e-9)
    assert run.final_top1 >= 90.0, run.final_top1


def test_weight_decay_norm_bias_false_spares_normalisation_and_biases(tmp_path):
    """With decoupled decay 10 at lr 0.01, 16 AdamW steps scale decayed weights by 0.9^16 ~ 0.19:
    BatchNorm scales fall from 1 to about 0.2. With ``weight_decay_norm_bias: false`` they and the
    biases form a second, undecayed group, and the scales stay near 1 (Adam moves each by at most
    ~0.01 a step)."""
    opts = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 10.0}
    _, decayed = _moved(tmp_path, "decayed", **opts)
    over = ["optim.weight_decay_norm_bias=false"]
    _, spared = _moved(tmp_path, "spared", overrides=over, **opts)

    def gammas(run: Any) -> float:
        bns = [m for m in run.student.modules() if isinstance(m, nn.BatchNorm2d)]
        return float(torch.cat([m.weight.detach() for m in bns]).mean())

    assert gammas(decayed) < 0.4 < 0.7 < gammas(spared), (gammas(decayed), gammas(spared))
    groups = load_checkpoint(spared.run_dir / "last.pt")["optimizer"]["param_groups"]
    one_d = [p for p in spared.student.parameters() if p.ndim <= 1]  # BN scales/shifts, fc.bias
    assert [g["weight_decay"] for g in groups] == [10.0, 0.0]
    assert len(groups[1]["params"]) == len(one_d) == 7
    assert len(load_checkpoint(decayed.run_dir / "last.pt")["optimizer"]["param_groups"]) == 1


# ---- runs that never learn -------------------------------------------------------------------


def _cli_run(tmp_path: Path, name: str, *settings: str) -> int:
    argv = ["train", str(DEMO / "teacher.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    over = [*FAST, "student.model=tinycnn", "student.kwargs={width: 8}"]
    return main([*argv, *sets(*over, f"engine.run_name={name}", *settings)])


def test_a_run_still_at_chance_after_3_epochs_gets_one_warning_and_goes_on(tmp_path, capsys):
    """lr 1e-6 cannot move the weights: top-1 stays about chance (10 digits). At the check, and
    only then, one line names the likely causes; the run still completes its 4 epochs
    (model.safetensors) and exits 0. The check waits for 3 epochs and 100 steps: this run's 4
    epochs of 5 steps are fewer, so it comes at the last epoch. A run at lr 0.05 that learns
    gets no such line."""
    assert _cli_run(tmp_path, "stuck", "optim.lr=1e-6", "optim.epochs=4") == 0
    err = capsys.readouterr().err
    state = load_checkpoint(tmp_path / "stuck" / "last.pt")
    assert state["epoch"] == 4 and (tmp_path / "stuck" / "model.safetensors").is_file()
    with open(tmp_path / "stuck" / "metrics.csv", newline="") as fh:
        top1s = [float(r["val_top1"]) for r in csv.DictReader(fh)]
    assert max(top1s) <= 15.0, top1s
    top1 = top1s[3]
    lines = [line for line in err.splitlines() if "within 1.5x chance" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"normkd: warning: after 4 epochs the student scores {top1:.1f}%")
    assert "optim.lr" in lines[0] and "labels" in lines[0]

    assert _cli_run(tmp_path, "learns", "optim.lr=0.05", "optim.epochs=3") == 0
    err = capsys.readouterr().err
    assert float(_last_row(tmp_path / "learns")["val_top1"]) >= 30.0
    assert "warning" not in err, err


def test_labels_that_do_not_match_the_images_warn_after_3_epochs(tmp_path, capsys):
    """Images shuffled between class folders: nothing to learn, so both the validation set and
    the training batches stay at chance, and the one warning names the likely causes."""
    root = write_image_folder(tmp_path / "images", classes=10, per_class=150, size=8)
    files = sorted(root.rglob("*.png"))
    rng = np.random.default_rng(0)
    for i, f in enumerate(files):  # every image to a random class, renamed so none collide
        f.rename(root / f"class_{rng.integers(10)}" / f"s{i:04d}.png")
    over = [
        "data.kind=folder", f"data.root={root}", "data.image_size=8", "data.workers=0",
        "optim.epochs=3", "optim.lr=0.05", "engine.run_name=shuffled",
    ]  # fmt: skip
    argv = ["train", str(DEMO / "teacher.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    over = [*FAST, "student.model=tinycnn", "student.kwargs={width: 8}", *over]
    assert main([*argv, *sets(*over)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "within 1.5x chance" in line]
    assert len(lines) == 1 and "labels that do not match the images" in lines[0], err


def _last_row(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))[-1]


# ---- settings --------------------------------------------------------------------------------


def _recipe(**sections: Any):
    return recipe_from_dict(
        {"name": "x", "task": "train", "student": {"model": "tinycnn"}, **sections}
    )


def test_new_settings_are_typed_and_checked():
    """A bare YAML on/off is the word; AdamW refuses SGD's nesterov; betas lie in [0, 1)."""
    assert _recipe(engine={"bn_recalibrate": False}).engine.bn_recalibrate == "off"
    assert _recipe(engine={"bn_recalibrate": True}).engine.bn_recalibrate == "on"
    assert _recipe().engine.bn_recalibrate == "auto" and _recipe().optim.optimizer == "sgd"
    bad = [
        ({"optim": {"optimizer": "adamw", "nesterov": True}}, "optim.nesterov is an SGD setting"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas must each lie in [0, 1)"),
        ({"optim": {"optimizer": "adam"}}, "optim.optimizer"),
        ({"optim": {"grad_clip": -1}}, "optim.grad_clip"),
        ({"engine": {"bn_recalibrate": "maybe"}}, "engine.bn_recalibrate"),
    ]
    for sections, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _recipe(**sections)
