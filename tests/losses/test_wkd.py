"""WKD-L and WKD-F against closed forms: exact OT on costs with known answers, Gaussian W2."""

import math

import pytest
import torch
import torch.nn.functional as F

from normkd.errors import ConfigError
from normkd.losses import BuildContext, StepState, Taps, TapShapes
from normkd.losses.wkd import (
    WKDFeatureLoss,
    WKDFeatureTerm,
    WKDLogitLoss,
    WKDLogitTerm,
    cka_cost_matrix,
    cka_form,
    cka_workspace_bytes,
    classifier_cost_matrix,
    cosine_decay,
    gaussian_w2_parts,
    image_row_shape,
    linear_cka,
    load_cost_matrix,
    mean_std,
    sinkhorn_distance,
    teacher_class_features,
    wkd_logit_parts,
)
from normkd.models import create_model

D64 = torch.float64


def _simplex(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, n, generator=g, dtype=D64) * 2, 1)


def _log_sinkhorn(p, q, cost, lam, iters=2000):
    """Entropic OT by log-domain Sinkhorn (no stabilising constants): <P, M> at convergence."""
    f, g = torch.zeros_like(p), torch.zeros_like(q)
    for _ in range(iters):
        f = lam * p.log() - lam * torch.logsumexp((g[:, None, :] - cost) / lam, 2)
        g = lam * q.log() - lam * torch.logsumexp((f[:, :, None] - cost) / lam, 1)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / lam)
    return (plan * cost).sum((1, 2)), plan


def test_sinkhorn_is_entropic_ot_and_brackets_the_exact_distance():
    p, q = _simplex(3, 6, 0), _simplex(3, 6, 1)
    line = torch.arange(6, dtype=D64)
    costs = {  # cost -> the exact (unregularised) Wasserstein distance
        "unit": ((1 - torch.eye(6, dtype=D64)), 0.5 * (p - q).abs().sum(1)),  # total variation
        "line": (
            (line[:, None] - line[None]).abs() / 5,
            (p.cumsum(1) - q.cumsum(1)).abs().sum(1) / 5,
        ),
    }
    for name, (m, exact) in costs.items():
        m = m.expand(3, 6, 6)
        want, plan = _log_sinkhorn(p, q, m, 0.1)
        assert torch.allclose(plan.sum(2), p) and torch.allclose(plan.sum(1), q, atol=1e-9)
        got = sinkhorn_distance(p, q, m, 0.1, 1000)
        assert torch.allclose(got, want, rtol=1e-5), name  # 1e-8 guards aside
        # The regularised plan is feasible, so it costs at least the exact distance, and at most
        # lam * (H(p) + H(q)) more.
        h = -(p * p.log()).sum(1) - (q * q.log()).sum(1)
        assert torch.all(got >= exact - 1e-9) and torch.all(got <= exact + 0.1 * h), name


def test_sinkhorn_plan_has_the_two_marginals_and_no_cost_for_equal_inputs():
    p = _simplex(2, 5, 3)
    cost = (1 - torch.eye(5, dtype=D64)).expand(2, 5, 5)
    assert float(sinkhorn_distance(p, p, cost, 0.01, 500).max()) < 1e-3
    q = _simplex(2, 5, 4)
    assert float(sinkhorn_distance(p, q, cost, 0.05, 10).min()) > 0.01


def test_wkd_l_is_target_likelihood_plus_gamma_times_non_target_ot():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, generator=g, dtype=D64), torch.randn(4, 6, generator=g, dtype=D64)
    y = torch.tensor([0, 2, 5, 2])
    cost = classifier_cost_matrix(torch.randn(6, 8, generator=g, dtype=D64))
    got_target, got_wd = wkd_logit_parts(s, t, y, cost, 2.0, 0.05, 10)
    p_s, p_t = s.softmax(1), t.softmax(1)
    want_target = -torch.stack([p_t[i, y[i]] * p_s[i, y[i]].log() for i in range(4)]).mean()
    assert torch.allclose(got_target, want_target, rtol=1e-10)
    wds = []
    for i in range(4):  # the non-target classes of each sample, their renormalised softmax
        keep = [c for c in range(6) if c != y[i]]
        ps = torch.softmax(s[i, keep] / 2.0, 0)[None]
        pt = torch.softmax(t[i, keep] / 2.0, 0)[None]
        m = (F.relu(cost[keep][:, keep]) + 1e-8)[None]
        wds.append(sinkhorn_distance(ps, pt, m, 0.05, 10))
    assert torch.allclose(got_wd, torch.cat(wds).mean(), rtol=1e-10)
    term = WKDLogitLoss(cost, gamma=7.0, temperature=2.0)
    state = StepState(s, y, torch.arange(4), 0, Taps(s), Taps(t))
    assert torch.allclose(term(state), want_target + 7.0 * got_wd, rtol=1e-10)


