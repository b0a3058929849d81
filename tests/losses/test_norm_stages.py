"""NORM beyond the last stage: ``side_heads`` (normkd's training-only heads, deployed plain) and
``layer3`` (the authors' --use_layer3: an in-path inner FT that stays in the deployed student)."""

import json

import pytest
import torch

from normkd.config import recipe_from_dict
from normkd.errors import ConfigError
from normkd.losses.base import StepState, Taps
from normkd.losses.norm import NORMLoss, StagePair
from normkd.models import create_model
from normkd.norm import INNER_FT, ExpandedMaps, norm_loss
from support import DEMO, sets


def _state(s_stages, t_stages, expanded) -> StepState:
    return StepState(
        x=torch.zeros(2),
        y=torch.zeros(2, dtype=torch.long),
        idx=torch.arange(2),
        epoch=0,
        student=Taps(stages=s_stages, wrapper=expanded),
        teacher=Taps(feat=t_stages[-1], stages=t_stages),
    )


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_side_heads_loss_is_last_stage_plus_each_inner_pair_deepest_first():
    n = 2
    pairs = [StagePair(1, 1, 8, 6), StagePair(0, 0, 4, 3)]  # deepest inner first
    term = NORMLoss(n, side_heads=pairs).eval()
    s_stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    t_stages = [torch.randn(2, 3, 16, 16), torch.randn(2, 6, 4, 4), torch.randn(2, 10, 2, 2)]
    expanded = torch.randn(2, n * 10, 2, 2)
    want = (
        norm_loss(expanded, t_stages[-1], n)
        + norm_loss(term.heads[0](s_stages[1]), t_stages[1], n)
        # teacher map 16x16 is max-pooled to the student's 8x8
        + norm_loss(term.heads[1](s_stages[0]), t_stages[0], n)
    )
    assert torch.allclose(term(_state(s_stages, t_stages, expanded)), want)
    assert term.student_taps == {"logits", "stages", "wrapper"} and term.teacher_taps == {
        "feat",
        "stages",
    }


def test_last_stage_term_has_no_heads_and_reads_only_the_last_map():
    term = NORMLoss(4)
    assert len(term.heads) == 0 and term.teacher_taps == {"feat"}


def test_layer3_loss_is_norm_loss_of_the_inner_and_the_last_expanded_maps():
    n = 3
    term = NORMLoss(n, layer3=1)
    t_stages = [torch.randn(2, 3, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4)]
    inner, last = torch.randn(2, n * 6, 4, 4), torch.randn(2, n * 10, 4, 4)
    got = term(_state([], t_stages, ExpandedMaps(inner, last)))
    # the teacher's 8x8 stage is max-pooled to the inner FT's 4x4 map, as the authors do
    want = norm_loss(last, t_stages[-1], n) + norm_loss(inner, t_stages[1], n)
    assert torch.allclose(got, want)
    assert term.student_taps == {"logits", "wrapper"} and term.teacher_taps == {"feat", "stages"}
    with pytest.raises(RuntimeError, match="inner FT"):
        term(_state([], t_stages, last))  # a student without its inner FT is refused
    with pytest.raises(RuntimeError, match="not layer3"):
        NORMLoss(n)(_state([], t_stages, ExpandedMaps(inner, last)))


def test_all_is_a_deprecated_alias_of_side_heads():
    base = {"name": "t", "teacher": {"model": "resnet8"}, "student": {"model": "resnet8"}}
    with pytest.warns(FutureWarning, match="side_heads"):
        recipe = recipe_from_dict(base | {"loss": [{"kind": "norm", "stages": "all"}]})
    assert recipe.term("norm").stages == "side_heads"


