"""What NORM costs at deployment: parameters, FLOPs and CPU latency of plain, FT and merged students.

Why: the paper's claim is that FT is folded into the classifier after training, so the deployed
student is exactly the original architecture (same parameters, FLOPs and speed) with the FT
student's logits. For every CIFAR-100 student of the paper's pairs (FT sized by its paper
teacher's channels, N from the pair's NORM recipe) this counts parameters and FLOPs
(``torch.utils.flop_counter.FlopCounterMode``, 1x3x32x32), merges after a few random training
steps (so BatchNorm statistics are non-trivial), checks the logits, and times inference.

    python benchmarks/bench_deploy.py            # 12 pairs, about 3 minutes on 2 CPU cores
    python benchmarks/bench_deploy.py --quick    # 1 small pair, 1 repeat: a smoke run
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    write_report,
)
from torch import nn

# The paper's CIFAR-100 pairs in its table order (folders of configs/cifar100/); any other pair
# folder found there is appended.
ORDER = [
    "resnet56__resnet20",
    "resnet110__resnet32",
    "resnet32x4__resnet8x4",
    "wrn_40_2__wrn_16_2",
    "wrn_40_2__wrn_40_1",
    "vgg13__vgg8",
    "vgg13__MobileNetV2",
    "ResNet50__MobileNetV2",
    "ResNet50__vgg8",
    "resnet32x4__ShuffleV1",
    "resnet32x4__ShuffleV2",
    "wrn_40_2__ShuffleV1",
]
QUICK = ["resnet56__resnet20"]


@dataclass
class Row:
    """Measured figures of one student."""

    pair: str
    student: str
    teacher: str
    t_channels: int
    n: int
    params: dict[str, int]
    flops: dict[str, int]
    max_diff: float
    max_logit: float
    latency: dict[str, dict[int, list[float]]]  # device -> batch -> variant -> seconds


def pair_dirs(quick: bool) -> list[Path]:
    """Pair folders holding a NORM recipe, in the paper's order."""
    root = CONFIGS / "cifar100"
    found = {p.parent.name for p in root.glob("*__*/norm.yaml")}
    names = QUICK if quick else ORDER + sorted(found - set(ORDER))
    return [root / n for n in names if n in found]


