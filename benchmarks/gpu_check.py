"""``make gpu-check``: run normkd's CUDA paths for real on a GPU machine, check them and time them.

Why: neither CI nor the development machine has a GPU, so the CUDA branches (autocast bf16 and
fp16 with its GradScaler, channels_last, torch.compile of the step, the device-resident loader
in GPU memory, NCCL DDP) run nowhere else. One command on a machine with a GPU (a workstation, or
the remote device tool: docs/gpu.md) runs, in order:

1. short digits distillations (NORM+KD, 2 epochs) with amp off / bf16 / fp16, channels_last and
   torch.compile, each stopped after epoch 1 and resumed: the losses are finite, the resumed run
   continues at epoch 2, and the merged student gives the FT student's logits to 1e-4; the
   device-resident loader on the GPU; a 2-process NCCL DDP run when there are 2 GPUs;
2. benchmarks/bench_throughput.py on the GPU (-> results/gpu/throughput.md);
3. a timed ``normkd reproduce cifar100 resnet20__resnet8 --scale short --epochs 2`` on the CIFAR-100
   subset ``make gpu-data`` packs (-> results/gpu/reproduce.md);
4. results/gpu.md: the device, torch/CUDA versions, each check's verdict and time.

Without a CUDA device it prints one line and exits 0: nothing is checked. ``--device cpu`` runs
the checks a CPU can run (the tests do), to keep their logic from rotting between GPU sessions.

    python benchmarks/gpu_check.py                      # on a GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --pack-data DIR      # CIFAR-100 subset to carry (make gpu-data)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    BENCH_DIR,
    REPO,
    RESULTS,
    SHARED_DATA,
    has_cifar100,
    md_table,
    write_cifar100_python,
    write_report,
)

DEMO = REPO / "configs" / "demo"
CARRY = REPO / "gpu-carry"  # ignored: what the remote command's `carry` brings along
CARRY_DATA = CARRY / "cifar100"
# The remote machine's python holds torch but not pydantic: its wheels travel (requirements.lock).
WHEELS = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions")
MAX_CARRY_MB = 48.0  # of the 64 MiB the working tree may take, the rest is the tree itself
MERGE_TOL = 1e-4
NO_CUDA = "gpu-check: no CUDA device: nothing checked"
CHECKS = (
    "fp32", "bf16", "fp16", "channels_last", "compile", "loader", "cka", "ddp", "throughput",
    "reproduce",
)  # fmt: skip
TEACHER_USERS = ("fp32", "bf16", "fp16", "channels_last", "compile", "ddp")


@dataclass
class Check:
    """One check's verdict: ok, FAILED or skipped, what it saw, how long it took."""

    name: str
    status: str
    seconds: float
    detail: str


def run_check(name: str, fn: Callable[[], str]) -> Check:
    """Run ``fn`` (returns its detail line; raises on a failed assertion), time it, never raise:
    one broken path must not hide the verdicts of the others."""
    t0 = time.perf_counter()
    try:
        detail = fn()
        status = "skipped" if detail.startswith("skipped") else "ok"
    except Exception as err:  # a failed check, whatever broke
        status, detail = "FAILED", f"{type(err).__name__}: {err}"
    check = Check(name, status, time.perf_counter() - t0, detail)
    print(f"[gpu-check] {name}: {status} ({check.seconds:.1f} s) {detail}", flush=True)
    return check


def train_teacher(work: Path, device: str) -> Path:
    """The demo's digits teacher for one epoch (quality does not matter here, the paths do)."""
    from normkd.config import load_recipe
    from normkd.engine import run_recipe

    sets = ["optim.epochs=1", f"engine.device={device}", f"engine.out_dir={work}"]
    recipe = load_recipe(DEMO / "teacher.yaml", [*sets, "engine.quiet=true"])
    path = Path(run_recipe(recipe, overwrite=True).run_dir) / "model.safetensors"
    assert path.is_file(), f"the teacher run wrote no {path}"
    return path


def distill_recipe(work: Path, teacher: Path, name: str, device: str, **engine: Any) -> Any:
    """The demo's NORM+KD recipe, 2 epochs, with the given engine settings (amp, compile...)."""
    from normkd.config import load_recipe

    sets = [
        f"teacher.weights={teacher}",
        "optim.epochs=2",
        f"engine.device={device}",
        f"engine.out_dir={work}",
        f"engine.run_name={name}",
        "engine.quiet=true",
    ]
    sets += [f"engine.{k}={v}" for k, v in engine.items()]  # off / False too: defaults are auto
    return load_recipe(DEMO / "norm_kd.yaml", sets)


