"""Hostile and careless inputs, round three: numbers beyond what torch holds, recipes that expand
without bound, warnings before an error, argparse's own errors, image folders that loop, and labels
out of range in a later batch of the Python API. Each gets one bounded line (exit 2) or a
UserError. docs/errors.md, section "Round three", lists them."""

import os
import sys
import tracemalloc
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normkd
from normkd.cli import main
from normkd.config import ConfigError, load_recipe
from normkd.data.folder import folder_datasets
from normkd.engine.checkpoint import save_model
from normkd.errors import UserError
from normkd.models import create_model
from support import DEMO, one_error_line, sets, write_image_folder

TEACHER = str(DEMO / "teacher.yaml")
TINY = [
    "student.model=tinycnn",
    "student.kwargs={width: 8}",
    "data.n_train=128",
    "engine.device=cpu",
]


def _line(argv: list[str], capsys) -> str:
    return one_error_line(main, argv, capsys, max_len=2020)


@pytest.mark.parametrize("key", ["engine.seed", "data.split_seed"])
@pytest.mark.parametrize("value", [2**64, -(2**64), 2**32])
def test_seeds_beyond_what_torch_holds_are_one_line(key, value, capsys):
    line = _line(["train", TEACHER, "--dry-run", *sets(*TINY, f"{key}={value}")], capsys)
    assert key in line and "out of range" in line


def test_sizes_beyond_any_run_are_refused_when_read(capsys):
    for over in ("data.batch_size=100000", "data.workers=100000", "data.image_size=100000"):
        line = _line(["train", TEACHER, "--dry-run", *sets(*TINY, over)], capsys)
        assert over.split("=")[0] in line and "less than or equal to" in line


def test_model_kwargs_or_term_sizes_beyond_memory_are_one_line(capsys):
    """A width the machine cannot allocate is the recipe's mistake, not a torch traceback; CRD's
    banks (dataset x feat_dim, twice) are bounded where the recipe is read."""
    tiny = [*TINY[2:], "student.model=tinycnn", "student.kwargs={width: 4000000000}"]
    line = _line(["train", TEACHER, "--dry-run", *sets(*tiny)], capsys)
    assert "student.kwargs" in line and "larger than this machine's memory" in line
    crd = DEMO / "crd.yaml"
    line = _line(
        ["distill", str(crd), "--dry-run", *sets(*TINY, "loss.1.feat_dim=1000000")], capsys
    )
    assert "loss.1.feat_dim" in line


