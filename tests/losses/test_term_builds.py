"""What every registered term builds into a run, the kinds taken from the registry itself.

A term declares its module and the taps that module reads; the engine builds the module, wraps
the student where the term says so, and has the distiller collect exactly the declared taps. For
each kind (a new term is checked the day it registers), a run is assembled with CE + that term and
one step is watched where the term receives its state: the module is the registered one, every
declared tap arrives shaped as the model's own modules make it (each stage the student's stage),
nothing undeclared is collected, and the term's parameters train with the student, the teacher's
never.
"""

from __future__ import annotations

import pytest
import torch

from normkd.config import recipe_from_dict
from normkd.losses import TERMS
from normkd.losses.base import StepState, Taps
from normkd.models.taps import get_module, get_taps
from support import build_job

# Settings a term's defaults do not fit digits' 8x8 images with (WKD-F's ImageNet grid of 4 would
# split resnet8's 2x2 maps into one-pixel cells, which the term refuses).
FIT_DIGITS = {"wkd_f": {"grid": 1}}


def _job(kind: str):
    loss = [{"kind": "ce"}] + ([] if kind == "ce" else [{"kind": kind, **FIT_DIGITS.get(kind, {})}])
    recipe = recipe_from_dict(
        {
            "name": f"builds_{kind}",
            "task": "distill",
            "data": {"kind": "digits", "n_train": 64, "batch_size": 16, "eval_batch_size": 64},
            "teacher": {"model": "resnet8x4"},
            "student": {"model": "resnet8"},
            "loss": loss,
            "optim": {"epochs": 2, "milestones": []},
            "engine": {"device": "cpu", "amp": "off"},
        }
    )
    return build_job(recipe, untrained_teacher=True)  # a random teacher: nothing trains here


def _stage_shapes(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The model's stage modules' output shapes, by hooks of this test's own."""
    out: list[tuple[int, ...]] = []
    names = get_taps(model).stages
    hooks = [
        get_module(model, n).register_forward_hook(lambda m, i, o: out.append(tuple(o.shape)))
        for n in names
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    assert len(out) == len(names) > 0
    return out


def _check_taps(taps: Taps, declared: frozenset[str], model: torch.nn.Module, x) -> None:
    """Each declared tap is there, shaped as ``model`` makes it; the undeclared are empty."""
    b = x.shape[0]
    assert ("stages" in declared) == bool(taps.stages)
    if "stages" in declared:
        assert [tuple(s.shape) for s in taps.stages] == _stage_shapes(model, x)
    assert ("preact" in declared) == bool(taps.preact)
    if "preact" in declared:  # the maps before the stages' last ReLU: the stages' shapes
        assert [tuple(p.shape) for p in taps.preact] == _stage_shapes(model, x)
    assert ("feat" in declared) == (taps.feat is not None)
    if taps.feat is not None:
        assert taps.feat.shape[0] == b and taps.feat.shape[1] == get_taps(model).feat_channels
    assert ("pooled" in declared) == (taps.pooled is not None)
    if taps.pooled is not None:
        assert taps.pooled.shape == (b, get_taps(model).feat_channels)
    assert ("wrapper" in declared) == (taps.wrapper is not None)
    assert taps.logits is not None and taps.logits.shape[0] == b


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_each_registered_term_builds_its_module_and_receives_its_declared_taps(kind: str):
    job = _job(kind)
    cfg, term = TERMS[kind], job.distiller.terms[kind]
    assert type(term) is cfg.term
    assert job.wrapped == cfg.changes_student()
    got: list[StepState] = []
    handle = term.register_forward_pre_hook(lambda m, args: got.append(args[0]))
    x, y, idx = next(iter(job.data.train))
    job.distiller.train()
    job.distiller(x, y, idx, 0)
    handle.remove()
    assert len(got) == 1
    state = got[0]
    declared_s = term.student_taps | {"logits"}  # CE beside it reads the student's logits
    _check_taps(state.student, declared_s, job.plain, x)
    if term.teacher_taps:
        assert state.teacher is not None
        _check_taps(state.teacher, term.teacher_taps | {"logits"}, job.distiller.teacher, x)
    else:
        assert state.teacher is None  # nothing read the teacher: it did not even run
    trained = {id(p) for g in job.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in term.parameters()} <= trained
    assert {id(p) for p in job.student.parameters()} <= trained
    assert not {id(p) for p in job.distiller.teacher.parameters()} & trained
