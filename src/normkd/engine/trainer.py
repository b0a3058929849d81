"""The training loop: epochs of distiller steps, evaluation, logs and atomic checkpoints.

Every epoch is a pure function of (seed, epoch, state at its start): the data order, augmentation
and global RNG are re-seeded per epoch, and the learning rate is computed, not stepped. So a run
resumed from ``last.pt`` ends bit-identical (on CPU) to one that never stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from normkd.config import Recipe, recipe_from_dict, recipe_to_dict
from normkd.distiller import Distiller
from normkd.engine import distributed
from normkd.engine.build import (
    Prebuilt,
    build_data,
    build_distiller,
    build_models,
    build_optimizer,
    prepare_student,
    resolve_device,
)
from normkd.engine.checkpoint import (
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    save_model,
)
from normkd.engine.logs import MetricsCSV, TensorBoard
from normkd.engine.schedule import lr_at
from normkd.errors import UserError
from normkd.norm import FTStudent, max_logit_diff, merge_ft

RUN_FILES = (
    "config.yaml",
    "metrics.csv",
    "last.pt",
    "best.pt",
    "model.safetensors",
    "summary.json",
)


class NonFiniteLossError(UserError):
    """A loss term became NaN/inf; training stops and the last good checkpoint is kept."""


class RunExistsError(UserError):
    """The run directory already holds another run."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run; the message says what is saved and how to continue.

    Checkpoints are only ever replaced whole (temp file + rename), so ``last.pt`` still holds the
    last completed epoch. Still a KeyboardInterrupt, so Python callers can handle it as usual.
    """


def _interrupt_note(recipe: Recipe, dry_run: bool) -> str:
    """One line for an interrupted run: what ``last.pt`` holds and the flag that continues it."""
    run_dir = recipe.run_dir()
    last = run_dir / "last.pt"
    if dry_run:
        return "interrupted during a dry run; nothing was written"
    if last.is_file():
        try:
            epoch = load_checkpoint(last)["epoch"]
        except (UserError, KeyboardInterrupt):
            epoch = "?"
        return (
            f"interrupted; {last} holds epoch {epoch}/{recipe.optim.epochs} (the last completed "
            "one): run its recipe again with --resume to continue from there"
        )
    if (run_dir / "config.yaml").is_file():
        return (
            f"interrupted before the first epoch of {run_dir} finished; nothing to resume: "
            "run its recipe again with --overwrite to start again"
        )
    return "interrupted before the run started; nothing was written"


@dataclass
class RunResult:
    """What a finished run reports (also written to ``summary.json``)."""

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
    history: list[dict[str, Any]] = field(default_factory=list)


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp: str = "off",
    ctx: distributed.DistContext | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean CE loss over a loader of ``(x, y, idx)`` batches.

    With ``ctx``, the loader is a per-rank shard and the counts are summed over ranks.
    """
    was = model.training
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    try:
        for x, y, _idx in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            n += y.numel()
    finally:
        model.train(was)
    if ctx is not None:
        c = distributed.all_reduce_sum(
            {"n": n, "c1": correct1, "c5": correct5, "loss": loss_sum}, ctx, device
        )
        n, correct1, correct5, loss_sum = c["n"], c["c1"], c["c5"], c["loss"]
    n = max(n, 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"--resume: no checkpoint {run_dir / 'last.pt'} to resume from")
        return
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if existing and not overwrite:
        raise RunExistsError(
            f"run directory {run_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    for f in existing:
        (run_dir / f).unlink()
    if (run_dir / "tb").is_dir():
        shutil.rmtree(run_dir / "tb")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to run directory {run_dir}: {err.strerror}") from err


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    for k in ("quiet", "out_dir", "run_name"):
        d.get("engine", {}).pop(k, None)
    return d


def fit(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    stop_after_epoch: int | None = None,
    prebuilt: Prebuilt | None = None,
) -> RunResult:
    """Run ``recipe`` to the end (or to ``stop_after_epoch``), writing everything to its run dir.

    ``prebuilt`` supplies the data and models instead of building them from the recipe (this is
    how ``normkd.distill`` runs objects passed from Python through the same loop).

    ``dry_run`` builds data and models, runs one forward of the distiller on a batch and returns
    without training or writing anything (fake data stands in when the real folder is absent).
    Under torchrun (WORLD_SIZE > 1) the student trains with DDP and only rank 0 writes.
    """
    ctx, dist_device = distributed.setup(recipe.engine.device)
    try:
        return _fit(
            recipe, ctx, dist_device, resume, overwrite, dry_run, stop_after_epoch, prebuilt
        )
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupt_note(recipe, dry_run)) from None
    finally:
        distributed.teardown(ctx)


