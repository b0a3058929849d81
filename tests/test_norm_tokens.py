"""NORM beyond CNNs: ViT, DeiT, Swin, ConvNeXt and hybrid students (timm, random weights, small
images) merge exactly; token maps leave class tokens out; mixed CNN / ViT pairs run end to end."""

import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normkd
from normkd.cli import main
from normkd.config import load_recipe
from normkd.data.digits import load_digits_split
from normkd.losses.base import StepState, Taps
from normkd.losses.norm import NORMLoss
from normkd.models import create_model, get_taps
from normkd.models.taps import TapSpec, as_map, collect_taps
from normkd.norm import (
    FTStudent,
    PooledExpanded,
    attach_ft,
    attach_inner_ft,
    ft_form,
    max_logit_diff,
    merge_ft,
    norm_loss,
    pooled_norm_loss,
)
from support import DEMO, build_job, sets

TC, N = 16, 2  # teacher channels, expansion factor

# name, timm keywords, image size, (form, layout, feat, classifier, heads, prefix tokens, grid)
FAMILIES = {
    "vit": (
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4},
        32,
        ("tokens", "tokens", "norm", "head", (), 1, (8, 8)),
    ),
    "deit": (
        "deit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4},
        32,
        ("tokens", "tokens", "norm", "head", (), 1, (8, 8)),
    ),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        {"img_size": 32, "patch_size": 4},
        32,
        ("tokens", "tokens", "norm", "head", ("head_dist",), 2, (8, 8)),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "window_size": 2},
        32,
        ("tokens", "nhwc", "norm", "head.fc", (), 0, None),
    ),
    "convnext": ("convnext_atto", {}, 64, ("pooled", "map", "stages", "head.fc", (), 0, None)),
    "hybrid": (
        "vit_tiny_r_s16_p8_224",
        {"img_size": 64},
        64,
        ("tokens", "tokens", "norm", "head", (), 1, (2, 2)),
    ),
    "vit_fc_norm": (  # mean-pooled ViT: a LayerNorm (fc_norm) after pooling
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "global_pool": "avg", "class_token": False},
        32,
        ("pooled", "tokens", "blocks", "head", (), 0, (8, 8)),
    ),
}


def _build(family: str) -> tuple[nn.Module, int]:
    name, kwargs, size, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs), size


def _loss(s_ft: FTStudent, logits: torch.Tensor, teacher_hw: tuple[int, int]) -> torch.Tensor:
    """CE plus NORM against a random teacher map of ``teacher_hw`` (the student's, for maps)."""
    e = s_ft.expanded
    b = logits.shape[0]
    if isinstance(e, PooledExpanded):
        norm = pooled_norm_loss(e.vector, torch.randn(b, TC, *teacher_hw), N)
    else:
        norm = norm_loss(e, torch.randn(b, TC, *e.shape[-2:]), N)
    return norm + F.cross_entropy(logits, torch.randint(0, logits.shape[1], (b,)))


