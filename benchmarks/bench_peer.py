"""KD training throughput beside a real peer: torchdistill's own loop vs normkd's ``train_step``.

Why: the issue "Speed" asks normkd to train at least 1.5x as many images/s as torchdistill at each
tool's defaults and at least as many at equal precision. A claim about a peer holds only when the
peer runs its own code, so this runs, in one process, on the same pair of normkd's zoo
(resnet32x4 -> resnet8x4), batch 64, the same images (the real CIFAR-100 train split when
``../shared/data`` has it) and the same machine:

- torchdistill: its ``DistillationBox`` with ``KDLoss`` from its registry, configured as its
  CIFAR-100 KD sample config (configs/sample/cifar100/kd/*.yaml), over a torchvision CIFAR-style
  Dataset + DataLoader (RandomCrop 32 pad 4, flip, ToTensor, Normalize), stepped as its
  examples/torchvision/image_classification.py ``train_one_epoch`` does (``forward_process``,
  ``post_forward_process``, ``loss.item()`` into its MetricLogger, a NaN check);
- normkd: ``normkd.engine.train_step`` fed by the job's device-resident loader (``assemble``), with
  the loop's ``EpochMeter``;
- the classic PIL + DataLoader loop with an eager KD step (what RepDistiller/CRD run);
- the ceiling: pre-made batches on the device, ``train_step`` alone.

torchdistill lives in its own environment (``make bench-env`` -> .venv-bench); run elsewhere (as
``make bench`` does, in .venv) this measures normkd alone and the report says torchdistill was not
measured and why.

    .venv-bench/bin/python benchmarks/bench_peer.py            # a few minutes on 2 CPU cores
    .venv-bench/bin/python benchmarks/bench_peer.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_throughput import CIFARStyle, epochs
from common import (
    CONFIGS,
    SHARED_DATA,
    env_line,
    has_cifar100,
    interleaved,
    md_table,
    median,
    met,
    parse_args,
    pyplot,
    resolve_device,
    save_figure,
    spread,
    write_cifar100_python,
    write_report,
)
from torch import nn
from torch.utils.data import DataLoader

# key -> (tool, precision, what runs)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "td_fp32": (
        "torchdistill",
        "fp32",
        "torchdistill DistillationBox + KDLoss, PIL DataLoader (its default: fp32)",
    ),
    "td_bf16": (
        "torchdistill",
        "bf16",
        "torchdistill, bf16 autocast around its forward_process (added by this benchmark)",
    ),
    "td_bf16_accelerate": (
        "torchdistill",
        "bf16",
        "torchdistill + Accelerate(mixed_precision=bf16): its own AMP route",
    ),
    "normkd_default": (
        "normkd",
        "default",
        "normkd train_step + device-resident loader at its defaults (amp auto, channels_last auto)",
    ),
    "normkd_fp32": (
        "normkd",
        "fp32",
        "normkd train_step + device-resident loader, amp off",
    ),
    "normkd_bf16": ("normkd", "bf16", "normkd train_step + device-resident loader, amp bf16"),
    "classic_fp32": ("classic", "fp32", "classic: PIL transforms in DataLoader workers + eager KD"),
    "ceiling_fp32": (
        "ceiling",
        "fp32",
        "ceiling: pre-made batches on the device, train_step alone",
    ),
    "ceiling_bf16": ("ceiling", "bf16", "ceiling, amp bf16"),
}
COLORS = {"torchdistill": "tab:red", "normkd": "tab:blue", "classic": "tab:orange"}


@dataclass
class Setup:
    """What every variant shares: the pair, the images (and the folder they are read from)."""

    pair: str  # a folder of configs/cifar100
    root: Path  # holds cifar-100-python/: what normkd's data.root points at
    x: torch.Tensor  # uint8 (N, 3, 32, 32) training images, as load_cifar100 returns them
    y: torch.Tensor
    batch: int
    source: str
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def x_hwc(self) -> np.ndarray:
        """The images as a torchvision CIFAR Dataset holds them (uint8 N, H, W, C)."""
        return self.x.permute(0, 2, 3, 1).contiguous().numpy()


@dataclass
class Peer:
    """torchdistill (and Accelerate) as found in this environment, or why not."""

    td: Any = None
    td_why: str = ""
    accelerate: Any = None
    accelerate_why: str = ""


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader workers of torchdistill's and the classic loop (default min(4, cores))",
    )
    p.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 variants: auto = only where the device runs bf16 natively (what amp: auto "
        "picks; emulated bf16 is about 10x slower than fp32 on an AVX2-only CPU)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=SHARED_DATA,
        help=f"folder holding cifar-100-python/ (default {SHARED_DATA}); generated when absent",
    )


def find_peer() -> Peer:
    """Import torchdistill and Accelerate; on failure keep a one-line reason for the report."""
    peer = Peer()
    try:
        import torchdistill

        peer.td = torchdistill
    except Exception as err:  # not installed, or broken beside this torch
        peer.td_why = f"not installed ({err}; `make bench-env` sets it up)"
    try:
        import accelerate

        peer.accelerate = accelerate
    except Exception as err:
        peer.accelerate_why = f"accelerate not installed ({err})"
    return peer


def load_setup(args: argparse.Namespace) -> Setup:
    """The real CIFAR-100 train split when present (not with --quick), else generated images
    written in its pickle layout, so normkd reads both through its own CIFAR-100 reader."""
    from normkd.data import fake_split, load_cifar100

    pair = "resnet20__resnet8" if args.quick else "resnet32x4__resnet8x4"
    batch = 16 if args.quick else 64
    if not args.quick and has_cifar100(args.data_root):
        split = load_cifar100(args.data_root)
        source = f"the real CIFAR-100 train split ({len(split.y_train):,} images, {args.data_root})"
        return Setup(pair, args.data_root, split.x_train, split.y_train, batch, source)
    n = 128 if args.quick else 5000
    fake = fake_split(100, 32, n, 16, seed=0)
    tmp = tempfile.TemporaryDirectory(prefix="normkd-peer-")
    write_cifar100_python(Path(tmp.name), (fake.x_train, fake.y_train), (fake.x_test, fake.y_test))
    why = "--quick" if args.quick else f"no CIFAR-100 at {args.data_root}"
    source = f"{n:,} generated CIFAR-shaped uint8 images ({why})"
    return Setup(pair, Path(tmp.name), fake.x_train, fake.y_train, batch, source, [tmp.cleanup])


def pil_transform() -> Any:
    """torchdistill's CIFAR-100 training transforms (its sample configs), the classic loop's too."""
    from torchvision import transforms as T

    from normkd.data import CIFAR100_MEAN, CIFAR100_STD

    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            T.Normalize(CIFAR100_MEAN, CIFAR100_STD),
        ]
    )


def kd_recipe(setup: Setup, device: torch.device, amp: str) -> Any:
    """The pair's shipped KD recipe (0.1 CE + 0.9 KD, T = 4) on this data, random teacher."""
    from normkd.config import load_recipe

    return load_recipe(
        CONFIGS / "cifar100" / setup.pair / "kd.yaml",
        [
            "teacher.weights=null",
            f"data.root={setup.root}",
            f"data.batch_size={setup.batch}",
            f"engine.device={device}",
            f"engine.amp={amp}",  # auto: the recipe's default
        ],
    )


