"""Published checkpoint files as RepDistiller and mdistiller write them, and the ones refused.

Every file is built here with torch.save, in the layout the authors' training scripts use:
- mdistiller (engine/trainer.py) saves ``{"epoch", "model", "optimizer", "best_acc"}`` where
  "model" is the state dict of the DataParallel-wrapped distiller (keys ``module.student.*``,
  ``module.teacher.*`` and the method's heads), in files named ``latest``, ``best``,
  ``epoch_N``; beside each, ``student_*`` holds ``{"model": student.state_dict()}``.
- RepDistiller (train_teacher.py / train_student.py) saves ``{MODEL}_last.pth`` as
  ``{"opt": argparse.Namespace, "model": ..., ["optimizer": ...]}``.
"""

import argparse
import collections

import pytest
import torch
from torch import nn

from normkd.models import CheckpointError, create_model, load_weights
from normkd.models.weights import safe_torch_load


def _trained(name: str = "resnet8", num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A model whose weights and BN statistics differ from a fresh one's (a real step taken)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    opt.step()
    return model


def _assert_loaded(path, src: nn.Module, name: str = "resnet8") -> None:
    torch.manual_seed(123)  # a fresh model with other weights
    dst = load_weights(create_model(name, num_classes=10), path)
    want, got = src.state_dict(), dst.state_dict()
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


def _mdistiller_latest(student: nn.Module, teacher: nn.Module, heads: bool) -> dict:
    """mdistiller's whole-distiller checkpoint: DataParallel(distiller).state_dict() and more."""
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    model = {f"module.student.{k}": v for k, v in student.state_dict().items()}
    model |= {f"module.teacher.{k}": v for k, v in teacher.state_dict().items()}
    if heads:  # e.g. FitNet's regressor, CRD's embeddings and memory banks
        model["module.conv_reg.weight"] = torch.randn(256, 64, 1, 1)
        model["module.contrast.memory_v1"] = torch.randn(50, 128)
    return {
        "epoch": 240,
        "model": model,
        "optimizer": opt.state_dict(),
        "best_acc": torch.tensor(75.3),
    }


@pytest.mark.parametrize("heads", [True, False], ids=["with-heads", "vanilla"])
def test_mdistiller_whole_distiller_checkpoint_loads_its_student(tmp_path, heads):
    # Teacher of the same architecture: taking its entries instead would load without a word.
    student, teacher = _trained(seed=1), _trained(seed=2)
    ckpt = _mdistiller_latest(student, teacher, heads)
    if not heads:  # mdistiller's Vanilla wrapper has no teacher
        ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k.startswith("module.student.")}
    torch.save(ckpt, tmp_path / "latest")
    _assert_loaded(tmp_path / "latest", student)


def test_mdistiller_student_checkpoint_loads(tmp_path):
    student = _trained()
    torch.save({"model": student.state_dict()}, tmp_path / "student_best")
    _assert_loaded(tmp_path / "student_best", student)


def test_mdistiller_checkpoint_of_another_student_names_only_the_students_mismatches(tmp_path):
    ckpt = _mdistiller_latest(_trained("resnet8x4"), _trained("resnet32x4"), heads=True)
    torch.save(ckpt, tmp_path / "best")
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet8", num_classes=10), tmp_path / "best")
    msg = str(info.value)
    assert "\n" not in msg and "does not fit CifarResNet" in msg
    assert "conv1.weight: checkpoint (32, 3, 3, 3) vs model (16, 3, 3, 3)" in msg
    assert "teacher" not in msg and "conv_reg" not in msg and "memory" not in msg


def _options() -> argparse.Namespace:
    """What RepDistiller's parse_option() returns: strings, numbers, lists, booleans."""
    return argparse.Namespace(
        model="resnet8", dataset="cifar100", learning_rate=0.05, lr_decay_epochs=[150, 180, 210],
        lr_decay_rate=0.1, weight_decay=5e-4, momentum=0.9, epochs=240, trial=0,
        multiprocessing=False,
        save_folder="./save/models/resnet8_cifar100_lr_0.05_decay_0.0005_trial_0",
    )  # fmt: skip


