"""A real zoo teacher/student pair behind the Distiller, built by the engine's own assembler."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from normkd.config import recipe_from_dict
from normkd.data.build import Data
from normkd.distiller import Distiller
from normkd.engine.job import assemble
from normkd.engine.runtime import Runtime
from normkd.models import create_model

IN_SHAPE = (3, 8, 8)  # the digits images
N_TRAIN = 64


def _distiller(
    loss: list[dict], pair: tuple[str, str] = ("resnet8x4", "resnet8"), **recipe: dict
) -> Distiller:
    """``pair`` (teacher, student; random weights) with ``loss``, through the run assembler."""
    recipe = recipe_from_dict(
        {
            "name": "t",
            "teacher": {"model": pair[0]},
            "student": {"model": pair[1]},
            "loss": loss,
            "engine": {"device": "cpu"},
            **recipe,
        }
    )
    teacher, student = (create_model(name, num_classes=10) for name in pair)
    data = Data(
        train=None,
        test=None,
        num_classes=10,
        in_shape=IN_SHAPE,
        train_size=N_TRAIN,
        train_labels=torch.arange(N_TRAIN) % 10,
    )
    job = assemble(
        recipe, Runtime(torch.device("cpu")), student=student, teacher=teacher, data=data
    )
    return job.distiller


@pytest.fixture
def zoo_distiller() -> Callable[..., Distiller]:
    """Build resnet8x4 -> resnet8 (or ``pair=(teacher, student)``; random weights) with a loss
    list and other recipe sections."""
    return _distiller


@pytest.fixture
def zoo_step() -> Callable[[list[dict]], Distiller]:
    """Build resnet8x4 -> resnet8 with ``loss``, run one training step's backward, return it."""

    def run(loss: list[dict]) -> Distiller:
        d = _distiller(loss)
        d.train()
        x = torch.randn(16, *IN_SHAPE)
        y = torch.arange(16) % 10
        _logits, losses = d(x, y, torch.arange(16), epoch=100)
        sum(losses.values()).backward()
        return d

    return run


def _check_grads(d: Distiller, kind: str) -> None:
    """The student's stem and every parameter of the term get gradient; the teacher none."""
    stem = d.student.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    for name, p in d.terms[kind].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d.teacher is not None
    assert all(p.grad is None for p in d.teacher.parameters())
    # What the trainer optimises (distiller.parameters()) holds the term's modules, not the teacher.
    trained = {id(p) for p in d.parameters()}
    assert all(id(p) in trained for p in d.terms[kind].parameters())
    assert not any(id(p) in trained for p in d.teacher.parameters())


@pytest.fixture
def check_grads() -> Callable[[Distiller, str], None]:
    """Assert gradients reach the student's stem and the term's modules, never the teacher."""
    return _check_grads


@pytest.fixture
def recipe_dry_run(capsys: pytest.CaptureFixture[str]) -> Callable[[Path, Path], str]:
    """`normkd distill RECIPE --dry-run --fake-data` on CPU (batch 2, a random teacher): asserts
    it succeeds and writes no run directory; returns what it printed."""
    from normkd.cli import main
    from support import sets

    def run(path: Path, tmp_path: Path) -> str:
        over = [
            "data.batch_size=2", "data.eval_batch_size=2", "engine.device=cpu",
            f"engine.out_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'none'}",
            "teacher.weights=null",
        ]  # fmt: skip
        capsys.readouterr()
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny batches gain nothing from threads on a shared CPU
        try:
            assert main(["distill", str(path), "--dry-run", "--fake-data", *sets(*over)]) == 0
        finally:
            torch.set_num_threads(before)
        assert not (tmp_path / "runs").exists(), "a dry run must not create the run directory"
        return capsys.readouterr().out

    return run


@pytest.fixture
def norm_combo_recipe(recipe_dry_run) -> Callable[[str, str, Path], None]:
    """Checks a pair's ``norm_<kind>.yaml``: CE 1, then ``<kind>.yaml``'s term, then
    ``norm.yaml``'s, nothing standardised; on resnet20 -> resnet8 it also dry-runs (the paper
    pairs' recipes all dry-run in test_recipes.py)."""
    from normkd.config import load_recipe
    from support import CONFIGS

    configs = CONFIGS / "cifar100"

    def check(pair: str, kind: str, tmp_path: Path) -> None:
        folder = configs / pair
        combo, alone, norm = (
            load_recipe(folder / f"{m}.yaml") for m in (f"norm_{kind}", kind, "norm")
        )
        assert [t.kind for t in combo.loss] == ["ce", kind, "norm"]
        assert combo.term(kind) == alone.term(kind) and combo.term("norm") == norm.term("norm")
        assert combo.term("ce").weight == 1.0 and not combo.logit_standardization.enabled
        if pair == "resnet20__resnet8":
            printed = recipe_dry_run(folder / f"norm_{kind}.yaml", tmp_path)
            assert f"{kind}=" in printed and "norm=" in printed

    return check