def test_gamma_decays_as_a_half_cosine_after_the_start_epoch():
    # Authors' epochs 1..240, decay after 150: ours are 0-based.
    assert cosine_decay(149, 150, 240) == 1.0
    assert cosine_decay(194, 150, 240) == pytest.approx(0.5)
    assert cosine_decay(239, 150, 240) == pytest.approx(0.0, abs=1e-12)
    assert cosine_decay(0, 0, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 100)))


def test_cost_matrices_from_class_features_and_classifier_rows():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 5, generator=g, dtype=D64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=D64))
    # CKA is 1 for the same features rotated and scaled, below 1 for others.
    assert float(linear_cka(x, 3 * x @ q)) == pytest.approx(1.0, abs=1e-12)
    feats = torch.stack([x, 2 * x @ q, torch.randn(20, 5, generator=g, dtype=D64)])
    cost = cka_cost_matrix(feats, sharpen=0)
    assert cost[0, 1] == pytest.approx(0, abs=1e-12) and cost[0, 2] > 0.05
    assert torch.equal(cost, cost.t()) and torch.all(cost.diag() == 0)
    assert torch.allclose(cka_cost_matrix(feats, 1.0), 1 - torch.exp(-cost))
    w = torch.randn(4, 3, generator=g, dtype=D64)
    cos = F.cosine_similarity(w[:, None], w[None], dim=2)
    assert torch.allclose(classifier_cost_matrix(w, 0), 1 - cos)


def _pairwise_cka_cost(feats):
    """The cost by its definition: linear_cka of every pair in turn (the old double loop)."""
    c = feats.shape[0]
    cost = torch.zeros(c, c, dtype=feats.dtype)
    for i in range(c):
        for j in range(i + 1, c):
            cost[i, j] = cost[j, i] = 1 - linear_cka(feats[i], feats[j])
    return cost


