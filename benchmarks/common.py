"""Helpers every benchmark shares, so each figure states where and how it was measured.

One environment line (device, torch, threads, date, load), Markdown tables, interleaved median
timing (drift on a shared machine hits every variant alike) and report/plot writing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from normkd.engine.checkpoint import atomic_write, atomic_write_text

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
CONFIGS = REPO / "configs"


def parse_args(
    description: str,
    argv: Sequence[str] | None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The flags every benchmark takes: ``--quick`` (smoke run), ``--out DIR``, ``--device``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds, not minutes)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present (the engine's rule, reused so both agree)."""
    from normkd.engine.runtime import resolve_device as engine_resolve

    return engine_resolve(name)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human description of ``device``: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"


def load_avg() -> float | None:
    """1-minute load average: a figure measured under load > cores is not a quiet-machine figure."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def env_line(device: torch.device, after: bool = False) -> str:
    """The line every table carries: device, torch version, threads, date and load.

    ``after``: taken right after the benchmark ran, when the 1-minute load average still holds
    the benchmark's own CPU threads; those are not counted as someone else's load.
    """
    load = load_avg()
    own = torch.get_num_threads() if after and device.type == "cpu" else 0
    load_s = f", load average {load:.2f}" if load is not None else ""
    if load is not None and own:
        load_s += f" (up to {own} of it this benchmark's own threads)"
    busy = ""
    if load is not None and load - own >= max(1.0, (os.cpu_count() or 1) / 2):
        busy = " **Busy machine: timings here are not quiet-machine figures.**"
    return (
        f"Device: {device_name(device)}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M %Z')}{load_s}.{busy}"
    )


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are str()-ed as given (format numbers before)."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` (sample std); a single value prints alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(
    fn: Callable[[], object], device: torch.device, number: int = 1, rate: bool = False
) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls (device synchronised).

    With ``rate``, ``fn`` returns how many items it processed and the result is items/second.
    """
    sync(device)
    t0 = time.perf_counter()
    items = 0
    for _ in range(number):
        done = fn()
        if rate:
            items += int(done)  # type: ignore[call-overload]
    sync(device)
    elapsed = time.perf_counter() - t0
    return items / elapsed if rate else elapsed / number


def interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
    number: int = 1,
    rate: bool = False,
) -> dict[str, list[float]]:
    """Per-call seconds (or items/s with ``rate``) of each variant, ``repeats`` blocks each.

    Warm-up blocks (allocator, kernels, worker start-up) are run and dropped. Variants run in an
    order rotated every repeat, so slow drifts (other jobs, thermal) spread evenly over them;
    report the median of the returned lists.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            time_block(fns[n], device, number, rate)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(time_block(fns[n], device, number, rate))
    return out


def median(values: Sequence[float]) -> float:
    """Median: robust to the odd block hit by a background job."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """min-max of the repeats relative to their median, to show how noisy a figure was."""
    m = median(values)
    if m <= 0 or len(values) < 2:
        return "—"
    return f"±{100 * (max(values) - min(values)) / (2 * m):.0f}%"


def met(ok: bool) -> str:
    """Target verdict cell."""
    return "met" if ok else "**not met**"


def write_report(out: Path, name: str, text: str) -> Path:
    """Write ``out/name.md`` whole (creating ``out``; a crash leaves the old report), print it,
    return the path."""
    path = out / f"{name}.md"
    atomic_write_text(path, text.rstrip() + "\n")
    print(text)
    print(f"\n[bench] wrote {path}", flush=True)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on CI or the device machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path, name: str, env: str) -> Path:
    """Save ``fig`` as ``out/name.png`` with the environment line as its footer."""
    plt = pyplot()
    fig.text(0.5, 0.005, env, ha="center", va="bottom", fontsize=7, color="0.35", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = out / f"{name}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    print(f"[bench] wrote {path}", flush=True)
    return path


# CIFAR-100 as ../shared ships it (the folder holding cifar-100-python/): the benchmarks read the
# real images when it is there and generated ones when not (a clone without ../shared, CI's tests).
SHARED_DATA = REPO.parent / "shared" / "data"


def has_cifar100(root: Path) -> bool:
    """Whether ``root`` holds the python-pickle CIFAR-100 layout (``cifar-100-python/train``)."""
    return all((root / "cifar-100-python" / name).is_file() for name in ("train", "test"))


def write_cifar100_python(
    root: Path,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    meta_from: Path | None = None,
) -> Path:
    """Write uint8 (N, 3, 32, 32) images and labels as ``root/cifar-100-python/{train,test,meta}``.

    Why: the original python-pickle layout (bytes keys, rows of 1024 red, green, blue values, fine
    labels; coarse labels are left out) is what ``normkd.data.load_cifar100``, ``normkd reproduce``
    and torchvision-style datasets read, so a generated set or a subset that fits a GPU machine's
    64 MiB working tree goes through the very code the real one does. ``meta_from``: a ``meta``
    file to copy (the class names); without it, placeholder names are written.
    """
    import pickle

    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, 32, 32) or len(x) != len(y):
            raise ValueError(f"{name}: expected uint8 (N, 3, 32, 32) images and N labels")
        record = {
            b"batch_label": f"{name} subset".encode(),
            b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(y))],
            b"fine_labels": [int(v) for v in y.tolist()],
            b"data": np.ascontiguousarray(x.reshape(len(x), -1).numpy()),
        }
        _write_bytes(folder / name, pickle.dumps(record, protocol=4))  # raw: 3 KB an image
    if meta_from is not None and meta_from.is_file():
        _write_bytes(folder / "meta", meta_from.read_bytes())
    else:
        names = [f"class_{i:02d}".encode() for i in range(100)]
        _write_bytes(folder / "meta", pickle.dumps({b"fine_label_names": names}, protocol=4))
    return folder


def _write_bytes(path: Path, data: bytes) -> None:
    """A whole file or the old one: a cut-off write never leaves a truncated pickle behind."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
