"""Parity of normkd's baseline terms with their authors' code, in float64 on identical inputs.

The authors' files are never part of this repository: ``--ref DIR`` names a folder outside it
holding them, laid out as packages so their relative imports resolve:

    DIR/dist_ref/dist_kd.py   hunto/image_classification_sota lib/models/losses/dist_kd.py
    DIR/wkd_ref/WKD.py, _base.py, _common.py, generate_cost_matrix.py
                              JiamingLv/WKD mdistiller/distillers/*, tools/generate_cost_matrix.py
    DIR/reviewkd_ref/ReviewKD.py, _base.py
                              megvii-research/mdistiller mdistiller/distillers/*
    DIR/reviewkd_ref/resnet.py, vgg.py, wrn.py
                              megvii-research/mdistiller mdistiller/models/cifar/*
    (each folder with an empty __init__.py)

Their WKD-L casts probabilities to float32 inside the loss; for a float64 comparison the script
hands that module a ``torch`` whose ``float32`` is float64 (every other name is torch's own).
Prints one line per check: max |ours - theirs| (loss and gradients) and PASS / FAIL at 1e-6.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types

import torch

from normkd.losses import StepState, Taps
from normkd.losses.dist import DISTLoss
from normkd.losses.reviewkd import ReviewKDLoss
from normkd.losses.wkd import WKDFeatureLoss, WKDLogitLoss, linear_cka, sharpen_cost

TOL = 1e-6
D64 = torch.float64


def _diff(ours: torch.Tensor, theirs: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    """Max abs difference of the two losses and of their gradients w.r.t. ``inputs``."""
    g_o = torch.autograd.grad(ours, inputs, retain_graph=True)
    g_t = torch.autograd.grad(theirs, inputs, retain_graph=True)
    d = (ours - theirs).abs().item()
    return max([d] + [(a - b).abs().max().item() for a, b in zip(g_o, g_t, strict=True)])


def _logits(seed: int, b: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g, dtype=D64) * 3).requires_grad_()
    t = torch.randn(b, c, generator=g, dtype=D64) * 3
    return s, t, torch.randint(0, c, (b,), generator=g)


def dist_checks(ref: types.ModuleType) -> list[tuple[str, float]]:
    """DIST for the authors' two settings (ImageNet tau 1, CIFAR-100 tau 4)."""
    rows = []
    for tau, (b, c) in ((1.0, (32, 1000)), (4.0, (64, 100))):
        s, t, y = _logits(int(tau), b, c)
        ours = DISTLoss(1.0, 1.0, tau)(StepState(s, y, y, 0, Taps(s), Taps(t)))
        theirs = ref.DIST(beta=1.0, gamma=1.0, tau=tau)(s, t)
        rows.append((f"dist tau={tau:g} B={b} C={c}", _diff(ours, theirs, [s])))
    return rows


def _float64_torch() -> types.ModuleType:
    shim = types.ModuleType("torch_f64")
    shim.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    shim.float32 = D64
    return shim


def wkd_l_checks(ref: types.ModuleType, cost_file: str | None) -> list[tuple[str, float]]:
    """WKD-L on the authors' CIFAR-100 matrix (sharpened as in their configs) and a random one."""
    ref.torch = _float64_torch()
    rows = []
    costs = {"random": torch.rand(100, 100, generator=torch.Generator().manual_seed(0))}
    if cost_file:
        costs["authors' resnet32x4 CKA"] = torch.load(
            cost_file, weights_only=True, map_location="cpu"
        )
    for name, raw in costs.items():
        cost = sharpen_cost(raw.to(D64), 1.0)
        for temp, gamma in ((8.0, 200.0), (2.0, 10.0)):
            s, t, y = _logits(7, 64, 100)
            ours = WKDLogitLoss(cost, gamma, temp, 0.05, 10)(
                StepState(s, y, y, 0, Taps(s), Taps(t))
            )
            theirs = ref.wkd_logit_loss_with_speration(s, t, y, temp, gamma, cost, 0.05, 10)
            rows.append(
                (f"wkd_l {name} cost, T={temp:g} gamma={gamma:g}", _diff(ours, theirs, [s]))
            )
    ref.torch = torch
    return rows