def _class_rows(c, n, d, dtype, seed):
    """Rows like a teacher's: non-negative, class means far from 0, scales that differ."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(c, n, d, generator=g, dtype=dtype) * torch.rand(
        c, 1, d, generator=g, dtype=dtype
    )
    return torch.relu(f + 2 * torch.randn(c, 1, d, generator=g, dtype=dtype))


@pytest.mark.parametrize(
    ("c", "n", "d", "form"),
    [(7, 300, 6, "feature"), (11, 5, 40, "kernel"), (6, 24, 24, "kernel"), (5, 40, 12, "feature")],
)
def test_the_cost_without_a_loop_over_pairs_is_linear_cka_of_every_pair(c, n, d, form):
    assert cka_form(c, n, d) == form
    feats = _class_rows(c, n, d, D64, seed=c * n)
    want = _pairwise_cka_cost(feats)
    ticks: list[tuple[int, int]] = []
    small = 8 * (n * d + c * c + 2 * c * n)  # a block of one class; 2 rows of every K a chunk
    for workspace in (2**29, small):
        ticks.clear()
        cost = cka_cost_matrix(feats, workspace=workspace, progress=lambda *t: ticks.append(t))
        torch.testing.assert_close(cost, want, rtol=0, atol=1e-12)
        assert torch.equal(cost, cost.t()) and torch.all(cost.diag() == 0)
        assert ticks[-1][0] == ticks[-1][1] == len(ticks)  # progress ends at its total
    assert len(ticks) > 1  # the small workspace did split the work
    assert cka_cost_matrix(feats[:1]).tolist() == [[0.0]]
    # where the GEMMs run is the caller's (wkd-cost: the teacher's device); the rows' device here
    on = cka_cost_matrix(feats, workspace=small, device="cpu")
    assert torch.equal(on, cka_cost_matrix(feats, workspace=small)) and on.device == feats.device


@pytest.mark.parametrize(
    ("c", "n", "d"),
    [(9, 2000, 16), (20, 500, 100), (8, 300, 1000)],  # CIFAR-like stage and logits; ImageNet-like
)
def test_in_float32_the_cost_is_the_exact_one_to_float_rounding(c, n, d):
    feats = _class_rows(c, n, d, torch.float32, seed=n)
    got = cka_cost_matrix(feats, workspace=4 * 4 * 3 * n * d)
    exact, eps = _pairwise_cka_cost(feats.double()), torch.finfo(torch.float32).eps
    assert got.dtype == torch.float32 and exact.max() > 0.05
    assert float((got.double() - exact).abs().max()) <= 2 * eps
    if d <= 100:  # the old float32 loop too (beyond that, its torch.norm of d^2 floats drifts)
        assert float((got - _pairwise_cka_cost(feats)).abs().max()) <= 4 * eps


@pytest.mark.parametrize(("c", "n", "d"), [(100, 32_000, 256), (100, 500, 100), (1000, 732, 1000)])
def test_the_cka_workspace_stays_within_its_bound(c, n, d):
    assert cka_workspace_bytes(c, n, d) <= 512 * 2**20  # CIFAR's stage and logits, ImageNet's
    assert cka_workspace_bytes(c, n, d, workspace=1) >= 4 * n * d  # at least one class at a time


def test_cost_matrix_files_load_safely_and_wrong_ones_are_refused(tmp_path):
    cost = torch.rand(5, 5)
    torch.save(cost, tmp_path / "c.pth")  # a plain tensor, as the authors ship theirs
    assert torch.equal(load_cost_matrix(str(tmp_path / "c.pth")), cost)
    torch.save({"x": cost}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not a"):
        load_cost_matrix(str(tmp_path / "bad.pth"))
    with pytest.raises(ConfigError, match="not found"):
        load_cost_matrix(str(tmp_path / "none.pth"))
    term = WKDLogitLoss(torch.rand(4, 4), 1.0, 1.0)
    s = torch.randn(2, 5)
    with pytest.raises(ConfigError, match="for 5 classes"):
        term(StepState(s, torch.tensor([0, 1]), torch.arange(2), 0, Taps(s), Taps(s)))


def test_a_cost_file_that_does_not_fit_is_one_line_before_the_run_folder(tmp_path, capsys):
    """A cost of another class count, a safetensors file without ``cost``, or a file that is no
    tensor at all: one error line from the CLI, refused while the job is built (no run folder)."""
    from safetensors.torch import save_file

    from normkd.cli import main
    from support import DEMO, one_error_line

    save_file({"cost": torch.rand(100, 100)}, str(tmp_path / "c100.safetensors"))
    save_file({"other": torch.rand(10, 10)}, str(tmp_path / "nocost.safetensors"))
    (tmp_path / "text.pth").write_text("not a tensor")
    teacher = tmp_path / "t.safetensors"
    from normkd.engine.checkpoint import save_model

    save_model(teacher, create_model("resnet8x4", num_classes=10), {"model": "resnet8x4",
               "num_classes": 10, "kwargs": {}})  # fmt: skip
    expected = {
        "c100.safetensors": "is (100, 100) for 10 classes",
        "nocost.safetensors": "has no tensor named 'cost'",
        "text.pth": "cannot read cost_matrix",
    }
    for name, message in expected.items():
        argv = ["distill", str(DEMO / "kd.yaml"), "--out-dir", str(tmp_path / "runs"), "--quiet",
                "--set", f"teacher.weights={teacher}", "--set", "optim.epochs=1",
                "--set", f"loss.1={{kind: wkd_l, cost_matrix: {tmp_path / name}}}"]  # fmt: skip
        assert message in one_error_line(main, argv, capsys), name
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_mean_std_per_cell_match_adaptive_pooling():
    f = torch.randn(2, 3, 7, 7, dtype=D64)
    mu, sd = mean_std(f, 4, eps=1e-5)
    assert torch.allclose(mu, F.adaptive_avg_pool2d(f, 4))
    n = F.adaptive_avg_pool2d(torch.ones(1, 1, 7, 7, dtype=D64), 4) * 0  # window sizes below
    ones = torch.ones(1, 1, 7, 7, dtype=D64)
    n = (
        F.adaptive_avg_pool2d(
            ones,
            4,
        )
        / F.adaptive_avg_pool2d(ones / 1e6, 4)
        / 1e6
    )
    counts = torch.tensor([2, 3, 3, 2], dtype=D64)  # adaptive windows of 7 -> 4
    n = counts[:, None] * counts[None]
    var = (F.adaptive_avg_pool2d(f * f, 4) - F.adaptive_avg_pool2d(f, 4) ** 2) * n / (n - 1)
    assert torch.allclose(sd, (var + 1e-5).sqrt())
    _mu1, sd1 = mean_std(f, 1, eps=0)
    assert torch.allclose(sd1.flatten(), f.flatten(2).std(2).flatten())


def test_wkd_f_with_ratio_one_is_the_gaussian_w2_distance():
    # W2^2 between Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).
    f_s, f_t = torch.randn(3, 4, 5, 5, dtype=D64), torch.randn(3, 4, 5, 5, dtype=D64) * 2 + 1
    mean_part, std_part = gaussian_w2_parts(f_s, f_t, eps=0.0)

    def sqrtm(a):
        e, v = torch.linalg.eigh(a)
        return v @ torch.diag(e.clamp(min=0).sqrt()) @ v.t()

    w2 = []
    for i in range(3):
        mu1, mu2 = f_s[i].mean((1, 2)), f_t[i].mean((1, 2))
        s1, s2 = torch.diag(f_s[i].flatten(1).var(1)), torch.diag(f_t[i].flatten(1).var(1))
        r = sqrtm(s1)
        bures = torch.trace(s1 + s2 - 2 * sqrtm(r @ s2 @ r))
        w2.append((mu1 - mu2).pow(2).sum() + bures)
    assert torch.allclose(mean_part + std_part, torch.stack(w2).mean(), rtol=1e-8)


def test_wkd_f_term_weights_the_mean_part_and_decays():
    s_map, t_map = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 4, 4)
    term = WKDFeatureLoss((4, 4, 4), (6, 4, 4), ratio=8.0, grid=1, decay_from=150, epochs=240)
    f_s = term.projector(s_map)
    mean_part, std_part = gaussian_w2_parts(f_s, t_map)
    state = StepState(
        s_map, torch.zeros(2), torch.arange(2), 0, Taps(stages=[s_map]), Taps(stages=[t_map])
    )
    assert torch.allclose(term(state), 8.0 * mean_part + std_part, rtol=1e-6)
    assert term.weight_at(100) == 1.0 and term.weight_at(239) == pytest.approx(0, abs=1e-12)


def test_recipe_defaults_are_the_authors_imagenet_settings():
    lt, ft = WKDLogitTerm(), WKDFeatureTerm()
    assert (lt.weight, lt.gamma, lt.temperature, lt.sinkhorn_lambda, lt.sinkhorn_iters) == (
        1.0, 10.0, 2.0, 0.05, 10,
    )  # fmt: skip
    assert (lt.sharpen, lt.decay_from) == (1.0, 0)
    assert (ft.weight, ft.ratio, ft.grid, ft.projector, ft.decay_from) == (
        1.0, 2.0, 4, "bottleneck", 0,
    )  # fmt: skip


def test_wkd_terms_train_through_the_real_assembler(zoo_step, check_grads):
    d = zoo_step(
        [{"kind": "ce"}, {"kind": "wkd_l"}, {"kind": "wkd_f", "grid": 1, "projector": "conv1x1"}]
    )
    check_grads(d, "wkd_l")
    check_grads(d, "wkd_f")
    d = zoo_step([{"kind": "ce"}, {"kind": "norm"}, {"kind": "wkd_l", "decay_from": None}])
    assert set(d.terms) == {"ce", "norm", "wkd_l"}
    stem = d.student.student.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


CTX = BuildContext(
    student=TapShapes((64, 2, 2), ((64, 2, 2),), (64,)), teacher=None
)  # WKD-L needs none


def _last_stage(m, x):
    """resnet8's layer3 map, by calling its layers in turn (eval mode)."""
    return m.layer3(m.layer2(m.layer1(m.relu(m.bn1(m.conv1(x))))))


