"""``normkd`` command line: demo | train | distill | reproduce | eval | merge | export | wkd-cost |
recipes | list-models.

Exit codes: 0 success; 2 user error (bad recipe, missing data, bad checkpoint), another process
writing the run directory, or Ctrl-C; 143 after SIGTERM. Each is one line without a traceback
(after Ctrl-C or SIGTERM the line says what last.pt holds and how to resume). A traceback
means a bug in normkd. docs/errors.md lists the bad inputs and what each gets.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from normkd import __version__
from normkd.errors import UserError
from normkd.signals import sigterm_as_interrupt

EPILOG = "Recipes live in configs/ (e.g. configs/demo/norm_kd.yaml). Docs: README.md."


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", type=Path, help="recipe YAML: a path, or a shipped name (normkd recipes)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set optim.lr=0.1 --set loss.1.weight=0.5",
    )
    p.add_argument("--resume", action="store_true", help="continue the run from RUN_DIR/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build data and models and run one step without training; fails on missing or "
        "broken data as the run would",
    )
    p.add_argument(
        "--fake-data",
        action="store_true",
        help="with --dry-run: random images of the data's shape instead of the real data "
        "(to check a recipe where its data is not)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument(
        "--out-dir", type=Path, help="parent folder of the run directory (engine.out_dir)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from normkd.config import load_recipe
    from normkd.engine import run_recipe

    overrides = list(args.overrides)
    if args.fake_data:
        if not args.dry_run:
            raise UserError(
                "--fake-data goes with --dry-run: random images can check a recipe, not train "
                "a model"
            )
        overrides.append("data.fake=true")
    if args.quiet:
        overrides.append("engine.quiet=true")
    if args.out_dir is not None:
        overrides.append(f"engine.out_dir={args.out_dir}")
    recipe = load_recipe(args.config, overrides, task=args.command)
    if recipe.task != args.command:
        raise UserError(
            f"{args.config} is a '{recipe.task}' recipe; run it with `normkd {recipe.task}`"
        )
    result = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run)
    if args.dry_run or int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"done: {recipe.name}: best top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}), "
        f"final top-1 {result.final_top1:.2f}% / top-5 {result.final_top5:.2f}%"
        + (
            f"; merged student top-1 {result.merged_top1:.2f}% "
            f"(max |logit diff| {result.merge_max_logit_diff:.1e})"
            if result.merged_top1 is not None
            else ""
        )
        + f"; run directory {result.run_dir}"
    )
    return 0


def _model_and_recipe(path: Path, config: Path | None, overrides: list[str]):
    """A model file or run directory -> (deployable model, recipe for its data)."""
    from normkd.config import load_recipe
    from normkd.engine.checkpoint import load_model_file

    model_file = path / "model.safetensors" if path.is_dir() else path
    if not model_file.is_file():
        raise UserError(
            f"no model file at {model_file} (expected RUN_DIR or RUN_DIR/model.safetensors)"
        )
    model, meta = load_model_file(model_file)
    cfg = config or model_file.parent / "config.yaml"
    if not cfg.is_file():
        raise UserError(f"no recipe for the data: pass --config (looked for {cfg})")
    return model, meta, load_recipe(cfg, overrides)


def _test_data(recipe, device):
    """The test loader of a run's recipe (the data must be there: no fake stand-in)."""
    from normkd.data.build import Place, build_data

    return build_data(recipe.data, Place(device, recipe.engine.seed))