def normkd_job(setup: Setup, device: torch.device, amp: str) -> Any:
    """normkd's own Job (``assemble``): its data, models, terms, optimizer and runtime."""
    from normkd.engine import Runtime, assemble

    recipe = kd_recipe(setup, device, amp)
    e = recipe.engine
    runtime = Runtime(device, amp=e.amp, channels_last=e.channels_last, compile=e.compile)
    job = assemble(recipe, runtime, dry_run=True)  # dry_run: the random teacher is allowed
    job.distiller.train()
    return job


def normkd_runner(job: Any, steps: int) -> Callable[[], int]:
    """``steps`` of normkd's loop body: next device batch, ``train_step``, ``EpochMeter.add``."""
    from normkd.engine import train_step
    from normkd.engine.step import EpochMeter

    loader = job.data.train

    def epoch_iter(e: int) -> Iterator[Any]:
        loader.set_epoch(e)
        return iter(loader)

    stream = epochs(epoch_iter)
    meter = EpochMeter(list(job.distiller.terms), job.runtime.device)

    def run() -> int:
        n = 0
        for step in range(steps):
            x, y, idx = next(stream)
            out = train_step(job, x, y, idx, 0, job.lr(0, step, len(loader)))
            meter.add(step, out, y)
            n += len(y)
        meter.check(0)  # the loop reads the meter once an epoch; here once a block
        return n

    return run


