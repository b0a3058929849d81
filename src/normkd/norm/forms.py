"""Where FT goes on a model, and the pooled form's loss (normkd's own; the paper has CNNs only).

FT takes one of three forms (:data:`~normkd.norm.paper.FORMS`), the same algebra in each, so the
merge stays exact:

- ``map``: the paper's, on a conv map (1x1 convs, BatchNorm2d).
- ``tokens``: on a vision transformer's last token sequence (after its final norm) or Swin's
  channels-last map, per token: bias-free linear layers and BatchNorm over all tokens. Class and
  distillation tokens go through FT too (they make the logits); the patch tokens, on their grid,
  are what is matched to the teacher. Pooling a token (or averaging them) and the head are
  linear, so FT folds into the head (into each head: DeiT's two).
- ``pooled``: on the classifier's input, where a non-linear layer sits between pooling and the
  classifier (ConvNeXt's head LayerNorm, timm's ``fc_norm``): FT over the pooled vector, its N
  segments matched to the teacher's globally average-pooled map (:func:`pooled_norm_loss`).

:func:`ft_form` picks the form: the last representation's (map or tokens) when FT there commutes
with everything up to the classifier (:func:`check_linear_head`), else ``pooled``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from normkd.models.taps import TapSpec, _default_example, get_module, get_taps, run_hooked
from normkd.norm.paper import Form, norm_loss


class PooledExpanded(NamedTuple):
    """A ``pooled``-form FT's expanded vector ``(B, N*C_t)``: matched by :func:`pooled_norm_loss`
    to the teacher's pooled map, not by :func:`norm_loss` to the map itself."""

    vector: torch.Tensor


def pooled_norm_loss(vector: torch.Tensor, teacher_map: torch.Tensor, n: int) -> torch.Tensor:
    """N-to-one matching of a pooled-form student: each of the N segments of ``vector``
    ``(B, N*C_t)`` is pulled to the teacher's globally average-pooled map ``(B, C_t, H, W)``
    (a ViT teacher's map is its patch tokens, so that is their mean), by MSE summed over segments.

    The pooled vector has no spatial layout left to match, so the teacher's map gives its average,
    the vector the teacher's own global pooling would hand a linear head.
    """
    if vector.dim() != 2 or teacher_map.dim() != 4:
        raise ValueError(
            "pooled_norm_loss expects a (B, N*C_t) vector and a (B, C_t, H, W) teacher map: got "
            f"{tuple(vector.shape)} and {tuple(teacher_map.shape)}"
        )
    pooled = teacher_map.detach().mean((2, 3), keepdim=True)
    return norm_loss(vector[:, :, None, None], pooled, n)


def ft_form(model: nn.Module, example: torch.Tensor | None = None) -> Form:
    """The FT form ``model`` gets: ``map`` (a CNN) or ``tokens`` (a ViT) where FT after its last
    representation commutes with the path to its classifier (global pooling, a class token, a
    flatten: so it folds into the classifier), else ``pooled`` (a norm layer or an activation
    after pooling, as ConvNeXt's head). Raises ValueError for a model without readable taps."""
    spec = get_taps(model, example)
    if _path_error(model, spec, example) is not None:
        _classifier_width(get_module(model, spec.classifier))
        return "pooled"
    return "map" if spec.layout == "map" else "tokens"


def _classifier_width(fc: nn.Module) -> int:
    """The input width of a classifier FT can merge into, or ValueError."""
    if isinstance(fc, nn.Linear):
        return fc.in_features
    if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1:
        return fc.in_channels
    raise ValueError(
        f"classifier is {type(fc).__name__}; FT merges into an nn.Linear (or a 1x1 nn.Conv2d)"
    )


@torch.no_grad()
def check_linear_head(
    model: nn.Module, spec: TapSpec, example: torch.Tensor | None = None, rtol: float = 1e-3
) -> None:
    """Raise ValueError unless FT after the ``feat`` map (or tokens) could be merged.

    FT can only be merged when everything between the last map and the classifier commutes with
    a per-position affine map: global pooling, a class token picked from the sequence, flatten,
    dropout. Checked on random maps: ``head_input(A m + c) == A head_input(m) + c`` for a random
    ``A``, ``c``. An activation, a LayerNorm or a BatchNorm after pooling (ConvNeXt, timm's
    ``fc_norm``, some conv heads) fails it, before any training time is spent; such models take
    FT on the pooled vector instead (:func:`ft_form`).
    """
    err = _path_error(model, spec, example, rtol)
    if err is not None:
        raise ValueError(
            f"{type(model).__name__}: the path from its last map {spec.feat!r} to its "
            f"classifier {spec.classifier!r} is not linear ({err}: an activation or a norm layer "
            "after global pooling?), so FT there could not be merged into the classifier after "
            "training; put FT on the pooled vector instead (form pooled), or use this model as "
            "the teacher"
        )


def _path_error(
    model: nn.Module, spec: TapSpec, example: torch.Tensor | None, rtol: float = 1e-3
) -> str | None:
    """Why FT on ``feat`` would not commute with the path to the classifiers, or None."""
    x = _default_example(model) if example is None else example
    shape = _head_inputs(model, spec, x, None)[0]
    c = spec.feat_channels
    axis = 1 if spec.layout == "map" else -1
    if len(shape) < 2 or shape[axis] != c:
        return f"its output {tuple(shape)} has not {c} channels in dim {axis}"
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(shape, generator=gen).double()
    a = torch.randn(c, c, generator=gen).double() / c**0.5
    b = torch.randn(c, generator=gen).double()

    def affine(t: torch.Tensor, dim: int) -> torch.Tensor:
        return (t.movedim(dim, -1) @ a.T + b).movedim(-1, dim)

    plain = _head_inputs(model, spec, x, m)[1]
    moved = _head_inputs(model, spec, x, affine(m, axis))[1]
    heads = [get_module(model, name) for name in (spec.classifier, *spec.heads)]
    for got, want, head in zip(moved, plain, heads):
        dim = -1 if isinstance(head, nn.Linear) else 1
        if want.dim() < 2 or want.shape[dim] != c:
            return f"the classifier reads {tuple(want.shape)}, not {c} features"
        want = affine(want, dim)
        scale = float(want.abs().max()) + 1e-6
        if float((got - want).abs().max()) > rtol * scale:
            return "FT would not commute with it"
    return None


def _head_inputs(
    model: nn.Module, spec: TapSpec, x: torch.Tensor, replace: torch.Tensor | None
) -> tuple[torch.Size, list[torch.Tensor]]:
    """(``feat``'s output shape, each classifier's input in float64) of one eval-mode forward of
    ``x``, ``feat``'s output replaced by ``replace`` when given."""
    shapes: list[torch.Size] = []
    got: list[torch.Tensor] = []

    def on_feat(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"tap {spec.feat!r} returned {type(out).__name__}, not a tensor")
        shapes.append(out.shape)
        return None if replace is None else replace.to(out)

    def on_head(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0].detach().double())

    handles = [get_module(model, spec.feat).register_forward_hook(on_feat)]
    handles += [
        get_module(model, name).register_forward_pre_hook(on_head)
        for name in (spec.classifier, *spec.heads)
    ]
    run_hooked(model, x, handles)
    if not shapes or not got:
        raise ValueError(
            f"{type(model).__name__}: its taps {spec.feat!r} / "
            f"{spec.classifier!r} were not called in a forward"
        )
    return shapes[-1], got