def _cmd_eval(args: argparse.Namespace) -> int:
    from normkd.engine import evaluate, resolve_device

    model, meta, recipe = _model_and_recipe(args.checkpoint, args.config, args.overrides)
    device = resolve_device(recipe.engine.device)
    data = _test_data(recipe, device)
    if meta["num_classes"] != data.num_classes:
        raise UserError(
            f"{args.checkpoint} predicts {meta['num_classes']} classes but its recipe's "
            f"{recipe.data.kind} data has {data.num_classes}: evaluate it on matching data"
        )
    res = evaluate(model.to(device), data.test, device)
    print(
        f"{args.checkpoint}: {meta['model']} top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% "
        f"loss {res['loss']:.4f} on {recipe.data.kind} test set"
    )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from normkd.config import load_recipe
    from normkd.engine import deploy
    from normkd.engine.checkpoint import load_checkpoint, save_model
    from normkd.engine.job import assemble
    from normkd.engine.rundir import check_output, load_state
    from normkd.engine.runtime import Runtime

    src = args.source
    if not src.exists():
        raise UserError(f"merge source not found: {src} (expected RUN_DIR or RUN_DIR/last.pt)")
    ckpt_path = src / ("best.pt" if args.best else "last.pt") if src.is_dir() else src
    run_dir = ckpt_path.parent
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"no config.yaml beside {ckpt_path}: merge needs the run directory")
    recipe = load_recipe(run_dir / "config.yaml")
    if not any(t.changes_student() for t in recipe.loss):
        raise UserError(
            f"{recipe.name}: none of its loss terms changes the student: nothing to merge"
        )
    state = load_checkpoint(ckpt_path)
    rt = Runtime(torch.device("cpu"))
    # Built as for a dry run (the teacher's weights are not needed), on the run's real data.
    job = assemble(recipe, rt, data=_test_data(recipe, rt.device), dry_run=True)
    load_state(job.distiller, state["distiller"], ckpt_path)  # config.yaml may have been edited
    x = next(iter(job.data.test))[0]
    merged, diff = deploy.deploy_checked(job, x)
    check_output(args.out, args.force)
    save_model(args.out, merged, deploy.model_meta(recipe, job.plain, job.data, True))
    n = sum(p.numel() for p in merged.parameters())
    print(
        f"merged {ckpt_path} -> {args.out}: {recipe.student.model}, {n:,} params; "
        f"max |logit diff| vs the trained student on a batch of {x.shape[0]}: {diff:.2e}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from normkd.config import MAX_IMAGE_SIZE
    from normkd.engine import deploy
    from normkd.engine.checkpoint import input_shape_ok, load_model_file
    from normkd.engine.rundir import check_output

    path = args.checkpoint / "model.safetensors" if args.checkpoint.is_dir() else args.checkpoint
    shape = None
    if args.input_shape is not None:
        try:
            shape = tuple(int(s) for s in args.input_shape[:100].split(","))
        except ValueError:
            shape = ()
        if not input_shape_ok(shape):
            raise UserError(
                "--input-shape must be C,H,W (three positive integers), got "
                f"{args.input_shape[:40]!r}; each at most {MAX_IMAGE_SIZE}"
            )
    check_output(args.onnx, args.force)
    model, meta = load_model_file(path)
    diff = deploy.export(model, meta, args.onnx, shape)
    used = ",".join(map(str, shape or meta["input_shape"]))
    msg = f"exported {path} ({meta['model']}, input {used}) -> {args.onnx}"
    if diff is None:
        print(msg + " (onnxruntime not installed: output not checked)")
    else:
        print(msg + f"; onnxruntime max |logit diff| vs PyTorch: {diff:.2e}")
    return 0


def _cmd_wkd_cost(args: argparse.Namespace) -> int:
    from normkd.config import load_recipe
    from normkd.wkd_cost import default_out, make_cost_file

    overrides = list(args.overrides)
    if args.batch_size is not None:  # the pass reads the training split as evaluation does
        overrides.append(f"data.eval_batch_size={args.batch_size}")
    recipe = load_recipe(args.config, overrides, task="distill")
    out = args.out or default_out(recipe, args.source)
    made = make_cost_file(recipe, out, args.source, force=args.force)
    print(
        f"wrote {made.path}: ({made.classes}, {made.classes}) 1 - linear CKA of the teacher's "
        f"{args.source} rows, {made.rows_per_class:,} per class, in {made.seconds:.1f} s; use "
        f"it: {made.override}"
    )
    return 0


def _add_wkd_cost(sub: argparse._SubParsersAction) -> None:
    """``normkd wkd-cost``'s arguments."""
    wkd = sub.add_parser(
        "wkd-cost",
        help="make WKD-L's published class costs (the teacher's 1 - linear CKA per class pair)",
        description="Builds the recipe's teacher with its weights, reads the recipe's training "
        "split un-augmented in dataset order and writes the (C, C) 1 - linear CKA between the "
        "teacher's rows of every two classes (safetensors, key 'cost', provenance in its "
        "metadata): the cost_matrix a wkd_l term takes for the published method.",
    )
    wkd.add_argument(
        "config", type=Path, help="a distill recipe: its teacher and data (any loss terms)"
    )
    wkd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    wkd.add_argument(
        "--out",
        type=Path,
        help="output .safetensors (default: wkd_cost_SOURCE.safetensors beside the teacher's "
        "weights)",
    )
    wkd.add_argument(
        "--source",
        default="last_stage",
        help="the teacher's rows per image: last_stage (default: every position of its last "
        "stage map, the authors' CIFAR files; needs equal class counts) or logits (their ImageNet "
        "files; each class cut to the smallest count)",
    )
    wkd.add_argument(
        "--batch-size",
        type=count(1, 1_000_000),
        default=None,
        help="images per teacher pass (default: the recipe's data.eval_batch_size)",
    )
    wkd.add_argument("--force", action="store_true", help="replace an existing --out file")
    wkd.set_defaults(func=_cmd_wkd_cost)


def _cmd_demo(args: argparse.Namespace) -> int:
    from normkd.demo import run_demo

    run_demo(
        out_dir=args.out_dir,
        quick=args.quick,
        methods=args.methods,
        seeds=args.seeds,
        quiet=not args.verbose,
        overwrite=args.overwrite,
    )
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from normkd.reproduce import reproduce

    if args.dataset != "cifar100":
        raise UserError(f"reproduce knows cifar100 only, got {args.dataset!r}")
    reproduce(
        args.pair,
        args.data_root,
        methods=args.methods,
        seeds=args.seeds,
        scale=args.scale,
        out_dir=args.out_dir,
        epochs=args.epochs,
        teacher_weights=args.teacher_weights,
        extra=args.overrides,
        report=args.report,
        records=args.records,
    )
    return 0


def _cmd_recipes(_args: argparse.Namespace) -> int:
    from normkd.config import shipped_recipes

    print("\n".join(shipped_recipes()))
    return 0


def _cmd_list(_args: argparse.Namespace) -> int:
    from normkd.models import list_models

    print("\n".join(list_models()))
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    """``normkd reproduce``'s arguments."""
    rep = sub.add_parser(
        "reproduce",
        help="the paper's CIFAR-100 comparison for one pair: teacher + methods x seeds, a table",
        description="Trains the pair's teacher (or uses --teacher-weights) and every method's "
        "shipped recipe for each seed, then prints and writes (Markdown + PNG) best and final "
        "top-1 beside the published figures. Re-running skips finished runs and resumes "
        "unfinished ones.",
    )
    rep.add_argument("dataset", choices=["cifar100"], help="the benchmark (cifar100)")
    rep.add_argument("pair", help="TEACHER__STUDENT, a folder of configs/cifar100/")
    rep.add_argument(
        "--data-root", type=Path, required=True, help="folder holding cifar-100-python/"
    )
    rep.add_argument("--methods", nargs="+", default=None, metavar="M", help="recipe names")
    rep.add_argument("--seeds", type=count(1, 100), default=1, help="seeds per method (default 1)")
    rep.add_argument(
        "--scale",
        choices=["paper", "short", "smoke"],
        default="short",
        help="paper: recipes as shipped (240 epochs, a GPU job); short: --epochs; smoke: 1 epoch "
        "on 2%% of the data",
    )
    rep.add_argument(
        "--epochs", type=count(1, 1_000_000), default=None, help="short scale's epochs (30)"
    )
    rep.add_argument("--teacher-weights", type=Path, help="a trained teacher (skips training it)")
    rep.add_argument("--out-dir", type=Path, default=Path("runs/reproduce"), help="run folders")
    rep.add_argument("--report", type=Path, help="also write the table (and PNG) here")
    rep.add_argument(
        "--records",
        type=Path,
        help="a folder of run records (committable): each finished run is recorded there, the "
        "teacher kept beside them, recorded runs are skipped and the table is built from them",
    )
    rep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rep.set_defaults(func=_cmd_reproduce)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """``normkd demo``'s arguments."""
    demo = sub.add_parser(
        "demo",
        help="train a teacher and distil students on the embedded digits set; print a table",
        description="On scikit-learn's bundled digits (no download): train a teacher, then "
        "students with each method over several seeds, for a CNN student and a ViT student; "
        "print a Markdown table per pair (paired differences with 95%% intervals) and write "
        "them with a PNG plot to the output folder.",
    )
    demo.add_argument("--quick", action="store_true", help="fewer epochs and one seed (< 60 s)")
    demo.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="M",
        help="methods to compare (default: vanilla kd norm norm_kd vit_vanilla vit_kd vit_norm "
        "vit_norm_kd)",
    )
    demo.add_argument(
        "--seeds", type=count(1, 100), default=None, help="seeds per method (default 3)"
    )
    demo.add_argument("--out-dir", type=Path, default=Path("runs/demo"), help="output folder")
    demo.add_argument("--verbose", action="store_true", help="per-epoch lines for every run")
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace run folders in --out-dir made with other settings (by default the demo "
        "replaces only its own runs of the same settings)",
    )
    demo.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normkd",
        description="Knowledge distillation with NORM (N-to-One Representation Matching) "
        "and strong baselines.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"normkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_demo(sub)

    train = sub.add_parser("train", help="train a teacher or a plain student from a recipe")
    _add_run_args(train)
    train.set_defaults(func=_cmd_run)
    distill = sub.add_parser("distill", help="distil a student from a teacher with a recipe")
    _add_run_args(distill)
    distill.set_defaults(func=_cmd_run)

    ev = sub.add_parser("eval", help="top-1/top-5 of a saved model on its recipe's test set")
    ev.add_argument("checkpoint", type=Path, help="RUN_DIR or a model.safetensors file")
    ev.add_argument(
        "--config", type=Path, help="recipe for the data (default: RUN_DIR/config.yaml)"
    )
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=_cmd_eval)

    merge = sub.add_parser(
        "merge", help="fold a NORM student's FT into its classifier and save the plain student"
    )
    merge.add_argument("source", type=Path, help="RUN_DIR or RUN_DIR/last.pt / best.pt")
    merge.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    merge.add_argument("--best", action="store_true", help="merge best.pt instead of last.pt")
    merge.add_argument("--force", action="store_true", help="replace an existing --out file")
    merge.set_defaults(func=_cmd_merge)

    export = sub.add_parser("export", help="export a saved (merged) student to ONNX")
    export.add_argument("checkpoint", type=Path, help="RUN_DIR or a model.safetensors file")
    export.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    export.add_argument(
        "--input-shape", default=None, help="C,H,W of the input (default: what the run trained on)"
    )
    export.add_argument("--force", action="store_true", help="replace an existing --onnx file")
    export.set_defaults(func=_cmd_export)

    _add_reproduce(sub)
    _add_wkd_cost(sub)

    rec = sub.add_parser(
        "recipes", help="print every shipped recipe's name (usable as RECIPE from any folder)"
    )
    rec.set_defaults(func=_cmd_recipes)

    lm = sub.add_parser("list-models", help="print every model name in the zoo")
    lm.set_defaults(func=_cmd_list)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse whose own errors (a missing or malformed argument) keep normkd's promise too:
    one line starting ``normkd: error:`` and exit code 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"normkd: error: {_one_line(message)} (see {self.prog} --help)\n")


