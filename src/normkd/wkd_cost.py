"""``normkd wkd-cost``: WKD-L's published class costs for a recipe's teacher, in one command.

The ``wkd_l`` term cannot make them: it is built from the models' tap shapes and never sees the
teacher's weights or the training images (see losses/wkd.py). This builds the recipe's teacher as
a run does (``engine.job.build_teacher``), reads its training split un-augmented, in dataset
order, normalised as a run's (``build_data(plain_train=True)``), and saves ``1 - linear CKA``
between the teacher's rows of every two classes (``teacher_class_features`` +
``cka_cost_matrix``, the authors' offline tools) under the key ``cost``, its provenance in the
file's metadata. The teacher runs in fp32, as the authors' did. One difference from them: with
``--source logits`` each class keeps its *first* images in dataset order (they shuffled ImageNet
with seed 0 before cutting every class to the smallest count).
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from normkd.config import ModelCfg, Recipe
from normkd.data.build import Place, build_data
from normkd.engine.checkpoint import atomic_write
from normkd.engine.job import build_teacher
from normkd.engine.rundir import check_output
from normkd.engine.runtime import resolve_device
from normkd.errors import UserError
from normkd.log import logger
from normkd.losses.wkd import (
    SOURCES,
    Source,
    cka_cost_matrix,
    cka_form,
    cka_workspace_bytes,
    image_row_shape,
    images_per_class,
    teacher_class_features,
)
from normkd.records import git_commit, machine_line, now, sha256

# The file's "what" (the last_stage line is the one benchmarks/tables.py's committed file holds).
WHAT = {
    "last_stage": "WKD-L class costs: 1 - linear CKA of the teacher's last-stage rows per class",
    "logits": "WKD-L class costs: 1 - linear CKA of the teacher's logit rows per class",
}
MEMINFO = Path("/proc/meminfo")  # the memory check reads MemAvailable here (Linux)
CGROUP = Path("/sys/fs/cgroup")  # and a container's limit here (cgroup v2, or v1's memory/)
CKA_QUIET_S = 5.0  # the CKA's progress lines start once it has run this long


@dataclass(frozen=True)
class CostFile:
    """What :func:`make_cost_file` wrote, and how a run of its recipe uses it."""

    path: Path
    classes: int
    rows_per_class: int
    seconds: float
    override: str  # ``--set loss.N.cost_matrix=PATH`` (or where such a term would take it)


def _teacher_cfg(recipe: Recipe) -> ModelCfg:
    if recipe.teacher is None:
        raise UserError(
            f"{recipe.name} has no teacher: wkd-cost reads a distill recipe's teacher and data"
        )
    return recipe.teacher


def default_out(recipe: Recipe, source: Source) -> Path:
    """``<teacher weights folder>/wkd_cost_<source>.safetensors``: the costs belong beside the
    teacher they were made from."""
    cfg = _teacher_cfg(recipe)
    weights = cfg.weights or cfg.pretrained_file
    if weights is None:
        raise UserError(
            f"{recipe.name}: the teacher has no weights file to put the costs beside: pass --out"
        )
    return Path(weights).parent / f"wkd_cost_{source}.safetensors"


def wkd_override(recipe: Recipe, path: Path) -> str:
    """The ``--set`` that names ``path`` as the cost of the recipe's ``wkd_l`` term."""
    index = next((i for i, t in enumerate(recipe.loss) if t.kind == "wkd_l"), None)
    if index is None:
        return shlex.quote(f"loss.N.cost_matrix={path}") + " on a wkd_l term (N: its place)"
    return "--set " + shlex.quote(f"loss.{index}.cost_matrix={path}")


def check_class_counts(labels: torch.Tensor, num_classes: int, source: Source) -> torch.Tensor:
    """The images per class; refuses, before the pass, a split the chosen rows cannot be paired
    over: every class needs an image, and last-stage rows pair the images of two classes one to
    one."""
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise UserError(
            f"class {empty[0]} has no training image ({len(empty)} class(es) without one): the "
            "costs need every class"
        )
    low, high = int(counts.min()), int(counts.max())
    if source == "last_stage" and low != high:
        raise UserError(
            f"--source last_stage pairs the images of two classes one to one, so every class "
            f"needs as many; this training split has {low} to {high} per class: use --source "
            f"logits (each class cut to the smallest count, {low})"
        )
    return counts


def memory_available() -> int | None:
    """Bytes this process could get now: the kernel's ``MemAvailable``, or less where a container
    (cgroup) limit leaves less, since going past that limit is an OOM kill, not a refusal."""
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", MEMINFO.read_text(), re.MULTILINE)
    except OSError:
        found = None
    known = [int(found[1]) * 1024] if found else []
    if (headroom := cgroup_headroom()) is not None:
        known.append(headroom)
    return min(known, default=None)


def cgroup_headroom() -> int | None:
    """The memory limit of this process's cgroup less what it uses, reclaimable file cache not
    counted (as ``docker stats`` does); None where no limit is set or none can be read."""
    for limit, usage, cache in (
        ("memory.max", "memory.current", "inactive_file"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),
    ):
        try:
            cap = (CGROUP / limit).read_text().strip()
            used = int((CGROUP / usage).read_text())
            stat = (CGROUP / limit).with_name("memory.stat").read_text()
        except (OSError, ValueError):
            continue
        if cap == "max" or not cap.isdigit() or int(cap) >= 1 << 60:  # "no limit" (v1: ~2^63)
            return None
        found = re.search(rf"^{cache} (\d+)$", stat, re.MULTILINE)
        return max(0, int(cap) - used + (int(found[1]) if found else 0))
    return None


