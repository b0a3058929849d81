"""The shipped recipes (src/normkd/configs/): every one loads, names are unique, each paper pair has
its full set of methods with the settings MISSION.md names, and dry runs build every model pairing
on fake data without writing a run directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import normkd
from normkd.cli import main
from normkd.config import Recipe, load_recipe
from normkd.models import create_model

CONFIGS = Path(normkd.__file__).parent / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
METHODS = {"vanilla", "kd", "norm", "norm_kd", "norm_authors", "crd", "dkd", "norm_crd", "norm_dkd"}
# the CRD benchmark's feature baselines, and NORM+KD as the authors' code runs it
CIFAR_METHODS = METHODS | {"fitnet", "at", "norm_kd_authors"}

CIFAR = CONFIGS / "cifar100"
CIFAR_PAIRS = {
    ("resnet56", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
}
# normkd's own CPU-sized pair (not in the paper), set up like resnet56 -> resnet20.
OWN_PAIRS = {("resnet20", "resnet8")}
# normkd's own mixed CNN / ViT pairs (not in the paper), on the same benchmark schedule.
OWN_PAIRS |= {
    ("resnet32x4", "vit_tiny_p4"),
    ("vit_small_p4", "resnet8x4"),
    ("resnet20", "vit_mini_p4"),
}
CIFAR_PAIRS |= OWN_PAIRS
CIFAR_TEACHERS = {t for t, _ in CIFAR_PAIRS}
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}  # lr 0.01 in the CRD benchmark
# DKD beta per pair: mdistiller configs/cifar100/dkd/*.yaml (8 = its cfg.py default; ResNet50 ->
# vgg8 has no mdistiller config and keeps the default).
CIFAR_DKD_BETA = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet20", "resnet8"): 2.0,  # normkd's own pair: as its nearest paper pair
    ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
}
# LSKD (base temperature, KD weight) per pair: the logit-standardization-KD README's log names
# ("kd,<teacher>,<student>,T,w.txt"); pairs without a published LSKD figure have no lskd.yaml.
CIFAR_LSKD = {
    ("resnet32x4", "resnet8x4"): (2.0, 9.0),
    ("vgg13", "vgg8"): (3.0, 9.0),
    ("wrn_40_2", "wrn_40_1"): (2.0, 9.0),
    ("wrn_40_2", "wrn_16_2"): (2.0, 9.0),
    ("resnet56", "resnet20"): (2.0, 9.0),
    ("resnet110", "resnet32"): (2.0, 9.0),
    ("resnet32x4", "ShuffleV2"): (2.0, 9.0),
    ("vgg13", "MobileNetV2"): (3.0, 9.0),
    ("ResNet50", "MobileNetV2"): (3.0, 1.0),
    ("resnet20", "resnet8"): (2.0, 9.0),  # normkd's own pair: the authors' default flags
}
# ReviewKD (weight, warm-up epochs, first_stage) per pair with a reviewkd.yaml: mdistiller
# configs/cifar100/reviewkd.yaml (resnet32x4 -> resnet8x4) and the vgg13 -> vgg8 config its
# maintainer posted in megvii-research/mdistiller issue #23 (REVIEWKD_WEIGHT 5.0 on engine/cfg.py's
# WARMUP_EPOCHS 20; their IN_CHANNELS list vgg8's stages after the stem); normkd's own pair takes
# the authors' resnet56 -> resnet20 weight (dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh).
CIFAR_REVIEWKD = {
    ("resnet32x4", "resnet8x4"): (5.0, 20, 1),
    ("vgg13", "vgg8"): (5.0, 20, 1),
    ("resnet20", "resnet8"): (0.6, 20, 1),
}
# WKD per pair with wkd_l.yaml / wkd_l_wkd_f.yaml: JiamingLv/WKD configs/cifar100/wkd_l/<pair>.yaml
# (gamma = WKD_LOGIT_WEIGHT, T) and configs/cifar100/wkd_lf/<pair>.yaml (gamma, T, WKD_FEAT_WEIGHT,
# MEAN_COV_RATIO, SPATIAL_GRID); every one: Sinkhorn lambda 0.05, 10 sweeps, sharpen 1, PROJECTOR
# conv1x1, HINT_LAYER -1, COSINE_DECAY_EPOCH 150.
CIFAR_WKD = {
    ("resnet32x4", "resnet8x4"): ((600.0, 8.0), (200.0, 8.0, 0.08, 8.0, 1)),  # res32x4_res8x4
    ("wrn_40_2", "ShuffleV1"): ((200.0, 6.0), (60.0, 4.0, 0.5, 3.0, 4)),  # wrn40_2_shuv1
    ("resnet20", "resnet8"): ((600.0, 8.0), (200.0, 8.0, 0.08, 8.0, 1)),  # own pair: res32x4_res8x4
}

IMAGENET = CONFIGS / "imagenet"
IMAGENET_PAIRS = {
    ("resnet34", "resnet18"),
    ("resnet50", "mobilenet_v1"),
    ("resnet50", "resnet50_1_4"),
    # normkd's own mixed pairs: a ViT teacher into a CNN, and the reverse
    ("deit_small", "resnet18"),
    ("resnet50", "deit_tiny"),
}
# folder names of timm models (a folder name cannot hold "timm:")
FOLDER_MODELS = {
    "deit_small": "timm:deit_small_patch16_224",
    "deit_tiny": "timm:deit_tiny_patch16_224",
}
ADAMW_STUDENTS = {"deit_tiny"}  # DeiT's optimizer, per 256 images
# DKD beta: mdistiller configs/imagenet/{r34_r18,r50_mv1}/dkd.yaml; resnet50_1_4 (no config) takes
# its ResNet50 teacher's other value.
IMAGENET_DKD_BETA = {"resnet34": 0.5, "resnet50": 2.0, "deit_small": 0.5}  # last: as its student


def _pair_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and "__" in d.name)


def _split(d: Path) -> tuple[str, str]:
    teacher, student = d.name.split("__")
    return teacher, student


def _terms(recipe: Recipe) -> dict[str, Any]:
    return {t.kind: t for t in recipe.loss}


def _rel(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


# --------------------------------------------------------------------------- loading


def test_every_recipe_loads_says_what_it_is_and_has_its_own_name() -> None:
    """One pass over all shipped recipes (the pair and dry-run tests check their contents)."""
    seen: dict[str, str] = {}
    for path in RECIPES:
        recipe = load_recipe(path)
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("# "), f"{_rel(path)}: start with a comment saying what it is"
        name = recipe.name
        assert name, _rel(path)
        assert name not in seen, f"{_rel(path)} reuses the name {name!r} of {seen.get(name)}"
        seen[name] = _rel(path)
    assert len(seen) == len(RECIPES) > 100


def test_precision_authors_recipes_fp32_others_the_hardware_default() -> None:
    """The authors'-code fidelity runs keep fp32 wherever they run; every other CIFAR / demo
    recipe takes the engine's default ``auto`` (ImageNet's base asks for bf16 outright)."""
    for path in RECIPES:
        amp = load_recipe(path).engine.amp
        if path.stem.endswith("_authors"):
            assert amp == "off", _rel(path)
        elif IMAGENET not in path.parents:
            assert amp == "auto", _rel(path)
        else:
            assert amp == "bf16", _rel(path)


def test_authors_recipes_resolve_to_fp32_in_contiguous_memory_on_any_device() -> None:
    """As the authors ran them: no autocast and no channels-last (which reorders fp32 sums)."""
    from normkd.engine.runtime import resolve_amp, resolve_channels_last

    authors = [p for p in RECIPES if p.stem.endswith("_authors")]
    assert len(authors) == 2 * len(CIFAR_PAIRS) + len(IMAGENET_PAIRS)
    for path in authors:
        engine = load_recipe(path).engine
        for device in ("cpu", "cuda"):
            amp = resolve_amp(engine.amp, torch.device(device))
            assert amp == "off", _rel(path)
            assert resolve_channels_last(engine.channels_last, amp) is False, _rel(path)


def test_pair_folders_complete() -> None:
    cifar = {_split(d) for d in _pair_dirs(CIFAR)}
    assert cifar == CIFAR_PAIRS
    assert {_split(d) for d in _pair_dirs(IMAGENET)} == IMAGENET_PAIRS
    for d in _pair_dirs(CIFAR) + _pair_dirs(IMAGENET):
        files = {p.stem for p in d.glob("*.yaml")}
        methods = CIFAR_METHODS if d.parent == CIFAR else METHODS
        assert files >= methods | {"_pair"}, f"{d.name}: missing {methods - files}"
    assert {p.stem for p in (CIFAR / "teachers").glob("*.yaml")} == CIFAR_TEACHERS


@pytest.mark.parametrize("d", _pair_dirs(CIFAR) + _pair_dirs(IMAGENET), ids=lambda d: d.name)
def test_pair_models_match_folder(d: Path) -> None:
    teacher, student = (FOLDER_MODELS.get(m, m) for m in _split(d))
    for path in sorted(d.glob("[!_]*.yaml")):
        r = load_recipe(path)
        assert r.student.model == student, _rel(path)
        if path.stem == "vanilla":
            assert r.task == "train" and r.teacher is None
            assert list(_terms(r)) == ["ce"]
        else:
            assert r.task == "distill" and r.teacher is not None, _rel(path)
            assert r.teacher.model == teacher, _rel(path)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("d", _pair_dirs(CIFAR), ids=lambda d: d.name)
def test_cifar_pair_settings(d: Path) -> None:
    teacher, student = _split(d)
    r = {p.stem: load_recipe(p) for p in d.glob("[!_]*.yaml")}
    for rec in r.values():  # the CRD benchmark schedule
        o = rec.optim
        assert (rec.data.kind, rec.data.batch_size, str(rec.data.root)) == (
            "cifar100",
            64,
            "data/cifar100",
        )
        assert (o.epochs, o.schedule, o.milestones, o.lr_decay) == (
            240,
            "multistep",
            [150, 180, 210],
            0.1,
        )
        assert (o.momentum, o.weight_decay) == (0.9, 5e-4)
        assert o.lr == (0.01 if student in LOW_LR_STUDENTS else 0.05)
    # the teacher checkpoint is the file the teacher recipe writes
    t_recipe = load_recipe(CIFAR / "teachers" / f"{teacher}.yaml")
    assert r["kd"].teacher is not None
    assert r["kd"].teacher.weights == t_recipe.run_dir() / "model.safetensors"

    kd = _terms(r["kd"])
    assert (kd["ce"].weight, kd["kd"].weight, kd["kd"].temperature) == (0.1, 0.9, 4.0)
    for method in ("norm", "norm_kd", "norm_authors", "norm_crd", "norm_dkd"):
        norm = r[method].term("norm")
        assert norm is not None and (norm.n, norm.ramp, norm.weight) == (8, "cifar", 1.0)
        assert norm.bn and norm.residual and norm.reduce == "max" and norm.stages == "last"
    for method in ("norm", "norm_kd", "norm_crd", "norm_dkd", "fitnet", "at", "crd", "dkd"):
        assert not r[method].logit_standardization.enabled, method
        assert _terms(r[method])["ce"].weight == 1.0, method
    assert set(_terms(r["norm"])) == {"ce", "norm"}
    assert set(_terms(r["norm_kd"])) == {"ce", "kd", "norm"}
    # RepDistiller scripts/run_cifar_distill.sh: hint -b 100 --hint_layer 2, attention -b 1000
    fitnet = _terms(r["fitnet"])
    assert set(fitnet) == {"ce", "fitnet"}
    assert (fitnet["fitnet"].weight, fitnet["fitnet"].stage) == (100.0, 2)
    assert fitnet["fitnet"].teacher_stage is None
    at = _terms(r["at"])
    assert set(at) == {"ce", "at"} and (at["at"].weight, at["at"].p) == (1000.0, 2.0)
    _check_crd_dkd(r, alpha=1.0, beta=CIFAR_DKD_BETA.get((teacher, student), 8.0), t=4.0, warmup=20)
    assert ("lskd" in r) == ((teacher, student) in CIFAR_LSKD)
    if "lskd" in r:  # the authors' --logit-stand flags on mdistiller's KD (CE 0.1 unchanged)
        lskd = _terms(r["lskd"])
        assert set(lskd) == {"ce", "lskd"} and lskd["ce"].weight == 0.1
        assert (lskd["lskd"].temperature, lskd["lskd"].weight) == CIFAR_LSKD[(teacher, student)]
        assert not r["lskd"].logit_standardization.enabled  # the term z-scores; nothing else
    if "dist" in r:  # the DIST_KD README's one CIFAR-100 setting (dist_cifar.yaml) for every pair
        dist = _terms(r["dist"])
        assert set(dist) == {"ce", "dist"} and dist["ce"].weight == 1.0
        t = dist["dist"]
        assert (t.weight, t.beta, t.gamma, t.tau) == (2.0, 1.0, 1.0, 4.0)
    authors = r["norm_authors"]
    assert authors.logit_standardization.enabled and authors.logit_standardization.scale == 2.5
    assert set(_terms(authors)) == {"ce", "norm"}  # alpha = 0 in the authors' scripts
    assert _terms(authors)["ce"].weight in {0.0625, 0.1, 0.125, 0.25, 0.5}
    # NORM+KD the authors' way: norm_authors.yaml plus a KD term at T = 4, standardised too.
    both = r["norm_kd_authors"]
    assert both.logit_standardization == authors.logit_standardization
    assert _terms(both)["ce"] == _terms(authors)["ce"] and both.term("norm") == authors.term("norm")
    assert set(_terms(both)) == {"ce", "kd", "norm"} and _terms(both)["kd"].temperature == 4.0
    _check_reviewkd_wkd(d, r)


def _check_reviewkd_wkd(d: Path, r: dict[str, Recipe]) -> None:
    """reviewkd / wkd_l / wkd_l_wkd_f exactly where CIFAR_REVIEWKD / CIFAR_WKD list the pair, with
    the authors' values; WKD-L keeps the uniform cost and says it is not the published method."""
    pair = _split(d)
    assert ("reviewkd" in r) == (pair in CIFAR_REVIEWKD)
    if "reviewkd" in r:
        rk = _terms(r["reviewkd"])
        assert set(rk) == {"ce", "reviewkd"} and rk["ce"].weight == 1.0
        t = rk["reviewkd"]
        assert (t.weight, t.warmup, t.first_stage) == CIFAR_REVIEWKD[pair]
        assert t.teacher_first_stage is None and t.mid_channels is None  # min(512, C), theirs
    assert ("wkd_l" in r) == ("wkd_l_wkd_f" in r) == (pair in CIFAR_WKD)
    if pair not in CIFAR_WKD:
        return
    (gamma, temp), (gamma_f, temp_f, weight_f, ratio, grid) = CIFAR_WKD[pair]
    alone, both = _terms(r["wkd_l"]), _terms(r["wkd_l_wkd_f"])
    assert set(alone) == {"ce", "wkd_l"} and set(both) == {"ce", "wkd_l", "wkd_f"}
    for method, terms, want in (
        ("wkd_l", alone, (gamma, temp)),
        ("wkd_l_wkd_f", both, (gamma_f, temp_f)),
    ):
        wl = terms["wkd_l"]
        assert terms["ce"].weight == wl.weight == 1.0, method
        assert (wl.gamma, wl.temperature) == want, method
        assert (wl.sinkhorn_lambda, wl.sinkhorn_iters) == (0.05, 10), method
        assert (wl.sharpen, wl.decay_from) == (1.0, 150), method
        assert wl.cost_matrix == "uniform", method  # the published 1 - CKA cost is a user's file
        text = (d / f"{method}.yaml").read_text()
        assert "NOT THE PUBLISHED METHOD" in text, method
        if pair not in OWN_PAIRS:  # the comment names the authors' cost file for this teacher
            assert f"wkd_cost_matrix/cifar100/{pair[0]}/linear_cka.pth" in text, method
    f = both["wkd_f"]
    assert (f.weight, f.ratio, f.grid) == (weight_f, ratio, grid)
    assert (f.projector, f.decay_from, f.eps) == ("conv1x1", 150, 1e-5)