def _distill(tmp_path, demo_teacher, stages: str) -> int:
    from normkd.cli import main

    over = [
        "data.n_train=100",
        "optim.epochs=1",
        "engine.device=cpu",
        "teacher.model=resnet8",
        f"teacher.weights={demo_teacher}",
        f"loss.1.stages={stages}",
    ]
    args = ["distill", str(DEMO / "norm.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    return main([*args, *sets(*over)])


def test_side_heads_train_through_the_cli_and_deploy_plain(tmp_path, demo_teacher):
    from normkd.engine.checkpoint import load_checkpoint, load_model_file

    assert _distill(tmp_path, demo_teacher, "side_heads") == 0
    state = load_checkpoint(tmp_path / "demo_norm" / "last.pt")["distiller"]
    heads = [k for k in state if k.startswith("terms.norm.heads.")]
    assert len(heads) > 0  # the inner-stage heads were trained and saved with the run
    model, _ = load_model_file(tmp_path / "demo_norm" / "model.safetensors")
    assert _n_params(model) == _n_params(create_model("resnet8", num_classes=10))


def test_layer3_deploys_the_student_with_its_inner_ft_and_reloads_it(tmp_path, demo_teacher):
    from normkd.engine.checkpoint import load_model_file
    from normkd.norm import FeatureTransform

    assert _distill(tmp_path, demo_teacher, "layer3") == 0
    run = tmp_path / "demo_norm"
    model, _ = load_model_file(run / "model.safetensors")
    inner = getattr(model, INNER_FT)
    # resnet8's stage before the last is layer2 (32 channels); the teacher's too: 4 * 32 expanded
    assert inner.stage == "layer2" and inner.ft.expand[0].weight.shape[:2] == (4 * 32, 32)
    plain = _n_params(create_model("resnet8", num_classes=10))
    extra = _n_params(FeatureTransform(32, 32, 4))
    summary = json.loads((run / "summary.json").read_text())
    assert _n_params(model) == summary["params"] == plain + extra
    assert summary["merge_max_logit_diff"] <= 1e-4  # the last FT still merges exactly
    # The reloaded student runs its inner FT: zeroing FT's contract (BN too) leaves the residual.
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        inner.ft.contract[1].weight.zero_()
        inner.ft.contract[1].bias.zero_()
        assert (model(x) - before).abs().max() > 1e-4


def test_layer3_refuses_a_pair_without_an_integer_size_ratio():
    from normkd.data.build import Data
    from normkd.engine.job import assemble
    from normkd.engine.runtime import Runtime

    recipe = recipe_from_dict(
        {
            "name": "t",
            "teacher": {"model": "ShuffleV2"},
            "student": {"model": "MobileNetV2"},
            "loss": [{"kind": "norm", "stages": "layer3"}],
            "engine": {"device": "cpu"},
        }
    )
    labels = torch.arange(8) % 10
    data = Data(None, None, num_classes=10, in_shape=(3, 12, 12), train_size=8, train_labels=labels)
    # At 12x12 the last maps are 1x1 and 2x2 (NORM's FT fits), the stages before 2x2 and 3x3.
    teacher = create_model("ShuffleV2", num_classes=10)
    student = create_model("MobileNetV2", num_classes=10)
    with pytest.raises(ConfigError, match=r"stages layer3: the stage before the last.*2x2.*3x3"):
        assemble(recipe, Runtime(torch.device("cpu")), student=student, teacher=teacher, data=data)
    assert INNER_FT not in student._modules  # refused before the student was changed


def test_inner_pairs_count_back_from_feat_on_the_peers_stage_lists():
    """WRN's last stage is block3 (not feat, the map after the final BN-ReLU): the inner stages
    are still conv1, block1, block2, and layer3 pairs block2 with block2."""
    from normkd.losses.norm import layer3_pair, side_head_pairs
    from normkd.models import probe

    s = probe(create_model("wrn_16_2", num_classes=10), (3, 32, 32))
    t = probe(create_model("wrn_40_2", num_classes=10), (3, 32, 32))
    names = ("wrn_16_2", "wrn_40_2")
    assert side_head_pairs(s, t, names) == [
        StagePair(2, 2, 64, 64),
        StagePair(1, 1, 32, 32),
        StagePair(0, 0, 16, 16),
    ]
    assert layer3_pair(s, t, names) == StagePair(2, 2, 64, 64)
    # MobileNetV2 (last stage blocks.6, feat the head conv2) under a resnet32x4 teacher
    m = probe(create_model("MobileNetV2", num_classes=10), (3, 32, 32))
    r = probe(create_model("resnet32x4", num_classes=10), (3, 32, 32))
    assert layer3_pair(m, r, ("MobileNetV2", "resnet32x4")) == StagePair(3, 2, 48, 128)