def distill_and_resume(recipe: Any) -> dict[str, Any]:
    """Epoch 1, stop, resume to epoch 2, in this process; what ``verify`` saw."""
    from normkd.engine import run_recipe

    first = run_recipe(recipe, stop_after_epoch=1, overwrite=True)
    check_stopped(Path(first.run_dir))
    done = run_recipe(recipe, resume=True)
    return verify(Path(done.run_dir), done.history, done.merge_max_logit_diff, done.final_top1)


def check_stopped(run: Path) -> None:
    """A run stopped after epoch 1 has its checkpoint and no deployed model yet."""
    assert (run / "last.pt").is_file(), f"no checkpoint in {run} after epoch 1"
    assert not (run / "model.safetensors").exists(), "a run stopped after epoch 1 deployed a model"


def verify(run: Path, history: list[dict[str, Any]], diff: float | None, top1: float) -> dict:
    """Assert finite losses, a resume that continued (not one that restarted) and a merged
    student equal to the FT student; return what was seen, for the detail line."""
    import csv

    with open(run / "metrics.csv") as fh:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(fh)]
    assert epochs == [1, 2], f"metrics.csv has epochs {epochs}: the resume did not continue"
    assert [row["epoch"] for row in history] == [1, 2], history
    terms = [k for k in history[-1] if k in ("ce", "kd", "norm", "loss")]
    bad = [(r["epoch"], k) for r in history for k in terms if not math.isfinite(r[k])]
    assert not bad, f"non-finite losses (epoch, term): {bad}"
    assert diff is not None and diff <= MERGE_TOL, f"merged vs FT logits differ by {diff}"
    assert (run / "model.safetensors").is_file(), "the resumed run wrote no model"
    last = history[-1]
    return {"diff": diff, "top1": top1, "loss": last["loss"], "img_s": last["images_per_s"]}


def check_distill(work: Path, teacher: Path, name: str, device: str, **engine: Any) -> str:
    """One engine setting end to end on ``device``: the detail line of distill_and_resume."""
    seen = distill_and_resume(distill_recipe(work, teacher, name, device, **engine))
    return (
        f"finite losses (last {seen['loss']:.3f}); resumed at epoch 2/2; merged = FT to "
        f"{seen['diff']:.1e}; top-1 {seen['top1']:.1f}%; {seen['img_s']:.0f} img/s"
    )


def check_loader(device: str) -> str:
    """The device-resident loader with augmentation on ``device``: batches live there, are
    normalised floats, and one epoch visits every image exactly once."""
    from normkd.data import Augment, DeviceLoader, load_digits_split

    split = load_digits_split(seed=0, n_train=300)
    loader = DeviceLoader(
        split.x_train, split.y_train, 64, device=device, mean=split.mean, std=split.std,
        shuffle=True, drop_last=False, augment=Augment(pad=1, flip=False),
    )  # fmt: skip
    loader.set_epoch(1)
    seen, dev = [], torch.device(device)
    for x, y, idx in loader:
        assert x.device.type == dev.type and y.device.type == dev.type, (x.device, y.device)
        assert x.dtype == torch.float32 and bool(torch.isfinite(x).all()), x.dtype
        assert torch.equal(y.cpu(), split.y_train[idx.cpu()]), "labels do not follow the images"
        seen.append(idx.cpu())
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(len(split.y_train))), "an epoch missed images"
    return f"{len(seen)} batches on {x.device}, every image once, labels aligned"


