"""ReviewKD against the paper's pieces: HCL by hand, ABF's attention fusion, the deep-to-shallow
review, the whole term against a functional reference in float64, and on a zoo pair against the
same reference fed maps computed by hand (the teacher's before their last ReLU)."""

import pytest
import torch
import torch.nn.functional as F

from normkd.cli import main
from normkd.errors import ConfigError
from normkd.losses import StepState, Taps
from normkd.losses.reviewkd import ABF, ReviewKDLoss, ReviewKDTerm, hcl_loss
from normkd.models import capture, create_model
from support import CONFIGS, DEMO, sets

D64 = torch.float64


def _blocks(f: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over an even ``n x n`` split of a square map, by reshaping (no pooling call)."""
    b, c, h, _ = f.shape
    k = h // n
    return f.reshape(b, c, n, k, n, k).mean((3, 5))


def test_hcl_is_the_weighted_mean_of_mses_over_the_pyramid():
    g = torch.Generator().manual_seed(0)
    f_s, f_t = (
        torch.randn(2, 3, 8, 8, generator=g, dtype=D64),
        torch.randn(2, 3, 8, 8, generator=g, dtype=D64),
    )

    def mse(a, b):
        return ((a - b) ** 2).sum() / a.numel()

    # 8x8: full map (weight 1), 4x4 (1/2), 2x2 (1/4), 1x1 (1/8), over 1 + 1/2 + 1/4 + 1/8
    parts = [mse(f_s, f_t)] + [mse(_blocks(f_s, n), _blocks(f_t, n)) for n in (4, 2, 1)]
    want = (parts[0] + parts[1] / 2 + parts[2] / 4 + parts[3] / 8) / 1.875
    assert torch.allclose(hcl_loss(f_s, f_t), want, rtol=1e-12)
    # 4x4: the 4x4 level is the map itself and is left out: full, 2x2 (1/2), 1x1 (1/4)
    s4, t4 = f_s[..., :4, :4], f_t[..., :4, :4]
    want4 = (
        mse(s4, t4)
        + mse(_blocks(s4, 2), _blocks(t4, 2)) / 2
        + mse(_blocks(s4, 1), _blocks(t4, 1)) / 4
    ) / 1.75
    assert torch.allclose(hcl_loss(s4, t4), want4, rtol=1e-12)
    # a pooled 1x1 feature: plain MSE
    s1, t1 = f_s[..., :1, :1], f_t[..., :1, :1]
    assert torch.allclose(hcl_loss(s1, t1), mse(s1, t1), rtol=1e-12)
    assert float(hcl_loss(f_t, f_t)) == 0.0


def _identity_bn(abf: ABF) -> ABF:
    """Eval mode with fresh statistics: each BN is x / sqrt(1 + eps)."""
    return abf.double().eval()


def _bn(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + 1e-5) ** 0.5


def test_abf_fuses_by_its_two_attention_maps_and_resizes_to_the_teacher():
    g = torch.Generator().manual_seed(1)
    abf = _identity_bn(ABF(in_channels=3, mid_channels=4, out_channels=5, fuse=True))
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=D64)
    residual = torch.randn(2, 4, 2, 2, generator=g, dtype=D64)
    w1, w2 = abf.conv1[0].weight, abf.conv2[0].weight
    mid = _bn(F.conv2d(x, w1))
    up = residual.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 2x2 -> 4x4
    att = torch.sigmoid(F.conv2d(torch.cat([mid, up], 1), abf.att[0].weight, abf.att[0].bias))
    fused = mid * att[:, :1] + up * att[:, 1:]
    fused8 = fused.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 4x4 -> 8x8 (teacher)
    out, res = abf(x, (8, 8), residual)
    assert out.shape == (2, 5, 8, 8) and res.shape == (2, 4, 8, 8)
    assert torch.allclose(res, fused8, rtol=1e-12)
    assert torch.allclose(out, _bn(F.conv2d(fused8, w2, padding=1)), rtol=1e-10)
    # Saturated attention picks one input: all student map, or all residual.
    with torch.no_grad():
        abf.att[0].weight.zero_()
        abf.att[0].bias.copy_(torch.tensor([50.0, -50.0]))
    assert torch.allclose(abf(x, (4, 4), residual)[1], mid, atol=1e-12)
    with torch.no_grad():
        abf.att[0].bias.copy_(torch.tensor([-50.0, 50.0]))
    assert torch.allclose(abf(x, (4, 4), residual)[1], up, atol=1e-12)


def test_deepest_abf_fuses_nothing_and_the_review_runs_deep_to_shallow():
    s_shapes = [(3, 8, 8), (5, 4, 4), (6, 1, 1)]
    t_shapes = [(4, 8, 8), (7, 4, 4), (9, 1, 1)]
    term = ReviewKDLoss(s_shapes, t_shapes, first_stage=0).double().eval()
    assert [a.att is None for a in term.abfs] == [False, False, True]
    assert term.abfs[0].conv1[0].weight.shape[0] == 6  # mid = min(512, pooled channels)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, *s, generator=g, dtype=D64) for s in s_shapes]
    outs = term.review(feats)
    assert [tuple(o.shape[1:]) for o in outs] == t_shapes
    # The deepest map reaches every level through the residuals; the shallowest only its own.
    deep = term.review([*feats[:2], feats[2] + 1])
    shallow = term.review([feats[0] + 1, *feats[1:]])
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(outs, deep, strict=True))
    assert (outs[0] - shallow[0]).abs().max() > 1e-6
    assert all(torch.equal(a, b) for a, b in zip(outs[1:], shallow[1:], strict=True))


def _reference(term: ReviewKDLoss, s_maps: list, t_maps: list) -> torch.Tensor:
    """The term as the paper and mdistiller write it, functionally, with the term's weights: BN on
    batch statistics, nearest resizing, sigmoid attention, HCL by 4/2/1 pooling."""

    def bn(x, m):
        return F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)

    total, residual = 0.0, None
    for i in reversed(range(len(s_maps))):
        a = term.abfs[i]
        x = bn(F.conv2d(s_maps[i], a.conv1[0].weight), a.conv1[1])
        if residual is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = torch.sigmoid(F.conv2d(torch.cat([x, residual], 1), a.att[0].weight, a.att[0].bias))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        x = F.interpolate(x, size=t_maps[i].shape[-2:], mode="nearest")
        residual = x
        out = bn(F.conv2d(x, a.conv2[0].weight, padding=1), a.conv2[1])
        ft, h = t_maps[i], out.shape[2]
        loss, cnt, tot = F.mse_loss(out, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size < h:
                cnt /= 2
                loss = loss + cnt * F.mse_loss(
                    F.adaptive_avg_pool2d(out, size), F.adaptive_avg_pool2d(ft, size)
                )
                tot += cnt
        total = total + loss / tot
    return total


@pytest.mark.parametrize(
    ("s_shapes", "t_shapes"),
    [
        (
            [(8, 16, 16), (16, 8, 8), (32, 4, 4), (32, 1, 1)],
            [(8, 16, 16), (16, 8, 8), (32, 4, 4), (32, 1, 1)],
        ),
        (
            [(12, 8, 8), (24, 4, 4), (48, 2, 2), (48, 1, 1)],
            [(8, 16, 16), (16, 8, 8), (32, 4, 4), (32, 1, 1)],
        ),
    ],
    ids=["same-sizes", "teacher-twice-larger"],
)
def test_term_equals_a_functional_reference_in_float64(s_shapes, t_shapes):
    torch.manual_seed(3)
    term = ReviewKDLoss(s_shapes, t_shapes, first_stage=1).double().train()
    g = torch.Generator().manual_seed(4)
    stem = torch.randn(4, 2, 16, 16, generator=g, dtype=D64)  # index 0, skipped by first_stage=1
    s_maps = [torch.randn(4, *s, generator=g, dtype=D64).requires_grad_() for s in s_shapes]
    t_maps = [torch.randn(4, *t, generator=g, dtype=D64) for t in t_shapes]
    # The teacher's pre-activation maps are reviewed (the default), not its stage maps.
    t_post = [stem, *(torch.relu(t) for t in t_maps[:-1])]
    state = StepState(
        stem, torch.zeros(4), torch.arange(4), 0,
        Taps(stages=[stem, *s_maps[:-1]], pooled=s_maps[-1].flatten(1)),
        Taps(stages=t_post, preact=[stem, *t_maps[:-1]], pooled=t_maps[-1].flatten(1)),
    )  # fmt: skip
    got, want = term(state), _reference(term, s_maps, t_maps)
    assert got.dtype == D64 and (got - want).detach().abs().item() <= 1e-10 * want.item()
    g_got = torch.autograd.grad(got, s_maps, retain_graph=True)
    g_want = torch.autograd.grad(want, s_maps)
    assert max((a - b).abs().max().item() for a, b in zip(g_got, g_want, strict=True)) < 1e-10


def test_weight_ramps_in_over_warmup_epochs_counted_from_one():
    term = ReviewKDLoss([(2, 4, 4), (2, 1, 1)], [(2, 4, 4), (2, 1, 1)], 0, warmup=20)
    assert [term.weight_at(e) for e in (0, 9, 19, 200)] == [0.05, 0.5, 1.0, 1.0]
    assert (
        ReviewKDLoss([(2, 4, 4), (2, 1, 1)], [(2, 4, 4), (2, 1, 1)], 0, warmup=0).weight_at(0)
        == 1.0
    )


def test_reviewkd_trains_student_and_abfs_not_the_teacher(zoo_step, check_grads):
    d = zoo_step([{"kind": "ce"}, {"kind": "reviewkd", "weight": 5.0}])
    check_grads(d, "reviewkd")
    # resnet8 (stages stem, 16, 32, 64) -> resnet8x4: layer1..layer3 + pooled, mid min(512, 64)
    abfs = d.terms["reviewkd"].abfs
    assert [a.conv2[0].out_channels for a in abfs] == [64, 128, 256, 256]
    assert {a.conv1[0].out_channels for a in abfs} == {64}


def test_bad_stage_indices_are_one_config_error(zoo_distiller):
    with pytest.raises(ConfigError, match=r"first stage 4 is out of range; valid: 0\.\.3"):
        zoo_distiller([{"kind": "ce"}, {"kind": "reviewkd", "first_stage": 4}])
    with pytest.raises(ConfigError, match="set teacher_first_stage so they agree"):
        zoo_distiller([{"kind": "ce"}, {"kind": "reviewkd", "teacher_first_stage": 2}])


def test_recipe_defaults_are_the_authors():
    t = ReviewKDTerm()
    assert (t.weight, t.warmup, t.first_stage, t.mid_channels) == (1.0, 20, 1, None)
    # mdistiller: the teacher's preact_feats always, the student's feats (cfg.py STU_PREACT False)
    assert (t.teacher_preact, t.student_preact) == (True, False)


def _resnet_preact(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A CIFAR ResNet's maps before each stage's last ReLU (its last block's bn2(conv2(.)) plus
    shortcut), the stem's output first, as mdistiller's ``preact_feats``; from its submodules."""
    h = F.relu(model.bn1(model.conv1(x)))
    maps = [h]
    for layer in (model.layer1, model.layer2, model.layer3):
        h = layer[:-1](h)
        b = layer[-1]
        out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
        maps.append(out + (h if b.downsample is None else b.downsample(h)))
        h = b(h)
    return maps


@pytest.mark.parametrize(
    ("teacher_preact", "student_preact"), [(True, False), (False, False), (True, True)]
)
def test_a_zoo_pair_is_reviewed_on_the_maps_each_option_names(
    zoo_distiller, teacher_preact, student_preact
):
    """resnet8x4 -> resnet8: the term's loss is the functional reference's on the maps computed
    by hand, pre-activation (negative values) or post-ReLU as the options say."""
    torch.manual_seed(5)
    opts = {"teacher_preact": teacher_preact, "student_preact": student_preact}
    d = zoo_distiller([{"kind": "ce"}, {"kind": "reviewkd", "warmup": 0, **opts}]).train()
    x = torch.randn(8, 3, 8, 8)
    loss = d(x, torch.arange(8) % 10, torch.arange(8), epoch=0)[1]["reviewkd"]
    t, s = d.teacher, d.student
    with torch.no_grad():
        t_pre = _resnet_preact(t, x)
        t_pooled = t.layer3(t.layer2(t.layer1(t_pre[0]))).mean((2, 3), keepdim=True)
    with capture(s, ["layer1", "layer2", "layer3"]) as post:
        s(x)
    s_pre = _resnet_preact(s, x)
    s_maps = s_pre[1:] if student_preact else [post[n] for n in ("layer1", "layer2", "layer3")]
    t_maps = t_pre[1:] if teacher_preact else [F.relu(m) for m in t_pre[1:]]
    assert all(m.min() < 0 for m in t_pre[1:])  # the two settings do read different maps
    s_pooled = post["layer3"].mean((2, 3), keepdim=True)
    want = _reference(d.terms["reviewkd"], [*s_maps, s_pooled], [*t_maps, t_pooled])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


def test_preact_and_post_relu_teachers_give_different_losses(zoo_distiller):
    torch.manual_seed(6)
    pre = zoo_distiller([{"kind": "ce"}, {"kind": "reviewkd", "warmup": 0}])
    post = zoo_distiller(
        [{"kind": "ce"}, {"kind": "reviewkd", "warmup": 0, "teacher_preact": False}]
    )
    post.load_state_dict(pre.state_dict())
    post.teacher.load_state_dict(pre.teacher.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 10
    losses = [d.train()(x, y, torch.arange(8), epoch=0)[1]["reviewkd"] for d in (pre, post)]
    assert torch.isfinite(losses[0]) and (losses[0] - losses[1]).abs() > 1e-3 * losses[1]
    # What each side collects: only the maps it reviews.
    assert pre.t_needs == {"preact", "pooled"}
    assert post.t_needs == {"stages", "pooled"} and pre.s_needs == {"logits", "stages", "pooled"}


@pytest.mark.parametrize(
    ("pair", "option"),
    [
        (("mobilenet_v2", "resnet8"), "teacher_preact"),
        (("resnet8x4", "mobilenet_v2"), "student_preact"),
    ],
)
def test_a_model_without_preact_maps_is_one_config_error_naming_the_option(
    zoo_distiller, pair, option
):
    role, name = ("teacher", pair[0]) if option == "teacher_preact" else ("student", pair[1])
    loss = [{"kind": "ce"}, {"kind": "reviewkd", "student_preact": True, "first_stage": 0}]
    with pytest.raises(ConfigError) as info:
        zoo_distiller(loss, pair=pair)
    assert str(info.value) == (
        f"loss reviewkd: {role} {name} declares no pre-activation stage maps; set {option}: "
        "false to review its stage maps after their ReLU"
    )


def test_reviewkd_trains_on_digits_through_the_cli_and_deploys_the_plain_student(
    tmp_path, demo_teacher
):
    from normkd.engine.checkpoint import load_checkpoint, load_model_file

    over = [
        "loss=[{kind: ce}, {kind: reviewkd, weight: 1.0, warmup: 0}]",
        "name=demo_reviewkd",
        "data.n_train=100",
        "optim.epochs=1",
        "engine.device=cpu",
        "teacher.model=resnet8",
        f"teacher.weights={demo_teacher}",
    ]
    args = ["distill", str(DEMO / "kd.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    assert main([*args, *sets(*over)]) == 0
    run = tmp_path / "demo_reviewkd"
    state = load_checkpoint(run / "last.pt")["distiller"]
    assert any(k.startswith("terms.reviewkd.abfs.") for k in state)  # trained, checkpointed
    model, _ = load_model_file(run / "model.safetensors")
    plain = create_model("resnet8", num_classes=10)
    assert model.state_dict().keys() == plain.state_dict().keys()  # the ABFs are not deployed


@pytest.mark.parametrize(
    "recipe",
    ["cifar100/resnet20__resnet8/reviewkd.yaml", "imagenet/resnet34__resnet18/reviewkd.yaml"],
)
def test_reviewkd_recipes_build_in_a_dry_run(recipe, tmp_path, recipe_dry_run):
    # (the other CIFAR pairs' reviewkd.yaml dry-run in tests/test_recipes.py)
    printed = recipe_dry_run(CONFIGS / recipe, tmp_path)
    assert "reviewkd=" in printed and "dry run ok" in printed


@pytest.mark.parametrize(
    ("recipe", "student_preact"),
    [
        ("cifar100/resnet20__resnet8/reviewkd.yaml", False),
        ("imagenet/resnet34__resnet18/reviewkd.yaml", True),
    ],
)
def test_reviewkd_recipes_review_the_maps_the_authors_do(recipe, student_preact):
    """The teacher's maps before their last ReLU in both; the student's too on ImageNet only
    (mdistiller's STU_PREACT: off in its CIFAR config, on in configs/imagenet/r34_r18)."""
    from normkd.config import load_recipe

    (term,) = [t for t in load_recipe(CONFIGS / recipe).loss if t.kind == "reviewkd"]
    assert (term.teacher_preact, term.student_preact) == (True, student_preact)
