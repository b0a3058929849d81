"""Starting from pretrained weights, the fine-tuning way: a student's classifier of another
class count is replaced by a fresh one (one line says so), any other mismatch stays an error;
timm's own loader reads ``pretrained_file``; a teacher's classifier must fit the data.

Every weight file is written here from a model built with 1000 classes; nothing is downloaded
(timm's ``pretrained: true`` would download, so it is never run).
"""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from normkd.cli import main
from normkd.config import ModelCfg, load_recipe, recipe_from_dict
from normkd.engine.job import build_teacher
from normkd.errors import ConfigError
from normkd.models import CheckpointError, create_model
from normkd.models.weights import fit_weights
from support import DEMO, build_job, sets

TEACHER = str(DEMO / "teacher.yaml")  # task train on the digits (10 classes)
NORM = str(DEMO / "norm.yaml")  # task distill
FAST = ("engine.device=cpu", "data.n_train=200")


def _save(model: nn.Module, path) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def _folder_recipe(root, **student) -> object:
    return recipe_from_dict(
        {
            "name": "ft",
            "task": "train",
            "data": {
                "kind": "folder",
                "root": str(root),
                "image_size": 32,
                "workers": 0,
                "batch_size": 8,
            },
            "student": student,
            "engine": {"device": "cpu"},
        }
    )


def _assert_all_but(model: nn.Module, state: dict, fresh: set[str]) -> None:
    """Every tensor of ``model`` is the file's, except ``fresh`` (the new classifier)."""
    got = model.state_dict()
    for k, v in got.items():
        if k in fresh:
            assert v.shape != state[k].shape, k
        else:
            assert torch.equal(v, state[k]), k


def test_a_student_checkpoint_with_1000_classes_keeps_a_new_classifier(tmp_path, capsys):
    state = _save(create_model("resnet8", num_classes=1000), tmp_path / "imagenet.pth")
    over = [*FAST, "student.model=resnet8", f"student.weights={tmp_path / 'imagenet.pth'}"]
    assert main(["train", TEACHER, "--dry-run", *sets(*over)]) == 0
    line = (
        f"student.weights: loaded {len(state) - 2:,} tensors; kept a new classifier (10 classes) "
        "instead of the checkpoint's 1000"
    )
    assert line in capsys.readouterr().out.splitlines()
    job = build_job(load_recipe(TEACHER, over))
    _assert_all_but(job.plain, state, {"fc.weight", "fc.bias"})
    assert job.plain.fc.weight.shape == (10, 64)


@pytest.mark.parametrize(
    ("name", "file", "fresh"),
    [  # the file names torchvision publishes its weights under
        ("mobilenet_v3_small", "mobilenet_v3_small-047dcff4.pth", {"classifier.3"}),
        ("resnet18", "resnet18-f37072fd.safetensors", {"fc"}),
    ],
)
def test_torchvision_weights_from_a_local_file_get_a_new_head(
    tmp_path, image_folder, capsys, name, file, fresh
):
    """torchvision's MobileNetV3 has an MLP head: its first Linear (the tap classifier, 576 ->
    1024) fits and loads; only its last (1024 -> 1000, the issue's classifier.3) is new."""
    state = _save(create_model(f"torchvision:{name}", num_classes=1000), tmp_path / file)
    recipe = _folder_recipe(image_folder, model=f"torchvision:{name}", weights=tmp_path / file)
    job = build_job(recipe)
    _assert_all_but(job.plain, state, {f"{m}.{p}" for m in fresh for p in ("weight", "bias")})
    assert "kept a new classifier (3 classes) instead of the checkpoint's 1000" in (
        capsys.readouterr().out
    )