def test_class_features_are_the_authors_rows_and_make_a_cost_the_term_loads(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=3).eval()
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([2, 0, 1, 0, 2, 1])  # two images per class, in two batches
    counts = torch.bincount(y, minlength=3)
    feats = teacher_class_features(teacher, [(x[:4], y[:4]), (x[4:], y[4:])], counts)
    with torch.no_grad():
        maps = _last_stage(teacher, x)  # (6, 64, 2, 2)
    assert feats.shape == (3, 2 * 4, 64)  # each position of each image a row
    assert image_row_shape(teacher, (3, 8, 8), "last_stage") == (4, 64)  # the probe agrees
    for c in range(3):
        imgs = [i for i in range(6) if y[i] == c]  # arrival order, image by image
        want = torch.cat([maps[i].flatten(1).t() for i in imgs])
        assert torch.allclose(feats[c], want, atol=1e-6)
    cost = cka_cost_matrix(feats.double())  # raw 1 - CKA, as the authors' files hold it
    assert torch.all(cost.diag() == 0) and torch.equal(cost, cost.t()) and cost.max() > 0
    save_file({"cost": cost.float()}, str(tmp_path / "cost.safetensors"))
    term = WKDLogitTerm(cost_matrix=str(tmp_path / "cost.safetensors"), sharpen=1.0)
    built = term.build(CTX)
    assert torch.allclose(built.cost, 1 - torch.exp(-cost.float()), atol=1e-6)


