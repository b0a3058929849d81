"""torch.compile of a whole NORM+KD step: with the tap and FT hooks kept registered
(``Distiller.hooks_kept``, as the trainer holds them) the step traces as one graph on CPU and
computes what the eager step computes; the kept hooks change nothing outside the distiller."""

from __future__ import annotations

import copy

import torch

from normkd.config import load_recipe
from normkd.norm import FTStudent
from support import DEMO, FAST, build_job

ARGS = [*FAST, "engine.amp=off", "teacher.weights=null"]


def _step(module, distiller, x, y, idx):
    """Losses and student gradients of one forward + backward."""
    distiller.zero_grad(set_to_none=True)
    _logits, losses = module(x, y, idx, 0)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_a_norm_kd_step_compiles_as_one_graph_and_matches_eager():
    job = build_job(load_recipe(DEMO / "norm_kd.yaml", ARGS), untrained_teacher=True)
    eager = job.distiller.train()
    assert isinstance(eager.student, FTStudent) and eager.student.ft.factored
    compiled_d = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    idx = torch.arange(16)
    # fullgraph: any graph break (a hook registered inside the step) is an error.
    fn = torch.compile(compiled_d, fullgraph=True, backend="aot_eager")
    with compiled_d.hooks_kept():
        got, got_grads = _step(fn, compiled_d, x, y, idx)
        again, _ = _step(fn, compiled_d, x, y, idx)  # the second call reuses the graph
    want, want_grads = _step(eager, eager, x, y, idx)
    assert set(got) == {"ce", "kd", "norm"} and got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(again[k])
    assert got_grads.keys() == want_grads.keys() and any("ft." in n for n in got_grads)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6)


def test_kept_hooks_leave_the_plain_student_alone_and_go_away_after():
    """Inside the block the plain student's own forward passes FT by (FT runs only in the
    wrapper's forward); after it no hook of normkd's is left on the student or the teacher."""
    job = build_job(load_recipe(DEMO / "norm_kd.yaml", ARGS), untrained_teacher=True)
    d = job.distiller.eval()
    x = torch.randn(4, 3, 8, 8)
    hooks = {id(m): (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in d.modules()}
    plain_before, ft_before = job.plain(x), d.student(x)
    with d.hooks_kept():
        assert sum(len(m._forward_hooks) for m in job.plain.modules()) > 0  # kept, registered
        torch.testing.assert_close(job.plain(x), plain_before, rtol=0, atol=0)
        torch.testing.assert_close(d.student(x), ft_before, rtol=0, atol=0)
        _logits, losses = d(x, torch.zeros(4, dtype=torch.long), torch.arange(4), 0)
        assert float(losses["norm"].detach()) > 0
    after = {id(m): (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in d.modules()}
    assert after == hooks
    assert all(not m._forward_hooks for m in d.teacher.modules())
