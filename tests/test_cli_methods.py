"""Every distillation method and NORM combination trains end to end through the CLI on digits."""

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from normkd.cli import main
from normkd.config import ConfigError, load_recipe, recipe_from_dict
from normkd.demo import demo_methods
from normkd.engine import run_recipe
from normkd.engine.checkpoint import load_checkpoint, load_model_file
from normkd.losses import TERMS, method_label
from normkd.models import create_model
from support import DEMO, build_job, sets

# Every registered term that has a demo recipe, alone and with NORM where the demo pairs them.
METHODS = [
    method
    for kind in TERMS
    if kind not in ("ce", "norm")
    for method in (kind, f"norm_{kind}")
    if (DEMO / f"{method}.yaml").is_file()
]
_TEACHER = "resnet8"
FAST = ["data.n_train=200", "engine.device=cpu", "optim.epochs=1", f"teacher.model={_TEACHER}"]
NO_TEACHER = ["teacher.weights=null", "engine.device=cpu"]  # dry runs need no trained teacher


@pytest.fixture
def teacher_file(demo_teacher: Path) -> Path:
    """The session's resnet8 demo teacher (tests/conftest.py)."""
    return demo_teacher


def _distill(method: str, out: Path, teacher: Path, *extra: str) -> int:
    args = [*FAST, f"teacher.weights={teacher}", *extra]
    return main(
        ["distill", str(DEMO / f"{method}.yaml"), "--out-dir", str(out), "--quiet", *sets(*args)]
    )


@pytest.fixture(scope="session")
def distilled(tmp_path_factory, demo_teacher) -> Callable[[str], Path]:
    """Run directory of a one-epoch distillation with ``method``, run once per session."""
    out = tmp_path_factory.mktemp("methods")
    done: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in done:
            assert _distill(method, out, demo_teacher) == 0
            done[method] = out / f"demo_{method}"
        return done[method]

    return run