def wkd_f_checks(ref: types.ModuleType, common: types.ModuleType) -> list[tuple[str, float]]:
    """WKD-F with the authors' projector weights copied into ours (CIFAR and ImageNet settings)."""
    rows = []
    settings = (  # name, s_shape, t_shape, projector, ratio, grid
        ("CIFAR conv1x1 grid 1", (256, 8, 8), (256, 8, 8), "conv1x1", 8.0, 1),
        ("ImageNet bottleneck grid 4", (512, 7, 7), (512, 7, 7), "bottleneck", 2.0, 4),
    )
    for name, s_shape, t_shape, proj, ratio, grid in settings:
        torch.manual_seed(0)
        ours = WKDFeatureLoss(s_shape, t_shape, ratio, grid, proj).double()
        if proj == "conv1x1":
            theirs = common.ConvReg((1, *s_shape), (1, *t_shape), use_relu=True, use_bn=True)
            state = ours.projector.state_dict()
            theirs_state = dict(zip(theirs.state_dict(), state.values(), strict=True))
        else:
            theirs = common.ConvRegBottleNeck((1, *s_shape), (1, *t_shape), c_hidden=256)
            theirs_state = dict(
                zip(theirs.state_dict(), ours.projector.state_dict().values(), strict=True)
            )
        theirs.load_state_dict(theirs_state)
        theirs = theirs.double()
        g = torch.Generator().manual_seed(3)
        f_s = torch.randn(8, *s_shape, generator=g, dtype=D64).requires_grad_()
        f_t = torch.relu(torch.randn(8, *t_shape, generator=g, dtype=D64))
        got = ours(StepState(f_s, f_s, f_s, 0, Taps(stages=[f_s]), Taps(stages=[f_t])))
        mean_loss, cov_loss = ref.wkd_feature_loss(theirs(f_s), f_t, 1e-5, grid=grid)
        want = ratio * mean_loss + cov_loss
        rows.append((f"wkd_f {name}", _diff(got, want, [f_s])))
    return rows


def cka_checks(gen: types.ModuleType) -> list[tuple[str, float]]:
    """Linear CKA between two classes' feature matrices, ours vs the authors' precentred one."""
    g = torch.Generator().manual_seed(5)
    x, y = (
        torch.randn(500, 64, generator=g, dtype=D64),
        torch.randn(500, 64, generator=g, dtype=D64),
    )
    y = y + 0.5 * x
    return [
        (
            "wkd cost: linear CKA",
            abs(linear_cka(x, y).item() - gen.linear_CKA_precenter(x, y).item()),
        )
    ]


REVIEWKD_SETTINGS = (  # name, student maps (C, H, W) shallow to deep, pooled last; the teacher's;
    # STU_PREACT (mdistiller's CIFAR default False, its ImageNet configs' True)
    (
        "CIFAR resnet32x4 -> resnet8x4",
        [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)],
        [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)],
        False,
    ),
    (
        "CIFAR resnet32x4 -> ShuffleV1 (sizes differ)",
        [(240, 16, 16), (480, 8, 8), (960, 4, 4), (960, 1, 1)],
        [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)],
        False,
    ),
    (
        "ImageNet resnet34 -> resnet18, STU_PREACT",
        [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512, 1, 1)],
        [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512, 1, 1)],
        True,
    ),
)