def _check_crd_dkd(r: dict[str, Recipe], alpha: float, beta: float, t: float, warmup: int) -> None:
    """crd/dkd: CE 1 + the method; norm_crd/norm_dkd: norm.yaml's terms + the same term."""
    crd = _terms(r["crd"])
    assert set(crd) == {"ce", "crd"}
    c = crd["crd"]  # RepDistiller -b 0.8 and train_student.py's NCE defaults
    assert (c.weight, c.feat_dim, c.nce_k, c.nce_t, c.nce_m) == (0.8, 128, 16384, 0.07, 0.5)
    assert c.negatives == "other_classes"  # RepDistiller's default --mode exact
    dkd = _terms(r["dkd"])
    assert set(dkd) == {"ce", "dkd"}
    d = dkd["dkd"]
    assert (d.weight, d.alpha, d.beta, d.temperature, d.warmup) == (1.0, alpha, beta, t, warmup)
    for method, term in (("crd", c), ("dkd", d)):
        combo = _terms(r[f"norm_{method}"])
        assert set(combo) == {"ce", "norm", method}, method
        assert combo[method] == term, f"norm_{method}: {method} term differs from {method}.yaml"
        assert combo["norm"] == _terms(r["norm"])["norm"], f"norm_{method}: norm differs"
        assert not r[f"norm_{method}"].logit_standardization.enabled
        assert combo["ce"].weight == 1.0
    assert crd["ce"].weight == dkd["ce"].weight == 1.0


