"""timm (and torchvision) models by name: random init unless asked, NORM merges exactly, CLI."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from normkd.cli import main
from normkd.config import recipe_from_dict
from normkd.errors import ConfigError
from normkd.models import UnknownModelError, create_model, get_taps, list_models, load_weights
from normkd.norm import attach_ft, max_logit_diff, merge_ft


def _trained_ft(model: nn.Module, x: torch.Tensor, n: int = 2):
    """FT attached and its BatchNorm statistics moved off their init, as training would."""
    s_ft = attach_ft(model, teacher_channels=16, n=n, example=x[:2])
    s_ft.train()
    with torch.no_grad():
        for _ in range(3):
            s_ft(x * 2 + 0.5)
    return s_ft.eval()


@pytest.mark.parametrize(
    ("name", "feat", "classifier"),
    [
        ("timm:resnet10t", "layer4", "fc"),
        # a conv head after global pooling: FT merges into the head's 1x1 conv
        ("timm:mobilenetv3_small_050", "blocks", "conv_head"),
        ("torchvision:mobilenet_v3_small", "features", "classifier.0"),
    ],
)
def test_norm_merge_is_exact(name, feat, classifier):
    model = create_model(name, num_classes=5)
    x = torch.randn(8, 3, 32, 32)
    spec = get_taps(model, x[:2])
    assert (spec.feat, spec.classifier) == (feat, classifier)
    s_ft = _trained_ft(model, x)
    merged = merge_ft(s_ft)
    assert type(merged) is type(model)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in model.parameters())
    assert max_logit_diff(s_ft, merged, x) < 1e-4


def test_timm_models_are_random_and_weights_load_from_a_local_file(tmp_path):
    """Random unless asked otherwise (pretrained weights: tests/test_pretrained.py)."""
    a = create_model("timm:resnet10t", num_classes=3)
    b = create_model("timm:resnet10t", num_classes=3)
    assert a.fc.out_features == 3
    assert not torch.equal(a.conv1[0].weight, b.conv1[0].weight)  # random init, nothing fetched
    save_file(a.state_dict(), str(tmp_path / "t.safetensors"))
    c = create_model("timm:resnet10t", num_classes=3, weights=tmp_path / "t.safetensors")
    assert torch.equal(a.conv1[0].weight, c.conv1[0].weight)
    assert not any(n.startswith("timm:") for n in list_models())


def test_unknown_names_list_close_matches():
    with pytest.raises(
        UnknownModelError, match=r"unknown timm model timm:resnet10x.*timm:resnet10t"
    ):
        create_model("timm:resnet10x", num_classes=3)
    with pytest.raises(ConfigError, match=r"student.model: unknown timm model.*timm:resnet10t"):
        recipe_from_dict({"name": "x", "task": "train", "student": {"model": "timm:resnet10x"}})
    with pytest.raises(ConfigError, match=r"torchvision:resnet18"):
        recipe_from_dict(
            {"name": "x", "task": "train", "student": {"model": "torchvision:resnt18"}}
        )
    with pytest.raises(ConfigError, match=r"timm:<any timm model>"):
        recipe_from_dict({"name": "x", "task": "train", "student": {"model": "resnet_8"}})
    for ok in ("timm:resnet10t", "torchvision:resnet18", "external"):
        r = recipe_from_dict({"name": "x", "task": "train", "student": {"model": ok}})
        assert r.student.model == ok
    with pytest.raises(UnknownModelError, match="cannot rebuild by name"):
        create_model("external", num_classes=3)


def test_a_head_that_is_not_linear_takes_ft_on_its_pooled_vector():
    class NormHead(nn.Module):  # LayerNorm after pooling (as ConvNeXt): FT on the map won't merge
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.norm(self.pool(self.body(x)).flatten(1)))

    with pytest.raises(ValueError, match="is not linear"):
        attach_ft(NormHead(), teacher_channels=4, n=2, form="feat")
    # By default FT goes after the LayerNorm, on the classifier's input, and merges there.
    s_ft = _trained_ft(NormHead(), torch.randn(8, 3, 16, 16))
    assert s_ft.form == "pooled" and s_ft.ft.in_channels == 8
    assert max_logit_diff(s_ft, merge_ft(s_ft), torch.randn(8, 3, 16, 16)) < 1e-5


def test_timm_teacher_into_torchvision_student_through_the_cli(tmp_path, image_folder):
    teacher = create_model("timm:resnet10t", num_classes=3)  # random weights, saved locally
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "timm_folder",
                "data": {
                    "kind": "folder",
                    "root": str(image_folder),
                    "image_size": 32,
                    "batch_size": 10,
                    "workers": 0,
                },
                "teacher": {
                    "model": "timm:resnet10t",
                    "weights": str(tmp_path / "teacher.safetensors"),
                },
                "student": {"model": "torchvision:mobilenet_v3_small"},
                "loss": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "norm", "n": 2}],
                "optim": {"epochs": 1, "lr": 0.01, "schedule": "constant"},
                "engine": {"device": "cpu", "out_dir": str(tmp_path / "runs"), "quiet": True},
            }
        )
    )
    assert main(["distill", str(recipe)]) == 0
    run = tmp_path / "runs" / "timm_folder"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["merge_max_logit_diff"] < 1e-4
    with safe_open(str(run / "model.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["normkd"])
    assert meta["model"] == "torchvision:mobilenet_v3_small"
    assert meta["class"] == "torchvision.models.mobilenetv3.MobileNetV3"
    student = create_model("torchvision:mobilenet_v3_small", num_classes=3)
    load_weights(student, run / "model.safetensors")  # the deployable student: plain architecture
    assert json.loads((run / "data.json").read_text())["n_train"] == 30
    assert main(["eval", str(run)]) == 0