def test_any_other_mismatch_stays_an_error_listing_all_of_them(tmp_path):
    body = create_model("torchvision:resnet18", num_classes=1000).state_dict()
    body["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)  # not the class count
    torch.save(body, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError) as info:
        fit_weights(create_model("torchvision:resnet18", num_classes=10), tmp_path / "edited.pth",
                    new_head=True)  # fmt: skip
    msg = str(info.value)
    assert "shape mismatches: fc.bias: checkpoint (1000,) vs model (10,)" in msg
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg
    _save(create_model("resnet8x4", num_classes=1000), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"does not fit CifarResNet.*conv1\.weight.*in all"):
        fit_weights(create_model("resnet8", num_classes=10), tmp_path / "other.pth", new_head=True)


@pytest.mark.parametrize(
    "edit",
    [  # resnet8 with 16 classes: its first conv has 16 channels too
        {"conv1.weight": (1000, 3, 3, 3), "fc.weight": (1000, 64), "fc.bias": (1000,)},
        {"fc.weight": (1000, 64), "fc.bias": (999,)},
    ],
    ids=["a-body-layer-of-the-same-counts", "class-counts-that-disagree"],
)
def test_only_the_classifier_and_only_one_class_count_make_a_new_head(tmp_path, edit):
    state = create_model("resnet8", num_classes=16).state_dict()
    state |= {k: torch.zeros(shape) for k, shape in edit.items()}
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as info:
        fit_weights(create_model("resnet8", num_classes=16), tmp_path / "w.pth", new_head=True)
    assert all(f"{k}: checkpoint {shape}" in str(info.value) for k, shape in edit.items())


def test_without_new_head_a_classifier_mismatch_is_still_refused(tmp_path):
    """The Python API keeps its strictness unless asked (load_weights(new_head=True))."""
    _save(create_model("resnet8", num_classes=1000), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"fc\.weight: checkpoint \(1000, 64\)"):
        fit_weights(create_model("resnet8", num_classes=10), tmp_path / "w.pth")


def _one_line_exit_2(argv, capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("normkd: error: "), err
    return err.strip()


def test_a_teacher_whose_classifier_does_not_fit_is_refused(tmp_path, capsys):
    _save(create_model("resnet8", num_classes=1000), tmp_path / "t.pth")
    over = [*FAST, "teacher.model=resnet8", f"teacher.weights={tmp_path / 't.pth'}"]
    line = _one_line_exit_2(["distill", NORM, "--dry-run", *sets(*over)], capsys)
    assert line.startswith(
        "normkd: error: teacher.weights: its classifier has 1000 classes and the data 10: a "
        "teacher needs a classifier trained on these classes"
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_pretrained_file_goes_through_timms_loader_with_a_new_head(
    tmp_path, image_folder, capsys, suffix
):
    path = tmp_path / f"model{suffix}"
    state = _save(create_model("timm:resnet10t", num_classes=1000), path)
    job = build_job(_folder_recipe(image_folder, model="timm:resnet10t", pretrained_file=path))
    _assert_all_but(job.plain, state, {"fc.weight", "fc.bias"})
    assert (
        f"student.pretrained_file: timm loaded {len(state) - 2:,} tensors; kept a new classifier "
        "(3 classes) instead of the checkpoint's 1000"
    ) in capsys.readouterr().out


def test_a_pretrained_file_missing_tensors_is_refused_not_half_loaded(tmp_path, image_folder):
    """timm loads without strict when it drops the classifier: a file lacking layer4 would
    leave it at random init without a word."""
    state = create_model("timm:resnet10t", num_classes=1000).state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("layer4.")}, tmp_path / "p.st")
    (tmp_path / "p.st").rename(tmp_path / "p.safetensors")
    recipe = _folder_recipe(
        image_folder, model="timm:resnet10t", pretrained_file=tmp_path / "p.safetensors"
    )
    with pytest.raises(CheckpointError) as info:
        build_job(recipe)
    msg = str(info.value)
    assert msg.startswith("student.pretrained_file: timm:resnet10t: pretrained_file ")
    assert "lacks layer4.0.bn1.bias" in msg and "weights file of another model" in msg


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_pretrained_files_are_one_line_errors_and_never_run_code(tmp_path, capsys):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": _Evil(tmp_path / "ran")}))
    base = [*FAST, "student.model=timm:resnet10t"]
    key = "student.pretrained_file: timm:resnet10t:"
    for path, needle in (
        (tmp_path / "nope.pth", f"{key} pretrained_file not found"),
        (tmp_path / "evil.pth", f"{key} refused to load pretrained_file"),
    ):
        argv = ["train", TEACHER, "--dry-run", *sets(*base, f"student.pretrained_file={path}")]
        assert needle in _one_line_exit_2(argv, capsys)
    assert not (tmp_path / "ran").exists()


def test_a_timm_teacher_from_pretrained_weights(tmp_path):
    """Pretrained weights count as a trained teacher when their classifier fits the data."""
    state = _save(create_model("timm:resnet10t", num_classes=1000), tmp_path / "w.safetensors")
    cfg = ModelCfg(model="timm:resnet10t", pretrained_file=tmp_path / "w.safetensors")
    teacher = build_teacher(cfg, 1000, allow_untrained=False)
    _assert_all_but(teacher, state, set())
    with pytest.raises(CheckpointError, match=r"teacher\.pretrained_file: its classifier has 1000"):
        build_teacher(cfg, 3, allow_untrained=False)


@pytest.mark.parametrize(
    ("student", "needle"),
    [
        ({"model": "resnet8", "pretrained": True}, "pretrained: only timm: models"),
        (
            {"model": "torchvision:resnet18", "pretrained_file": "x.pth"},
            "pretrained_file: only timm: models",
        ),
        (
            {"model": "timm:resnet10t", "weights": "a.pth", "pretrained_file": "b.pth"},
            "weights and pretrained_file are both set",
        ),
        ({"model": "timm:resnet10t", "kwargs": {"pretrained": True}}, "cannot be set in kwargs"),
    ],
)
def test_recipes_refuse_pretrained_settings_that_cannot_work(student, needle):
    with pytest.raises(ConfigError, match=needle):
        recipe_from_dict({"name": "x", "task": "train", "student": student})
