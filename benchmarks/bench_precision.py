"""Accuracy under ``engine.amp: auto`` (the default) vs ``off`` (fp32): does the fast path cost
accuracy?

Why: ``amp: auto`` trains in bf16 autocast wherever the device runs bf16 natively, so a default
run on such a machine is not an fp32 run. This trains the same students both ways, paired (same
seed, same data order, the same fp32-trained teacher), and reports the per-seed difference:

- digits (default): the demo recipes vanilla / KD / NORM / NORM+KD x 5 seeds, each under both
  settings (``precision.md``);
- ``--cifar ROOT``: one short run of NORM+KD resnet20 -> resnet8 on the real CIFAR-100 (ROOT holds
  cifar-100-python/), teacher trained first in fp32, the student under both settings
  (``precision_cifar100.md``). Its runs are kept in ``--work`` and resumed when rerun.

On a device without native bf16, ``auto`` is fp32 and both columns are the same run twice; the
report says which precision ``auto`` took.

    python benchmarks/bench_precision.py                        # digits, a few minutes on 2 cores
    python benchmarks/bench_precision.py --cifar ../shared/data --epochs 3   # about 30 minutes
    python benchmarks/bench_precision.py --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    CONFIGS,
    env_line,
    has_cifar100,
    md_table,
    mean_std,
    met,
    parse_args,
    pyplot,
    resolve_device,
    save_figure,
    write_report,
)

from normkd.losses import method_label

METHODS = ["vanilla", "kd", "norm", "norm_kd"]
AMPS = ("off", "auto")
# auto may cost at most this much top-1 on average (paired, points): about the seeds' own spread.
TOLERANCE = 0.5


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; quick 1)")
    p.add_argument("--methods", nargs="+", default=METHODS, help="digits: demo recipes to compare")
    p.add_argument("--cifar", type=Path, default=None, help="folder holding cifar-100-python/")
    p.add_argument("--epochs", type=int, default=3, help="CIFAR-100 epochs (teacher and student)")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("runs/bench_precision"),
        help="where the CIFAR-100 runs live (resumed when rerun)",
    )


def auto_means(device: Any) -> str:
    """What ``amp: auto`` / ``channels_last: auto`` resolve to on ``device``."""
    from normkd.engine.runtime import resolve_amp, resolve_channels_last

    amp = resolve_amp("auto", device)
    cl = resolve_channels_last("auto", amp)
    return f"{'fp32' if amp == 'off' else amp}{' + channels_last' if cl else ''}"


def _run(path: Path, overrides: list[str], resume: bool = False) -> Any:
    from normkd.config import load_recipe
    from normkd.engine.loop import run_recipe

    recipe = load_recipe(path, overrides)
    return recipe, run_recipe(recipe, resume=resume, overwrite=not resume)


def digits(args: argparse.Namespace, device: Any) -> str:
    """Train the demo teacher once (fp32), then every method x seed x amp; the report's text."""
    seeds = args.seeds or (1 if args.quick else 5)
    methods = args.methods
    final: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normkd-bench-prec-") as tmp:
        common = [f"engine.out_dir={tmp}", "engine.quiet=true", f"engine.device={device}"]
        common += ["optim.epochs=1", "optim.warmup_epochs=0"] if args.quick else []
        _t, teacher = _run(CONFIGS / "demo" / "teacher.yaml", [*common, "engine.amp=off"])
        t_file = Path(teacher.run_dir) / "model.safetensors"
        for seed in range(seeds):
            for method in methods:
                for amp in AMPS:
                    run = [*common, f"engine.amp={amp}", f"engine.seed={seed}"]
                    run += [f"engine.run_name={method}_{amp}_s{seed}", f"teacher.weights={t_file}"]
                    if method == "vanilla":
                        run.remove(f"teacher.weights={t_file}")
                    _r, res = _run(CONFIGS / "demo" / f"{method}.yaml", run)
                    final.setdefault((method, amp), []).append(res.final_top1)
                    seconds.setdefault((method, amp), []).append(res.seconds)
                    print(
                        f"[precision] {method} seed {seed} amp {amp}: {res.final_top1:.2f}% "
                        f"({res.seconds:.1f} s)",
                        flush=True,
                    )
    rows, worst = [], []
    diffs = {}
    for m in methods:
        off, auto = final[(m, "off")], final[(m, "auto")]
        d = diffs[m] = [a - b for a, b in zip(auto, off, strict=True)]
        worst.append(statistics.mean(d))
        rows.append(
            [
                method_label(m),
                mean_std(off),
                mean_std(auto),
                mean_std(d),
                ", ".join(f"{v:+.2f}" for v in d),
                f"{statistics.mean(seconds[(m, 'off')]):.1f} / "
                f"{statistics.mean(seconds[(m, 'auto')]):.1f}",
            ]
        )
    ok = min(worst) >= -TOLERANCE
    _plot(diffs, args.out, env_line(device))
    n_test = 1797 - _t.data.n_train  # the embedded digits: 1,797 images
    headers = ["method", "off (fp32) top-1 %", "auto top-1 %", "auto - off, paired"]
    headers += ["per-seed auto - off", "s / run (off / auto)"]
    return "\n".join(
        [
            f"## Digits: demo recipes, {len(methods)} methods x {seeds} seeds x 2 settings",
            "",
            f"Teacher `{_t.student.model}` trained once in fp32: top-1 {teacher.final_top1:.2f}%. "
            f"Final top-1 on the {n_test:,} test digits; wall time {time.perf_counter() - t0:.0f} s.",
            "",
            md_table(headers, rows),
            "",
            "## Targets",
            "",
            md_table(
                ["target", "measured", "verdict"],
                [
                    [
                        f"auto - off ≥ -{TOLERANCE} points (paired mean, every method)",
                        f"worst method {min(worst):+.2f}",
                        met(ok),
                    ]
                ],
            ),
        ]
    )