def _train(s_ft: FTStudent, size: int, steps: int = 3) -> None:
    """A few SGD steps, then FT's BatchNorm statistics re-estimated over a few batches."""
    opt = torch.optim.SGD(s_ft.parameters(), lr=0.01, momentum=0.9)
    s_ft.train()
    for _ in range(steps):
        logits = s_ft(torch.randn(4, 3, size, size))
        loss = _loss(s_ft, logits, (3, 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in s_ft.ft.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for _ in range(3):
            s_ft(torch.randn(4, 3, size, size) * 2 + 0.5)
    for bn in bns:  # the statistics are the data's, not BatchNorm's identity
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    s_ft.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_takes_its_form_and_merges_exactly(family):
    model, size = _build(family)
    form, layout, feat, classifier, heads, prefix, grid = FAMILIES[family][3]
    x = torch.randn(8, 3, size, size)
    spec = get_taps(model, x[:2])
    assert (spec.layout, spec.feat, spec.classifier, spec.heads) == (
        layout,
        feat,
        classifier,
        heads,
    )
    assert (spec.prefix_tokens, spec.grid) == (prefix, grid)
    assert ft_form(model, x[:2]) == form
    plain = sum(p.numel() for p in model.parameters())
    s_ft = attach_ft(model, teacher_channels=TC, n=N, example=x[:2])
    assert s_ft.form == form
    _train(s_ft, size)
    with torch.no_grad():
        assert not torch.allclose(s_ft(x), model(x), atol=1e-3)  # FT is in the logits' path
    merged = merge_ft(s_ft)
    assert type(merged) is type(model)
    assert sum(p.numel() for p in merged.parameters()) == plain
    diff = max_logit_diff(s_ft, merged, x)
    report = os.environ.get("NORMKD_MERGE_REPORT")
    if report:
        with open(report, "a") as fh:
            fh.write(f"{FAMILIES[family][0]}\t{form}\t{diff:.3e}\n")
    assert diff <= 1e-4, f"{family}: max logit diff {diff}"


def test_deit_both_tokens_go_through_ft_and_only_patches_are_matched():
    """DeiT: the class and distillation tokens are FT'd (each head reads its own token, their
    logits averaged); the matched map is the 64 patch tokens on their 8x8 grid."""
    model, size = _build("deit_distilled")
    x = torch.randn(4, 3, size, size)
    s_ft = attach_ft(model, teacher_channels=TC, n=N, example=x[:2])
    _train(s_ft, size)
    spec = s_ft.spec
    with torch.no_grad(), collect_taps(model, spec, frozenset({"feat"})) as taps:
        tokens = model.forward_features(x)  # (B, 2 + 64, D) after the final norm
        logits = s_ft(x)
    assert s_ft.expanded.shape == (4, N * TC, 8, 8)
    contracted, expanded = s_ft.ft(tokens)
    head = (model.head(contracted[:, 0]) + model.head_dist(contracted[:, 1])) / 2
    torch.testing.assert_close(logits, head, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_ft.expanded, expanded[:, 2:].transpose(1, 2).reshape(4, -1, 8, 8))
    # The teacher-side tap is the patch grid too: no class or distillation token in it.
    torch.testing.assert_close(taps.feat, tokens[:, 2:].transpose(1, 2).reshape(4, -1, 8, 8))


def test_as_map_layouts_and_wrong_sizes():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # 1 prefix + 2x2 patches
    spec = TapSpec("f", 3, "fc", layout="tokens", prefix_tokens=1, grid=(2, 2))
    m = as_map(tokens, spec)
    assert m.shape == (2, 3, 2, 2) and torch.equal(m[:, :, 1, 0], tokens[:, 3])
    assert torch.equal(as_map(tokens[:, 1:], spec), m)  # a sequence without its prefix yet
    with pytest.raises(ValueError, match="another size"):
        as_map(torch.randn(2, 7, 3), spec)
    nhwc = torch.randn(2, 4, 5, 3)
    assert torch.equal(as_map(nhwc, TapSpec("f", 3, "fc", layout="nhwc")), nhwc.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="layout"):
        TapSpec("f", 3, "fc", layout="nchw")


def test_pooled_student_is_matched_to_the_teachers_average_pooled_map():
    vector, t_map = torch.randn(3, N * TC), torch.randn(3, TC, 4, 4)
    want = F.mse_loss(vector, t_map.mean((2, 3)).repeat(1, N)) * N
    torch.testing.assert_close(pooled_norm_loss(vector, t_map, N), want)
    state = StepState(
        torch.zeros(3), torch.zeros(3), torch.zeros(3), 0, Taps(wrapper=PooledExpanded(vector)),
        Taps(feat=t_map),
    )  # fmt: skip
    torch.testing.assert_close(NORMLoss(N)(state), want)  # the term takes the pooled route
    with pytest.raises(ValueError, match="pooled_norm_loss expects"):
        pooled_norm_loss(vector[:, :, None, None], t_map, N)


def test_forms_can_be_chosen_and_what_cannot_merge_is_refused():
    convnext, size = _build("convnext")
    x = torch.randn(2, 3, size, size)
    with pytest.raises(ValueError, match="is not linear"):
        attach_ft(convnext, TC, N, example=x, form="feat")
    with pytest.raises(ValueError, match="form must be"):
        attach_ft(convnext, TC, N, example=x, form="tokens")
    deit, size = _build("deit_distilled")
    x = torch.randn(8, 3, size, size)
    s_ft = attach_ft(deit, TC, N, example=x[:2], form="pooled")  # allowed where tokens would do
    assert s_ft.form == "pooled" and s_ft.ft.in_channels == 192
    _train(s_ft, size)
    assert max_logit_diff(s_ft, merge_ft(s_ft), x) <= 1e-4  # FT before both heads, merged in both
    with pytest.raises(ValueError, match="needs conv stages"):
        attach_inner_ft(attach_ft(_build("vit")[0], TC, N, example=x[:2]), TC, x[:2])


class LinearPatchViT(nn.Module):
    """Patches cut by ``unfold`` and embedded by a linear layer (no conv map to read the grid
    from), a class token, one LayerNorm, the class token's head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 4, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.mix = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(F.unfold(x, 2, stride=2).transpose(1, 2))  # (B, H/2 * W/2, d)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.norm(t + self.mix(t))[:, 0])


class ConvStemViT(LinearPatchViT):
    """A hybrid whose conv stem already has the tokens' width: the grid is the last such map's."""

    def __init__(self, d: int = 16) -> None:
        super().__init__(d)
        self.stem = nn.Sequential(nn.Conv2d(3, d, 3, padding=1), nn.ReLU())
        self.proj = nn.Conv2d(d, d, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(self.stem(x)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.norm(t + self.mix(t))[:, 0])


def test_torchvision_vit_and_a_linear_patch_embedding_are_read_too():
    """The class token added outside any module (torchvision), a grid found from the input's
    aspect ratio when no conv map gives it (8x16 inputs: 4x8 patches), and from the patch conv
    after a stem of the same width."""
    tv = torchvision.models.VisionTransformer(
        image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip
    for model, x, feat, grid in (
        (tv, torch.randn(8, 3, 8, 8), "encoder", (4, 4)),
        (LinearPatchViT(), torch.randn(8, 3, 8, 16), "norm", (4, 8)),
        (ConvStemViT(), torch.randn(8, 3, 8, 8), "norm", (4, 4)),
    ):
        spec = get_taps(model, x[:2])
        assert (spec.layout, spec.feat, spec.prefix_tokens, spec.grid) == ("tokens", feat, 1, grid)
        s_ft = attach_ft(model, TC, N, example=x[:2])
        opt = torch.optim.SGD(s_ft.parameters(), lr=0.01)
        for _ in range(3):
            loss = _loss(s_ft, s_ft.train()(x), (1, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert s_ft.expanded.shape == (8, N * TC, *grid)
        assert max_logit_diff(s_ft, merge_ft(s_ft), x) <= 1e-4


# --------------------------------------------------------------------------- mixed pairs

TIMM_VIT = (
    "student.model=timm:vit_tiny_patch16_224",
    "student.kwargs.img_size=8",
    "student.kwargs.patch_size=2",
    "student.kwargs.embed_dim=64",
    "student.kwargs.depth=2",
    "student.kwargs.num_heads=2",
)


STUDENTS = {  # overrides of the recipe's student, and the FT form it gets
    "zoo": ((), "map"),
    "timm": (TIMM_VIT, "tokens"),
    # mean-pooled, with a LayerNorm (fc_norm) after pooling: FT on the pooled vector
    "timm_pooled": (
        (*TIMM_VIT, "student.kwargs.global_pool=avg", "student.kwargs.class_token=false"),
        "pooled",
    ),
}


@pytest.mark.parametrize("student", list(STUDENTS))
def test_cnn_teacher_into_vit_student_through_the_cli(student, tmp_path, demo_teacher):
    """The demo's mixed-pair recipe with its zoo ViT (a map-form ViT), timm's ViT (class token,
    token form) or a mean-pooled timm ViT (pooled form), one epoch: NORM's loss is applied, the
    deployed ViT is the plain one."""
    extra, form = STUDENTS[student]
    args = ["data.n_train=200", "engine.device=cpu", "optim.epochs=1", "teacher.model=resnet8"]
    args += [f"teacher.weights={demo_teacher}", *extra]
    path = DEMO / "vit_norm_kd.yaml"
    assert build_job(load_recipe(path, args)).student.form == form
    argv = ["distill", str(path), "--out-dir", str(tmp_path), "--quiet"]
    assert main([*argv, *sets(*args)]) == 0
    run = tmp_path / "demo_vit_norm_kd"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["merge_max_logit_diff"] < 1e-4
    first = (run / "metrics.csv").read_text().splitlines()
    row = dict(zip(first[0].split(","), first[1].split(",")))
    assert float(row["norm"]) > 0 and float(row["kd"]) > 0
    kwargs = {k.split(".")[-1]: _value(v) for k, v in (a.split("=") for a in extra[1:])}
    name = "timm:vit_tiny_patch16_224" if extra else "vit_nano_p2"
    plain = create_model(name, num_classes=10, **kwargs)
    state = load_file(str(run / "model.safetensors"))
    assert state.keys() == plain.state_dict().keys()  # the ViT's own architecture, nothing more
    plain.load_state_dict(state)


def _value(v: str) -> object:
    return {"false": False}.get(v, int(v) if v.isdigit() else v)


def test_a_vit_built_for_another_image_size_is_a_one_line_error(tmp_path, capsys, demo_teacher):
    args = ["engine.device=cpu", f"teacher.weights={demo_teacher}", "teacher.model=resnet8"]
    args += ["student.model=timm:vit_tiny_patch16_224", "student.kwargs.img_size=32"]
    argv = ["distill", str(DEMO / "vit_norm.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    assert main([*argv, *sets(*args)]) == 2
    err = capsys.readouterr().err
    assert "student timm:vit_tiny_patch16_224 cannot run on 3x8x8 inputs" in err
    assert "img_size" in err and "Traceback" not in err


def _digits(n_train: int = 200) -> tuple[TensorDataset, TensorDataset]:
    split = load_digits_split(seed=0, n_train=n_train)

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (split.mean, split.std))

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean) / std

    return (
        TensorDataset(norm(split.x_train), split.y_train),
        TensorDataset(norm(split.x_test[:200]), split.y_test[:200]),
    )


def _api_norm_kd(teacher: nn.Module, student: nn.Module, out_dir) -> normkd.Result:
    """NORM+KD for two epochs on digits through ``normkd.distill``, merged exactly."""
    train, val = _digits()
    res = normkd.distill(
        teacher, student, DataLoader(train, 32, shuffle=True), DataLoader(val, 100),
        method="norm+kd", epochs=2, n=2, check_teacher=False, out_dir=out_dir, device="cpu",
        quiet=True,
    )  # fmt: skip
    assert res.merge_max_logit_diff is not None and res.merge_max_logit_diff < 1e-4
    assert type(res.student) is type(student)
    return res


def test_vit_teacher_into_cnn_student_through_the_api(tmp_path):
    """A timm ViT teacher (its patch tokens become the matched 4x4 map; the class token is left
    out) into a resnet8 student on digits: NORM+KD for two epochs, merged exactly."""
    teacher = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=8, patch_size=2, embed_dim=64, depth=2,
        num_heads=2,
    )  # fmt: skip
    student = create_model("resnet8", num_classes=10)
    res = _api_norm_kd(teacher, student, tmp_path)
    assert get_taps(teacher).layout == "tokens" and get_taps(teacher).prefix_tokens == 1
    assert sum(p.numel() for p in res.student.parameters()) == sum(
        p.numel() for p in student.parameters()
    )
    assert all(row["norm"] > 0 for row in res.history)


def test_vit_teacher_into_cnn_student_through_the_cli(tmp_path):
    """The demo's NORM+KD recipe with a zoo ViT teacher (a checkpoint the test writes: its 4x4
    token grid meets resnet8's 2x2 map by 2x2 pooling) into resnet8, one epoch through the CLI."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = create_model("vit_nano_p2", num_classes=10)
    weights = tmp_path / "vit_teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    args = ["data.n_train=200", "engine.device=cpu", "optim.epochs=1", "student.model=resnet8"]
    args += ["teacher.model=vit_nano_p2", f"teacher.weights={weights}"]
    argv = ["distill", str(DEMO / "norm_kd.yaml"), "--out-dir", str(tmp_path), "--quiet"]
    assert main([*argv, *sets(*args)]) == 0
    run = tmp_path / "demo_norm_kd"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["merge_max_logit_diff"] < 1e-4 and summary["ft_form"] == "map"
    first = (run / "metrics.csv").read_text().splitlines()
    row = dict(zip(first[0].split(","), first[1].split(",")))
    assert float(row["norm"]) > 0 and float(row["kd"]) > 0
    plain = create_model("resnet8", num_classes=10)
    state = load_file(str(run / "model.safetensors"))
    assert state.keys() == plain.state_dict().keys()  # resnet8 as it is, FT merged away
    plain.load_state_dict(state)


def test_cnn_teacher_into_vit_student_through_the_api(tmp_path):
    """resnet8 teacher into the zoo's digits ViT through ``normkd.distill``: NORM+KD for two
    epochs, merged exactly into a plain vit_nano_p2."""
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10)
    student = create_model("vit_nano_p2", num_classes=10)
    res = _api_norm_kd(teacher, student, tmp_path)
    assert res.student.state_dict().keys() == student.state_dict().keys()
    assert all(row["norm"] > 0 and row["kd"] > 0 for row in res.history)
