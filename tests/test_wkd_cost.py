"""``normkd wkd-cost``: a recipe's teacher over its un-augmented training split -> the cost file
a wkd_l term takes for the published method. Generated CIFAR-format data, a random teacher."""

import contextlib
import io

import pytest
import torch
from safetensors import safe_open

from normkd import wkd_cost
from normkd.cli import main
from normkd.data import load_cifar100
from normkd.losses.wkd import cka_cost_matrix, teacher_class_features
from normkd.models import create_model, load_weights
from normkd.records import sha256
from support import one_error_line, sets, write_cifar100

RECIPE = "cifar100/resnet20__resnet8/wkd_l.yaml"  # CE, then its wkd_l term: loss.1
META = {"what", "teacher_sha256", "rows_per_class", "source", "commit", "machine", "finished"}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Random resnet8 weights for 100 classes (a cost needs no trained teacher)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=100)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory, teacher_file):
    """The command run once on 2 images per class: (data root, its printed lines)."""
    root = write_cifar100(tmp_path_factory.mktemp("data"), 200, 100, balanced=True)
    argv = ["wkd-cost", RECIPE, *_sets(root, teacher_file), "--batch-size", "64"]
    printed = io.StringIO()  # capsys is per test; this runs once for the module
    with (
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(io.StringIO()),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(wkd_cost, "CKA_QUIET_S", 0.0)  # the CKA's lines even when it is quick
        assert main(argv) == 0  # stderr no terminal: progress as lines, not a bar
    return root, printed.getvalue()


def _sets(root, teacher) -> list[str]:
    return sets(f"data.root={root}", "teacher.model=resnet8", f"teacher.weights={teacher}")


def _direct(root, teacher_path, source="last_stage") -> tuple[torch.Tensor, torch.Tensor]:
    """(cost, class rows) from the teacher and the training images as stored, in one batch,
    normalised as torchvision's ToTensor + Normalize do (the authors' generate_cost_matrix)."""
    teacher = create_model("resnet8", num_classes=100)
    load_weights(teacher, teacher_path)
    split = load_cifar100(root)
    mean = torch.tensor(split.mean).view(1, 3, 1, 1)
    std = torch.tensor(split.std).view(1, 3, 1, 1)
    x = (split.x_train.float() / 255 - mean) / std
    counts = torch.bincount(split.y_train, minlength=100)
    feats = teacher_class_features(teacher, [(x, split.y_train)], counts, source)
    return cka_cost_matrix(feats), feats


def _read(path) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("cost"), f.metadata()


def test_the_file_is_the_teachers_cka_over_the_plain_training_set_in_order(made, teacher_file):
    root, printed = made
    out = teacher_file.parent / "wkd_cost_last_stage.safetensors"  # beside the teacher
    assert f"use it: --set loss.1.cost_matrix={out}" in printed
    assert "teacher pass, batch 4/4" in printed  # progress: 200 images, 64 at a time
    assert "linear CKA, block 1/1" in printed
    # The rows' memory, predicted before the pass from one probe image: 2 images a class, each
    # 8 x 8 positions of resnet8's 64-channel last stage.
    assert "the rows take 3.3 MB (100 classes x 128 rows x 64 floats)" in printed
    cost, meta = _read(out)
    want, feats = _direct(root, teacher_file)
    # Batches of 64 against one of 200, and the loader's fused normalisation: float noise only;
    # shuffled or augmented images would pair other rows (costs apart by ~1e-2).
    torch.testing.assert_close(cost, want, rtol=0, atol=2e-6)
    assert set(meta) >= META and meta["source"] == "last_stage"
    assert meta["teacher_sha256"] == sha256(teacher_file)
    assert meta["rows_per_class"] == str(feats.shape[1]) and float(meta["seconds"]) >= 0


def test_a_wkd_l_run_takes_the_file_and_drops_the_uniform_warning(
    made, teacher_file, tmp_path, capsys
):
    root, printed = made
    override = printed.rsplit("use it: ", 1)[1].split()  # ["--set", "loss.1.cost_matrix=..."]
    dry = ["distill", RECIPE, "--dry-run", "--out-dir", str(tmp_path / "runs"), "--quiet"]
    dry += [*_sets(root, teacher_file), *sets("data.batch_size=16", "engine.device=cpu")]
    assert main(dry) == 0
    assert "cost_matrix uniform" in capsys.readouterr().err  # as shipped: the warning
    assert main([*dry, *override]) == 0
    assert "cost_matrix uniform" not in capsys.readouterr().err


def test_unequal_class_counts_need_logit_rows(tmp_path, teacher_file, capsys):
    root = write_cifar100(tmp_path, n_train=201, n_test=100, balanced=True)  # one class has 3
    argv = ["wkd-cost", RECIPE, *_sets(root, teacher_file), "--out", str(tmp_path / "c")]
    line = one_error_line(main, argv, capsys)
    assert "use --source logits" in line and "2 to 3 per class" in line
    assert not (tmp_path / "c").exists()
    gaps = write_cifar100(tmp_path / "gaps", n_train=200, n_test=100)  # random labels
    argv_gaps = ["wkd-cost", RECIPE, *_sets(gaps, teacher_file), "--source", "logits"]
    line = one_error_line(main, [*argv_gaps, "--out", str(tmp_path / "g")], capsys)
    assert "has no training image" in line and "the costs need every class" in line
    assert main([*argv, "--source", "logits"]) == 0
    cost, meta = _read(tmp_path / "c")
    want, feats = _direct(root, teacher_file, "logits")
    torch.testing.assert_close(cost, want, rtol=0, atol=2e-6)
    assert meta["source"] == "logits" and meta["rows_per_class"] == str(feats.shape[1])


def test_an_existing_file_and_a_missing_teacher_are_one_line_errors(
    made, teacher_file, tmp_path, capsys
):
    root, out = made[0], tmp_path / "cost.safetensors"
    out.write_bytes(b"someone's costs")
    argv = ["wkd-cost", RECIPE, *_sets(root, teacher_file), "--out", str(out)]
    assert "exists; pass --force to replace it" in one_error_line(main, argv, capsys)
    assert out.read_bytes() == b"someone's costs"
    absent = sets(f"teacher.weights={tmp_path / 'absent.safetensors'}")
    line = one_error_line(main, [*argv, "--force", *absent], capsys)
    assert "teacher.weights" in line and "absent.safetensors" in line
    run = ["distill", RECIPE, "--out-dir", str(tmp_path / "runs"), *_sets(root, teacher_file)]
    assert one_error_line(main, [*run, *absent], capsys) == line  # the error a run gets
    assert out.read_bytes() == b"someone's costs"
    no_teacher = ["wkd-cost", "demo/teacher.yaml", "--out", str(tmp_path / "t")]
    assert "has no teacher" in one_error_line(main, no_teacher, capsys)


def test_rows_that_would_not_fit_in_memory_are_refused_before_the_pass(
    made, teacher_file, tmp_path, capsys, monkeypatch
):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000 kB\nMemAvailable:    4000 kB\n")
    monkeypatch.setattr(wkd_cost, "MEMINFO", meminfo)  # a machine with 4 MB to spare
    monkeypatch.setattr(wkd_cost, "CGROUP", tmp_path / "no-cgroup")  # and no container limit
    out = tmp_path / "c.safetensors"
    argv = ["wkd-cost", RECIPE, *_sets(made[0], teacher_file), "--out", str(out)]
    assert one_error_line(main, argv, capsys) == (
        "normkd: error: the teacher's last_stage rows need 3.3 MB (100 classes x 128 rows x 64 "
        "floats) and the CKA up to 6.8 MB more, but 4.1 MB of memory is available: use --source "
        "logits (one row per image) or a machine with more memory"
    )
    meminfo.write_text("MemAvailable:    10 kB\n")
    line = one_error_line(main, [*argv, "--source", "logits"], capsys)
    assert line.endswith(
        "(100 classes x 2 rows x 100 floats) and the CKA up to 242 kB more, "
        "but 10 kB of memory is available: use a machine with more memory"
    )
    assert not out.exists()


def test_memory_available_reads_meminfo_and_is_unknown_without_it(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16 kB\nMemFree:  2 kB\nMemAvailable:     12 kB\n")
    monkeypatch.setattr(wkd_cost, "MEMINFO", meminfo)
    monkeypatch.setattr(wkd_cost, "CGROUP", tmp_path / "no-cgroup")
    assert wkd_cost.memory_available() == 12 * 1024
    meminfo.write_text("MemTotal:  16 kB\n")  # an old kernel's: no estimate
    assert wkd_cost.memory_available() is None
    monkeypatch.setattr(wkd_cost, "MEMINFO", tmp_path / "absent")  # not Linux
    assert wkd_cost.memory_available() is None


@pytest.mark.parametrize("v1", [False, True], ids=["cgroup-v2", "cgroup-v1"])
def test_a_container_limit_below_the_machines_free_memory_is_what_is_available(
    tmp_path, monkeypatch, v1
):
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemAvailable:  1000000 kB\n")  # the host has ~1 GB free
    here = cgroup / "memory" if v1 else cgroup
    here.mkdir(parents=True)
    names = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
        if v1
        else ("memory.max", "memory.current")
    )
    cache = "total_inactive_file" if v1 else "inactive_file"
    (here / names[0]).write_text("50000000\n")  # a 50 MB container, 40 MB used, 5 MB of it cache
    (here / names[1]).write_text("40000000\n")
    (here / "memory.stat").write_text(f"anon 35000000\n{cache} 5000000\nactive_file 1\n")
    monkeypatch.setattr(wkd_cost, "MEMINFO", meminfo)
    monkeypatch.setattr(wkd_cost, "CGROUP", cgroup)
    assert wkd_cost.cgroup_headroom() == 15_000_000
    assert wkd_cost.memory_available() == 15_000_000
    (here / names[0]).write_text("9223372036854771712\n" if v1 else "max\n")  # no limit set
    assert wkd_cost.cgroup_headroom() is None
    assert wkd_cost.memory_available() == 1000000 * 1024
    meminfo.unlink()
    (here / names[0]).write_text("50000000\n")
    assert wkd_cost.memory_available() == 15_000_000  # the limit alone, where meminfo is absent