def check_cka(device: str) -> str:
    """WKD-L's class costs with the GEMMs on ``device`` (``normkd wkd-cost`` runs them beside
    the teacher), both forms, against the pair-by-pair linear CKA in float64 on the CPU."""
    from normkd.losses.wkd import cka_cost_matrix, cka_form, linear_cka

    gen, worst = torch.Generator().manual_seed(0), {}
    for c, n, d in ((6, 64, 8), (6, 16, 64)):  # the feature form, then the kernel form
        feats = torch.randn(c, n, d, generator=gen) * torch.linspace(0.5, 2.0, d)
        cost = cka_cost_matrix(feats, device=device)
        assert cost.device == feats.device and cost.dtype == feats.dtype, (cost.device, cost.dtype)
        ref = torch.zeros(c, c, dtype=torch.float64)
        for i in range(c):
            for j in range(c):
                ref[i, j] = 1 - linear_cka(feats[i].double(), feats[j].double())
        worst[cka_form(c, n, d)] = float((cost.double() - ref).abs().max())
    assert max(worst.values()) < 1e-5, worst
    diffs = ", ".join(f"{form} form {diff:.1e}" for form, diff in worst.items())
    return f"1 - CKA on {device} vs the float64 pair loop: {diffs}"


def free_port() -> int:
    """A free TCP port on the loopback interface for torchrun's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_ddp(work: Path, teacher: Path, device: str) -> str:
    """Two processes under torchrun (NCCL on 2 GPUs; gloo with ``--device cpu``, the same code
    path): one launch stops after epoch 1, a second resumes, as a restarted cluster job does."""
    if device.startswith("cuda"):
        found = torch.cuda.device_count()
        if found < 2:
            return f"skipped: NCCL DDP needs 2 CUDA devices, this machine has {found}"
        device, backend = "cuda", "NCCL"  # torchrun gives each rank its own cuda:LOCAL_RANK
    else:
        backend = "gloo"
    result = work / "ddp.json"
    for phase in ("first", "resume"):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(Path(__file__)),
            "--ddp-worker", phase, "--device", device, "--work", str(work),
            "--teacher", str(teacher),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (
            f"torchrun ({phase}) exit {proc.returncode}: {proc.stdout[-1500:]}"
        )
        if phase == "first":
            check_stopped(work / "ddp")
    done = json.loads(result.read_text())
    seen = verify(Path(done["run_dir"]), done["history"], done["diff"], done["top1"])
    return (
        f"2 processes ({backend}): finite losses (last {seen['loss']:.3f}); resumed at epoch "
        f"2/2; merged = FT to {seen['diff']:.1e}; top-1 {seen['top1']:.1f}%"
    )


def ddp_worker(phase: str, device: str, work: Path, teacher: Path) -> int:
    """One rank of one check_ddp launch: ``first`` stops after epoch 1, ``resume`` finishes;
    rank 0 then writes what the run returned to WORK/ddp.json."""
    from normkd.engine import run_recipe
    from normkd.engine.checkpoint import atomic_write_text

    recipe = distill_recipe(work, teacher, "ddp", device)
    if phase == "first":
        run_recipe(recipe, stop_after_epoch=1, overwrite=True)
        return 0
    done = run_recipe(recipe, resume=True)
    if int(os.environ.get("RANK", "0")) == 0:
        seen = {"run_dir": done.run_dir, "history": done.history, "top1": done.final_top1}
        atomic_write_text(work / "ddp.json", json.dumps(seen | {"diff": done.merge_max_logit_diff}))
    return 0


def check_throughput(device: str, out: Path, quick: bool = False) -> str:
    """benchmarks/bench_throughput.py on ``device`` (its own report, results/gpu/throughput.md);
    the detail quotes its normkd / classic verdicts. ``quick``: its smoke run (the tests)."""
    cmd = [sys.executable, str(BENCH_DIR / "bench_throughput.py"), "--device", device]
    cmd += ["--out", str(out / "gpu"), *(["--quick"] if quick else [])]
    rc = subprocess.call(cmd)
    assert rc == 0, f"bench_throughput.py exit {rc} (its output is above)"
    return throughput_verdicts(out / "gpu" / "throughput.md") + "; gpu/throughput.md"


def throughput_verdicts(md: Path) -> str:
    """The normkd / classic rows of a throughput report's summary, as one line."""
    from run_all import verdict_lines

    rows = [r.strip().strip("|").split("|") for r in verdict_lines(md)]
    picked = [
        f"{c[0].strip()} normkd/classic {c[2].strip()} ({c[4].strip()})"
        for c in rows
        if len(c) == 5 and "normkd / classic" in c[1]
    ]
    assert picked, f"no normkd / classic row in {md}"
    return "; ".join(picked)