def flops_of(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval forward (FlopCounterMode: 2 per multiply-add, convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def n_params(model: nn.Module) -> int:
    """All parameters (BatchNorm affine included), what a checkpoint stores."""
    return sum(p.numel() for p in model.parameters())


def measure_pair(
    folder: Path, device: torch.device, train_steps: int, plan: dict[int, tuple[int, int, int]]
) -> Row:
    """Build plain/FT students for one pair, train FT a few steps, merge, count and time."""
    from normkd.config import load_recipe
    from normkd.models import create_model, get_taps
    from normkd.norm import attach_ft, max_logit_diff, merge_ft

    recipe = load_recipe(folder / "norm.yaml")
    norm = recipe.term("norm")
    assert recipe.teacher is not None and norm is not None
    torch.manual_seed(0)
    teacher = create_model(recipe.teacher.model, num_classes=100, **recipe.teacher.kwargs)
    t_channels = get_taps(teacher, torch.zeros(2, 3, 32, 32)).feat_channels
    del teacher
    plain = create_model(recipe.student.model, num_classes=100, **recipe.student.kwargs)
    example = torch.zeros(2, 3, 32, 32)
    s_ft = attach_ft(
        copy.deepcopy(plain),
        t_channels,
        norm.n,
        bn=norm.bn,
        residual=norm.residual,
        example=example,
    ).to(device)

    _train_briefly(s_ft, train_steps, device)
    merged = merge_ft(s_ft)
    x = torch.randn(64, 3, 32, 32, device=device)
    diff = max_logit_diff(s_ft, merged, x)
    with torch.no_grad():
        max_logit = float(s_ft(x).abs().max())

    s_ft, merged = s_ft.cpu().eval(), merged.cpu().eval()
    plain.eval()
    variants = {"plain": plain, "merged": merged, "ft": s_ft}
    x1 = torch.randn(1, 3, 32, 32)
    params = {k: n_params(m) for k, m in variants.items()}
    flops = {k: flops_of(m, x1) for k, m in variants.items()}
    return Row(
        pair=folder.name,
        student=recipe.student.model,
        teacher=recipe.teacher.model,
        t_channels=t_channels,
        n=norm.n,
        params=params,
        flops=flops,
        max_diff=diff,
        max_logit=max_logit,
        latency=_latencies(variants, device, plan),
    )


def _train_briefly(s_ft: nn.Module, steps: int, device: torch.device) -> None:
    """A few SGD steps on random data so every BatchNorm (student and FT) has non-trivial
    statistics; leaves the model in eval mode, ready to merge."""
    opt = torch.optim.SGD(s_ft.parameters(), lr=0.01, momentum=0.9)
    s_ft.train()
    for _ in range(steps):
        x = torch.randn(32, 3, 32, 32, device=device)
        y = torch.randint(0, 100, (32,), device=device)
        loss = F.cross_entropy(s_ft(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    s_ft.eval()


def _latencies(
    variants: dict[str, nn.Module], device: torch.device, plan: dict[int, tuple[int, int, int]]
) -> dict[str, dict[int, Any]]:
    """device -> batch -> each variant's timed blocks (the CPU always; the GPU too when given),
    the variants interleaved so drift in the machine's speed hits them alike."""
    latency: dict[str, dict[int, Any]] = {}
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    for dev in devices:
        latency[str(dev)] = {}
        models = {k: m.to(dev) for k, m in variants.items()}
        for batch, (number, warmup, repeats) in plan.items():
            xb = torch.randn(batch, 3, 32, 32, device=dev)
            fns = {k: _forward(m, xb) for k, m in models.items()}
            latency[str(dev)][batch] = interleaved(fns, dev, warmup, repeats, number)
        for m in models.values():
            m.cpu()
    return latency


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """A no-argument inference call, what the timer repeats."""

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _m(v: float) -> str:
    return f"{v / 1e6:.2f}M"


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every pair, write deploy.md/.png."""
    args = parse_args(__doc__.split("\n\n")[0], argv)
    device = resolve_device(args.device)
    env0 = env_line(device)
    # batch -> (calls per block, warm-up blocks, timed blocks)
    plan = {1: (2, 1, 1), 4: (1, 1, 1)} if args.quick else {1: (20, 2, 15), 64: (1, 1, 7)}
    train_steps = 1 if args.quick else 3
    rows = [_measure_and_say(folder, device, train_steps, plan) for folder in pair_dirs(args.quick)]
    env = env_line(device, after=True)
    batches = list(plan)
    per_batch = ", ".join(
        f"batch {b}: {n} calls/block, {w} warm-up + {k} timed blocks"
        for b, (n, w, k) in plan.items()
    )
    text = "\n".join(
        [
            "# Deployment cost of NORM: plain vs FT vs merged students"
            + (" (QUICK smoke run, not a result)" if args.quick else ""),
            "",
            env0,
            "",
            "Students with random weights (architecture, not accuracy, is what is measured); FT "
            f"trained {train_steps} SGD steps on random data before merging so its BatchNorm "
            "statistics are non-trivial. FLOPs: `FlopCounterMode` at 1x3x32x32 (2 FLOPs per "
            "multiply-add; BatchNorm and activations not counted). Latency: eval mode, "
            f"`torch.inference_mode`, median of blocks, variants in rotating order ({per_batch}).",
            "",
            "## Size and equivalence",
            "",
            _size_table(rows),
            "",
            env,
            *_latency_sections(rows, batches, env),
            "",
            "## Targets",
            "",
            md_table(["figure", "measured", "target", "verdict"], _target_rows(rows, batches)),
            "",
            "The FT/plain columns are what merging saves at inference.",
            "",
            env,
        ]
    )
    write_report(args.out, "deploy", text)
    _plot(rows, batches, args.out, env)
    return 0


def _measure_and_say(
    folder: Path, device: torch.device, train_steps: int, plan: dict[int, tuple[int, int, int]]
) -> Row:
    """:func:`measure_pair`, with a progress line before and the pair's figures after."""
    print(f"[deploy] {folder.name} ...", flush=True)
    r = measure_pair(folder, device, train_steps, plan)
    ratios = ", ".join(
        f"b{b}: merged/plain {median(v['merged']) / median(v['plain']):.3f}"
        for b, v in r.latency["cpu"].items()
    )
    print(f"[deploy]   params {r.params}, max logit diff {r.max_diff:.2e}, {ratios}", flush=True)
    return r


def _same_size(r: Row) -> bool:
    return r.params["merged"] == r.params["plain"] and r.flops["merged"] == r.flops["plain"]


def _size_table(rows: list[Row]) -> str:
    """Parameters and FLOPs of plain, FT and merged students, and FT vs merged logits."""
    size_rows = []
    for r in rows:
        sizes = [_m(d[k]) for d in (r.params, r.flops) for k in ("plain", "ft", "merged")]
        size_rows.append(
            [
                r.student,
                f"{r.teacher} ({r.t_channels} ch)",
                r.n,
                *sizes,
                "yes" if _same_size(r) else "**no**",
                f"{r.max_diff:.1e} (max abs logit {r.max_logit:.1f})",
            ]
        )
    head = ["student", "FT sized for teacher", "N", "params plain", "params FT", "params merged"]
    head += ["FLOPs plain", "FLOPs FT", "FLOPs merged", "merged = plain"]
    return md_table([*head, "max logit diff FT vs merged"], size_rows)


def _latency_sections(rows: list[Row], batches: list[int], env: str) -> list[str]:
    """One latency table per device: each variant's median ms and its ratio to plain."""
    sections = []
    for dev in rows[0].latency:
        lat_rows = []
        for r in rows:
            cells = [r.student, r.teacher]
            for b in batches:
                v = r.latency[dev][b]
                p, mg, ft = (median(v[k]) for k in ("plain", "merged", "ft"))
                cells += [f"{1000 * p:.2f}", f"{1000 * mg:.2f}", f"{1000 * ft:.2f}"]
                cells += [f"{mg / p:.3f}", f"{ft / p:.3f}"]
            lat_rows.append(cells)
        headers = ["student", "teacher"]
        for b in batches:
            headers += [f"b{b} plain ms", f"b{b} merged ms", f"b{b} FT ms"]
            headers += [f"b{b} merged/plain", f"b{b} FT/plain"]
        sections += ["", f"## Inference latency on {dev} (median per forward)", ""]
        sections += [md_table(headers, lat_rows), "", env]
    return sections


def _target_rows(rows: list[Row], batches: list[int]) -> list[list[str]]:
    """Merged vs plain CPU latency per batch (geometric mean over pairs, worst pair beside it)
    and the same-size check, each against its target."""
    out = []
    for b in batches:
        ratios = [
            median(r.latency["cpu"][b]["merged"]) / median(r.latency["cpu"][b]["plain"])
            for r in rows
        ]
        mean = statistics.geometric_mean(ratios)
        out.append(
            [
                f"batch {b}: merged / plain CPU latency",
                f"geometric mean {mean:.3f}, worst {max(ratios):.3f}",
                "≤ 1.01",
                met(mean <= 1.01),
            ]
        )
    all_same = all(_same_size(r) for r in rows)
    out.append(
        [
            "merged student: same params and FLOPs as plain",
            "all pairs" if all_same else "**some differ**",
            "all pairs",
            met(all_same),
        ]
    )
    return out


def _plot(rows: list[Row], batches: list[int], out: Path, env: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.4))
    labels = [f"{r.student}\n({r.teacher})" for r in rows]
    xs = range(len(rows))
    for ax, b in zip(axes, batches):
        lat = [r.latency["cpu"][b] for r in rows]
        mg = [median(v["merged"]) / median(v["plain"]) for v in lat]
        ft = [median(v["ft"]) / median(v["plain"]) for v in lat]
        w = 0.4
        ax.bar([x - w / 2 for x in xs], mg, w, label="merged / plain", color="tab:green")
        ax.bar([x + w / 2 for x in xs], ft, w, label="FT / plain", color="tab:orange")
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=60, fontsize=7)
        ax.set_ylabel("CPU latency relative to plain student")
        ax.set_title(f"batch {b}")
        ax.legend(fontsize=8)
    save_figure(fig, out, "deploy", env)


if __name__ == "__main__":
    sys.exit(main())