@pytest.mark.parametrize("method", METHODS)
def test_each_method_distils_through_the_cli_and_deploys_the_plain_student(method, distilled):
    run = distilled(method)
    assert (run / "model.safetensors").is_file() and (run / "metrics.csv").is_file()
    with open(run / "metrics.csv") as fh:
        row = next(csv.DictReader(fh))
    # Each term is logged as a finite number; a distillation term that is 0 was not applied.
    recipe = load_recipe(DEMO / f"{method}.yaml", [f"teacher.model={_TEACHER}"])
    for term in (t.kind for t in recipe.loss):
        assert math.isfinite(float(row[term])), (term, row[term])
        assert term == "ce" or float(row[term]) != 0.0, (term, row[term])
    model, meta = load_model_file(run / "model.safetensors")
    plain = create_model("resnet8", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert set(load_file(run / "model.safetensors")) == set(plain.state_dict())
    assert meta.get("merged_from_ft", False) == method.startswith("norm")
    # Term state (regressors, embeddings, memory banks, fusion modules) lives in the checkpoint,
    # not the model: exactly the state the run's terms hold when they are built.
    ckpt = load_checkpoint(run / "last.pt")["distiller"]
    terms = build_job(recipe, untrained_teacher=True).distiller.terms.state_dict()
    assert {k for k in ckpt if k.startswith("terms.")} == {f"terms.{k}" for k in terms}


@pytest.mark.parametrize("method", ["fitnet", "crd", "norm_crd"])
def test_term_modules_are_optimised_with_the_student(method, distilled, teacher_file):
    ckpt = load_checkpoint(distilled(method) / "last.pt")
    recipe = load_recipe(DEMO / f"{method}.yaml", [*FAST, f"teacher.weights={teacher_file}"])
    d = build_job(recipe).distiller
    n_student = sum(1 for _ in d.student.parameters())
    n_term = sum(1 for _ in d.terms.parameters())
    assert n_term > 0
    # SGD sees the student's parameters, then the terms' (distiller.parameters() order) ...
    group = ckpt["optimizer"]["param_groups"][0]["params"]
    assert len(group) == n_student + n_term
    # ... and has stepped every one of the terms' parameters (non-zero momentum).
    state = ckpt["optimizer"]["state"]
    for i in group[n_student:]:
        assert state[i]["momentum_buffer"].abs().sum() > 0
    # Their trained values are in the checkpoint with the term, under terms.<kind>.
    kind = method.removeprefix("norm_")
    names = {f"terms.{kind}.{n}" for n, _ in d.terms[kind].named_parameters()}
    assert names <= set(ckpt["distiller"])


def test_crd_resume_is_bit_identical(tmp_path, teacher_file):
    common = ["optim.epochs=2", "data.n_train=100"]
    assert _distill("crd", tmp_path, teacher_file, *common, "engine.run_name=full") == 0
    recipe = load_recipe(
        DEMO / "crd.yaml",
        [
            *FAST,
            *common,
            f"teacher.weights={teacher_file}",
            f"engine.out_dir={tmp_path}",
            "engine.run_name=part",
            "engine.quiet=true",
        ],
    )
    run_recipe(recipe, stop_after_epoch=1)
    run_recipe(recipe, resume=True)
    full = load_checkpoint(tmp_path / "full" / "last.pt")["distiller"]
    part = load_checkpoint(tmp_path / "part" / "last.pt")["distiller"]
    assert full.keys() == part.keys()
    for k in full:
        assert torch.equal(full[k], part[k]), k


def test_demo_discovers_the_new_recipes_with_labels():
    for m in METHODS:
        assert m in demo_methods() and method_label(m) != m  # tables name it


def _recipe(loss: list[dict]) -> dict:
    return {
        "name": "x",
        "teacher": {"model": "resnet8x4"},
        "student": {"model": "resnet8"},
        "loss": loss,
    }


@pytest.mark.parametrize(
    "loss,pattern",
    [
        (
            [{"kind": "ce"}, {"kind": "dkdd"}],
            rf"loss\.1: unknown loss term kind; valid kinds: {', '.join(sorted(TERMS))}",
        ),
        (
            [{"weight": 1.0}],
            rf"loss\.0: each loss term needs 'kind' \(one of: {', '.join(sorted(TERMS))}\)",
        ),
        (
            [{"kind": "dkd", "temprature": 2}],
            r"loss\.0\.temprature: unknown key; valid keys for 'dkd': alpha, beta, kind, temperature, warmup, weight",
        ),
        ([{"kind": "crd", "nce_m": 1.0}], r"loss\.0\.nce_m: "),
        ([{"kind": "crd", "negatives": "some"}], r"loss\.0\.negatives: .*'other_classes' or 'any'"),
        ([{"kind": "dkd", "temperature": 0}], r"loss\.0\.temperature: .*greater than 0"),
        ([{"kind": "at", "p": -1}], r"loss\.0\.p: .*greater than 0"),
        ([{"kind": "fitnet", "stage": "two"}], r"loss\.0\.stage: "),
    ],
)
def test_bad_terms_fail_with_a_message_naming_what_is_valid(loss, pattern):
    with pytest.raises(ConfigError, match=pattern):
        recipe_from_dict(_recipe(loss))


@pytest.mark.parametrize("kind", [k for k, term in TERMS.items() if term.needs_teacher()])
def test_teacher_terms_are_refused_without_a_teacher(kind):
    with pytest.raises(ConfigError, match=rf"loss terms \['{kind}'\] need one"):
        recipe_from_dict(
            {
                "name": "x",
                "task": "train",
                "student": {"model": "resnet8"},
                "loss": [{"kind": kind}],
            }
        )


def test_unknown_kind_on_the_command_line_is_a_one_line_error(tmp_path, capsys):
    rc = main(
        ["distill", str(DEMO / "dkd.yaml"), "--dry-run", *sets(*NO_TEACHER, "loss.1.kind=dkdd")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"valid kinds: {', '.join(sorted(TERMS))}" in err and "Traceback" not in err


def test_fitnet_stage_out_of_range_is_a_user_error(capsys):
    rc = main(
        ["distill", str(DEMO / "fitnet.yaml"), "--dry-run", *sets(*NO_TEACHER, "loss.1.stage=9")]
    )
    assert rc == 2
    assert "index 9 is out of range; valid: -4..3" in capsys.readouterr().err