@pytest.mark.parametrize("path", sorted((CIFAR / "teachers").glob("*.yaml")), ids=_rel)
def test_cifar_teacher_settings(path: Path) -> None:
    r = load_recipe(path)
    assert r.task == "train" and r.teacher is None and r.student.model == path.stem
    assert list(_terms(r)) == ["ce"]
    assert (r.optim.lr, r.optim.epochs, r.optim.milestones) == (0.05, 240, [150, 180, 210])
    assert r.run_dir() == Path("runs/cifar100/teachers") / path.stem


@pytest.mark.parametrize("d", _pair_dirs(IMAGENET), ids=lambda d: d.name)
def test_imagenet_pair_settings(d: Path) -> None:
    teacher, student = _split(d)
    r = {p.stem: load_recipe(p) for p in d.glob("[!_]*.yaml")}
    for rec in r.values():
        o, e = rec.optim, rec.engine
        assert (rec.data.kind, rec.data.batch_size, rec.data.workers) == ("imagenet", 256, 8)
        if student in ADAMW_STUDENTS:
            assert (o.optimizer, o.lr, o.weight_decay) == ("adamw", 2.5e-4, 0.05)
            assert (o.epochs, o.schedule, o.warmup_epochs) == (100, "cosine", 5)
        else:
            assert (o.epochs, o.lr, o.weight_decay, o.momentum) == (100, 0.1, 1e-4, 0.9)
        # amp: see above; the authors'-code recipe runs in contiguous memory, as they did
        want = rec.name is not None and not rec.name.endswith("_authors")
        assert (e.channels_last, e.out_dir) == (want, Path("runs/imagenet"))
        if rec.teacher is not None:  # a file named by the user, never downloaded
            assert rec.teacher.weights is not None
            assert rec.teacher.weights.parent == Path("data/pretrained")
            name = FOLDER_MODELS.get(teacher, teacher).removeprefix("timm:")
            assert rec.teacher.weights.name.startswith(f"{name}-")
    if student not in ADAMW_STUDENTS:
        for method in ("vanilla", "kd", "norm", "norm_kd", "crd", "dkd", "norm_crd", "norm_dkd"):
            assert (r[method].optim.schedule, r[method].optim.step_size) == ("step", 30)
    kd = _terms(r["kd"])
    assert (kd["ce"].weight, kd["kd"].weight, kd["kd"].temperature) == (0.5, 0.5, 1.0)
    for method in ("norm", "norm_kd", "norm_authors", "norm_crd", "norm_dkd"):
        norm = r[method].term("norm")
        assert norm is not None and (norm.n, norm.ramp, norm.weight) == (8, "imagenet", 1.0)
    assert not r["norm"].logit_standardization.enabled
    assert r["norm_authors"].logit_standardization.enabled
    assert set(_terms(r["norm_authors"])) == {"ce", "norm"}
    # DKD paper's ImageNet setting: alpha 0.5, T 1, no warm-up (mdistiller WARMUP 1)
    _check_crd_dkd(r, alpha=0.5, beta=IMAGENET_DKD_BETA[teacher], t=1.0, warmup=1)