class _Fixed(torch.nn.Module):
    """A stand-in network for mdistiller's distiller: returns given logits and feature dict."""

    def __init__(self, out: tuple[torch.Tensor, dict]) -> None:
        super().__init__()
        self.out = out

    def forward(self, _image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.out


def _maps(shapes: list[tuple[int, ...]], b: int, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(b, *sh, generator=g, dtype=D64) for sh in shapes]


def _reviewkd_diff(
    ref: types.ModuleType,
    s_shapes: list[tuple[int, ...]],
    t_shapes: list[tuple[int, ...]],
    stu_preact: bool,
) -> float:
    """Max |ours - theirs| of one setting: their distiller on stand-in networks, ours on taps.
    Each network's post-activation maps are its pre-activation ones through a ReLU, so both
    sides agree only if they review the same ones (the teacher's pre-activation, the student's
    as ``stu_preact`` says)."""
    g, b = torch.Generator().manual_seed(11), 4
    s_maps = [m.requires_grad_() for m in _maps(s_shapes, b, g)]
    t_maps = _maps(t_shapes, b, g)
    s_post, t_post = ([torch.relu(m) for m in maps[:-1]] for maps in (s_maps, t_maps))
    s_pooled, t_pooled = s_maps[-1].flatten(1), t_maps[-1].flatten(1)
    stem = torch.zeros(b, 1, 1, 1, dtype=D64)  # their lists lead with a stem no ABF reads
    logits = torch.randn(b, 10, generator=g, dtype=D64)
    cfg = types.SimpleNamespace(
        REVIEWKD=types.SimpleNamespace(
            SHAPES=[sh[1] for sh in reversed(s_shapes)],
            OUT_SHAPES=[sh[1] for sh in reversed(t_shapes)],
            IN_CHANNELS=[sh[0] for sh in s_shapes],
            OUT_CHANNELS=[sh[0] for sh in t_shapes],
            CE_WEIGHT=1.0, REVIEWKD_WEIGHT=1.0, WARMUP_EPOCHS=20, STU_PREACT=stu_preact,
            MAX_MID_CHANNEL=512,
        )
    )  # fmt: skip
    # (mdistiller's student lists lead with a stem, which ``zip`` leaves out; ours start at 0)
    student = _Fixed((logits, {
        "feats": [stem, *s_post], "preact_feats": [stem, *s_maps[:-1]], "pooled_feat": s_pooled,
    }))  # fmt: skip
    teacher = _Fixed((logits, {
        "feats": [stem, *t_post], "preact_feats": [stem, *t_maps[:-1]], "pooled_feat": t_pooled,
    }))  # fmt: skip
    theirs = ref.ReviewKD(student, teacher, cfg).double().train()
    ours = ReviewKDLoss(s_shapes, t_shapes, first_stage=0, student_preact=stu_preact)
    ours = ours.double().train()
    deepest = len(s_shapes) - 1
    for j, abf in enumerate(theirs.abfs):  # theirs deep to shallow, ours shallow to deep
        target = ours.abfs[deepest - j]
        values = list(abf.state_dict().values())
        target.load_state_dict(dict(zip(target.state_dict(), values, strict=True)))
    y = torch.zeros(b, dtype=torch.long)
    want = theirs.forward_train(image=stem, target=y, epoch=20)[1]["loss_kd"]  # warm-up done
    state = StepState(
        stem, y, y, 20, Taps(stages=s_post, preact=s_maps[:-1], pooled=s_pooled),
        Taps(stages=t_post, preact=t_maps[:-1], pooled=t_pooled),
    )  # fmt: skip
    return _diff(ours(state), want, s_maps)


def reviewkd_checks(ref: types.ModuleType) -> list[tuple[str, float]]:
    """ReviewKD's loss through mdistiller's own distiller (ABF chain + HCL), their ABF weights
    copied into ours, on identical student and teacher maps; BN in training mode on both sides."""
    return [
        (f"reviewkd {name}", _reviewkd_diff(ref, s, t, pre))
        for name, s, t, pre in REVIEWKD_SETTINGS
    ]


PREACT_MODELS = (  # our zoo name, (their module, their constructor)
    ("resnet32x4", ("resnet", "resnet32x4")),
    ("resnet56", ("resnet", "resnet56")),
    ("vgg13", ("vgg", "vgg13_bn")),
    ("wrn_40_2", ("wrn", "wrn_40_2")),
)


def preact_checks() -> list[tuple[str, float]]:
    """Our ``preact`` capture of a CIFAR teacher against mdistiller's own model file returning its
    ``preact_feats``, the same weights (ours, BN statistics randomised) loaded into both; eval
    mode, float64."""
    from normkd.models import create_model
    from normkd.models.taps import capture_inputs, get_taps

    rows = []
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(12), dtype=D64)
    for name, (module, ctor) in PREACT_MODELS:
        torch.manual_seed(13)
        ours = create_model(name, num_classes=100).double()
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        theirs = getattr(importlib.import_module(f"reviewkd_ref.{module}"), ctor)(num_classes=100)
        theirs.double().load_state_dict(ours.state_dict())
        spec = get_taps(ours.eval())
        with torch.no_grad(), capture_inputs(ours, spec.preact_stages) as got:
            ours(x)
            want = theirs.eval()(x)[1]["preact_feats"]
        d = max(
            (got[n] - w).abs().max().item() for n, w in zip(spec.preact_stages, want, strict=True)
        )
        rows.append((f"preact maps {name} (mdistiller preact_feats)", d))
    return rows


