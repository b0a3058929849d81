"""Training throughput of one NORM+KD distillation step: normkd's pipeline vs the classic loop.

Why: normkd keeps the whole CIFAR-scale set on the device and augments it there in batches
(airbench style), while the RepDistiller/CRD anchors decode, crop and flip every image in Python
(PIL) inside DataLoader workers. This measures both, with the same models and loss, side by side
in one run, plus the ceiling (batches already on the device, no augmentation), NORM's cost
(NORM+KD step vs KD-only step on the same batches) and what each data pipeline delivers alone.

Pairs: resnet32x4 -> resnet8x4 at 32x32 on random CIFAR-shaped uint8 data (100 classes), and the
demo's digits pair (configs/demo). Each variant runs blocks of steps in a rotating order; warm-up
blocks are dropped and the median block is reported.

    python benchmarks/bench_throughput.py            # about 3 minutes on 2 CPU cores
    python benchmarks/bench_throughput.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    CONFIGS,
    env_line,
    interleaved,
    md_table,
    median,
    met,
    parse_args,
    pyplot,
    resolve_device,
    save_figure,
    spread,
    write_report,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

VARIANTS = {
    "normkd": "normkd: DeviceLoader + on-device crop/flip + Distiller step (NORM+KD)",
    "classic": "classic: PIL transforms in DataLoader workers + eager step (NORM+KD)",
    "ceiling": "ceiling: batches already on the device, no augmentation, Distiller step (NORM+KD)",
    "kd_only": "KD only: same batches as the ceiling, plain student, Distiller step (CE+KD)",
    "fp32": "fp32 eager: the ceiling at engine.amp off, channels_last off (the old default)",
    "kd_only_fp32": "KD only at fp32: the KD-only step at engine.amp off, channels_last off",
    "normkd_data": "data alone: DeviceLoader + on-device crop/flip, no step",
    "classic_data": "data alone: DataLoader workers + PIL transforms, no step",
}
STEP_VARIANTS = ["normkd", "classic", "ceiling", "kd_only", "fp32", "kd_only_fp32"]
FP32 = ["engine.amp=off", "engine.channels_last=false"]


@dataclass
class Pair:
    """One teacher -> student setting: recipes, data and the classic pipeline's transforms."""

    key: str
    title: str
    norm_kd: Path
    kd: Path
    x_hwc: np.ndarray  # uint8 (N, H, W, C), what a torchvision CIFAR Dataset holds
    y: np.ndarray  # int64 (N,)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader workers of the classic loop (default min(4, cpu count))",
    )


def make_pairs(quick: bool) -> list[Pair]:
    """The CIFAR-shaped pair (random images) and the demo's digits pair."""
    from normkd.config import load_recipe
    from normkd.data import CIFAR100_MEAN, CIFAR100_STD, load_digits_split

    rng = np.random.default_rng(0)
    n = 512 if quick else 5000
    # The benchmark's pair; a smoke run builds the small CPU pair instead (its plumbing is the same).
    cifar_pair = "resnet20__resnet8" if quick else "resnet32x4__resnet8x4"
    cifar = Pair(
        key="cifar",
        title=f"{cifar_pair.replace('__', ' -> ')}, 32x32, 100 classes (random CIFAR-shaped uint8 data)",
        norm_kd=CONFIGS / "cifar100" / cifar_pair / "norm_kd.yaml",
        kd=CONFIGS / "cifar100" / cifar_pair / "kd.yaml",
        x_hwc=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        y=rng.integers(0, 100, n).astype(np.int64),
        num_classes=100,
        mean=tuple(CIFAR100_MEAN),
        std=tuple(CIFAR100_STD),
        pad=4,
        flip=True,
    )
    demo = load_recipe(CONFIGS / "demo" / "norm_kd.yaml")
    split = load_digits_split(seed=demo.data.split_seed, n_train=demo.data.n_train)
    digits = Pair(
        key="digits",
        title=(
            f"demo digits pair {demo.teacher.model if demo.teacher else '?'} -> "
            f"{demo.student.model}, 8x8, {split.num_classes} classes "
            f"({len(split.x_train)} training images)"
        ),
        norm_kd=CONFIGS / "demo" / "norm_kd.yaml",
        kd=CONFIGS / "demo" / "kd.yaml",
        x_hwc=split.x_train.permute(0, 2, 3, 1).contiguous().numpy(),
        y=split.y_train.numpy(),
        num_classes=split.num_classes,
        mean=split.mean,
        std=split.std,
        pad=1,  # what the engine's digits pipeline uses
        flip=False,
    )
    return [cifar, digits]