# --------------------------------------------------------------------------- dry runs

DRY_PAIR = CIFAR / "resnet32x4__resnet8x4"
# Every method on one pair; on the others the recipes that build the most terms with their models
# (NORM's FT on the pair's shapes with CRD's embeddings, and with DKD; the settings tests above read
# every recipe's contents). ImageNet runs at 224 px, so its pairs get the two combinations and the
# authors' variant (about 30 s less than every file); its mixed CNN / ViT pairs, whose other recipes
# build the same models, NORM+CRD alone.
MIXED_IMAGENET = {"deit_small__resnet18", "resnet50__deit_tiny"}
# ReviewKD / WKD build their modules on each pair's own stage shapes: every CIFAR pair's that has one
FEATURE_METHODS = {"reviewkd", "wkd_l", "wkd_l_wkd_f"}
DRY_RUNS = sorted(
    set(DRY_PAIR.glob("[!_]*.yaml"))
    | {d / f"{m}.yaml" for d in _pair_dirs(CIFAR) for m in ("norm_crd", "norm_dkd")}
    | {p for d in _pair_dirs(CIFAR) for p in d.glob("*.yaml") if p.stem in FEATURE_METHODS}
    | set((CIFAR / "teachers").glob("*.yaml"))
    | {
        d / f"{m}.yaml"
        for d in _pair_dirs(IMAGENET)
        for m in (
            ("norm_crd",) if d.name in MIXED_IMAGENET else ("norm_crd", "norm_dkd", "norm_authors")
        )
    }
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny-batch forwards gain nothing from intra-op threads and lose much on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", DRY_RUNS, ids=_rel)
def test_dry_run(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`normkd train|distill RECIPE --dry-run --fake-data` builds models and a batch, on fake
    data (CI has no ImageNet or CIFAR-100)."""
    recipe = load_recipe(path)
    out_dir = tmp_path / "runs"
    batch = 2 if recipe.data.kind == "imagenet" else 4
    argv = [recipe.task, str(path), "--dry-run", "--fake-data"]
    for kv in (
        f"data.batch_size={batch}",
        f"data.eval_batch_size={batch}",
        "engine.device=cpu",
        f"engine.out_dir={out_dir}",
        f"data.root={tmp_path / 'no-such-data'}",
    ):
        argv += ["--set", kv]
    if recipe.teacher is not None:  # no trained teacher here: random weights are enough to build
        argv += ["--set", "teacher.weights=null"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dry run ok (FAKE data, as --fake-data asked)" in printed
    assert recipe.name in printed and f"student {recipe.student.model}" in printed
    classes = 1000 if recipe.data.kind == "imagenet" else 100
    assert f"-> logits ({batch}, {classes})" in printed
    for kind in _terms(recipe):
        assert f"{kind}=" in printed
    assert not out_dir.exists(), "a dry run must not create the run directory"


@pytest.mark.usefixtures("one_thread")
def test_authors_layer3_option_deploys_resnet18_with_its_inner_ft(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stages=layer3` on the authors' ResNet34 -> ResNet18 recipe: the student the dry run
    reports is ResNet18 plus the in-path FT after layer3 (256 -> 8 * 256 -> 256, BN after each)."""
    from normkd.norm import FeatureTransform

    path = IMAGENET / "resnet34__resnet18" / "norm_authors.yaml"
    argv = ["distill", str(path), "--dry-run", "--fake-data"]
    for kv in (
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "engine.device=cpu",
        f"engine.out_dir={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'no-such-data'}",
        "teacher.weights=null",
        "loss.1.stages=layer3",
    ):
        argv += ["--set", kv]
    assert main(argv) == 0
    plain = sum(p.numel() for p in create_model("resnet18", num_classes=1000).parameters())
    inner = sum(p.numel() for p in FeatureTransform(256, 256, 8).parameters())
    assert f"student resnet18 ({plain + inner:,} params; FT on its map)" in capsys.readouterr().out


def test_every_published_figure_has_the_recipe_a_reproduction_sets_beside_it() -> None:
    """published.py's figures are only worth carrying where a user can run the method on the pair
    (resnet110 -> resnet20: the NORM paper's pair normkd ships no folder for)."""
    from normkd import published

    for root, table in ((CIFAR, published.CIFAR100), (IMAGENET, published.IMAGENET)):
        for pair, figures in table.items():
            folder = root / pair
            if pair == "resnet110__resnet20":
                assert not folder.exists()
                continue
            missing = [m for m in figures if not (folder / f"{m}.yaml").is_file()]
            assert not missing, f"{pair}: published figures without a recipe: {missing}"