def _size(nbytes: int) -> str:
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:,.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


def check_memory(
    teacher: nn.Module, in_shape: tuple[int, ...], counts: torch.Tensor, source: Source
) -> str:
    """Predict the memory of the rows and the CKA (one probe forward for the rows' shape) and
    refuse, before the pass, what would not fit; returns the prediction, for the log."""
    per_image, dim = image_row_shape(teacher, in_shape, source)
    c, n = len(counts), images_per_class(counts, source) * per_image
    rows, work = 4 * c * n * dim, cka_workspace_bytes(c, n, dim)  # float32 rows
    shape = f"{c:,} classes x {n:,} rows x {dim:,} floats"
    free = memory_available()
    if free is not None and rows + work > free:
        fix = (
            "--source logits (one row per image) or a machine"
            if source == "last_stage"
            else "a machine"
        )
        raise UserError(
            f"the teacher's {source} rows need {_size(rows)} ({shape}) and the CKA up to "
            f"{_size(work)} more, but {_size(free)} of memory is available: use {fix} with more "
            "memory"
        )
    have = "unknown" if free is None else _size(free)
    return f"the rows take {_size(rows)} ({shape}), the CKA up to {_size(work)}; {have} available"


def _cka_progress(progress: bool) -> Callable[[int, int], None] | None:
    """A line per tenth of the CKA's blocks, once it has run for ``CKA_QUIET_S`` seconds."""
    if not progress:
        return None
    t0, shown = time.perf_counter(), [0]

    def tick(done: int, total: int) -> None:
        seconds, tenth = time.perf_counter() - t0, done * 10 // total
        if seconds >= CKA_QUIET_S and (tenth > shown[0] or done == total):
            shown[0] = tenth
            logger.info(f"wkd-cost: linear CKA, block {done}/{total} ({seconds:.0f} s)")

    return tick


def _batches(
    loader: Any, device: torch.device, progress: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of ``loader`` on ``device``; on a terminal a bar, elsewhere a line
    per tenth of the pass (the engine's rule: a bar's redraws would flood a log file)."""
    steps = len(loader)
    bar = progress and sys.stderr.isatty()
    every = max(1, steps // 10)
    shown = tqdm(loader, total=steps, desc="wkd-cost", disable=not bar, leave=False)
    for step, (x, y, _idx) in enumerate(shown, 1):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if progress and not bar and (step % every == 0 or step == steps):
            logger.info(f"wkd-cost: teacher pass, batch {step}/{steps}")


def make_cost_file(
    recipe: Recipe,
    out: Path,
    source: Source = "last_stage",
    force: bool = False,
    progress: bool = True,
) -> CostFile:
    """Build the recipe's teacher and training split and write their ``(C, C)`` raw ``1 - CKA``
    to ``out`` (atomically; an existing ``out`` only with ``force``, refused before the work)."""
    t0 = time.perf_counter()
    if source not in SOURCES:
        raise UserError(f"--source {source!r}: use {' or '.join(SOURCES)}")
    cfg = _teacher_cfg(recipe)
    check_output(out, force)
    device = resolve_device(recipe.engine.device)
    torch.manual_seed(recipe.engine.seed)  # as assemble does: whatever draws, draws the same
    data = build_data(recipe.data, Place(device, recipe.engine.seed), plain_train=True)
    assert data.train_labels is not None  # every loader build_data makes knows its labels
    counts = check_class_counts(data.train_labels, data.num_classes, source)
    teacher = build_teacher(cfg, data.num_classes).to(device)
    memory = check_memory(teacher, data.in_shape, counts, source)
    if progress:
        logger.info(
            f"wkd-cost: the teacher's {source} rows of {data.train_size:,} training images "
            f"({recipe.data.kind}, un-augmented, in order) on {device}; {memory}"
        )
    batches = _batches(data.train, device, progress)
    feats = teacher_class_features(teacher, batches, counts, source)
    c, n, d = feats.shape
    if progress:
        logger.info(
            f"wkd-cost: 1 - linear CKA of {c * (c - 1) // 2:,} class pairs, {n:,} rows of "
            f"{d:,} a class ({cka_form(c, n, d)} form) on {device}"
        )
    cost = cka_cost_matrix(feats, progress=_cka_progress(progress), device=device).contiguous()
    weights = cfg.weights or cfg.pretrained_file
    note = {  # the file's own metadata: what it is and what it was made from
        "what": WHAT[source],
        "teacher_sha256": sha256(Path(weights)) if weights else f"timm pretrained {cfg.model}",
        "rows_per_class": str(n),
        "source": source,
        "commit": git_commit(),
        "machine": machine_line(),
        "finished": now(),
        "seconds": f"{time.perf_counter() - t0:.1f}",
    }
    atomic_write(out, lambda tmp: save_file({"cost": cost}, tmp, metadata=note))
    return CostFile(out, data.num_classes, n, float(note["seconds"]), wkd_override(recipe, out))