def _fit(
    recipe: Recipe,
    ctx: distributed.DistContext,
    dist_device: torch.device | None,
    resume: bool,
    overwrite: bool,
    dry_run: bool,
    stop_after_epoch: int | None,
    prebuilt: Prebuilt | None = None,
) -> RunResult:
    t_start = time.perf_counter()
    run_dir = recipe.run_dir()
    device = dist_device or resolve_device(recipe.engine.device)
    seed = recipe.engine.seed
    main = ctx.is_main
    quiet = recipe.engine.quiet or not main

    ckpt = None
    if resume:
        _prepare_run_dir(run_dir, resume=True, overwrite=False)
        ckpt = load_checkpoint(run_dir / "last.pt")
        saved = recipe_from_dict(ckpt["recipe"], f"{run_dir / 'last.pt'}")
        if _comparable(recipe_to_dict(saved)) != _comparable(recipe_to_dict(recipe)):
            raise UserError(
                f"--resume: the recipe differs from the one {run_dir} was started with; "
                "resume with the same recipe (see its config.yaml)"
            )

    torch.manual_seed(seed)
    if prebuilt is None:
        data = build_data(recipe, device, dry_run=dry_run, rank=ctx.rank, world_size=ctx.world_size)
        student, teacher, plain = build_models(
            recipe, data.num_classes, data.in_shape, allow_untrained=dry_run
        )
    else:
        data, teacher, plain = prebuilt.data, prebuilt.teacher, prebuilt.student
        student = prepare_student(recipe, plain, teacher, data.in_shape)
    distiller = build_distiller(recipe, student, teacher, data).to(device)
    if recipe.engine.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in plain.parameters())

    if dry_run:
        x, y, idx = next(iter(data.train))
        distiller.train()
        logits, losses = distiller(x, y, idx, 0)
        note = " (FAKE data: the real folder is absent)" if data.fake else ""
        if main:
            print(
                f"dry run ok{note}: {recipe.name}: student {recipe.student.model} "
                f"({n_params:,} params), batch {tuple(x.shape)} -> logits {tuple(logits.shape)}, "
                f"losses {', '.join(f'{k}={float(v.detach()):.4f}' for k, v in losses.items())}"
            )
        return RunResult(str(run_dir), 0, 0.0, -1, 0.0, 0.0, n_params, 0.0, fake_data=data.fake)

    if main:
        if not resume:
            _prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
        remove_stale_temps(run_dir)  # partial checkpoint writes of a killed earlier process
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
        )
        (run_dir / "data.json").write_text(json.dumps(data.info, default=str))
    distributed.barrier(ctx)

    opt_cfg = recipe.optim
    optimizer = build_optimizer(recipe, distiller)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.engine.amp == "fp16")

    start_epoch, best_top1, best_epoch = 0, -1.0, -1
    if ckpt is not None:
        distiller.load_state_dict(ckpt["distiller"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_top1, best_epoch = ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"]

    step_fn: nn.Module = distiller
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if recipe.engine.sync_bn:
            if device.type != "cuda":
                raise UserError("engine.sync_bn needs CUDA devices (PyTorch has no CPU SyncBN)")
            distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
        # The teacher is not a parameter of the distiller, so DDP never wraps or syncs it.
        step_fn = DDP(distiller, device_ids=[device.index] if device.type == "cuda" else None)
    if recipe.engine.compile:
        step_fn = torch.compile(step_fn)

    csv_log = MetricsCSV(run_dir / "metrics.csv", keep_below_epoch=start_epoch) if main else None
    tb = TensorBoard(run_dir / "tb", purge_step=start_epoch) if main else None
    history = list(csv_log.rows) if csv_log is not None else []
    last_epoch = (
        opt_cfg.epochs if stop_after_epoch is None else min(stop_after_epoch, opt_cfg.epochs)
    )
    lr_scale = (
        recipe.data.batch_size / opt_cfg.lr_reference_batch
        if opt_cfg.lr_scaling == "linear"
        else 1.0
    )
    sharded_eval = ctx.enabled and not hasattr(data.test, "set_epoch")
    test = {"top1": 0.0, "top5": 0.0, "loss": float("nan")}
    try:
        for epoch in range(start_epoch, last_epoch):
            torch.manual_seed(seed * 1_000_003 + epoch)
            _set_epoch(data.train, epoch)
            sums = _train_epoch(
                distiller,
                step_fn,
                optimizer,
                scaler,
                data.train,
                recipe,
                epoch,
                device,
                lr_scale,
                quiet,
            )
            elapsed = sums.pop("_seconds")
            sums = distributed.all_reduce_sum(sums, ctx, device)
            seen = max(sums.pop("_seen"), 1.0)
            stats = {k: v / seen for k, v in sums.items() if k != "_correct"}
            stats["train_top1"] = 100.0 * sums["_correct"] / seen
            stats["lr"] = lr_at(opt_cfg, epoch, len(data.train) - 1, len(data.train)) * lr_scale
            stats["images_per_s"] = seen / max(elapsed, 1e-9)
            if ctx.enabled:  # each rank's BatchNorm statistics moved on its own last batch
                for b in distiller.buffers():
                    torch.distributed.broadcast(b, src=0)
            if (epoch + 1) % recipe.engine.eval_every == 0 or epoch + 1 == last_epoch:
                test = evaluate(
                    distiller.student,
                    data.test,
                    device,
                    recipe.engine.amp,
                    ctx=ctx if sharded_eval else None,
                )
            if test["top1"] > best_top1:
                best_top1, best_epoch = test["top1"], epoch
            row = {
                "epoch": epoch,
                **stats,
                "test_top1": test["top1"],
                "test_top5": test["top5"],
                "test_loss": test["loss"],
                "best_top1": best_top1,
            }
            history.append(row)
            if main:
                assert csv_log is not None and tb is not None
                state = {
                    "epoch": epoch + 1,
                    "distiller": distiller.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_top1": best_top1,
                    "best_epoch": best_epoch,
                    "recipe": recipe_to_dict(recipe),
                }
                csv_log.append(row)
                tb.scalars(
                    {f"train/{k}": v for k, v in stats.items()}
                    | {
                        "test/top1": test["top1"],
                        "test/top5": test["top5"],
                        "test/loss": test["loss"],
                    },
                    epoch,
                )
                save_checkpoint(run_dir / "last.pt", state)
                if best_epoch == epoch:
                    save_checkpoint(run_dir / "best.pt", state)
            if not quiet:
                print(
                    f"[{recipe.name}] epoch {epoch + 1}/{opt_cfg.epochs} "
                    f"loss {stats['loss']:.4f} train {stats['train_top1']:.2f}% "
                    f"test {test['top1']:.2f}% (best {best_top1:.2f}%) "
                    f"{stats['images_per_s']:.0f} img/s",
                    flush=True,
                )
    finally:
        if tb is not None:
            tb.close()

    final = history[-1] if history else {}
    result = RunResult(
        run_dir=str(run_dir),
        epochs=last_epoch,
        best_top1=float(best_top1),
        best_epoch=best_epoch,
        final_top1=float(final.get("test_top1", 0.0)),
        final_top5=float(final.get("test_top5", 0.0)),
        params=n_params,
        seconds=time.perf_counter() - t_start,
        history=[{k: _num(v) for k, v in r.items()} | {"epoch": int(r["epoch"])} for r in history],
    )
    if last_epoch < opt_cfg.epochs:
        return result  # stopped early on purpose (tests, staged runs): no deployable model yet

    deploy: nn.Module = distiller.student
    meta = {
        "model": recipe.student.model,
        "class": f"{type(plain).__module__}.{type(plain).__qualname__}",
        "num_classes": data.num_classes,
        "kwargs": recipe.student.kwargs,
        "recipe": recipe.name,
    }
    if isinstance(distiller.student, FTStudent):
        deploy = merge_ft(distiller.student)
        x, _y, _i = next(iter(data.test))
        result.ft_top1 = result.final_top1
        result.merged_top1 = evaluate(deploy, data.test, device, ctx=ctx if sharded_eval else None)[
            "top1"
        ]
        result.merge_max_logit_diff = max_logit_diff(distiller.student, deploy, x.to(device))
        meta["merged_from_ft"] = True
    if main:
        save_model(run_dir / "model.safetensors", deploy, meta)
        summary = {k: v for k, v in asdict(result).items() if k != "history"}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier(ctx)
    return result


def _set_epoch(loader: Any, epoch: int) -> None:
    """Device loaders and DistributedSampler-backed DataLoaders both reshuffle per epoch."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _num(v: Any) -> Any:
    """CSV cells (strings after a resume) back to numbers."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _train_epoch(
    distiller: Distiller,
    step_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Any,
    recipe: Recipe,
    epoch: int,
    device: torch.device,
    lr_scale: float = 1.0,
    quiet: bool = False,
) -> dict[str, float]:
    """One epoch of steps; returns this process's sums (losses x samples, correct, seen, time)."""
    from tqdm import tqdm

    distiller.train()
    steps = len(loader)
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(
        loader,
        total=steps,
        desc=f"{recipe.name} {epoch + 1}/{recipe.optim.epochs}",
        disable=quiet,
        leave=False,
        dynamic_ncols=True,
    )
    for step, (x, y, idx) in enumerate(bar):
        x, y, idx = (t.to(device, non_blocking=True) for t in (x, y, idx))
        lr = lr_at(recipe.optim, epoch, step, steps) * lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, recipe.engine.amp):
            logits, losses = step_fn(x, y, idx, epoch)
        total = sum(losses.values())
        if not torch.isfinite(total.detach()).item():
            bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).item()]
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad) or 'total'} became non-finite at epoch {epoch + 1}, "
                f"step {step + 1}; stopped, the last good checkpoint is kept (try a lower lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        b = y.shape[0]
        seen += b
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * b
        sums["loss"] = sums.get("loss", 0) + total.detach().float() * b
        correct += (logits.detach().argmax(1) == y).sum()
        if not quiet and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{float(total.detach()):.3f}", lr=f"{lr:.3g}")
    out = {k: float(v) for k, v in sums.items()}
    out["_correct"] = float(correct)
    out["_seen"] = float(seen)
    out["_seconds"] = time.perf_counter() - t0
    return out