@pytest.mark.parametrize("with_optimizer", [True, False], ids=["train_teacher", "train_student"])
def test_repdistiller_last_checkpoint_with_its_argparse_options_loads(tmp_path, with_optimizer):
    model = _trained()
    ckpt = {"opt": _options(), "model": model.state_dict()}
    if with_optimizer:
        ckpt["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.05).state_dict()
    path = tmp_path / "resnet8_last.pth"
    torch.save(ckpt, path)
    _assert_loaded(path, model)
    opt = safe_torch_load(path)["opt"]
    assert type(opt) is argparse.Namespace and opt == _options()
    # The allowance lasted for that load only: torch's global allowlist is as it was.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


@pytest.fixture
def caller_allows():
    """Let a test add to torch's global allowlist; put the list back as it was afterwards."""
    before = torch.serialization.get_safe_globals()
    yield torch.serialization.add_safe_globals
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


def test_a_global_allowance_made_by_the_caller_survives_a_load(tmp_path, caller_allows):
    torch.save({"opt": _options(), "model": _trained().state_dict()}, tmp_path / "m_last.pth")
    caller_allows([argparse.Namespace])
    safe_torch_load(tmp_path / "m_last.pth")
    assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_without_torchs_scoped_allowlist_the_allowance_is_undone_by_hand(
    tmp_path, monkeypatch, caller_allows
):
    # torch 2.4 (the oldest normkd supports) has add_safe_globals but no safe_globals context.
    monkeypatch.delattr(torch.serialization, "safe_globals")
    model = _trained()
    torch.save({"opt": _options(), "model": model.state_dict()}, tmp_path / "resnet8_last.pth")
    caller_allows([collections.Counter])  # the caller's own allowance stays
    before = set(torch.serialization.get_safe_globals())
    _assert_loaded(tmp_path / "resnet8_last.pth", model)
    assert set(torch.serialization.get_safe_globals()) == before
    assert argparse.Namespace not in before


_CALLS: list[str] = []


def _record(what: str) -> str:
    _CALLS.append(what)
    return what


class _Recorder:
    """Unpickling it calls _record: proof that the loader ran code from the file."""

    def __reduce__(self):
        return (_record, ("unpickled",))


class _Options:
    """A look-alike of argparse.Namespace that must not ride on its allowance."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __setstate__(self, state):
        _CALLS.append("setstate")
        self.__dict__.update(state)


class _StateDict(collections.OrderedDict):
    """An OrderedDict subclass: not OrderedDict itself, so not plain data."""


def _resnet8_state() -> dict:
    return create_model("resnet8", num_classes=10).state_dict()


@pytest.mark.parametrize(
    "extra,culprit",
    [
        (lambda: {"opt": _Recorder()}, "_record"),
        (lambda: {"opt": argparse.Namespace(lr=0.05, hook=_Recorder())}, "_record"),
        (lambda: {"opt": _Options(lr=0.05)}, "_Options"),
        (lambda: {"opt": argparse.Namespace(parser=_Options(lr=0.05))}, "_Options"),
        (lambda: {"model": _StateDict(_resnet8_state())}, "_StateDict"),
    ],
    ids=["code", "code-in-namespace", "other-class", "other-class-in-namespace", "dict-subclass"],
)
def test_any_other_class_is_refused_in_one_line_and_never_run(tmp_path, extra, culprit):
    ckpt = {"model": _resnet8_state()} | extra()
    path = tmp_path / "resnet8_last.pth"
    torch.save(ckpt, path)
    _CALLS.clear()
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet8", num_classes=10), path)
    msg = str(info.value)
    assert msg.startswith(f"refused to load {path}: it holds objects other than tensors")
    assert culprit in msg and "\n" not in msg
    assert _CALLS == []
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