def _laughs(levels: int, tail: str) -> bytes:
    lines = ["name: x", "task: train", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("\n".join(lines) + "\n" + tail + "\n").encode()


def test_a_billion_laughs_recipe_gets_one_short_line(tmp_path, capsys):
    """496 bytes of aliases stand for 43 million values; the error used to repeat every one."""
    path = tmp_path / "laughs.yaml"
    path.write_bytes(_laughs(9, "student: {model: resnet8}\noptim: {milestones: *a8}"))
    assert len(path.read_bytes()) < 600
    line = _line(["train", str(path), "--dry-run"], capsys)
    assert "holds more than 10,000 values" in line and len(line) < 300


def test_many_problems_are_listed_bounded(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask: train\nstudent: {model: resnet8}\noptim: {milestones: [" +
                    ", ".join(["x" * 200] * 900) + "]}\n")  # fmt: skip
    line = _line(["train", str(path), "--dry-run"], capsys)
    assert "and 895 more" in line and len(line) < 2000


def test_a_nul_in_a_path_is_one_line(capsys):
    line = _line(["train", TEACHER, "--dry-run", *sets(*TINY, 'engine.out_dir="a\\0b"')], capsys)
    assert "engine.out_dir" in line and "control character" in line


def test_warnings_raised_on_the_way_to_an_error_do_not_come_before_it(capsys):
    """torchvision's GoogLeNet warns (FutureWarning) as it builds, then cannot run on 8x8 digits:
    the promise is one line, so the warning is dropped with the failed command."""
    over = ["student.model=torchvision:googlenet", "student.kwargs={init_weights: null}"]
    with warnings.catch_warnings():  # printed as outside pytest, not recorded by it
        warnings.simplefilter("default")
        warnings._showwarnmsg_impl = lambda m: print(warnings._formatwarnmsg(m), file=sys.stderr)  # type: ignore[attr-defined]
        line = _line(["train", TEACHER, "--dry-run", *sets(*TINY, *over)], capsys)
    assert "googlenet cannot run on 3x8x8 inputs" in line


def test_argparse_errors_are_one_line_and_counts_are_bounded(capsys):
    """argparse's own errors used to print a usage block first; counts are bounded as read."""
    cases = [
        (["demo", "--seeds", str(10**12)], "--seeds: expected an integer in 1..100"),
        (["train"], "the following arguments are required: config"),
        (["reproduce", "cifar100", "x", "--data-root", ".", "--epochs", "0"], "1..1000000"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("normkd: error: ") and needle in err


def test_model_files_and_export_shapes_are_bounded(tmp_path, capsys):
    """A model file's class count and input shape, and --input-shape, feed allocations."""
    model = create_model("resnet8", num_classes=10)
    for meta in ({"num_classes": 10**12}, {"num_classes": 10, "input_shape": [3, 10**6, 10**6]}):
        path = tmp_path / "m.safetensors"
        save_model(path, model, {"model": "resnet8", "kwargs": {}} | meta)
        line = _line(["export", str(path), "--onnx", str(tmp_path / "m.onnx")], capsys)
        assert "normkd metadata must be JSON" in line
    save_model(path, model, {"model": "resnet8", "num_classes": 10, "kwargs": {}})
    argv = ["export", str(path), "--onnx", str(tmp_path / "m.onnx"), "--input-shape"]
    line = _line([*argv, "3,100000,100000"], capsys)
    assert "each at most 4096" in line
    with pytest.raises(UserError, match=r"integers in 1\.\.4096"):
        normkd.export(path, tmp_path / "m.onnx", input_shape=(3, 10**6, 10**6))
    assert not (tmp_path / "m.onnx").exists()


def test_an_image_folder_with_link_cycles_reads_each_image_once(tmp_path):
    """Policy: links are followed, each real folder is entered once and each real file read
    once, so a cycle (a link up the tree) or two links to one folder never repeat images."""
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=12, size=8)
    os.symlink("..", root / "class_0" / "up")  # a cycle back to the root
    os.symlink("../class_0", root / "class_1" / "twin")  # another class's folder
    (root / "class_1" / "sub").mkdir()
    os.symlink("../000.png", root / "class_1" / "sub" / "again.png")  # a file seen already
    train, _val, classes, info = folder_datasets(root, image_size=8)
    assert info["n_train"] + info["n_val"] == 24
    paths = [os.path.realpath(p) for p, _ in train.base.samples]
    assert len(set(paths)) == 24 and classes == ["class_0", "class_1"]
    assert [y for _, y in train.base.samples] == [0] * 12 + [1] * 12


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_api_labels_out_of_range_in_a_later_batch_name_the_batch(tmp_path):
    x = torch.randn(24, 3, 8, 8)
    y = torch.tensor([0, 1, 2] * 4 + [0, 1, 7] + [0] * 9)  # batch 1 holds a 7; 3 classes
    loader = DataLoader(TensorDataset(x, y), batch_size=12)
    with pytest.raises(UserError, match=r"train_data batch 1: labels run from 0 to 7, but the "
                       r"models predict 3 classes \(labels must lie in 0..2\)"):  # fmt: skip
        normkd.distill(None, _Net(), loader, method="vanilla", epochs=1, out_dir=tmp_path,
                       device="cpu", quiet=True)  # fmt: skip


# ------------------------------------------------------------------ generated hostile recipes

_huge_int = st.one_of(st.integers(min_value=2**32, max_value=2**200),
                      st.integers(min_value=-(2**200), max_value=-(2**32)))  # fmt: skip
_bad_text = st.text(alphabet=st.sampled_from(["\0", "\x01", "\x1b", "\x7f", "a", "/"]), min_size=1,
                    max_size=20).filter(lambda s: any(c in s for c in "\0\x01\x1b\x7f"))  # fmt: skip
_KEYS = ["engine.seed", "data.split_seed", "data.batch_size", "optim.epochs", "engine.run_name",
         "name", "data.root", "student.kwargs.width", "loss.0.weight", "engine.out_dir"]  # fmt: skip


def _yaml_value(draw) -> str:
    kind = draw(st.sampled_from(["int", "text", "laughs", "deep", "wide"]))
    if kind == "int":
        return str(draw(_huge_int))
    if kind == "text":
        return '"' + draw(_bad_text).encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if kind == "laughs":
        return "*a" + str(draw(st.integers(5, 8)))
    if kind == "deep":
        n = draw(st.integers(51, 3000))
        return "[" * n + "]" * n
    return "[" + ", ".join(["x"] * draw(st.integers(10_001, 20_000))) + "]"


@st.composite
def hostile_recipes(draw) -> tuple[str, str]:
    """A recipe text with one hostile value at one key (nested as the key says)."""
    key = draw(st.sampled_from(_KEYS))
    value = _yaml_value(draw)
    anchors = _laughs(9, "").decode().split("\n", 2)[2] if value.startswith("*a") else ""
    parts = key.split(".")
    body = f"{parts[-1]}: {value}"
    if parts[0] == "loss":
        body = f"loss: [{{kind: ce, {body}}}]"
    else:
        for part in reversed(parts[:-1]):
            body = f"{part}: {{{body}}}"
    doc = anchors + "task: train\n" + body + "\n"
    doc += "" if key == "name" else "name: x\n"
    doc += "" if parts[0] == "student" else "student: {model: resnet8}\n"
    return key, doc


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples in CI every time: a failure here is a real one
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=hostile_recipes())
def test_generated_hostile_recipes_get_one_bounded_line_within_a_memory_budget(case, tmp_path):
    """Out-of-range numbers, NUL and control characters, alias bombs, deep or wide structures:
    load_recipe refuses each with one line of bounded length, allocating under 16 MiB."""
    key, doc = case
    path = tmp_path / "r.yaml"
    path.write_text(doc)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load_recipe(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert "\n" not in msg and len(msg) <= 2000, msg[:300]
    assert peak < 16 * 2**20 + 3 * len(doc), (key, peak)
