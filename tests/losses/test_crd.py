"""CRD: NCE against its formula, momentum memory banks, negative sampling, nce_k capping."""

import math
import socket
import subprocess
import sys

import pytest
import torch

from normkd.losses import CRDLoss, StepState, Taps, crd, nce_loss
from normkd.losses.crd import CRDTerm


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum(1, keepdim=True))


def _state(ps: torch.Tensor, pt: torch.Tensor, idx: torch.Tensor) -> StepState:
    y = torch.zeros(len(idx), dtype=torch.long)
    return StepState(torch.zeros(len(idx)), y, idx, 0, Taps(pooled=ps), Taps(pooled=pt))


def _nce_by_hand(p: torch.Tensor, n_data: int) -> torch.Tensor:
    k = p.shape[1] - 1
    total = 0.0
    for row in p.tolist():
        total += math.log(row[0] / (row[0] + k / n_data + 1e-7))
        total += sum(math.log((k / n_data) / (x + k / n_data + 1e-7)) for x in row[1:])
    return torch.tensor(-total / p.shape[0], dtype=torch.float64)


def test_nce_loss_equals_its_formula():
    p = torch.rand(4, 6, dtype=torch.float64) * 1e-2
    assert torch.allclose(nce_loss(p, 50), _nce_by_hand(p, 50).double(), rtol=1e-9)


def test_loss_is_two_way_nce_of_normalised_scores_against_the_other_sides_bank():
    term = CRDLoss(5, 7, dataset_size=40, feat_dim=4, nce_k=6).double()
    ps, pt = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    idx = torch.tensor([3, 17, 30])
    bank_s, bank_t = term.bank_s.clone(), term.bank_t.clone()
    torch.manual_seed(5)
    rows = torch.cat([idx[:, None], term.sample_negatives(idx)], 1)
    torch.manual_seed(5)  # the term draws the same negatives
    loss = term.train()(_state(ps, pt, idx))
    v_s = _unit(ps @ term.embed_s.weight.T + term.embed_s.bias)
    v_t = _unit(pt @ term.embed_t.weight.T + term.embed_t.bias)
    e_s = torch.exp((bank_t[rows] * v_s[:, None]).sum(2) / 0.07)  # student anchor, teacher bank
    e_t = torch.exp((bank_s[rows] * v_t[:, None]).sum(2) / 0.07)  # teacher anchor, student bank
    z_s, z_t = e_s.mean() * 40, e_t.mean() * 40  # fixed from the first batch
    want = _nce_by_hand(e_s / z_s, 40) + _nce_by_hand(e_t / z_t, 40)
    assert torch.allclose(loss, want.double(), rtol=1e-6)
    assert torch.allclose(term.z, torch.stack([z_s, z_t]).detach())


def test_normalisers_are_set_once_then_kept():
    term = CRDLoss(5, 7, dataset_size=40, feat_dim=4, nce_k=6)
    assert (term.z < 0).all()
    term(_state(torch.randn(3, 5), torch.randn(3, 7), torch.tensor([0, 1, 2])))
    z = term.z.clone()
    assert (z > 0).all()
    term(_state(torch.randn(3, 5) * 5, torch.randn(3, 7), torch.tensor([3, 4, 5])))
    assert torch.equal(term.z, z)