def count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (a count normkd allocates or loops over)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    held: list[warnings.WarningMessage] = []
    try:
        # Python warnings wait for the command's end: one that a failing command raised on its
        # way (a library's FutureWarning while building a model) would stand before the error.
        with warnings.catch_warnings(record=True) as held, sigterm_as_interrupt():
            warnings.simplefilter("default")
            return int(args.func(args))
    except UserError as err:
        print(f"normkd: error: {_one_line(err)}", file=sys.stderr)
        held = []
        return 2
    except KeyboardInterrupt as err:  # the engine's TrainingInterrupted says what is saved
        print(f"normkd: {_one_line(err) or 'interrupted'}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))  # 143 after SIGTERM
    finally:
        for w in held:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


MAX_LINE = 2000  # characters of an error line: bounded whatever a message repeats


def _one_line(err: BaseException | str) -> str:
    """The message on one line, whatever a library put in it, and at most MAX_LINE long."""
    text = str(err)[: MAX_LINE * 4]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())


def entry() -> int:
    """The ``normkd`` process (console script, ``python -m normkd``): :func:`main`, then
    SIGTERM and SIGINT ignored for the interpreter's own teardown (about a second with torch
    loaded), so a scheduler's SIGTERM or a late Ctrl-C there cannot turn a finished command's
    exit code into a kill (-15, or -2 with Python's KeyboardInterrupt at exit)."""
    import signal

    code = main()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return code