def test_logit_class_features_cut_every_class_to_the_smallest():
    teacher = create_model("resnet8", num_classes=3).eval()
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 0, 1, 2, 2])
    counts = torch.bincount(y, minlength=3)  # 2, 1, 2
    feats = teacher_class_features(teacher, [(x, y)], counts, source="logits")
    with torch.no_grad():
        logits = teacher(x)
    assert feats.shape == (3, 1, 3)
    assert image_row_shape(teacher, (3, 8, 8), "logits") == (1, 3)
    assert torch.allclose(feats[:, 0], logits[[0, 2, 3]], atol=1e-6)
    with pytest.raises(ValueError, match="every class needs the same"):
        teacher_class_features(teacher, [(x, y)], counts)  # stage rows: counts 2, 1, 2
    with pytest.raises(ValueError, match="not the 3 counts given"):  # a batch more than counted
        teacher_class_features(teacher, [(x, y), (x[:1], y[:1])], counts, source="logits")
    with pytest.raises(ValueError, match="not the 3 counts given"):  # one short
        teacher_class_features(teacher, [(x[1:], y[1:])], counts, source="logits")


def test_uniform_cost_says_it_is_not_the_published_method(capsys):
    WKDLogitTerm().build(CTX)
    err = capsys.readouterr().err
    assert "normkd: warning: loss wkd_l: cost_matrix uniform" in err
    assert "not the published method" in err


@pytest.mark.parametrize("pair", ["resnet20__resnet8", "resnet32x4__resnet8x4"])
def test_norm_wkd_l_recipe_is_norm_plus_the_wkd_l_recipes_term(pair, tmp_path, norm_combo_recipe):
    norm_combo_recipe(pair, "wkd_l", tmp_path)


def test_a_grid_with_one_pixel_cells_is_refused_with_the_grid_that_fits():
    """The unbiased variance of a one-pixel cell is NaN: a run would stop at its first step and
    blame the learning rate. The term refuses it when built and says which grid fits."""
    with pytest.raises(ValueError, match=r"grid 4 splits the 2x2 maps .* use grid <= 1"):
        WKDFeatureLoss((8, 2, 2), (16, 2, 2), grid=4)
    with pytest.raises(ValueError, match=r"grid 3 splits the 3x3 maps .* use grid <= 2"):
        WKDFeatureLoss((8, 3, 3), (16, 3, 3), grid=3)
    ok = WKDFeatureLoss((8, 7, 7), (16, 7, 7), grid=4)  # ImageNet's 7x7 maps, the default grid
    mu, sd = mean_std(torch.randn(2, 16, 7, 7), grid=4)
    assert ok.grid == 4 and torch.isfinite(sd).all() and mu.shape == (2, 16, 4, 4)
