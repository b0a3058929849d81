"""NORM with ``stages: all``: inner stages matched deepest first through training-only heads."""

import torch

from normkd.losses.base import StepState, Taps
from normkd.losses.norm import NORMLoss
from normkd.norm import norm_loss
from support import DEMO, sets


def test_all_stages_loss_is_last_stage_plus_each_inner_pair_deepest_first():
    n = 2
    term = NORMLoss(n, inner=[(8, 6), (4, 3)]).eval()  # pairs: deepest inner first
    s_stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    t_stages = [torch.randn(2, 3, 16, 16), torch.randn(2, 6, 4, 4), torch.randn(2, 10, 2, 2)]
    expanded = torch.randn(2, n * 10, 2, 2)
    state = StepState(
        x=torch.zeros(2),
        y=torch.zeros(2, dtype=torch.long),
        idx=torch.arange(2),
        epoch=0,
        student=Taps(stages=s_stages),
        teacher=Taps(feat=t_stages[-1], stages=t_stages),
        expanded=expanded,
    )
    want = (
        norm_loss(expanded, t_stages[-1], n)
        + norm_loss(term.heads[0](s_stages[1]), t_stages[1], n)
        # teacher map 16x16 is max-pooled to the student's 8x8
        + norm_loss(term.heads[1](s_stages[0]), t_stages[0], n)
    )
    assert torch.allclose(term(state), want)
    assert term.student_taps == {"logits", "stages"} and term.teacher_taps == {"feat", "stages"}


def test_last_stage_term_has_no_heads_and_reads_only_the_last_map():
    term = NORMLoss(4)
    assert len(term.heads) == 0 and term.teacher_taps == {"feat"}


def test_all_stages_trains_through_the_cli_and_deploys_plain(tmp_path, demo_teacher):
    from normkd.cli import main
    from normkd.engine.checkpoint import load_checkpoint, load_model_file

    over = [
        "data.n_train=100",
        "optim.epochs=1",
        "engine.device=cpu",
        "teacher.model=resnet8",
        f"teacher.weights={demo_teacher}",
        "loss.1.stages=all",
    ]
    args = ["distill", str(DEMO / "norm.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    assert main([*args, *sets(*over)]) == 0
    state = load_checkpoint(tmp_path / "demo_norm" / "last.pt")["distiller"]
    heads = [k for k in state if k.startswith("terms.norm.heads.")]
    assert len(heads) > 0  # the inner-stage heads were trained and saved with the run
    model, _ = load_model_file(tmp_path / "demo_norm" / "model.safetensors")
    plain = sum(p.numel() for p in model.parameters())
    from normkd.models import create_model

    assert plain == sum(p.numel() for p in create_model("resnet8", num_classes=10).parameters())
