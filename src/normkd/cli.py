"""Command line: ``normkd demo`` (more subcommands arrive with the training engine)."""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def _demo(args: argparse.Namespace) -> int:
    """Attach FT to a zoo student, train a few steps on random tensors, merge, print the check."""
    from normkd.models import create_model, get_taps
    from normkd.norm import attach_ft, max_logit_diff, merge_ft, norm_loss

    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=10).eval()
    student = create_model(args.student, num_classes=10)
    t_spec = get_taps(teacher)
    s_ft = attach_ft(student, teacher_channels=t_spec.feat_channels, n=args.n)
    opt = torch.optim.SGD(s_ft.parameters(), lr=0.01, momentum=0.9)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(16, 3, 32, 32)
        y = torch.randint(0, 10, (16,))
        from normkd.models import capture

        with torch.no_grad(), capture(teacher, [t_spec.feat]) as taps:
            teacher(x)
        logits = s_ft(x)
        loss_norm = norm_loss(s_ft.expanded, taps[t_spec.feat], args.n)
        loss = F.cross_entropy(logits, y) + loss_norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(
            f"step {step + 1}/{args.steps}: ce+norm = {loss.item():.4f} (norm {loss_norm.item():.4f})"
        )
    merged = merge_ft(s_ft)
    diff = max_logit_diff(s_ft, merged, torch.randn(8, 3, 32, 32))
    n_plain = sum(p.numel() for p in student.parameters())
    n_ft = sum(p.numel() for p in s_ft.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    print(
        f"{args.teacher} -> {args.student}, N={args.n}: params plain {n_plain:,} | with FT {n_ft:,} "
        f"| merged {n_merged:,}; max |logit diff| after merge = {diff:.2e} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normkd",
        description="Knowledge distillation with NORM (N-to-One Representation Matching).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="attach FT to a zoo student, train briefly, merge and check")
    demo.add_argument("--teacher", default="resnet32x4")
    demo.add_argument("--student", default="resnet8x4")
    demo.add_argument("--n", type=int, default=4, help="expansion factor N")
    demo.add_argument("--steps", type=int, default=5)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