def check_reproduce(device: str, data_root: Path | None, out: Path, work: Path) -> str:
    """A timed ``normkd reproduce`` of the CPU-sized pair, 2 epochs, on the carried subset."""
    if data_root is None:
        return (
            f"skipped: no CIFAR-100 at {CARRY_DATA} or {SHARED_DATA} "
            "(`make gpu-data`, then carry gpu-carry)"
        )
    cmd = [
        sys.executable, "-m", "normkd", "reproduce", "cifar100", "resnet20__resnet8",
        "--scale", "short", "--epochs", "2", "--data-root", str(data_root),
        "--out-dir", str(work / "reproduce"), "--report", str(out / "gpu" / "reproduce.md"),
        "--set", f"engine.device={device}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    secs = time.perf_counter() - t0
    assert rc == 0, f"normkd reproduce exit {rc} after {secs:.0f} s (its output is above)"
    from normkd.data import load_cifar100

    split = load_cifar100(data_root)
    return (
        f"{len(split.y_train):,} train / {len(split.y_test):,} test images; teacher + 6 methods, "
        f"2 epochs each, in {secs:.0f} s; gpu/reproduce.md"
    )


# What a CPU run (--device cpu) leaves out unless --only names it: too slow on 2 cores, or
# measured there by other means.
CPU_SKIPS = {
    "compile": "skipped on CPU: inductor's CPU build takes minutes and is not the GPU path",
    "throughput": "skipped on CPU: `make bench` measures it there",
    "reproduce": "skipped on CPU: a teacher and six methods for 2 epochs is a GPU job",
}


def plan(args: argparse.Namespace, work: Path, teacher: Callable[[], Path]) -> dict[str, Any]:
    """Each check by name: a function returning its detail line (raises when it fails)."""
    dev = args.device
    return {
        "fp32": lambda: check_distill(
            work, teacher(), "amp_off", dev, amp="off", channels_last=False
        ),
        "bf16": lambda: check_distill(
            work, teacher(), "amp_bf16", dev, amp="bf16", channels_last=False
        ),
        "fp16": lambda: check_distill(
            work, teacher(), "amp_fp16", dev, amp="fp16", channels_last=False
        ),
        "channels_last": lambda: check_distill(
            work, teacher(), "channels_last", dev, amp="bf16", channels_last=True
        ),
        "compile": lambda: check_distill(work, teacher(), "compile", dev, compile=True),
        "loader": lambda: check_loader(dev),
        "cka": lambda: check_cka(dev),
        "ddp": lambda: check_ddp(work, teacher(), dev),
        "throughput": lambda: check_throughput(dev, args.out),
        "reproduce": lambda: check_reproduce(dev, args.data_root, args.out, work),
    }


def run_checks(args: argparse.Namespace, work: Path) -> list[Check]:
    """The teacher once (itself a check: the train task on the device), then each named check."""
    names = [c for c in (args.only or CHECKS) if c not in (args.skip or [])]
    box: list[Path] = []

    def teacher() -> Path:
        if not box:
            raise RuntimeError("no teacher: its training failed (see the teacher row)")
        return box[0]

    fns = plan(args, work, teacher)
    if args.device == "cpu":
        asked = set(args.only or [])
        left = {k: why for k, why in CPU_SKIPS.items() if k not in asked}
        fns |= {k: (lambda why=why: why) for k, why in left.items()}
        names_run = [n for n in names if n not in left]
    else:
        names_run = names
    checks = []
    if set(TEACHER_USERS) & set(names_run):
        checks.append(run_check("teacher", lambda: _teacher(work, args.device, box)))
    return checks + [run_check(name, fns[name]) for name in names]


def _teacher(work: Path, device: str, box: list[Path]) -> str:
    box.append(train_teacher(work, device))
    return f"digits teacher (resnet8x4, 1 epoch) trained on {device}: {box[0].name}"


def device_lines(device: torch.device) -> list[str]:
    """The device and the versions every GPU figure is read against."""
    from common import env_line

    lines = [env_line(device)]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}; "
            f"{torch.cuda.device_count()} GPU(s); {props.name}, compute capability "
            f"{props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs."
        )
    import platform

    lines.append(f"Python {platform.python_version()} at {sys.executable}.")
    return lines