def build(
    recipe_path: Path, pair: Pair, device: torch.device, overrides: Sequence[str] = ()
) -> Any:
    """The engine's own Job for the pair's recipe (random teacher): what ``normkd distill`` runs,
    at the recipe's engine settings (amp, channels_last: auto) unless ``overrides`` say else."""
    from normkd.config import load_recipe
    from normkd.data.build import Data
    from normkd.engine import Runtime, assemble

    recipe = load_recipe(recipe_path, list(overrides))
    if recipe.teacher is not None:  # a random teacher: timing needs no trained weights
        recipe = load_recipe(recipe_path, ["teacher.weights=null", *overrides])
    e = recipe.engine
    in_shape = (pair.x_hwc.shape[3], pair.x_hwc.shape[1], pair.x_hwc.shape[2])
    labels = torch.as_tensor(pair.y)  # CRD draws its negatives from other classes
    data = Data(None, None, pair.num_classes, in_shape, train_size=len(pair.y), train_labels=labels)
    runtime = Runtime(device, amp=e.amp, channels_last=e.channels_last)
    job = assemble(recipe, runtime, data=data, dry_run=True)
    job.distiller.train()
    return job


def distiller_step(job: Any, x: torch.Tensor, y: torch.Tensor, idx: Any) -> None:
    """The trainer's own step (normkd.engine.train_step: lr, autocast, forward, backward, SGD)."""
    from normkd.engine import train_step

    train_step(job, x, y, idx, 0, job.lr(0, 0, 1))


class CIFARStyle(Dataset):
    """torchvision's CIFAR dataset in miniature: uint8 HWC numpy images -> PIL -> transforms."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, transform: Callable[[Any], Any]) -> None:
        self.data, self.targets, self.transform = x_hwc, y, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


class ClassicStep:
    """The anchors' eager step, written out: teacher under no_grad, student, three losses, SGD."""

    def __init__(self, recipe: Any, distiller: nn.Module) -> None:
        from normkd.models import get_taps
        from normkd.models.taps import get_module

        # Own copies, so its permanent hook never fires inside the other variants' steps.
        self.teacher = copy.deepcopy(distiller.teacher)
        self.student = copy.deepcopy(distiller.student)  # FTStudent: logits flow through FT
        o = recipe.optim
        self.opt = torch.optim.SGD(
            self.student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
        self.maps: dict[str, torch.Tensor] = {}
        feat = get_module(self.teacher, get_taps(self.teacher).feat)
        feat.register_forward_hook(lambda _m, _i, out: self.maps.__setitem__("t", out))
        w = {t.kind: t for t in recipe.loss}
        self.ce_w, self.kd_w, self.norm_w = w["ce"].weight, w["kd"].weight, w["norm"].weight
        self.temperature, self.n = w["kd"].temperature, w["norm"].n
        self.losses: list[float] = []  # the anchors log loss.item() every step (AverageMeter)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from normkd.losses import kd_loss
        from normkd.norm import norm_loss

        with torch.no_grad():
            t_logits = self.teacher(x)
        logits = self.student(x)
        loss = (
            self.ce_w * F.cross_entropy(logits, y)
            + self.kd_w * kd_loss(logits, t_logits, self.temperature)
            + self.norm_w * norm_loss(self.student.expanded, self.maps["t"], self.n)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss))