def cifar(args: argparse.Namespace, device: Any) -> str:
    """Teacher resnet20 (fp32), then NORM+KD resnet8 under off and auto; the report's text."""
    if not has_cifar100(args.cifar):
        raise SystemExit(f"--cifar {args.cifar}: no cifar-100-python/ there (see ../shared/ENV.md)")
    e = 1 if args.quick else args.epochs
    common = [f"data.root={args.cifar}", f"engine.device={device}", "engine.quiet=true"]
    common += [f"optim.epochs={e}", "optim.schedule=cosine", f"engine.out_dir={args.work}"]
    pair = CONFIGS / "cifar100" / "resnet20__resnet8"
    t_over = [*common, "engine.amp=off", "engine.run_name=teacher_resnet20"]
    t_path = CONFIGS / "cifar100" / "teachers" / "resnet20.yaml"
    _t, teacher = _run(t_path, t_over, resume=(args.work / "teacher_resnet20").is_dir())
    t_file = Path(teacher.run_dir) / "model.safetensors"
    rows, res = [], {}
    for amp in AMPS:
        over = [*common, f"engine.amp={amp}", f"teacher.weights={t_file}"]
        over.append(f"engine.run_name=norm_kd_{amp}")
        resume = (args.work / f"norm_kd_{amp}").is_dir()
        _r, res[amp] = _run(pair / "norm_kd.yaml", over, resume=resume)
        r = res[amp]
        per_epoch = [row["images_per_s"] for row in r.history]
        rows.append(
            [
                amp if amp == "off" else f"auto ({auto_means(device)})",
                f"{r.best_top1:.2f}",
                f"{r.final_top1:.2f}",
                f"{statistics.mean(per_epoch):.0f}" if per_epoch else "—",
            ]
        )
    d = res["auto"].final_top1 - res["off"].final_top1
    return "\n".join(
        [
            f"## Real CIFAR-100: NORM+KD resnet20 -> resnet8, {e} epochs, one seed",
            "",
            f"Teacher resnet20 trained {e} epochs in fp32 (cosine lr): top-1 "
            f"{teacher.final_top1:.2f}%. Student runs: `configs/cifar100/resnet20__resnet8/"
            f"norm_kd.yaml` with `optim.epochs={e} optim.schedule=cosine`, seed 0, the same "
            "teacher, `engine.amp` off vs auto. 50,000 training / 10,000 test images.",
            "",
            md_table(["engine.amp", "best top-1 %", "final top-1 %", "train images/s"], rows),
            "",
            "## Targets",
            "",
            md_table(
                ["target", "measured", "verdict"],
                [
                    [
                        f"auto - off ≥ -{TOLERANCE} points (final top-1, one seed)",
                        f"{d:+.2f}",
                        met(d >= -TOLERANCE),
                    ]
                ],
            ),
        ]
    )


def _plot(diffs: dict[str, list[float]], out: Path, env: str) -> None:
    """Per-seed paired differences (auto - off) per method, with the tolerance line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, d in enumerate(diffs.values()):
        ax.plot([i] * len(d), d, "o", color="tab:blue", alpha=0.7)
        ax.plot([i - 0.2, i + 0.2], [statistics.mean(d)] * 2, color="k")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axhline(-TOLERANCE, color="tab:red", ls="--", lw=0.8, label=f"-{TOLERANCE} points")
    ax.set_xticks(range(len(diffs)), [method_label(m) for m in diffs], rotation=15)
    ax.set_ylabel("top-1 auto - off (points, paired)")
    ax.set_title("digits: engine.amp auto vs off, same seed (bar: mean)")
    ax.legend(fontsize=8)
    save_figure(fig, out, "precision", env)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv, _extra)
    device = resolve_device(args.device)
    env0 = env_line(device)
    name = "precision_cifar100" if args.cifar is not None else "precision"
    body = cifar(args, device) if args.cifar is not None else digits(args, device)
    title = "# Accuracy under engine.amp auto vs off" + (
        " (QUICK smoke run: not a result)" if args.quick else ""
    )
    text = [
        title,
        "",
        env0,
        "",
        f"`engine.amp: auto` resolves here to {auto_means(device)}; `off` is fp32 (channels_last "
        "off). Evaluation is fp32 in both. Paired: the same seed, data order and teacher.",
        "",
        body,
        "",
        env_line(device, after=True),
    ]
    write_report(args.out, name, "\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