def test_bank_rows_of_the_batch_move_by_momentum_and_are_renormalised():
    term = CRDLoss(5, 7, dataset_size=30, feat_dim=4, nce_k=8, nce_m=0.5)
    ps, pt = torch.randn(3, 5), torch.randn(3, 7)
    idx = torch.tensor([2, 11, 29])
    old_s, old_t = term.bank_s.clone(), term.bank_t.clone()
    term.train()(_state(ps, pt, idx))
    with torch.no_grad():
        v_s = _unit(ps @ term.embed_s.weight.T + term.embed_s.bias)
        v_t = _unit(pt @ term.embed_t.weight.T + term.embed_t.bias)
    assert torch.allclose(term.bank_s[idx], _unit(0.5 * old_s[idx] + 0.5 * v_s), atol=1e-6)
    assert torch.allclose(term.bank_t[idx], _unit(0.5 * old_t[idx] + 0.5 * v_t), atol=1e-6)
    assert torch.allclose(term.bank_s[idx].norm(dim=1), torch.ones(3))
    others = torch.ones(30, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(term.bank_s[others], old_s[others])
    assert torch.equal(term.bank_t[others], old_t[others])
    # Evaluation mode reads the banks but leaves them alone.
    snap = term.bank_s.clone()
    term.eval()(_state(ps, pt, idx))
    assert torch.equal(term.bank_s, snap)


def test_nce_k_is_capped_at_dataset_size_minus_one():
    term = CRDLoss(5, 7, dataset_size=10, nce_k=16384)
    assert term.nce_k == 9
    neg = term.sample_negatives(torch.arange(10))
    assert neg.shape == (10, 9)
    assert (neg != torch.arange(10)[:, None]).all()  # never the anchor itself
    assert neg.min() >= 0 and neg.max() < 10


def test_negatives_come_from_other_classes_when_labels_are_given():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0])
    term = CRDLoss(5, 7, dataset_size=12, nce_k=500, labels=labels)
    idx = torch.arange(12)
    neg = term.sample_negatives(idx)
    assert neg.shape == (12, 11)
    assert (labels[neg] != labels[idx][:, None]).all()
    # Every allowed row is drawn (uniform over the other classes, not a fixed subset).
    many = torch.cat([term.sample_negatives(torch.tensor([0])) for _ in range(200)], 1)
    assert set(many.flatten().tolist()) == set(torch.nonzero(labels != 0).flatten().tolist())


# name: (dataset size, nce_k, labels or None). "keys" cases have fewer than _SPARSE * nce_k allowed
# rows per anchor (top nce_k of random keys), "redraw" ones more (repeats redrawn). Uneven classes
# give anchors different numbers of allowed rows (150, 200 or 250 here).
_CASES = {
    "keys-any": (200, 50, None),
    "keys-other-classes": (300, 150, torch.arange(300) % 3),
    "keys-uneven-classes": (300, 100, torch.tensor([0] * 50 + [1] * 100 + [2] * 150)),
    "redraw-any": (2000, 20, None),
    "redraw-other-classes": (3000, 100, torch.arange(3000) % 10),
}


def _case(name: str) -> tuple[CRDLoss, torch.Tensor]:
    """The case's term and its allowed-rows mask (anchor x row)."""
    n, k, labels = _CASES[name]
    term = CRDLoss(5, 7, dataset_size=n, nce_k=k, labels=labels)
    assert term.nce_k == k
    assert (term._min_count >= crd._SPARSE * k) == name.startswith("redraw")
    allowed = ~torch.eye(n, dtype=torch.bool)
    if labels is not None:
        allowed &= labels[:, None] != labels[None, :]
    return term, allowed


@pytest.mark.parametrize("name", _CASES)
def test_each_anchors_negatives_are_distinct_and_never_its_own_row_or_class(name):
    term, allowed = _case(name)
    n, k, _ = _CASES[name]
    torch.manual_seed(0)
    idx = torch.randint(0, n, (300,))
    neg = term.sample_negatives(idx)
    assert neg.shape == (300, k) and neg.min() >= 0 and neg.max() < n
    # With replacement, about k**2 / (2 * allowed) repeats per row: 0.1 to 56 here, so over 300
    # rows the old sampler fails this with near certainty.
    assert (neg.sort(1).values.diff(dim=1) != 0).all(), "a row repeats a negative"
    assert allowed[idx[:, None], neg].all(), "the anchor's own row or class was drawn"