def ceiling_runner(job: Any, steps: int) -> Callable[[], int]:
    """``train_step`` alone on four pre-made, normalised batches already on the device."""
    from itertools import cycle

    from normkd.data import CIFAR100_MEAN, CIFAR100_STD, DeviceLoader
    from normkd.engine import train_step

    src = job.data.train
    fixed = DeviceLoader(
        src.x, src.y, src.batch_size, device=src.device, mean=CIFAR100_MEAN, std=CIFAR100_STD,
        shuffle=True, drop_last=True, augment=None,
    )  # fmt: skip
    ready = cycle([b for _, b in zip(range(4), fixed)])

    def run() -> int:
        n = 0
        for _ in range(steps):
            x, y, idx = next(ready)
            train_step(job, x, y, idx, 0, job.lr(0, 0, 1))
            n += len(y)
        return n

    return run


def fresh_models(setup: Setup, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The pair's teacher (eval mode, as a KD teacher runs) and student from normkd's zoo."""
    from normkd.models import create_model

    t_name, s_name = setup.pair.split("__")
    torch.manual_seed(0)
    teacher = create_model(t_name, num_classes=100).to(device).eval()
    student = create_model(s_name, num_classes=100).to(device)
    return teacher, student


def td_train_config(setup: Setup, workers: int, pin: bool, recipe: Any) -> dict[str, Any]:
    """The ``train:`` section of torchdistill's CIFAR-100 KD sample config (its
    wide_resnet40_1_from_wide_resnet40_4-final_run.yaml), as a dict: its sampler, wrappers,
    optimizer, scheduler and ``KDLoss`` under ``WeightedSumLoss``, with normkd's KD weights
    (torchdistill's ``alpha`` weighs CE, ``beta`` the T^2-scaled KL), schedule and batch."""
    w = {t.kind: t for t in recipe.loss}
    o = recipe.optim
    kd = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": w["kd"].temperature,
        "alpha": w["ce"].weight,
        "beta": w["kd"].weight,
        "reduction": "batchmean",
    }
    model = {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": []}
    return {
        "num_epochs": o.epochs,
        "train_data_loader": {
            "dataset_id": "cifar100/train",
            "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": None},
            "kwargs": {
                "batch_size": setup.batch,
                "num_workers": workers,
                "pin_memory": pin,
                "drop_last": False,
            },
            "cache_output": None,
        },
        "teacher": model | {"wrapper": "DataParallel", "requires_grad": False},
        "student": model
        | {"adaptations": None, "wrapper": "DistributedDataParallel", "requires_grad": True},
        "optimizer": {
            "key": "SGD",
            "kwargs": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay},
        },
        "scheduler": {
            "key": "MultiStepLR",
            "kwargs": {"milestones": list(o.milestones), "gamma": o.lr_decay},
        },
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}
            },
        },
    }


class TorchdistillLoop:
    """torchdistill's examples/torchvision/image_classification.py ``train_one_epoch``, one step at
    a time: epochs run ``pre_epoch_process`` / ``post_epoch_process`` as its ``train`` does."""

    def __init__(self, box: Any, device: torch.device, autocast: str = "off") -> None:
        from torchdistill.misc.log import MetricLogger, SmoothedValue

        self.box, self.device = box, device
        self.autocast = autocast
        self.logger = MetricLogger(delimiter="  ")
        self.logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
        self.logger.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
        self.stream = epochs(self._epoch)

    def _epoch(self, epoch: int) -> Iterator[Any]:
        if epoch > 0:
            self.box.post_epoch_process()
        self.box.pre_epoch_process(epoch=epoch)
        return iter(self.box.train_data_loader)

    def __call__(self, steps: int) -> int:
        from normkd.engine.runtime import autocast

        box, n = self.box, 0
        for _ in range(steps):
            start = time.time()
            sample, targets, supp = next(self.stream)
            sample, targets = sample.to(self.device), targets.to(self.device)
            with autocast(self.device, self.autocast):
                loss = box.forward_process(sample, targets, supp)
            box.post_forward_process(loss=loss)
            self.logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
            self.logger.meters["img/s"].update(len(sample) / (time.time() - start))
            if torch.isnan(loss) or torch.isinf(loss):
                raise ValueError(f"The training loop was broken due to loss = {loss}")
            n += len(sample)
        return n