STEP_METHODS = {
    "kd": [{"kind": "kd", "temperature": 4.0}],
    "dist": [{"kind": "dist", "weight": 2.0, "tau": 4.0}],
    "wkd_l": [{"kind": "wkd_l", "gamma": 600.0, "temperature": 8.0}],
    "wkd_f": [{"kind": "wkd_f", "weight": 0.08, "ratio": 4.0, "grid": 1, "projector": "conv1x1"}],
    "reviewkd": [{"kind": "reviewkd", "weight": 5.0}],
}


def step_cost(repeats: int, steps: int) -> None:
    """Seconds per full training step (forward, backward, SGD), resnet32x4 -> resnet8x4, batch
    64 of 32x32, each method timed in turn within every repeat; median, and ratio to KD."""
    import statistics
    import time

    from normkd.config import recipe_from_dict
    from normkd.data.build import Data
    from normkd.engine.job import assemble
    from normkd.engine.runtime import Runtime
    from normkd.models import create_model

    data = Data(None, None, 100, (3, 32, 32), 64, torch.arange(64) % 100)
    jobs = {}
    for name, loss in STEP_METHODS.items():
        torch.manual_seed(0)
        recipe = recipe_from_dict({
            "name": name, "teacher": {"model": "resnet32x4"}, "student": {"model": "resnet8x4"},
            "loss": [{"kind": "ce"}, *loss], "engine": {"device": "cpu"},
        })  # fmt: skip
        t, s = (
            create_model("resnet32x4", num_classes=100),
            create_model("resnet8x4", num_classes=100),
        )
        job = assemble(recipe, Runtime(torch.device("cpu")), student=s, teacher=t, data=data)
        jobs[name] = (job.distiller.train(), job.optimizer)
    x, y = torch.randn(64, 3, 32, 32), torch.arange(64) % 100

    def run(name: str, n: int) -> float:
        d, opt = jobs[name]
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            _logits, losses = d(x, y, torch.arange(64), epoch=0)
            sum(losses.values()).backward()
            opt.step()
        return (time.perf_counter() - start) / n

    for name in jobs:
        run(name, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name in jobs:
            times[name].append(run(name, steps))
    kd = statistics.median(times["kd"])
    print("| method | s / step (median) | x KD | repeats |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / kd:.2f} | {', '.join(f'{t:.3f}' for t in ts)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", help="folder holding the authors' files (see above)")
    ap.add_argument("--step-cost", type=int, metavar="REPEATS", help="time training steps instead")
    ap.add_argument(
        "--cost", help="the authors' wkd_cost_matrix/cifar100/resnet32x4/linear_cka.pth"
    )
    args = ap.parse_args()
    if args.step_cost:
        step_cost(args.step_cost, steps=3)
        return
    if not args.ref:
        ap.error("--ref is required for the parity checks")
    sys.path.insert(0, args.ref)
    rows = dist_checks(importlib.import_module("dist_ref.dist_kd"))
    wkd = importlib.import_module("wkd_ref.WKD")
    rows += wkd_l_checks(wkd, args.cost)
    rows += wkd_f_checks(wkd, importlib.import_module("wkd_ref._common"))
    rows += cka_checks(importlib.import_module("wkd_ref.generate_cost_matrix"))
    rows += reviewkd_checks(importlib.import_module("reviewkd_ref.ReviewKD"))
    rows += preact_checks()
    print(f"| check | max abs diff (loss, grads) | verdict (tol {TOL:g}) |\n|---|---|---|")
    for name, d in rows:
        print(f"| {name} | {d:.3e} | {'PASS' if d <= TOL else 'FAIL'} |")
    if any(d > TOL for _, d in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
