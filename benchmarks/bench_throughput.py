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
    "normkd_data": "data alone: DeviceLoader + on-device crop/flip, no step",
    "classic_data": "data alone: DataLoader workers + PIL transforms, no step",
}
STEP_VARIANTS = ["normkd", "classic", "ceiling", "kd_only"]


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


def build(recipe_path: Path, pair: Pair, device: torch.device) -> Any:
    """The engine's own Job for the pair's recipe (random teacher): what ``normkd distill`` runs."""
    from normkd.config import load_recipe
    from normkd.data.build import Data
    from normkd.engine import Runtime, assemble

    recipe = load_recipe(recipe_path, ["teacher.weights=null"])
    in_shape = (pair.x_hwc.shape[3], pair.x_hwc.shape[1], pair.x_hwc.shape[2])
    data = Data(None, None, pair.num_classes, in_shape, train_size=len(pair.y))
    job = assemble(recipe, Runtime(device), data=data, dry_run=True)
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
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Images/s of every variant (``repeats`` blocks of ``steps`` steps) and step FLOPs."""
    from torchvision import transforms as T

    from normkd.data import Augment, DeviceLoader

    torch.manual_seed(0)
    job = build(pair.norm_kd, pair, device)
    kd_job = build(pair.kd, pair, device)

    x_nchw = torch.from_numpy(pair.x_hwc).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(pair.y)
    common = {"device": device, "mean": pair.mean, "std": pair.std, "shuffle": True}
    loader = DeviceLoader(
        x_nchw, y, batch, drop_last=False, augment=Augment(pad=pair.pad, flip=pair.flip), **common
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
    classic_step = ClassicStep(job.recipe, job.distiller)

    fixed = DeviceLoader(x_nchw, y, batch, drop_last=True, augment=None, **common)
    ready = [b for _, b in zip(range(4), fixed)]  # on the device, normalised, no augmentation

    s_device = epochs(device_epoch)
    s_classic = epochs(lambda _e: iter(classic_loader))
    s_ready, s_ready_kd = cycle(ready), cycle(ready)

    def run_normkd() -> int:
        n = 0
        for _ in range(steps):
            xb, yb, ib = next(s_device)
            distiller_step(job, xb, yb, ib)
            n += len(yb)
        return n

    def run_classic() -> int:
        n = 0
        for _ in range(steps):
            xb, yb = next(s_classic)
            classic_step(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))
            n += len(yb)
        return n

    def run_ready(stream: Iterator[Any], j: Any) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for _ in range(steps):
                xb, yb, ib = next(stream)
                distiller_step(j, xb, yb, ib)
                n += len(yb)
            return n

        return run

    fns = {
        "normkd": run_normkd,
        "classic": run_classic,
        "ceiling": run_ready(s_ready, job),
        "kd_only": run_ready(s_ready_kd, kd_job),
    }
    rates = interleaved(fns, device, warmup, repeats, rate=True)

    def drain(stream: Iterator[Any]) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for _ in range(data_batches):
                n += len(next(stream)[0].to(device, non_blocking=True))
            return n

        return run

    # What each pipeline delivers on its own: explains how much of a step the data can cost.
    data_fns = {"normkd_data": drain(s_device), "classic_data": drain(s_classic)}
    rates |= interleaved(data_fns, device, warmup, repeats, rate=True)
    flops = {
        "norm_kd": step_flops(job, ready[0]),
        "kd_only": step_flops(kd_job, ready[0]),
    }
    return rates, flops


def step_flops(job: Any, batch: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one whole step, forward and backward (FlopCounterMode: convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        distiller_step(job, *batch)
    return int(counter.get_total_flops())


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
    pairs = make_pairs(args.quick)
    for pair in pairs:
        steps, warmup, repeats = plan[pair.key]
        print(f"[throughput] {pair.title}: {len(VARIANTS)} variants ...", flush=True)
        results[pair.key], flops[pair.key] = bench_pair(
            pair, device, batch, steps, warmup, repeats, args.workers, data_batches
        )
        for k, v in results[pair.key].items():
            print(f"[throughput]   {k}: {median(v):.1f} img/s", flush=True)
    env = env_line(device)

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
        "(the recipe's CE + KD + NORM; KD-only drops NORM and FT). Throughput is images / wall "
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
            f"{warmup} warm-up + {repeats} timed blocks.",
            "",
            md_table(["variant", "images/s (median)", "spread", "ms per batch"], rows),
            "",
            env,
        ]
        ratio = median(r["normkd"]) / median(r["classic"])
        overhead = median(r["kd_only"]) / median(r["ceiling"])  # time ratio = inverse rate ratio
        share = median(r["normkd"]) / median(r["ceiling"])
        summary_rows += [
            [pair.key, "normkd / classic throughput", f"{ratio:.2f}x", "≥ 2x", met(ratio >= 2)],
            [
                pair.key,
                "NORM+KD step time / KD-only step time",
                f"{overhead:.3f}",
                "≤ 1.05",
                met(overhead <= 1.05),
            ],
            [
                pair.key,
                "NORM+KD step FLOPs / KD-only step FLOPs (forward + backward)",
                f"{flops[pair.key]['norm_kd'] / flops[pair.key]['kd_only']:.3f}",
                "—",
                "",
            ],
            [pair.key, "normkd pipeline / ceiling throughput", f"{share:.2f}", "—", ""],
        ]
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


def _plot(
    pairs: list[Pair], results: dict[str, dict[str, list[float]]], out: Path, env: str
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:gray"]
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