def td_runner(
    setup: Setup, device: torch.device, workers: int, steps: int, mode: str, peer: Peer
) -> Callable[[], int]:
    """A DistillationBox over normkd's zoo pair; ``mode``: fp32, bf16 (autocast added around its
    forward) or accelerate (its own AMP route, Hugging Face Accelerate with bf16)."""
    from torchdistill.core.distillation import get_distillation_box

    accelerator = None
    if mode == "accelerate":
        if peer.accelerate is None:
            raise RuntimeError(peer.accelerate_why)
        accelerator = peer.accelerate.Accelerator(cpu=device.type == "cpu", mixed_precision="bf16")
        device = accelerator.device
    teacher, student = fresh_models(setup, device)
    recipe = kd_recipe(setup, device, "off")
    config = td_train_config(setup, workers, device.type == "cuda", recipe)
    datasets = {"cifar100/train": CIFARStyle(setup.x_hwc, setup.y.numpy(), pil_transform())}
    box = get_distillation_box(
        teacher, student, datasets, config, device, None, False, 1, accelerator
    )
    loop = TorchdistillLoop(box, device, "bf16" if mode == "bf16" else "off")
    return lambda: loop(steps)


class ClassicKD:
    """The anchors' eager KD step written out (RepDistiller train_distill): teacher under no_grad,
    student, CE + KD with the recipe's weights, SGD, ``loss.item()`` logged every step."""

    def __init__(self, setup: Setup, device: torch.device) -> None:
        recipe = kd_recipe(setup, device, "off")
        self.teacher, self.student = fresh_models(setup, device)
        self.teacher.requires_grad_(False)
        o = recipe.optim
        self.opt = torch.optim.SGD(
            self.student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
        w = {t.kind: t for t in recipe.loss}
        self.ce_w, self.kd_w, self.t = w["ce"].weight, w["kd"].weight, w["kd"].temperature
        self.losses: list[float] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from normkd.losses import kd_loss

        with torch.no_grad():
            t_logits = self.teacher(x)
        logits = self.student(x)
        loss = self.ce_w * F.cross_entropy(logits, y) + self.kd_w * kd_loss(
            logits, t_logits, self.t
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())


def classic_runner(
    setup: Setup, device: torch.device, workers: int, steps: int
) -> Callable[[], int]:
    """The classic loop: a CIFAR-style Dataset, DataLoader workers, an eager step."""
    step = ClassicKD(setup, device)
    loader = DataLoader(
        CIFARStyle(setup.x_hwc, setup.y.numpy(), pil_transform()),
        batch_size=setup.batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    stream = epochs(lambda _e: iter(loader))

    def run() -> int:
        n = 0
        for _ in range(steps):
            x, y = next(stream)
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            n += len(y)
        return n

    return run


def build_runners(
    setup: Setup, device: torch.device, workers: int, steps: int, peer: Peer, bf16: str = "on"
) -> tuple[dict[str, Callable[[], int]], dict[str, str]]:
    """Every variant that can run here, and one line for each that cannot."""
    from normkd.engine.runtime import native_bf16

    fns: dict[str, Callable[[], int]] = {}
    missing: dict[str, str] = {}
    amps = ["off"]
    if bf16 == "on" or (bf16 == "auto" and native_bf16(device)):
        amps.append("bf16")
    else:
        why = (
            "--bf16 off"
            if bf16 == "off"
            else "this device has no native bf16 (--bf16 on forces it)"
        )
        for key in ("normkd_bf16", "ceiling_bf16", "td_bf16", "td_bf16_accelerate"):
            missing[key] = why
    jobs = {amp: normkd_job(setup, device, amp) for amp in ["auto", *amps]}
    fns["normkd_default"] = normkd_runner(jobs["auto"], steps)
    fns["normkd_fp32"] = normkd_runner(jobs["off"], steps)
    fns["classic_fp32"] = classic_runner(setup, device, workers, steps)
    fns["ceiling_fp32"] = ceiling_runner(jobs["off"], steps)
    if "bf16" in jobs:
        fns["normkd_bf16"] = normkd_runner(jobs["bf16"], steps)
        fns["ceiling_bf16"] = ceiling_runner(jobs["bf16"], steps)
    for key, mode in (
        ("td_fp32", "fp32"),
        ("td_bf16", "bf16"),
        ("td_bf16_accelerate", "accelerate"),
    ):
        if key in missing:
            continue
        if peer.td is None:
            missing[key] = f"torchdistill {peer.td_why}"
            continue
        try:
            fns[key] = td_runner(setup, device, workers, steps, mode, peer)
            fns[key]()  # one block now, so a route that breaks says so here, not mid-timing
        except Exception as err:
            where = "Accelerate route" if mode == "accelerate" else f"{mode} loop"
            missing[key] = f"torchdistill's {where} failed: {type(err).__name__}: {err}"
            fns.pop(key, None)
            print(f"[peer] {key}: {missing[key]}", flush=True)
    return fns, missing


def versions(peer: Peer) -> str:
    """The peer's and the host's versions, stated beside the figures."""
    import platform

    import torchvision

    td = getattr(peer.td, "__version__", None)
    acc = getattr(peer.accelerate, "__version__", None)
    return (
        f"torchdistill {td or 'not installed'}; accelerate {acc or 'not installed'}; "
        f"torchvision {torchvision.__version__}; Python {platform.python_version()}; "
        f"interpreter {sys.executable}."
    )


def ratio_row(
    label: str,
    num: str,
    dens: Sequence[str],
    target: float | None,
    rates: dict[str, list[float]],
    missing: dict[str, str],
    peer: Peer,
) -> list[str]:
    """One summary row: median(num) / the fastest measured of ``dens``, against ``target``."""
    measured = [d for d in dens if d in rates]
    goal = f"≥ {target:.1f}x" if target is not None else "—"
    if num not in rates or not measured:
        if peer.td is None and any(k.startswith("td_") for k in (num, *dens)):
            return [
                label,
                f"not measured: torchdistill {peer.td_why}",
                goal,
                "torchdistill: not installed",
            ]
        why = "; ".join(
            dict.fromkeys(missing.get(k, f"{k} not run") for k in (num, *dens) if k not in rates)
        )
        return [label, f"not measured: {why}", goal, "not measured"]
    den = max(measured, key=lambda d: median(rates[d]))
    value = median(rates[num]) / median(rates[den])
    verdict = met(value >= target) if target is not None else ""
    note = f" (vs {den})" if len(dens) > 1 else ""
    return [label, f"{value:.2f}x{note}", goal, verdict]


def summary_rows(
    rates: dict[str, list[float]], missing: dict[str, str], peer: Peer
) -> list[list[str]]:
    """The issue's targets, then the figures that explain them."""
    rows = [
        (
            "normkd / torchdistill, each tool's defaults (normkd: amp auto; torchdistill: fp32)",
            "normkd_default",
            ["td_fp32"],
            1.5,
        ),
        ("normkd / torchdistill, equal precision fp32", "normkd_fp32", ["td_fp32"], 1.0),
        (
            "normkd / torchdistill, equal precision bf16 (the faster torchdistill bf16 route)",
            "normkd_bf16",
            ["td_bf16", "td_bf16_accelerate"],
            1.0,
        ),
        (
            "torchdistill / classic loop, fp32 (its framework's cost)",
            "td_fp32",
            ["classic_fp32"],
            None,
        ),
        ("normkd / classic loop, fp32", "normkd_fp32", ["classic_fp32"], None),
        ("normkd / ceiling, fp32", "normkd_fp32", ["ceiling_fp32"], None),
        ("normkd / ceiling, bf16", "normkd_bf16", ["ceiling_bf16"], None),
        ("normkd defaults / normkd fp32", "normkd_default", ["normkd_fp32"], None),
    ]
    return [ratio_row(label, n, d, t, rates, missing, peer) for label, n, d, t in rows]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every variant that runs here, interleaved; write peer.md/.png."""
    args = parse_args(__doc__.split("\n\n")[0], argv, _extra)
    device = resolve_device(args.device)
    env0 = env_line(device)
    peer = find_peer()
    if peer.td is None:
        print(f"[peer] torchdistill: {peer.td_why}; measuring normkd alone", flush=True)
    setup = load_setup(args)
    if args.quick:
        steps, warmup, repeats = 1, 1, 1
    elif device.type == "cuda":
        steps, warmup, repeats = 25, 2, 7
    else:
        steps, warmup, repeats = 3, 1, 5
    try:
        print(f"[peer] {setup.pair}, batch {setup.batch}, {setup.source}", flush=True)
        bf16 = "on" if args.quick and args.bf16 == "auto" else args.bf16  # smoke: every route
        fns, missing = build_runners(setup, device, args.workers, steps, peer, bf16)
        rates = interleaved(fns, device, warmup, repeats, rate=True)
    finally:
        for done in setup.cleanup:
            done()
    for k, v in rates.items():
        print(f"[peer]   {k}: {median(v):.1f} img/s", flush=True)
    env = env_line(device, after=True)
    write_report(
        args.out,
        "peer",
        report(args, setup, peer, rates, missing, env0, env, plan=(steps, warmup, repeats)),
    )
    plot(rates, args.out, env, setup)
    return 0


def report(
    args: argparse.Namespace,
    setup: Setup,
    peer: Peer,
    rates: dict[str, list[float]],
    missing: dict[str, str],
    env0: str,
    env: str,
    plan: tuple[int, int, int],
) -> str:
    """peer.md: how it was measured, every variant's images/s, the targets' verdicts."""
    steps, warmup, repeats = plan
    rows = []
    for key, (tool, precision, what) in VARIANTS.items():
        if key in rates:
            v = rates[key]
            cells = [f"{median(v):.1f}", spread(v), f"{1000 * setup.batch / median(v):.1f}"]
        else:
            cells = [f"not measured: {missing.get(key, 'not run')}", "—", "—"]
        rows.append([what, tool, precision, *cells])
    t_name, s_name = setup.pair.split("__")
    return "\n".join(
        [
            "# KD training throughput: normkd vs torchdistill, side by side"
            + (" (QUICK smoke run: tiny batches, not a result)" if args.quick else ""),
            "",
            env0,
            "",
            versions(peer),
            "",
            f"{t_name} -> {s_name} (normkd's zoo, random weights) on {setup.source}; batch "
            f"{setup.batch}; the loss is the pair's `kd.yaml` (0.1 CE + 0.9 KD, T = 4) in every "
            "variant (torchdistill: `KDLoss` alpha 0.1, beta 0.9). torchdistill and the classic "
            f"loop read the images through a torchvision CIFAR-style Dataset in {args.workers} "
            "DataLoader workers (RandomCrop 32 pad 4, RandomHorizontalFlip, ToTensor, Normalize); "
            "normkd crops and flips on the device (`DeviceLoader` + `Augment`). Each tool runs at "
            f"its defaults (normkd: `engine.amp: auto`, which here is {_auto(args)}; torchdistill: "
            "fp32), then at equal precision. torchdistill has no autocast option of its own: its only mixed-precision "
            "route is a Hugging Face `Accelerator` passed to the box; the `td_bf16` row wraps its "
            "`forward_process` in `torch.autocast` (backward outside, as normkd's step does). "
            f"Throughput is images / wall time of a block of {steps} steps, median over "
            f"{repeats} blocks after {warmup} warm-up block(s), variants in rotating order; ± is "
            "half the min-max range of the blocks.",
            "",
            md_table(
                ["variant", "tool", "precision", "images/s (median)", "spread", "ms per batch"],
                rows,
            ),
            "",
            env,
            "",
            "## Summary",
            "",
            md_table(
                ["figure", "measured", "target", "verdict"], summary_rows(rates, missing, peer)
            ),
            "",
            env,
        ]
    )


def _auto(args: argparse.Namespace) -> str:
    """What ``engine.amp: auto`` and ``channels_last: auto`` resolve to on this device."""
    from normkd.engine.runtime import resolve_amp, resolve_channels_last

    amp = resolve_amp("auto", resolve_device(args.device))
    cl = resolve_channels_last("auto", amp)
    return f"{'fp32' if amp == 'off' else amp}{' + channels_last' if cl else ''}"


def plot(rates: dict[str, list[float]], out: Path, env: str, setup: Setup) -> None:
    """Bars of images/s per measured variant, coloured by tool."""
    plt = pyplot()
    keys = [k for k in VARIANTS if k in rates]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(keys) + 1.6))
    vals = [median(rates[k]) for k in keys]
    ax.barh(keys, vals, color=[COLORS.get(VARIANTS[k][0], "tab:gray") for k in keys])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images / s (median)")
    ax.set_title(f"KD training throughput, {setup.pair.replace('__', ' -> ')}, batch {setup.batch}")
    save_figure(fig, out, "peer", env)


if __name__ == "__main__":
    sys.exit(main())