def report(device: torch.device, checks: list[Check], wall: float) -> str:
    """gpu.md: device, versions, each check's verdict, time and what it saw."""
    rows = [[c.name, c.status if c.status != "FAILED" else "**FAILED**", f"{c.seconds:.1f}",
             c.detail] for c in checks]  # fmt: skip
    failed = [c.name for c in checks if c.status == "FAILED"]
    verdict = (
        f"**{len(failed)} failed: {', '.join(failed)}**"
        if failed
        else "every check that ran passed"
    )
    lines = device_lines(device)
    return "\n".join(
        [
            "# GPU check (`make gpu-check`)"
            + (" on the CPU: not a GPU result" if device.type == "cpu" else ""),
            "",
            *[f"{line}\n" for line in lines],
            "Each distillation is the demo's digits NORM+KD recipe, 2 epochs, stopped after "
            "epoch 1 and resumed: finite losses, a resume that continues at epoch 2, and the "
            f"merged student's logits equal to the FT student's to {MERGE_TOL:g}. The "
            "throughput and reproduce reports are in gpu/.",
            "",
            "## Summary",
            "",
            md_table(["check", "verdict", "seconds", "what it saw"], rows),
            "",
            f"{verdict}; {wall:.0f} s in all.",
            "",
            lines[0],
        ]
    )


def pack_data(dest: Path, source: Path, n_train: int, n_test: int, seed: int = 0) -> int:
    """A seeded random subset of ``source``'s CIFAR-100 in its pickle layout under ``dest``,
    small enough to travel with the working tree (refused above MAX_CARRY_MB)."""
    from normkd.data import load_cifar100

    split = load_cifar100(source)
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(split.y_train), generator=g)[:n_train].sort().values
    te = torch.randperm(len(split.y_test), generator=g)[:n_test].sort().values
    meta = Path(split.info["root"]) / "meta"
    folder = write_cifar100_python(
        dest, (split.x_train[tr], split.y_train[tr]), (split.x_test[te], split.y_test[te]), meta
    )
    mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    if mb > MAX_CARRY_MB:
        for f in folder.iterdir():
            f.unlink()
        print(f"gpu-data: {mb:.1f} MB is over {MAX_CARRY_MB:g} MB: use fewer images")
        return 2
    print(f"gpu-data: wrote {len(tr):,} train + {len(te):,} test images ({mb:.1f} MB) to {folder}")
    return 0


def pack_wheels(dest: Path, python_version: str) -> int:
    """Download the wheels a GPU machine's python lacks (pydantic and its needs, the versions
    of requirements.lock) for ``python_version`` on x86-64 Linux, into ``dest``."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    wanted = [f"{w}=={pins[w.lower().replace('_', '-')]}" for w in WHEELS]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    cmd += [a for p in platforms for a in ("--platform", p)]
    return subprocess.call([*cmd, *wanted])


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"reports folder (default {RESULTS})")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (the tests)")
    default_root = next((r for r in (CARRY_DATA, SHARED_DATA) if has_cifar100(r)), None)
    p.add_argument("--data-root", type=Path, default=default_root, help="holds cifar-100-python/")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temp dir)")
    p.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    p.add_argument("--skip", nargs="+", choices=CHECKS, default=[], help="leave these out")
    p.add_argument("--pack-data", type=Path, metavar="DIR", help="write the CIFAR subset, exit")
    p.add_argument("--source", type=Path, default=SHARED_DATA, help="--pack-data: full CIFAR-100")
    p.add_argument("--train", type=int, default=10_000, help="--pack-data: train images")
    p.add_argument("--test", type=int, default=2_000, help="--pack-data: test images")
    p.add_argument("--pack-wheels", type=Path, metavar="DIR", help="download wheels, exit")
    p.add_argument("--python-version", default="3.12", help="--pack-wheels: the GPU's python")
    p.add_argument("--ddp-worker", choices=("first", "resume"), help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0: every check that ran passed, or no CUDA device (nothing checked); 1: a check
    failed (gpu.md says which); 2: --pack-data refused the size."""
    args = _args(argv)
    if args.pack_data is not None:
        return pack_data(args.pack_data, args.source, args.train, args.test)
    if args.pack_wheels is not None:
        return pack_wheels(args.pack_wheels, args.python_version)
    if args.ddp_worker is not None:
        return ddp_worker(args.ddp_worker, args.device, args.work, args.teacher)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0
    device = torch.device(args.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normkd-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        checks = run_checks(args, work)
    write_report(args.out, "gpu", report(device, checks, time.perf_counter() - t0))
    return 1 if any(c.status == "FAILED" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