@pytest.mark.parametrize("name", _CASES)
def test_negatives_cover_every_allowed_row_about_evenly(name):
    term, allowed = _case(name)
    n, k, _ = _CASES[name]
    anchor = int(allowed.sum(1).argmin())  # one with the fewest allowed rows
    count = int(allowed[anchor].sum())
    torch.manual_seed(1)
    idx = torch.full((40 * count // k,), anchor)  # each allowed row expected 40 times
    hits = torch.bincount(term.sample_negatives(idx).flatten(), minlength=n)
    assert (hits[~allowed[anchor]] == 0).all()
    # Binomial(40 expected, sd <= 6.3): [10, 80] is beyond 4.7 sd either way for every row.
    assert hits[allowed[anchor]].min() >= 10 and hits[allowed[anchor]].max() <= 80


@pytest.mark.parametrize("n,k,draws", [(8, 3, 70_000), (33, 2, 200_000)])
def test_every_subset_of_allowed_rows_is_equally_likely(n, k, draws):
    # 8 images, 3 negatives: the keys path, 35 subsets of the other 7 expected 2,000 times each.
    # 33 images, 2 negatives: the redraw path, 496 pairs of the other 32 expected ~403 times each.
    term = CRDLoss(5, 7, dataset_size=n, nce_k=k)
    assert (term._min_count >= crd._SPARSE * k) == (n == 33)
    torch.manual_seed(5)
    neg = term.sample_negatives(torch.zeros(draws, dtype=torch.long)).sort(1).values
    subsets, freq = neg.unique(dim=0, return_counts=True)
    assert len(subsets) == math.comb(n - 1, k) and (subsets != 0).all()
    mean = draws / math.comb(n - 1, k)
    sd = math.sqrt(mean)
    assert (freq - mean).abs().max() <= 5 * sd, (freq.min(), freq.max(), mean)


def test_all_the_other_rows_when_nce_k_equals_them():
    term = CRDLoss(5, 7, dataset_size=10, nce_k=9)
    neg = term.sample_negatives(torch.arange(10))
    for i, row in enumerate(neg.tolist()):
        assert sorted(row) == [j for j in range(10) if j != i]


def test_anchors_with_too_few_allowed_rows_draw_with_replacement_the_others_not():
    # Class 0 (2 images) anchors may draw any of the 10 class-1 images: 5 distinct ones. Class 1
    # anchors have only the 2 class-0 images, so their 5 negatives repeat them (as RepDistiller).
    labels = torch.tensor([0, 0] + [1] * 10)
    term = CRDLoss(5, 7, dataset_size=12, nce_k=5, labels=labels)
    torch.manual_seed(2)
    idx = torch.arange(12).repeat(20)
    neg = term.sample_negatives(idx)
    first = labels[idx] == 0
    assert (labels[neg[first]] == 1).all()
    assert all(len(set(row)) == 5 for row in neg[first].tolist())
    assert set(neg[first].flatten().tolist()) == set(range(2, 12))
    assert set(neg[~first].flatten().tolist()) == {0, 1}  # only the class-0 images, both drawn


def test_chunked_keys_keep_every_guarantee(monkeypatch):
    # A key budget of 3 rows of 299 forces the chunking that bounds memory on large sets.
    monkeypatch.setattr(crd, "_KEY_BUDGET", 3 * 299)
    term = CRDLoss(5, 7, dataset_size=300, nce_k=40)
    idx = torch.arange(0, 300, 3)
    torch.manual_seed(4)
    neg = term.sample_negatives(idx)
    assert neg.shape == (100, 40)
    assert (neg.sort(1).values.diff(dim=1) != 0).all() and (neg != idx[:, None]).all()
    # Every chunk draws its own subsets: together 100 anchors x 40 of 299 reach every row.
    assert len(neg.unique()) == 300
    torch.manual_seed(4)
    assert torch.equal(term.sample_negatives(idx), neg)


@pytest.mark.parametrize("name", ["keys-uneven-classes", "redraw-any"])
def test_negatives_follow_the_global_rng(name):
    term, _ = _case(name)
    torch.manual_seed(3)
    a = term.sample_negatives(torch.arange(4))
    torch.manual_seed(3)
    assert torch.equal(term.sample_negatives(torch.arange(4)), a)
    assert not torch.equal(term.sample_negatives(torch.arange(4)), a)


def test_loss_is_finite_and_falls_when_optimised_on_a_fixed_batch():
    n = 200
    term = CRDLoss(16, 24, n, feat_dim=8, nce_k=50, labels=torch.arange(n) % 10).train()
    ps = torch.randn(8, 16, requires_grad=True)
    pt = torch.randn(8, 24)
    idx = torch.arange(8) * 7
    opt = torch.optim.SGD([ps, *term.parameters()], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = term(_state(ps, pt, idx))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_banks_and_normalisers_are_checkpointed_with_the_term():
    term = CRDLoss(5, 7, dataset_size=30, labels=torch.arange(30) % 3)
    keys = set(term.state_dict())
    assert {"bank_s", "bank_t", "z"} <= keys
    assert not any(k.startswith("neg_") for k in keys)  # rebuilt from the labels


def test_too_small_or_single_class_sets_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        CRDLoss(5, 7, dataset_size=1)
    with pytest.raises(ValueError, match="two classes"):
        CRDLoss(5, 7, dataset_size=4, labels=torch.zeros(4, dtype=torch.long))


def test_recipe_defaults_are_the_crd_benchmarks():
    c = CRDTerm()
    assert (c.weight, c.feat_dim, c.nce_k, c.nce_t, c.nce_m) == (0.8, 128, 16384, 0.07, 0.5)
    assert c.negatives == "other_classes"


def test_crd_gradients_reach_student_and_both_embeddings_not_teacher(zoo_step, check_grads):
    d = zoo_step([{"kind": "crd"}])
    check_grads(d, "crd")
    term = d.terms["crd"]
    # resnet8 pools 64 channels, resnet8x4 256; 64 training images in the fixture.
    assert term.embed_s.in_features == 64 and term.embed_t.in_features == 256
    assert term.bank_s.shape == (64, 128) and term.nce_k == 63


def test_with_norm_the_student_embedding_reads_the_pooled_features_after_ft(zoo_step):
    d = zoo_step([{"kind": "norm", "n": 2}, {"kind": "crd"}])
    seen: dict[str, torch.Tensor] = {}
    d.terms["crd"].embed_s.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]))
    d.student.ft.register_forward_hook(lambda _m, _a, out: seen.update(ft=out[0]))
    d.student.student.layer3.register_forward_hook(lambda _m, _a, out: seen.update(feat=out))
    d(torch.randn(4, 3, 8, 8), torch.arange(4), torch.arange(4), epoch=0)
    assert torch.allclose(seen["x"], seen["ft"].mean((2, 3)), atol=1e-6)
    assert not torch.allclose(seen["x"], seen["feat"].mean((2, 3)), atol=1e-3)


