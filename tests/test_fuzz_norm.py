"""Fuzzing NORM's shapes: norm_loss, FeatureTransform and attach_ft on random shapes and arguments.

Valid shapes give the definition (N * MSE against the teacher map tiled N times, after pooling the
larger map by the integer ratio); invalid ones raise the documented ValueError, whose message an
independent oracle predicts here. Nothing else may escape.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normkd.norm import FeatureTransform, FTStudent, attach_ft, norm_loss

FUZZ = settings(max_examples=120, deadline=None)

# Arguments that should be positive integers: valid ones, and every kind of wrong one.
counts = st.integers(1, 4) | st.integers(-2, 0) | st.sampled_from([True, 1.0, 2.5, "2", None])


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _norm_loss_error(es, ts, n, reduce) -> str | None:
    """What norm_loss must say about these shapes (a regex), or None when they are valid."""
    if not _positive_int(n):
        return r"n \(the expansion factor\) must be a positive integer"
    if reduce not in ("max", "avg"):
        return "reduce must be 'max' or 'avg'"
    if len(es) != 4 or len(ts) != 4:
        return "norm_loss expects 4-D maps"
    if 0 in es or 0 in ts:
        return "norm_loss expects non-empty maps"
    if es[0] != ts[0]:
        return "batch sizes differ"
    if es[1] != n * ts[1]:
        return re.escape(f"has {es[1]} channels but n * teacher channels = {n} * {ts[1]}")
    (hs, ws), (ht, wt) = es[2:], ts[2:]
    if (hs, ws) == (ht, wt):
        return None
    if not ((ht >= hs and wt >= ws) or (hs >= ht and ws >= wt)):
        return "larger in different dimensions"
    big, small = ((ht, wt), (hs, ws)) if ht >= hs and wt >= ws else ((hs, ws), (ht, wt))
    if big[0] % small[0] or big[1] % small[1]:
        return "non-integer ratio"
    return None


def _tiled_mse(expanded, teacher, n, reduce):
    """The definition, written independently: pool the larger map, tile the teacher N times."""
    pool = F.max_pool2d if reduce == "max" else F.avg_pool2d
    (hs, ws), (ht, wt) = expanded.shape[-2:], teacher.shape[-2:]
    if ht >= hs and wt >= ws and (ht, wt) != (hs, ws):
        teacher = pool(teacher, (ht // hs, wt // ws))
    elif (hs, ws) != (ht, wt):
        expanded = pool(expanded, (hs // ht, ws // wt))
    return F.mse_loss(expanded, teacher.repeat(1, n, 1, 1)) * n


@st.composite
def near_valid_shapes(draw):
    """Mostly valid (B, N*C_t, H, W) / (B, C_t, kH, kW) pairs, some nudged into invalid ones."""
    b, ct, n = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    es, ts = [b, n * ct, h, w], [b, ct, h * kh, w * kw]
    if draw(st.booleans()):  # the student map is the larger one
        es[2:], ts[2:] = ts[2:], es[2:]
    for _ in range(draw(st.integers(0, 2))):  # nudge one size
        which, i = draw(st.sampled_from([es, ts])), draw(st.integers(0, 3))
        which[i] = max(0, which[i] + draw(st.sampled_from([-1, 1])))
    return es, ts, n


random_shapes = st.tuples(
    st.lists(st.integers(0, 6), max_size=5), st.lists(st.integers(0, 6), max_size=5), counts
)


@FUZZ
@given(
    shapes=near_valid_shapes() | random_shapes,
    reduce=st.sampled_from(["max", "max", "avg", "min"]),
)
def test_norm_loss_matches_definition_or_says_why_not(shapes, reduce):
    es, ts, n = shapes
    expanded, teacher = torch.randn(es), torch.randn(ts)
    want_error = _norm_loss_error(es, ts, n, reduce)
    if want_error is not None:
        with pytest.raises(ValueError, match=want_error):
            norm_loss(expanded, teacher, n, reduce)
        return
    got = norm_loss(expanded, teacher, n, reduce)
    assert got.shape == () and torch.isfinite(got)
    assert torch.allclose(got, _tiled_mse(expanded, teacher, n, reduce), rtol=1e-5, atol=1e-6)


@FUZZ
@given(
    cin=counts,
    ct=counts,
    n=counts,
    bn=st.booleans(),
    residual=st.booleans(),
    train=st.booleans(),
    xs=st.lists(st.integers(0, 4), max_size=5),
    match_channels=st.booleans(),
)
def test_feature_transform_shapes(cin, ct, n, bn, residual, train, xs, match_channels):
    if not all(_positive_int(v) for v in (cin, ct, n)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            FeatureTransform(cin, ct, n, bn=bn, residual=residual)
        return
    ft = FeatureTransform(cin, ct, n, bn=bn, residual=residual).train(train)
    if match_channels and len(xs) >= 2:
        xs[1] = cin
    x = torch.randn(xs)
    if len(xs) != 4 or xs[1] != cin or 0 in xs:
        with pytest.raises(
            ValueError, match=re.escape(f"expects a non-empty (B, {cin}, H, W) map")
        ):
            ft(x)
        return
    if train and bn and xs[0] * xs[2] * xs[3] == 1:
        # BatchNorm cannot normalise one value per channel in training (PyTorch's ValueError).
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ft(x)
        return
    out, expanded = ft(x)
    assert out.shape == x.shape
    assert expanded.shape == (xs[0], n * ct, xs[2], xs[3])
    # The expanded map is exactly what norm_loss takes with a teacher map of C_t channels.
    loss = norm_loss(expanded, torch.randn(xs[0], ct, xs[2], xs[3]), n)
    assert torch.isfinite(loss)


def _small_cnn() -> nn.Module:
    """A CNN without a declared tap spec: attach_ft must discover its last conv map."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 7),
    )


@FUZZ
@given(
    ct=counts,
    n=counts,
    bn=st.booleans(),
    residual=st.booleans(),
    b=st.integers(2, 3),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    teacher_hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
)
def test_attach_ft_on_random_shapes(ct, n, bn, residual, b, hw, teacher_hw):
    student = _small_cnn()
    example = torch.randn(b, 3, *hw)
    if not (_positive_int(ct) and _positive_int(n)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            attach_ft(student, ct, n, bn=bn, residual=residual, example=example)
        return
    s_ft = attach_ft(student, ct, n, bn=bn, residual=residual, example=example)
    assert isinstance(s_ft, FTStudent) and s_ft.ft.in_channels == 5
    logits = s_ft(example)
    assert logits.shape == (b, 7)
    h, w = (hw[0] + 1) // 2, (hw[1] + 1) // 2  # the stride-2 conv's output
    assert s_ft.expanded.shape == (b, n * ct, h, w)
    es, ts = list(s_ft.expanded.shape), [b, ct, *teacher_hw]
    want_error = _norm_loss_error(es, ts, n, "max")
    teacher = torch.randn(ts)
    if want_error is not None:
        with pytest.raises(ValueError, match=want_error):
            norm_loss(s_ft.expanded, teacher, n)
    else:
        norm_loss(s_ft.expanded, teacher, n).backward()
        assert s_ft.ft.expand[0].weight.grad is not None
    with pytest.raises(ValueError, match="already has a FeatureTransform"):
        attach_ft(s_ft, ct, n)
