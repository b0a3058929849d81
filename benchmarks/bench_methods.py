"""What each method costs per training step, relative to KD, on one CIFAR pair.

Why: a user choosing a baseline wants to know what it costs beside its accuracy. Every shipped
recipe of the pair (the paper's resnet32x4 -> resnet8x4) is built by the engine's own ``assemble``
and timed with the trainer's own step (``train_step``: autocast, forward, backward, SGD) on the
same random CIFAR-shaped batches, in rotating order, at the recipes' engine defaults. Beside the
time: the step's FLOPs (FlopCounterMode: convolutions and matmuls, forward and backward) and the
trainable parameters a method adds to the student's (training-only modules, FT before the merge).

    python benchmarks/bench_methods.py            # about 5 minutes on 2 CPU cores
    python benchmarks/bench_methods.py --quick    # seconds: resnet20 -> resnet8, a smoke run
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from bench_throughput import Pair, build, distiller_step, precision, step_flops
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

NORM_KD_TARGET = 1.2  # NORM+KD's step over KD's: the engine's factored FT keeps NORM cheap


def methods_of(pair: str) -> list[str]:
    """Every shipped recipe of the pair (a method each), vanilla and KD first."""
    names = sorted(p.stem for p in (CONFIGS / "cifar100" / pair).glob("*.yaml"))
    names = [n for n in names if not n.startswith("_")]
    first = [n for n in ("vanilla", "kd") if n in names]
    return first + [n for n in names if n not in first]


def _pair(name: str, n: int) -> Pair:
    rng = np.random.default_rng(0)
    recipe = CONFIGS / "cifar100" / name / "kd.yaml"
    return Pair(
        key=name,
        title=name.replace("__", " -> "),
        norm_kd=recipe,
        kd=recipe,
        x_hwc=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        y=rng.integers(0, 100, n).astype(np.int64),
        num_classes=100,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        pad=4,
        flip=True,
    )


def trainable(job: Any) -> int:
    """Parameters the step updates: the student's plus whatever the terms train beside it."""
    return sum(p.numel() for p in job.distiller.parameters() if p.requires_grad)


def measure(
    pair: Pair, methods: Sequence[str], device: torch.device, batch: int, plan: tuple[int, int, int]
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, int], dict[str, str], str]:
    """Seconds per step (blocks), FLOPs, trainable parameters and the loss terms per method."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, pair.num_classes, (batch,), generator=gen).to(device)
    idx = torch.arange(batch, device=device)
    jobs, flops, params, terms = {}, {}, {}, {}
    for m in methods:
        job = build(CONFIGS / "cifar100" / pair.key / f"{m}.yaml", pair, device)
        jobs[m] = job
        flops[m] = step_flops(job, (x, y, idx))
        params[m] = trainable(job)
        terms[m] = " + ".join(t.kind for t in job.recipe.loss)
        print(f"[methods] {m}: {terms[m]}, {flops[m] / 1e9:.2f} GFLOPs/step", flush=True)
    steps, warmup, repeats = plan
    fns = {m: (lambda j=job: distiller_step(j, x, y, idx)) for m, job in jobs.items()}
    seconds = interleaved(fns, device, warmup, repeats, number=steps)
    return seconds, flops, params, terms, precision(next(iter(jobs.values())))


def rows_of(
    seconds: dict[str, list[float]],
    flops: dict[str, int],
    params: dict[str, int],
    terms: dict[str, str],
) -> list[list[str]]:
    """One table row per method, times and FLOPs relative to KD, parameters beyond vanilla's."""
    kd_t, kd_f = median(seconds["kd"]), flops["kd"]
    base = params.get("vanilla", params["kd"])
    return [
        [
            m,
            terms[m],
            f"{1000 * median(s):.1f}",
            spread(s),
            f"{median(s) / kd_t:.2f}x",
            f"{flops[m] / 1e9:.2f}",
            f"{flops[m] / kd_f:.2f}x",
            f"{(params[m] - base) / 1e6:+.3f}M",
        ]
        for m, s in seconds.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Time every recipe of the pair, write methods.md/.png."""
    args = parse_args(__doc__.split("\n\n")[0], argv)
    device = resolve_device(args.device)
    name = "resnet20__resnet8" if args.quick else "resnet32x4__resnet8x4"
    batch, plan = (8, (1, 1, 2)) if args.quick else (64, (2, 1, 5))
    methods = methods_of(name)
    env0 = env_line(device)
    pair = _pair(name, 512 if args.quick else 50000)
    seconds, flops, params, terms, prec = measure(pair, methods, device, batch, plan)
    env = env_line(device, after=True)
    ratio = median(seconds["norm_kd"]) / median(seconds["kd"])
    text = "\n".join(
        [
            "# What each method costs per training step"
            + (" (QUICK smoke run: tiny batches, not a result)" if args.quick else ""),
            "",
            env0,
            "",
            f"Pair {pair.title} (CIFAR-100 shapes, random images), batch {batch}, every shipped "
            f"recipe of the pair at its engine defaults (resolved here to {prec}), the trainer's "
            f"own step. {plan[0]} steps per block, {plan[1]} warm-up + {plan[2]} timed blocks in "
            "rotating order; the median block is reported, ± is half its min-max range. FLOPs: "
            "one step, forward and backward (convolutions and matmuls). Extra parameters: what a "
            "method trains beyond the plain student (training-only modules, NORM's FT before it "
            "is merged away).",
            "",
            md_table(
                [
                    "method",
                    "loss terms",
                    "ms / step",
                    "spread",
                    "time / KD",
                    "GFLOPs / step",
                    "FLOPs / KD",
                    "extra trainable params",
                ],
                rows_of(seconds, flops, params, terms),
            ),
            "",
            "## Targets",
            "",
            md_table(
                ["figure", "measured", "target", "verdict"],
                [
                    [
                        "NORM+KD step / KD step",
                        f"{ratio:.2f}x",
                        f"≤ {NORM_KD_TARGET}x",
                        met(ratio <= NORM_KD_TARGET),
                    ]
                ],
            ),
            "",
            env,
        ]
    )
    write_report(args.out, "methods", text)
    _plot(seconds, args.out, env, pair.title)
    return 0


def _plot(seconds: dict[str, list[float]], out: Any, env: str, title: str) -> None:
    plt = pyplot()
    kd = median(seconds["kd"])
    names = list(seconds)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    ax.barh(names[::-1], [median(seconds[n]) / kd for n in names[::-1]], color="0.55")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("step time relative to KD (median block)")
    ax.set_title(f"Per-step cost by method, {title}")
    save_figure(fig, out, "methods", env)


if __name__ == "__main__":
    sys.exit(main())