def epochs(make_iter: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """Batches forever, epoch after epoch (a new iterator each epoch, as a training loop does)."""
    epoch = 0
    while True:
        yield from make_iter(epoch)
        epoch += 1


def bench_pair(
    pair: Pair,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    repeats: int,
    workers: int,
    data_batches: int,
) -> tuple[dict[str, list[float]], dict[str, int], str]:
    """Images/s of every variant (``repeats`` blocks of ``steps`` steps) and step FLOPs."""
    torch.manual_seed(0)
    job = build(pair.norm_kd, pair, device)
    kd_job = build(pair.kd, pair, device)
    fp32_job = build(pair.norm_kd, pair, device, FP32)
    kd_fp32_job = build(pair.kd, pair, device, FP32)
    cl = bool(job.runtime.channels_last)
    s_device, s_classic, ready = _streams(pair, device, batch, workers, cl)
    fmt = torch.channels_last if cl else torch.contiguous_format
    ready_cl = [(xb.contiguous(memory_format=fmt), yb, ib) for xb, yb, ib in ready]
    classic_step = ClassicStep(job.recipe, job.distiller)

    def on(j: Any) -> Callable[..., Any]:
        return lambda xb, yb, ib: distiller_step(j, xb, yb, ib)

    def classic(xb: torch.Tensor, yb: torch.Tensor) -> Any:
        return classic_step(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))

    fns = {
        "normkd": _runner(s_device, on(job), steps),
        "classic": _runner(s_classic, classic, steps),
        "ceiling": _runner(cycle(ready_cl), on(job), steps),
        "kd_only": _runner(cycle(ready_cl), on(kd_job), steps),
        "fp32": _runner(cycle(ready), on(fp32_job), steps),
        "kd_only_fp32": _runner(cycle(ready), on(kd_fp32_job), steps),
    }
    rates = interleaved(fns, device, warmup, repeats, rate=True)
    # What each pipeline delivers on its own: explains how much of a step the data can cost.
    data_fns = {
        "normkd_data": _drain(s_device, device, data_batches),
        "classic_data": _drain(s_classic, device, data_batches),
    }
    rates |= interleaved(data_fns, device, warmup, repeats, rate=True)
    flops = {
        "norm_kd": step_flops(job, ready[0]),
        "norm_kd_direct": direct_flops(job, ready[0]),
        "kd_only": step_flops(kd_job, ready[0]),
    }
    return rates, flops, precision(job)


