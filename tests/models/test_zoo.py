"""Every zoo model: registry, tap contract, merge exactness, and published-checkpoint loading."""

import functools
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkd.models import (
    CheckpointError,
    UnknownModelError,
    capture,
    create_model,
    get_taps,
    list_models,
    load_weights,
)
from normkd.models.taps import TapSpec, discover_taps
from normkd.norm import attach_ft, max_logit_diff, merge_ft, norm_loss

IMAGENET = {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v1", "resnet50_1_4"}
ALL = list_models()


def _input(name: str, batch: int) -> torch.Tensor:
    size = 64 if name in IMAGENET else 32
    return torch.randn(batch, 3, size, size)


def test_zoo_lists_every_family():
    for name in ["resnet8x4", "resnet32x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1"]:
        assert name in ALL
    assert set(IMAGENET) <= set(ALL)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="resnet8x4") as info:
        create_model("resnet9000")
    assert "unknown model 'resnet9000'" in str(info.value)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet8", num_classes=0)


# Spatial side of each declared stage map at the test input size (32x32 CIFAR, 64x64 ImageNet).
STAGE_SIZES = {
    "MobileNetV2": [16, 16, 8, 4, 2],
    "ShuffleV1": [32, 16, 8, 4],
    "ShuffleV2": [32, 16, 8, 4],
    **{name: [32, 32, 16, 8] for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "ResNet50": [32, 32, 16, 8, 4],
    **{name: [16, 8, 4, 2] for name in IMAGENET},  # 1/4 .. 1/32 of the input
}


@functools.cache
def _model(name: str) -> nn.Module:
    """Each zoo model built once per session (ResNet50 initialisation dominates otherwise)."""
    torch.manual_seed(0)
    return create_model(name, num_classes=7).eval()


# Models whose last stage is not ``feat``: the peers' feature lists stop before the head that
# pooling reads (WRN's final BN-ReLU, the 1x1 head convs); see tests/models/test_peer_stages.py.
LAST_STAGE_BEFORE_HEAD = {
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "MobileNetV2",
    "ShuffleV2",
}


@pytest.mark.parametrize("name", ALL)
def test_tap_contract(name):
    """Declared taps fit the maps (channels; stages shallow to deep, the last one at feat's
    resolution and feat itself except where the peers' lists stop before the head), feat ->
    global average pool -> classifier reproduces the logits, and discovery finds the same taps."""
    model = _model(name)
    spec = get_taps(model)
    assert isinstance(spec, TapSpec)
    assert (spec.stages[-1] == spec.feat) == (name not in LAST_STAGE_BEFORE_HEAD)
    x = _input(name, 2)
    with torch.no_grad(), capture(model, [*spec.stages, spec.feat]) as maps:
        logits = model(x)
    assert logits.shape == (2, 7)
    for stage, c in zip(spec.stages, spec.stage_channels, strict=True):
        assert maps[stage].dim() == 4 and maps[stage].shape[1] == c, stage
    sizes = [maps[s].shape[-1] for s in spec.stages]
    assert sizes == sorted(sizes, reverse=True)
    assert maps[spec.stages[-1]].shape[-2:] == maps[spec.feat].shape[-2:]  # feat's own stage
    if name in STAGE_SIZES:
        assert sizes == STAGE_SIZES[name]
    assert maps[spec.feat].shape[1] == spec.feat_channels
    fc = model.get_submodule(spec.classifier)
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(fc(maps[spec.feat].mean((2, 3))), logits, atol=1e-5, rtol=1e-5)
    if name in IMAGENET:
        found = discover_taps(model)
        assert (found.feat, found.feat_channels, found.classifier) == (
            spec.feat,
            spec.feat_channels,
            spec.classifier,
        )


@pytest.mark.parametrize("name", ALL)
def test_feat_hook_replaces_pooled_input(name):
    """normkd swaps feat's output with a hook: nothing but global pooling may sit between feat
    and the classifier, so constant maps give exactly the classifier of that constant."""
    model = _model(name)
    spec = get_taps(model)
    handle = model.get_submodule(spec.feat).register_forward_hook(
        lambda _m, _i, out: torch.ones_like(out)
    )
    try:
        with torch.no_grad():
            logits = model(_input(name, 2))
    finally:
        handle.remove()
    with torch.no_grad():
        expected = model.get_submodule(spec.classifier)(torch.ones(2, spec.feat_channels))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_merge_is_exact_for_every_zoo_student(name):
    student = create_model(name, num_classes=10)
    plain = sum(p.numel() for p in student.parameters())
    n, tc = 2, 16
    s_ft = attach_ft(student, teacher_channels=tc, n=n)
    opt = torch.optim.SGD(s_ft.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):  # a few real steps so FT and the student move away from their init
        x = _input(name, 4)
        logits = s_ft(x)
        h, w = s_ft.expanded.shape[-2:]
        loss = F.cross_entropy(logits, torch.randint(0, 10, (4,))) + norm_loss(
            s_ft.expanded, torch.randn(4, tc, h, w), n
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Re-estimate BN statistics over a few batches so eval mode uses non-trivial statistics.
    bns = [m for m in s_ft.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for _ in range(3):
            s_ft(_input(name, 4))
    merged = merge_ft(s_ft)
    assert type(merged) is type(student)
    assert sum(p.numel() for p in merged.parameters()) == plain
    diff = max_logit_diff(s_ft, merged, _input(name, 4))
    worst = os.environ.get("NORMKD_MERGE_REPORT")
    if worst:
        with open(worst, "a") as fh:
            fh.write(f"{name}\t{diff:.3e}\n")
    assert diff <= 1e-4, f"{name}: max logit diff {diff}"


def _repdistiller_checkpoint(model: nn.Module, wrap: str, prefix: str = "") -> dict:
    """The dict RepDistiller/mdistiller training scripts save: weights plus bookkeeping."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    return {
        "epoch": 240,
        wrap: state,
        "best_acc": torch.tensor(79.42),
        "optimizer": opt.state_dict(),
    }


@pytest.mark.parametrize("wrap,prefix", [("model", ""), ("net", ""), ("model", "module.")])
def test_published_checkpoint_layout_loads(tmp_path, wrap, prefix):
    src = create_model("resnet8x4", num_classes=100)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(_repdistiller_checkpoint(src, wrap, prefix), path)
    dst = load_weights(create_model("resnet8x4", num_classes=100), path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_bare_state_dict_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    src = create_model("wrn_16_1", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for f in ("bare.pt", "w.safetensors"):
        dst = create_model("wrn_16_1", num_classes=10, weights=tmp_path / f)
        assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_wrong_architecture_reports_all_mismatches_at_once(tmp_path):
    torch.save({"model": create_model("resnet8", num_classes=100).state_dict()}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet8x4", num_classes=100), tmp_path / "a.pth")
    msg = str(info.value)
    assert "shape mismatches" in msg and "conv1.weight" in msg
    assert "missing keys" in msg and "layer1.0.downsample" in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(create_model("resnet8", num_classes=10), path)


def test_truncated_and_missing_checkpoints(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"corrupt or truncated|refused"):
        load_weights(create_model("resnet8", num_classes=10), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(create_model("resnet8", num_classes=10), tmp_path / "nope.pth")
