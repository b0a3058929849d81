"""Recipe validation: every bad input fails with a message naming the key and what is allowed."""

from pathlib import Path

import pytest

from normkd.config import ConfigError, apply_overrides, load_recipe, recipe_from_dict
from normkd.losses import TERMS

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def _base(**over):
    d = {"name": "t", "task": "train", "student": {"model": "resnet8"}}
    d.update(over)
    return d


def test_demo_recipe_with_base_inheritance_resolves():
    r = load_recipe(DEMO / "norm_kd.yaml")
    assert r.teacher is not None and r.term("norm") is not None and r.term("norm").n == 4
    assert [t.kind for t in r.loss] == ["ce", "kd", "norm"]
    assert r.data.kind == "digits"


@pytest.mark.parametrize(
    "data,needle",
    [
        (_base(optimizer={"lr": 1}), "optimizer: unknown key"),
        (_base(optim={"lrr": 1}), "optim.lrr: unknown key"),
        (_base(optim={"lr": "fast"}), "optim.lr"),
        (_base(optim={"lr": -0.1}), "optim.lr"),
        (_base(optim={"epochs": 0}), "optim.epochs"),
        (_base(student={"model": "resnet9000"}), "valid names"),
        (_base(loss=[{"kind": "magic"}]), f"valid kinds: {', '.join(sorted(TERMS))}"),
        (_base(loss=[{"weight": 1}]), "needs 'kind'"),
        (_base(loss=[{"kind": "ce", "weight": -1}]), "loss.0.weight"),
        (_base(loss=[{"kind": "ce"}, {"kind": "ce"}]), "twice"),
        (_base(loss=[{"kind": "kd"}]), "need one"),
        (_base(task="distill", loss=[{"kind": "kd"}]), "needs a teacher"),
        (_base(data={"kind": "mnist"}), "data.kind"),
        (_base(engine={"amp": "fp8"}), "engine.amp"),
        (_base(engine={"device": "tpu"}), "engine.device"),
        (_base(optim={"epochs": 10, "milestones": [5, 20]}), "milestones"),
        (
            _base(task="distill", teacher={"model": "resnet8"}, loss=[{"kind": "norm", "n": 0}]),
            "loss.0.n",
        ),
    ],
)
def test_bad_recipes_name_the_key(data, needle):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data, "r.yaml")
    assert needle in str(info.value)
    assert str(info.value).startswith("r.yaml: ")


def test_overrides_reach_nested_keys_and_list_items():
    d = apply_overrides(
        {"optim": {"lr": 0.1}, "loss": [{"kind": "ce"}, {"kind": "kd", "weight": 1}]},
        ["optim.lr=0.5", "loss.1.weight=0.25", "engine.amp=bf16", "teacher.weights=null"],
    )
    assert d["optim"]["lr"] == 0.5 and d["loss"][1]["weight"] == 0.25
    assert d["engine"]["amp"] == "bf16" and d["teacher"]["weights"] is None
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"loss": [{}]}, ["loss.3.weight=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_yaml_errors_are_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