_DDP_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from normkd.losses import CRDLoss, StepState, Taps

def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.arange(4) + 10 * rank
    ps, pt = torch.randn(4, 5, generator=g), torch.randn(4, 7, generator=g)
    y = torch.zeros(4, dtype=torch.long)
    return StepState(torch.zeros(4), y, idx, 0, Taps(pooled=ps), Taps(pooled=pt))

def worker(rank, out, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    term = CRDLoss(5, 7, dataset_size=30, feat_dim=4, nce_k=8).train()
    b = batch(rank)
    term(b)
    saved = {"bank_s": term.bank_s, "bank_t": term.bank_t, "idx": b.idx}
    saved |= {"ps": b.student.pooled, "pt": b.teacher.pooled}
    torch.save(saved, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
"""


def test_under_ddp_every_rank_applies_every_ranks_bank_rows(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_crd.py"
    script.write_text(_DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path), str(port)], check=True, timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # One process seeing both ranks' batches at once updates the same rows the same way.
    torch.manual_seed(0)
    term = CRDLoss(5, 7, dataset_size=30, feat_dim=4, nce_k=8).train()
    both = StepState(
        torch.zeros(8),
        torch.zeros(8, dtype=torch.long),
        torch.cat([r0["idx"], r1["idx"]]),
        0,
        Taps(pooled=torch.cat([r0["ps"], r1["ps"]])),
        Taps(pooled=torch.cat([r0["pt"], r1["pt"]])),
    )
    term(both)
    for key in ("bank_s", "bank_t"):
        assert torch.equal(r0[key], r1[key])
        assert torch.allclose(r0[key], getattr(term, key), atol=1e-6)