def _streams(
    pair: Pair, device: torch.device, batch: int, workers: int, channels_last: bool
) -> tuple[Iterator[Any], Iterator[Any], list[Any]]:
    """Endless batches from normkd's device-resident loader and from a classic torchvision
    DataLoader (the same augmentation), and 4 fixed batches on the device (normalised, not
    augmented) for the ceiling: a step with no data cost at all."""
    from torchvision import transforms as T

    from normkd.data import Augment, DeviceLoader

    x_nchw = torch.from_numpy(pair.x_hwc).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(pair.y)
    common = {"device": device, "mean": pair.mean, "std": pair.std, "shuffle": True}
    augment = Augment(pad=pair.pad, flip=pair.flip)
    loader = DeviceLoader(
        x_nchw, y, batch, drop_last=False, augment=augment, channels_last=channels_last, **common
    )

    def device_epoch(e: int) -> Iterator[Any]:
        loader.set_epoch(e)
        return iter(loader)

    h, w = pair.x_hwc.shape[1:3]
    tf = [T.RandomCrop((h, w), padding=pair.pad)]
    if pair.flip:
        tf.append(T.RandomHorizontalFlip())
    tf += [T.ToTensor(), T.Normalize(pair.mean, pair.std)]
    classic_loader = DataLoader(
        CIFARStyle(pair.x_hwc, pair.y, T.Compose(tf)),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    fixed = DeviceLoader(x_nchw, y, batch, drop_last=True, augment=None, **common)
    ready = [b for _, b in zip(range(4), fixed)]
    return epochs(device_epoch), epochs(lambda _e: iter(classic_loader)), ready


def _runner(stream: Iterator[Any], step: Callable[..., Any], steps: int) -> Callable[[], int]:
    """``steps`` training steps on batches from ``stream``; returns the images it trained on."""

    def run() -> int:
        n = 0
        for _ in range(steps):
            b = next(stream)
            step(*b)
            n += len(b[1])
        return n

    return run


def _drain(stream: Iterator[Any], device: torch.device, batches: int) -> Callable[[], int]:
    """Only fetch ``batches`` batches onto the device: what a data pipeline delivers alone."""

    def run() -> int:
        n = 0
        for _ in range(batches):
            n += len(next(stream)[0].to(device, non_blocking=True))
        return n

    return run


def precision(job: Any) -> str:
    """What the recipe's engine settings resolved to here (``amp: auto`` & co)."""
    rt = job.runtime
    amp = "fp32" if rt.amp == "off" else rt.amp
    return f"{amp}{' + channels_last' if rt.channels_last else ''}"


def step_flops(job: Any, batch: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one whole step, forward and backward (FlopCounterMode: convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        distiller_step(job, *batch)
    return int(counter.get_total_flops())


def direct_flops(job: Any, batch: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of the step with FT in its direct form (the N*C_t-channel map built, as the paper
    and the authors' code compute it): NORM's own FLOPs, which the factored form undercuts."""
    ft = job.student.ft
    ft.factored = False
    try:
        return step_flops(job, batch)
    finally:
        ft.factored = True


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both pairs, write throughput.md/.png."""
    args = parse_args(__doc__.split("\n\n")[0], argv, _extra)
    device = resolve_device(args.device)
    env0 = env_line(device)
    data_batches = 2 if args.quick else 20
    if args.quick:
        batch, plan = 8, {"cifar": (1, 1, 1), "digits": (2, 1, 1)}
    else:
        # (steps per block, warm-up blocks, timed blocks): CIFAR blocks last seconds on 2 cores,
        # digits blocks cover about one 300-image epoch, so each includes the classic loop's
        # per-epoch worker start-up, as in the anchors (persistent_workers off).
        batch, plan = 64, {"cifar": (3, 1, 5), "digits": (5, 2, 9)}
    results: dict[str, dict[str, list[float]]] = {}
    flops: dict[str, dict[str, int]] = {}
    precisions: dict[str, str] = {}
    pairs = make_pairs(args.quick)
    for pair in pairs:
        steps, warmup, repeats = plan[pair.key]
        print(f"[throughput] {pair.title}: {len(VARIANTS)} variants ...", flush=True)
        results[pair.key], flops[pair.key], precisions[pair.key] = bench_pair(
            pair, device, batch, steps, warmup, repeats, args.workers, data_batches
        )
        for k, v in results[pair.key].items():
            print(f"[throughput]   {k}: {median(v):.1f} img/s", flush=True)
    env = env_line(device, after=True)

    sections = [
        "# Training throughput of one distillation step"
        + (" (QUICK smoke run: tiny batches, not a result)" if args.quick else ""),
        "",
        env0,
        "",
        f"Batch {batch}; classic loop: {args.workers} DataLoader workers "
        f"(min(4, {os.cpu_count()} cores)), PIL RandomCrop(padding) [+ RandomHorizontalFlip], "
        "ToTensor, Normalize; normkd: the same crop/flip done on the device by `DeviceLoader` "
        "with `Augment`. Every variant trains the same teacher/student pair with the same loss "
        "(the recipe's CE + KD + NORM; KD-only drops NORM and FT), at the recipes' engine "
        "defaults (`engine.amp: auto`, `channels_last: auto`) except the two fp32 rows (amp "
        "off, channels_last off: normkd's default before) and the classic loop (fp32 eager, as "
        "the anchors run). Throughput is images / wall "
        "time of a block of steps, median over blocks (warm-up blocks dropped, variants in "
        "rotating order); ± is half the min-max range of the blocks.",
    ]
    summary_rows = []
    for pair in pairs:
        r = results[pair.key]
        steps, warmup, repeats = plan[pair.key]
        rows = [
            [
                VARIANTS[k],
                f"{median(v):.1f}",
                spread(v),
                f"{1000 * batch / median(v):.1f}",
            ]
            for k, v in r.items()
        ]
        sections += [
            "",
            f"## {pair.title}",
            "",
            f"{steps} steps per block ({data_batches} batches for the data-alone rows), "
            f"{warmup} warm-up + {repeats} timed blocks. The defaults resolved here to "
            f"{precisions[pair.key]}.",
            "",
            md_table(["variant", "images/s (median)", "spread", "ms per batch"], rows),
            "",
            env,
        ]
        summary_rows += summary(pair.key, r, flops[pair.key], precisions[pair.key])
    sections += [
        "",
        "## Summary",
        "",
        md_table(["pair", "figure", "measured", "target", "verdict"], summary_rows),
        "",
        env,
    ]
    write_report(args.out, "throughput", "\n".join(sections))
    _plot(pairs, results, args.out, env)
    return 0


def summary(
    key: str, r: dict[str, list[float]], flops: dict[str, int], precision: str
) -> list[list[str]]:
    """The issue's targets for one pair: the default step vs fp32 eager (>= 1.8x), NORM's step
    time over KD's within 3% of their FLOP ratio (NORM's FLOPs: FT in its direct form; at the
    defaults and at fp32), the pipeline."""
    ratio = median(r["normkd"]) / median(r["classic"])
    speedup = median(r["ceiling"]) / median(r["fp32"])
    flop_ratio = flops["norm_kd_direct"] / flops["kd_only"]
    bound = flop_ratio * 1.03
    rows = [
        [key, "normkd / classic throughput", f"{ratio:.2f}x", "≥ 2x", met(ratio >= 2)],
        [
            key,
            f"default step ({precision}) / fp32 eager step, NORM+KD",
            f"{speedup:.2f}x",
            "≥ 1.8x",
            met(speedup >= 1.8),
        ],
        [
            key,
            "NORM+KD step FLOPs / KD-only step FLOPs (forward + backward; FT direct, NORM's own)",
            f"{flop_ratio:.3f}",
            "—",
            "",
        ],
        [
            key,
            "NORM+KD step FLOPs / KD-only step FLOPs, as run (FT factored)",
            f"{flops['norm_kd'] / flops['kd_only']:.3f}",
            "—",
            "",
        ],
    ]
    for label, norm, kd in (
        (f"defaults ({precision})", "ceiling", "kd_only"),
        ("fp32", "fp32", "kd_only_fp32"),
    ):
        overhead = median(r[kd]) / median(r[norm])  # time ratio = inverse rate ratio
        rows.append(
            [
                key,
                f"NORM+KD step time / KD-only step time, {label}",
                f"{overhead:.3f}",
                f"≤ {bound:.3f} (FLOP ratio + 3%)",
                met(overhead <= bound),
            ]
        )
    share = median(r["normkd"]) / median(r["ceiling"])
    return [*rows, [key, "normkd pipeline / ceiling throughput", f"{share:.2f}", "—", ""]]


def _plot(
    pairs: list[Pair], results: dict[str, dict[str, list[float]]], out: Path, env: str
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:gray", "tab:purple", "tab:brown"]
    for ax, pair in zip(axes, pairs):
        r = results[pair.key]
        names = [k for k in STEP_VARIANTS if k in r]
        vals = [median(r[k]) for k in names]
        ax.bar(names, vals, color=colors[: len(names)])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("images / s (median)")
        ax.set_title(pair.title, fontsize=8)
    save_figure(fig, out, "throughput", env)


if __name__ == "__main__":
    sys.exit(main())
