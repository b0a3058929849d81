"""The training loop: epochs of steps, evaluation, logs, checkpoints, and the deployable model.

Every epoch is a pure function of (seed, epoch, state at its start): the data order, augmentation
and global RNG are re-seeded per epoch and the learning rate is computed, not stepped. So a run
resumed from ``last.pt`` ends bit-identical (on CPU) to one that never stopped.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from normkd.config import Recipe, recipe_to_dict
from normkd.data.build import Data
from normkd.engine import calibrate, deploy, runtime
from normkd.engine.job import Job, assemble
from normkd.engine.rundir import Best, RunDir, RunLock, interrupt_note, load_state
from normkd.engine.step import EpochMeter, evaluate, train_step
from normkd.log import logger
from normkd.models.taps import StudentWrapper
from normkd.signals import Terminated, sigterm_as_interrupt


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a run; the message says what is saved and how to go on.

    Checkpoints are only ever replaced whole (temp file + rename), so ``last.pt`` still holds the
    last completed epoch. Still a KeyboardInterrupt, so Python callers can handle it as usual.
    ``exit_code``: what the CLI exits with (2 after Ctrl-C, 143 = 128 + SIGTERM after SIGTERM).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunResult:
    """What a finished run reports (also written to ``summary.json``, without the model)."""

    run_dir: str
    epochs: int
    best_top1: float
    best_epoch: int
    final_top1: float
    final_top5: float
    params: int
    seconds: float
    ft_top1: float | None = None
    merged_top1: float | None = None
    merge_max_logit_diff: float | None = None
    fake_data: bool = False
    # When a term trained the student wrapped: where its modules sat (map / tokens / pooled), the
    # trained and the deployed model's top-1 and their largest logit difference (summary.json keys
    # named as runs already recorded them).
    ft_form: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # deployable, once complete
    model_meta: dict[str, Any] | None = field(default=None, repr=False)  # saved beside it


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    stop_after_epoch: int | None = None,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    data: Data | None = None,
) -> RunResult:
    """Run ``recipe`` to the end (or to ``stop_after_epoch``), writing its run directory.

    ``student``/``teacher``/``data`` replace what the recipe names (``normkd.distill``). A dry
    run builds everything, runs one forward on a batch and writes nothing. Under torchrun
    (WORLD_SIZE > 1) the student trains with DDP and only rank 0 writes.
    """
    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt(), runtime.start(recipe.engine) as rt:
            run = RunDir(recipe, resume=resume, overwrite=overwrite, main=rt.is_main)
            lock = RunLock(run.path) if rt.is_main and not dry_run else None
            if lock is not None:
                lock.acquire()  # before anything is read: a second writer is refused first
            try:
                if not dry_run:
                    run.check()
                job = assemble(
                    recipe, rt, student=student, teacher=teacher, data=data, dry_run=dry_run
                )
                if dry_run:
                    return _dry_run(job)
                run.open(job.data.info)
                return fit(job, run, stop_after_epoch, t0)
            finally:
                run.close()
                if lock is not None:
                    lock.release()
    except KeyboardInterrupt as err:
        raise TrainingInterrupted(
            interrupt_note(recipe, dry_run), exit_code=143 if isinstance(err, Terminated) else 2
        ) from None


def fit(
    job: Job, run: RunDir, stop_after_epoch: int | None = None, t0: float | None = None
) -> RunResult:
    """Train ``job`` from where ``run`` stands; finish the run when the schedule is complete.

    ``t0``: when the run started (``time.perf_counter()``), so its seconds include the build. A
    resumed run's seconds add those its checkpoint carries: a run's time is its whole time.
    """
    t0 = time.perf_counter() if t0 is None else t0
    recipe, rt = job.recipe, job.runtime
    start, best, before = _restore(job, run)
    last = min(stop_after_epoch or recipe.optim.epochs, recipe.optim.epochs)
    sharded = rt.distributed and not hasattr(job.data.test, "set_epoch")
    history = run.history
    test = {"top1": 0.0, "top5": 0.0, "loss": float("nan")}
    recal = _recalibration(job)
    # The tap hooks and the terms' own on the student stay registered over the epochs (a compiled
    # step traces them whole); the deployed copy is made after they are gone.
    with job.distiller.hooks_kept():
        for epoch in range(start, last):
            stats = train_epoch(job, epoch)
            done = epoch + 1  # epochs as a user counts them (metrics.csv, summary.json, lines)
            if done % recipe.engine.eval_every == 0 or done == last:
                if recal:
                    _recalibrate(job, epoch)
                # fp32 whatever engine.amp says: the top-1 reported is the model's as deployed, and
                # the deployed student's (scored in fp32 at the end) is then the trained one's.
                test = evaluate(
                    job.student, job.data.test, rt.device, ranks=rt if sharded else None
                )
                _check_chance(job, done, test["top1"], stats["train_top1"])
            improved = test["top1"] > best.top1
            if improved:
                best = Best(test["top1"], done)
            row = {"epoch": done, **stats} | {f"val_{k}": v for k, v in test.items()}
            row["best_top1"] = best.top1
            history.append(row)
            seconds = before + time.perf_counter() - t0
            run.save_epoch(row, stats, test, _state(job, epoch, best, seconds), improved)
            if not (recipe.engine.quiet or not rt.is_main):
                logger.info(
                    f"[{recipe.name}] epoch {done}/{recipe.optim.epochs} "
                    f"loss {stats['loss']:.4f} train {stats['train_top1']:.2f}% "
                    f"val {test['top1']:.2f}% (best {best.top1:.2f}%) "
                    f"{stats['images_per_s']:.0f} img/s"
                )
    final = history[-1] if history else {}
    result = RunResult(
        str(run.path), last, float(best.top1), best.epoch,
        float(final.get("val_top1", 0.0)), float(final.get("val_top5", 0.0)),
        _params(job), before + time.perf_counter() - t0, history=history,
    )  # fmt: skip
    if last == recipe.optim.epochs:  # a run stopped early on purpose has no deployable model
        _check_gap(job, final, recal)
        _finish(job, run, result, sharded)
    return result


def _params(job: Job) -> int:
    """Parameters of the deployed student: its own architecture, whatever trained beside it."""
    return sum(p.numel() for p in job.plain.parameters())


def train_epoch(job: Job, epoch: int) -> dict[str, float]:
    """One epoch of steps; returns the means over all ranks (losses, train_top1, lr, img/s)."""
    recipe, rt = job.recipe, job.runtime
    _seed_epoch(recipe, epoch)
    _set_epoch(job.data.train, epoch)
    job.distiller.train()
    loader, steps = job.data.train, len(job.data.train)
    quiet = recipe.engine.quiet or not rt.is_main
    meter = EpochMeter(list(job.distiller.terms), rt.device)
    desc = f"{recipe.name} {epoch + 1}/{recipe.optim.epochs}"
    # A bar only on a terminal: in a log file (a scheduler's, CI's) its redraws would flood it,
    # and the epoch's own line says the same once.
    bar_off = quiet or not sys.stderr.isatty()
    bar = tqdm(loader, total=steps, desc=desc, disable=bar_off, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    lr = 0.0
    for step, (x, y, idx) in enumerate(bar):
        x, y, idx = (t.to(rt.device, non_blocking=True) for t in (x, y, idx))
        lr = job.lr(epoch, step, steps)
        out = train_step(job, x, y, idx, epoch, lr)
        meter.add(step, out, y)
        if not bar_off and (step % 10 == 0 or step == steps - 1):  # the bar syncs anyway
            meter.check(epoch)
            bar.set_postfix(loss=f"{float(out.total):.3f}", lr=f"{lr:.3g}")
    meter.check(epoch)
    rt.share_buffers(job.distiller)
    seconds = time.perf_counter() - t0
    sums = rt.sum(meter.totals())
    seen = max(sums.pop("seen"), 1.0)
    correct = sums.pop("correct")
    stats = {k: v / seen for k, v in sums.items()}
    return stats | {"train_top1": 100.0 * correct / seen, "lr": lr, "images_per_s": seen / seconds}


def _seed_epoch(recipe: Recipe, epoch: int) -> None:
    """Seed torch's global RNG for ``epoch`` alone (data order of loaders that draw from it,
    worker seeds, augmentation, dropout), so the epoch does not depend on the ones before it."""
    torch.manual_seed(recipe.engine.seed * 1_000_003 + epoch)


def _recalibration(job: Job) -> bool:
    """Whether this run re-estimates the student's BatchNorm statistics before evaluating; says
    so when ``auto`` turned it on (the student's BatchNorm momentum is below 0.1)."""
    mode = job.recipe.engine.bn_recalibrate
    on = calibrate.wanted(mode, job.student)
    if on and mode == "auto" and job.runtime.is_main and not job.recipe.engine.quiet:
        logger.info(
            f"[{job.recipe.name}] the student has BatchNorm layers with momentum below 0.1: their "
            f"statistics are re-estimated on up to {job.recipe.engine.bn_recalibrate_batches} "
            "training batches before each evaluation (engine.bn_recalibrate=off skips it)"
        )
    return on


def _recalibrate(job: Job, epoch: int) -> None:
    """Re-estimate the student's BatchNorm statistics on up to
    ``engine.bn_recalibrate_batches`` of this epoch's own training batches (the epoch's order and
    augmentation replayed from its seed; torch's global RNG left as it was).

    In place, so ``last.pt``, ``best.pt`` and the merged model hold the statistics evaluated.
    Training never reads them (BatchNorm in train mode uses each batch's own) and the last
    epoch's recalibration starts from a reset, so a run resumed from any checkpoint still ends
    bit-identical to one that never stopped.
    """
    recipe, rt, loader = job.recipe, job.runtime, job.data.train
    with torch.random.fork_rng(devices=[]):
        _seed_epoch(recipe, epoch)
        _set_epoch(loader, epoch)
        batches = recipe.engine.bn_recalibrate_batches
        calibrate.recalibrate(job.student, loader, batches, rt.device, rt.autocast)
    rt.share_buffers(job.distiller)  # DDP: every rank evaluates and saves rank 0's statistics


def _warn(job: Job, text: str) -> None:
    """One line on stderr from the main process, also with ``engine.quiet`` (exit code unchanged)."""
    if job.runtime.is_main:
        logger.warning(text)


CHANCE_CHECK_STEPS = 100  # optimizer steps before a run may be called stuck


def _check_chance(job: Job, done: int, top1: float, train_top1: float) -> None:
    """Warn once if the evaluation top-1 *and* the training batches' top-1 are both within 1.5x
    chance after ``engine.chance_check_epochs`` epochs (at the first evaluation from then on; the
    last epoch of a shorter schedule). Both: early on, a healthy run's evaluation can sit near
    chance while its BatchNorm statistics still lag its weights (the demo's students score 10-14%
    at epoch 3 with 45-68% on their training batches), and a warning that cries wolf teaches users
    to ignore warnings; a stuck run's training batches are at chance too.

    Not before ``CHANCE_CHECK_STEPS`` optimizer steps either: no model is judged on a handful
    of steps (the demo's ViT, 5 steps an epoch under AdamW warm-up, is at 13-15% on both after
    3 epochs and ends near 40%). A run that does not learn otherwise goes on to the end and exits
    0 (a diverged lr that stays finite, an untrained teacher, labels that do not match the
    images). ``done`` alone decides when, so a resumed run warns as an uninterrupted one, once.
    """
    recipe, classes = job.recipe, job.data.num_classes
    k = recipe.engine.chance_check_epochs
    if k:
        k = max(k, math.ceil(CHANCE_CHECK_STEPS / max(len(job.data.train), 1)))
    k = min(k, recipe.optim.epochs)
    every = recipe.engine.eval_every
    due = min(math.ceil(k / every) * every, recipe.optim.epochs)
    if k == 0 or done != due or classes < 2:
        return
    chance = 100.0 / classes
    if top1 <= 1.5 * chance and train_top1 <= 1.5 * chance:
        teacher = ", an untrained or wrong teacher" if job.distiller.teacher is not None else ""
        _warn(
            job,
            f"after {done} epoch{'s' if done > 1 else ''} the student scores {top1:.1f}% top-1 on "
            f"the validation set ({train_top1:.1f}% on training batches), within 1.5x chance "
            f"({chance:.1f}% for {classes} classes); likely causes: an lr too high or too low "
            f"(optim.lr; AdamW wants about 1e-3){teacher}, labels that do not match the images; "
            "training goes on",
        )


def _check_gap(job: Job, final: dict[str, Any], recalibrated: bool) -> None:
    """Warn when the final model scores far better on training batches than in evaluation (more
    than 40 points apart, evaluation under 2x chance): a model that learnt but is evaluated
    broken, e.g. BatchNorm statistics that never caught up with its weights."""
    classes = job.data.num_classes
    train, val = final.get("train_top1"), final.get("val_top1")
    if train is None or val is None or classes < 2:
        return
    if train - val > 40.0 and val < 2 * 100.0 / classes:
        cause = "are the validation images prepared as the training ones (normalisation, size) "
        cause += "and labelled alike?"
        if calibrate.batchnorms(job.student):
            cause = (
                f"even with its BatchNorm statistics re-estimated; {cause}"
                if recalibrated
                else "its BatchNorm statistics may lag its weights (engine.bn_recalibrate=on "
                "re-estimates them), or the validation images are prepared or labelled differently"
            )
        _warn(
            job,
            f"the student scores {train:.1f}% on training batches but {val:.1f}% on the "
            f"validation set: {cause}",
        )


def _set_epoch(loader: Any, epoch: int) -> None:
    """Device loaders and DistributedSampler-backed DataLoaders both reshuffle per epoch."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _restore(job: Job, run: RunDir) -> tuple[int, Best, float]:
    """(first epoch to train, best so far, seconds spent so far): from the checkpoint a resume
    continues (one written before checkpoints carried seconds counts as 0), or fresh."""
    state = run.state
    if state is None:
        return 0, Best(), 0.0
    last = run.path / "last.pt"
    load_state(job.distiller, state["distiller"], last)
    load_state(job.optimizer, state["optimizer"], last)
    if "scaler" in state:
        load_state(job.runtime.scaler, state["scaler"], last)
    return state["epoch"], Best(state["best_top1"], state["best_epoch"]), state.get("seconds", 0.0)


def _state(job: Job, epoch: int, best: Best, seconds: float) -> dict[str, Any]:
    """The training state after ``epoch``: what last.pt / best.pt hold (``seconds``: the run's
    time so far, which a resume carries on from)."""
    return {
        "epoch": epoch + 1,
        "distiller": job.distiller.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scaler": job.runtime.scaler.state_dict(),
        "best_top1": best.top1,
        "best_epoch": best.epoch,
        "seconds": float(seconds),
        "recipe": recipe_to_dict(job.recipe),
    }


def _finish(job: Job, run: RunDir, result: RunResult, sharded: bool) -> None:
    """The terms' deploy (checked on a test batch), save model.safetensors and summary.json."""
    rt, model = job.runtime, job.student
    if job.wrapped:
        result.ft_form = model.form if isinstance(model, StudentWrapper) else None
        x = next(iter(job.data.test))[0].to(rt.device)
        model, result.merge_max_logit_diff = deploy.deploy_checked(job, x)
        result.ft_top1 = result.final_top1
        ranks = rt if sharded else None
        result.merged_top1 = evaluate(model, job.data.test, rt.device, ranks=ranks)["top1"]
    result.model = model
    meta = deploy.model_meta(job.recipe, job.plain, job.data, job.wrapped)
    result.model_meta = meta
    summary = {f.name: getattr(result, f.name) for f in fields(result)}
    del summary["history"], summary["model"], summary["model_meta"]
    run.finish(model, meta, summary)
    rt.barrier()


def _dry_run(job: Job) -> RunResult:
    """One forward of the distiller on a training batch; nothing is written."""
    x, y, idx = next(iter(job.data.train))
    job.distiller.train()
    logits, losses = job.distiller(x, y, idx, 0)
    if job.runtime.is_main:
        note = " (FAKE data, as --fake-data asked)" if job.data.fake else ""
        wrap = f"; {job.student.describe()}" if isinstance(job.student, StudentWrapper) else ""
        n_params = _params(job)
        logger.info(
            f"dry run ok{note}: {job.recipe.name}: student {job.recipe.student.model} "
            f"({n_params:,} params{wrap}), batch {tuple(x.shape)} -> logits {tuple(logits.shape)}, "
            f"losses {', '.join(f'{k}={float(v.detach()):.4f}' for k, v in losses.items())}"
        )
    run_dir = str(job.recipe.run_dir())
    return RunResult(run_dir, 0, 0.0, 0, 0.0, 0.0, _params(job), 0.0, fake_data=job.data.fake)
