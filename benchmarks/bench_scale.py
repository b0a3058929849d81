"""How one NORM+KD training step scales with batch size and with the expansion factor N.

Why: FT's expanded map has ``N * C_t`` channels at the student's last resolution, so its cost
grows linearly in N while the rest of the step does not; this shows where N starts to matter next
to the teacher and student, and whether the step scales linearly in the batch (no per-sample
Python). resnet32x4 -> resnet8x4 at 32x32 (the CIFAR-100 NORM+KD recipe), data already on the
device (step compute only; see bench_throughput for the data pipeline).

    python benchmarks/bench_scale.py            # about 3 minutes on 2 CPU cores
    python benchmarks/bench_scale.py --quick    # tiny batches: a smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    CONFIGS,
    env_line,
    interleaved,
    md_table,
    median,
    parse_args,
    pyplot,
    resolve_device,
    save_figure,
    spread,
    write_report,
)

PAIR = CONFIGS / "cifar100" / "resnet32x4__resnet8x4"
BATCHES = [32, 64, 128, 256, 512]
NS = [1, 2, 4, 8, 16]


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, nargs="+", default=None, help=f"default {BATCHES}")
    p.add_argument("--ns", type=int, nargs="+", default=None, help=f"default {NS}")
    p.add_argument("--n-at", type=int, default=8, help="N of the batch sweep (default 8)")
    p.add_argument("--batch-at", type=int, default=64, help="batch of the N sweep (default 64)")


def make_step(
    recipe_file: Path, n: int | None, batch: int, device: torch.device
) -> Callable[[], int]:
    """The trainer's own step (normkd.engine.train_step) on a fixed on-device batch."""
    from normkd.config import load_recipe
    from normkd.data.build import Data
    from normkd.engine import Runtime, assemble, train_step

    over = ["teacher.weights=null"] + ([f"loss.2.n={n}"] if n is not None else [])
    recipe = load_recipe(recipe_file, over)
    assert n is None or (recipe.term("norm") is not None and recipe.term("norm").n == n)
    job = assemble(recipe, Runtime(device), data=Data(None, None, 100, (3, 32, 32)), dry_run=True)
    job.distiller.train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    idx = torch.arange(batch, device=device)
    lr = job.lr(0, 0, 1)

    def step() -> int:
        train_step(job, x, y, idx, 0, lr)
        return batch

    return step


