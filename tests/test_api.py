"""normkd.distill: your models and DataLoaders through the CLI's engine, and every bad input."""

import json

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normkd
from normkd.api import method_loss
from normkd.cli import main
from normkd.engine.checkpoint import load_checkpoint, load_model_file
from normkd.errors import UserError
from normkd.losses import TERMS
from normkd.models import create_model
from normkd.norm import attach_ft

# fp32 on every machine: these tests pin the API's wiring and errors, with accuracy thresholds
# set on tiny data in fp32 (amp: auto would pick bf16 on a CPU with native bf16 and move them).
Q = {"device": "cpu", "quiet": True, "amp": "off"}


def _set(n: int, seed: int, classes: int = 3) -> TensorDataset:
    """16x16 images whose class is a bright colour channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def data():
    return _set(96, 0), _set(48, 1)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A torchvision ResNet-18 trained briefly (through the API's vanilla method)."""
    torch.manual_seed(0)
    train, val = data
    res = normkd.distill(
        None,
        torchvision.models.resnet18(num_classes=3),
        DataLoader(train, 8, shuffle=True, drop_last=True),
        DataLoader(val, 48),
        method="vanilla",
        epochs=2,
        lr=0.02,
        out_dir=tmp_path_factory.mktemp("teacher"),
        **Q,
    )
    assert res.final_top1 > 80, res.history  # otherwise the untrained-teacher check refuses it
    assert res.evaluated_on == "val" and (res.run_dir / "model.safetensors").is_file()
    return res.student


def test_norm_kd_end_to_end(tmp_path, data, teacher):
    train, val = data
    student = create_model("resnet8", num_classes=3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = normkd.distill(
        teacher,
        student,
        DataLoader(train, 16, shuffle=True),
        DataLoader(val, 48),
        method="norm+kd",
        epochs=2,
        n=2,
        out_dir=tmp_path,
        run_name="mine",
        **Q,
    )
    run = tmp_path / "mine"
    assert res.run_dir == run
    for f in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "model.safetensors"):
        assert (run / f).is_file(), f
    assert len(res.history) == 2 and res.best_top1 >= res.final_top1 - 1e-9
    assert json.loads((run / "summary.json").read_text())["best_top1"] == res.best_top1
    # The user's student is untouched; the result is a trained copy with the plain architecture.
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert type(res.student) is type(student)
    assert sum(p.numel() for p in res.student.parameters()) == sum(
        p.numel() for p in student.parameters()
    )
    # Its logits are the FT student's of the last checkpoint (FT merged into the classifier).
    state = load_checkpoint(run / "last.pt")["distiller"]
    s_ft = attach_ft(create_model("resnet8", num_classes=3), teacher_channels=512, n=2)
    s_ft.load_state_dict(
        {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    )
    x = val.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(res.student(x), s_ft.eval()(x), atol=1e-4, rtol=1e-4)
    assert res.merge_max_logit_diff < 1e-4
    # The CLI cannot rebuild a model object by name, and says so.
    assert main(["eval", str(run)]) == 2


def test_eval_of_an_external_model_explains(tmp_path, data, teacher, capsys):
    train, _ = data
    normkd.distill(
        teacher,
        create_model("resnet8", num_classes=3),
        train,
        method="kd",
        epochs=1,
        batch_size=32,
        workers=0,
        out_dir=tmp_path,
        **Q,
    )
    assert main(["eval", str(tmp_path / "distill_kd")]) == 2
    err = capsys.readouterr().err
    assert "CifarResNet passed from Python" in err and "cannot rebuild by name" in err
    with pytest.raises(UserError, match="already holds a run"):  # same run dir, no overwrite
        normkd.distill(
            teacher,
            create_model("resnet8", num_classes=3),
            train,
            method="kd",
            epochs=1,
            workers=0,
            out_dir=tmp_path,
            **Q,
        )


def test_crd_from_a_dataset_gets_indices(tmp_path, data, teacher):
    train, _ = data
    res = normkd.distill(
        teacher,
        create_model("resnet8", num_classes=3),
        train,
        method="norm+crd",
        epochs=1,
        batch_size=32,
        workers=0,
        n=2,
        out_dir=tmp_path,
        **Q,
    )
    assert res.evaluated_on == "train" and len(res.history) == 1
    assert "crd" in res.history[0] and "norm" in res.history[0]


def test_crd_without_indices_is_refused(tmp_path, data, teacher):
    with pytest.raises(UserError, match=r"CRD needs each sample's index.*\(x, y, idx\)"):
        normkd.distill(
            teacher,
            create_model("resnet8", num_classes=3),
            DataLoader(data[0], 16),
            method="crd",
            out_dir=tmp_path,
            **Q,
        )


def test_class_count_mismatch(tmp_path, data, teacher):
    with pytest.raises(UserError, match=r"teacher ResNet predicts 3 classes but student .* 4"):
        normkd.distill(
            teacher,
            create_model("resnet8", num_classes=4),
            DataLoader(data[0], 16),
            out_dir=tmp_path,
            **Q,
        )


def test_untrained_teacher(tmp_path, data):
    fresh = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(UserError, match=r"gets .*% top-1 on 48 val_data images.*looks untrained"):
        normkd.distill(
            fresh,
            create_model("resnet8", num_classes=3),
            DataLoader(data[0], 16),
            DataLoader(data[1], 48),
            out_dir=tmp_path,
            **Q,
        )
    assert not (tmp_path / "distill_norm_kd").exists()  # refused before anything was written


def test_non_cnn_model(tmp_path, data, teacher):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    with pytest.raises(UserError, match=r"student Sequential is not a CNN.*no 4-D feature map"):
        normkd.distill(teacher, mlp, DataLoader(data[0], 16), out_dir=tmp_path, **Q)


def test_bad_loaders(tmp_path, data, teacher):
    s = create_model("resnet8", num_classes=3)
    x, y = data[0].tensors
    dicts = DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], 16)
    with pytest.raises(UserError, match=r"must yield \(x, y\) or \(x, y, idx\).*got dict"):
        normkd.distill(teacher, s, dicts, out_dir=tmp_path, **Q)
    flat = DataLoader(TensorDataset(x.flatten(1), y), 16)
    with pytest.raises(UserError, match=r"x a float tensor \(B, C, H, W\).*got x = torch.float32"):
        normkd.distill(teacher, s, flat, out_dir=tmp_path, **Q)
    with pytest.raises(UserError, match="must be a torch DataLoader"):
        normkd.distill(teacher, s, (b for b in DataLoader(data[0], 16)), out_dir=tmp_path, **Q)
    empty = DataLoader(TensorDataset(x[:0], y[:0]), 16)
    with pytest.raises(UserError, match="train_data is empty"):
        normkd.distill(teacher, s, empty, out_dir=tmp_path, **Q)
    with pytest.raises(UserError, match="train_data is an empty Dataset"):
        normkd.distill(teacher, s, TensorDataset(x[:0], y[:0]), out_dir=tmp_path, **Q)
    big = DataLoader(TensorDataset(x, y + 5), 16)
    with pytest.raises(UserError, match=r"labels must lie in 0..2"):
        normkd.distill(teacher, s, big, out_dir=tmp_path, **Q)