def sweep(
    points: dict[str, tuple[Path, int | None, int]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per step at each point; each point is built, measured and freed in turn."""
    out: dict[str, list[float]] = {}
    for name, (recipe_file, n, batch) in points.items():
        step = make_step(recipe_file, n, batch, device)
        out[name] = interleaved({name: step}, device, warmup, repeats)[name]
        print(f"[scale]   {name}: {1000 * median(out[name]):.0f} ms/step", flush=True)
        del step
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run both sweeps, write scale.md/.png."""
    args = parse_args(__doc__.split("\n\n")[0], argv, _extra)
    device = resolve_device(args.device)
    env0 = env_line(device)
    quick = args.quick
    batches = args.batches or ([4, 8] if quick else BATCHES)
    ns = args.ns or ([1, 2] if quick else NS)
    n_at = args.n_at
    batch_at = 4 if quick and args.batch_at == 64 else args.batch_at
    warmup, repeats = (1, 1) if quick else (1, 3)
    pair = PAIR.parent / "resnet20__resnet8" if quick else PAIR  # smoke: the small pair
    norm_kd, kd = pair / "norm_kd.yaml", pair / "kd.yaml"

    print(f"[scale] batch sweep at N={n_at}: {batches}", flush=True)
    by_batch = sweep({f"b{b}": (norm_kd, n_at, b) for b in batches}, device, warmup, repeats)
    print(f"[scale] N sweep at batch {batch_at}: {ns} (+ KD only)", flush=True)
    n_points: dict[str, tuple[Path, int | None, int]] = {"kd": (kd, None, batch_at)}
    n_points |= {f"n{n}": (norm_kd, n, batch_at) for n in ns}
    by_n = sweep(n_points, device, warmup, repeats)
    env = env_line(device, after=True)

    base_b = batches[0]
    b_rows, n_rows = _batch_rows(by_batch, batches), _n_rows(by_n, ns, batch_at)
    text = "\n".join(
        [
            "# Scaling of one NORM+KD step: batch size and N"
            + (" (QUICK smoke run, not a result)" if quick else ""),
            "",
            env0,
            "",
            f"{pair.name.replace('__', ' -> ')} at 32x32, 100 classes, the CIFAR-100 recipe's loss "
            "(CE + KD + NORM; random teacher, same cost). One step = normkd.engine.train_step "
            "(lr, autocast, distiller forward, backward, SGD); the batch is already on the device. "
            f"Median of {repeats} timed steps after {warmup} warm-up step(s); ± is half the min-max "
            "range.",
            "",
            f"## Batch size (N = {n_at})",
            "",
            md_table(
                ["batch", "ms / step", "spread", "images / s", f"time relative to batch {base_b}"],
                b_rows,
            ),
            "",
            env,
            "",
            f"## Expansion factor N (batch {batch_at})",
            "",
            md_table(["step", "ms / step", "spread", "images / s", "time / KD-only time"], n_rows),
            "",
            env,
        ]
    )
    write_report(args.out, "scale", text)
    _plot(batches, by_batch, ns, by_n, batch_at, n_at, args.out, env)
    return 0


def _batch_rows(by_batch: dict[str, list[float]], batches: list[int]) -> list[list[Any]]:
    """ms / step, spread, images / s and time relative to the smallest batch, per batch."""
    t0 = median(by_batch[f"b{batches[0]}"])
    rows = []
    for b in batches:
        t = median(by_batch[f"b{b}"])
        rel = f"{t / t0:.2f} (linear: {b / batches[0]:.2f})"
        rows.append([b, f"{1000 * t:.0f}", spread(by_batch[f"b{b}"]), f"{b / t:.1f}", rel])
    return rows


def _n_rows(by_n: dict[str, list[float]], ns: list[int], batch_at: int) -> list[list[Any]]:
    """KD alone, then NORM+KD at each N: ms / step, spread, images / s, time over KD's."""
    t_kd = median(by_n["kd"])
    rows: list[list[Any]] = []
    for name, key in [("KD only (no FT)", "kd")] + [(f"NORM+KD, N={n}", f"n{n}") for n in ns]:
        t = median(by_n[key])
        rows.append(
            [name, f"{1000 * t:.0f}", spread(by_n[key]), f"{batch_at / t:.1f}", f"{t / t_kd:.2f}"]
        )
    return rows


def _plot(
    batches: list[int],
    by_batch: dict[str, list[float]],
    ns: list[int],
    by_n: dict[str, list[float]],
    batch_at: int,
    n_at: int,
    out: Path,
    env: str,
) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    tb = [1000 * median(by_batch[f"b{b}"]) for b in batches]
    ax1.loglog(batches, tb, "o-", label="measured")
    ax1.loglog(
        batches, [tb[0] * b / batches[0] for b in batches], "--", color="0.5", label="linear"
    )
    ax1.set_xticks(batches, [str(b) for b in batches])
    ax1.minorticks_off()
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("ms per step")
    ax1.set_title(f"NORM+KD step vs batch (N = {n_at})")
    ax1.legend()
    tn = [1000 * median(by_n[f"n{n}"]) for n in ns]
    ax2.plot(ns, tn, "o-", label="NORM+KD")
    ax2.axhline(1000 * median(by_n["kd"]), color="tab:gray", ls="--", label="KD only (no FT)")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ns, [str(n) for n in ns])
    ax2.set_xlabel("N (expansion factor)")
    ax2.set_ylabel("ms per step")
    ax2.set_title(f"NORM+KD step vs N (batch {batch_at})")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    save_figure(fig, out, "scale", env)


if __name__ == "__main__":
    sys.exit(main())