def test_bad_method_and_options(tmp_path, data, teacher):
    s = create_model("resnet8", num_classes=3)
    loader = DataLoader(data[0], 16)
    with pytest.raises(UserError, match=r"unknown method 'norm\+foo' \(unknown: foo\)"):
        normkd.distill(teacher, s, loader, method="norm+foo", out_dir=tmp_path, **Q)
    with pytest.raises(UserError, match=r"unknown option.*kd_wieght.*valid options"):
        normkd.distill(teacher, s, loader, kd_wieght=2.0, out_dir=tmp_path, **Q)
    with pytest.raises(UserError, match=r"optim\.lr"):
        normkd.distill(teacher, s, loader, lr=-1.0, check_teacher=False, out_dir=tmp_path, **Q)
    with pytest.raises(UserError, match="needs a teacher"):
        normkd.distill(None, s, loader, method="kd", out_dir=tmp_path, **Q)


def test_method_strings_map_to_loss_terms():
    kinds = {m: [t["kind"] for t in method_loss(m, {}, 240)] for m in normkd.api.METHODS}
    assert kinds["vanilla"] == ["ce"]
    assert kinds["norm+kd"] == ["ce", "norm", "kd"] or kinds["norm+kd"] == ["ce", "kd", "norm"]
    assert kinds["norm+crd"][0] == "ce" and set(kinds["norm+crd"]) == {"ce", "norm", "crd"}
    # The options set reach the term; what is not set keeps the term's own default.
    norm = TERMS["norm"](**method_loss("norm", {"n": 4, "norm_weight": 2.0}, 10)[1])
    assert (norm.kind, norm.weight, norm.n, norm.ramp) == ("norm", 2.0, 4, "none")
    dkd = method_loss("norm_dkd", {}, 240)[2]
    assert dkd["kind"] == "dkd" and dkd["warmup"] == 20
    # Every warmed-up term ramps over epochs / 12 of a short job (mdistiller's 20 of 240), unless
    # the caller sets it.
    for method, kind in (("dkd", "dkd"), ("reviewkd", "reviewkd")):
        term = method_loss(method, {}, 24)[1]
        assert term["kind"] == kind and term["warmup"] == 2, term
    assert method_loss("reviewkd", {"reviewkd_warmup": 7}, 24)[1]["warmup"] == 7


def test_a_python_run_of_a_torchvision_student_opens_from_the_cli_and_exports(
    tmp_path, data, teacher, capsys
):
    """A torchvision object passed from Python is saved under the name that rebuilds it, so
    `normkd export` opens the run; Result.export and normkd.export write the same checked file."""
    import onnx

    train, val = data
    res = normkd.distill(
        teacher,
        torchvision.models.mobilenet_v3_small(num_classes=3),
        DataLoader(train, 16, shuffle=True),
        DataLoader(val, 48),
        method="kd",
        epochs=1,
        out_dir=tmp_path,
        **Q,
    )
    meta = res.run.model_meta
    assert meta["model"] == "torchvision:mobilenet_v3_small" and meta["input_shape"] == [3, 16, 16]
    rebuilt, _ = load_model_file(res.run_dir / "model.safetensors")
    x = val.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), res.student.eval()(x))
    cli_out = tmp_path / "cli.onnx"
    assert main(["export", str(res.run_dir), "--onnx", str(cli_out)]) == 0
    assert "input 3,16,16" in capsys.readouterr().out
    assert res.export(tmp_path / "a.onnx") == tmp_path / "a.onnx"
    normkd.export(res.run_dir, tmp_path / "b.onnx")
    for f in ("cli.onnx", "a.onnx", "b.onnx"):
        props = {e.key: e.value for e in onnx.load(str(tmp_path / f)).metadata_props}
        assert json.loads(props["input_shape"]) == [3, 16, 16], f
        assert json.loads(props["model"]) == "torchvision:mobilenet_v3_small", f
    with pytest.raises(UserError, match="exists: pass force=True"):
        res.export(tmp_path / "a.onnx")
    # A class of the caller's own stays 'external' (nothing rebuilds it by name).
    own = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))  # fmt: skip
    from normkd.models.external import name_of

    assert name_of(own, 3) is None
    assert name_of(torchvision.models.resnet18(num_classes=3), 3) == "torchvision:resnet18"
