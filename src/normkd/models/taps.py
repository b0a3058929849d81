"""The feature-tap contract: where a classifier's last conv map, classifier and stages live.

Every model used as teacher or student is described by a :class:`TapSpec` that names *modules*,
so maps are read with forward hooks and no model code is edited. Zoo models declare their spec as
a ``tap_spec`` attribute; any other CNN (torchvision, timm, your own) gets one discovered by a
single traced forward pass (:func:`discover_taps`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class TapSpec:
    """Names (dotted, as in ``model.named_modules()``) of the modules a distiller reads.

    feat: module whose output is the last convolutional map, i.e. exactly what global pooling reads.
    classifier: the final ``nn.Linear``.
    stages: modules whose outputs are the stage maps, shallow to deep (the last is usually ``feat``).
    feat_channels / stage_channels: channel counts of those maps, declared so they can be checked.
    """

    feat: str
    feat_channels: int
    classifier: str
    stages: tuple[str, ...] = field(default_factory=tuple)
    stage_channels: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.stage_channels):
            raise ValueError(
                f"TapSpec: {len(self.stages)} stages but {len(self.stage_channels)} stage channel counts"
            )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted path ``name`` ('' is the model itself), with a clear error."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no submodule named {name!r}") from err


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    setattr(parent, child, new)


def get_taps(model: nn.Module, example: torch.Tensor | None = None) -> TapSpec:
    """The model's TapSpec: declared by the model, else discovered once and cached on it."""
    spec = getattr(model, "tap_spec", None)
    if isinstance(spec, TapSpec):
        return spec
    spec = discover_taps(model, example)
    # Cache outside the module's state so state_dict/deepcopy are unaffected.
    object.__setattr__(model, "tap_spec", spec)
    return spec


def _default_example(model: nn.Module) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.zeros(2, 3, 64, 64, device=device, dtype=dtype)


@torch.no_grad()
def discover_taps(model: nn.Module, example: torch.Tensor | None = None) -> TapSpec:
    """Find feat/classifier/stages of an arbitrary CNN classifier by tracing one forward pass.

    The classifier is the last ``nn.Linear`` called; ``feat`` is the outermost module whose output
    is the last 4-D map with as many channels as the classifier has inputs (the map global pooling
    reads); stages are the outermost modules ending each spatial resolution.
    """
    x = _default_example(model) if example is None else example
    calls: list[tuple[str, nn.Module, object]] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [
        m.register_forward_hook(lambda mod, _i, out: calls.append((names[mod], mod, out)))
        for m in model.modules()
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    linears = [(n, m) for n, m, _ in calls if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no nn.Linear classifier found in its forward pass")
    cls_name, cls_mod = linears[-1]
    c = cls_mod.in_features

    maps = [(n, o) for n, _m, o in calls if isinstance(o, torch.Tensor) and o.dim() == 4]
    # Last call per module wins (a module called twice, e.g. a shared ReLU, reports its last output).
    last_out: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for n, o in maps:
        if n in last_out:
            order.remove(n)
        last_out[n] = o
        order.append(n)
    candidates = [n for n in order if n and last_out[n].shape[1] == c]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: no convolutional map with {c} channels (the classifier's inputs) "
            "found; is it a CNN classifier with global pooling?"
        )
    feat = _outermost(candidates, last_out, order)

    # Stages: for each run of equal spatial size up to feat, the outermost module that returned
    # the run's final map.
    groups: list[list[str]] = []
    for n in order[: order.index(feat) + 1]:
        if groups and last_out[groups[-1][-1]].shape[-2:] == last_out[n].shape[-2:]:
            groups[-1].append(n)
        else:
            groups.append([n])
    stages = [_outermost(g, last_out, order) for g in groups]
    stages[-1] = feat
    return TapSpec(
        feat=feat,
        feat_channels=c,
        classifier=cls_name,
        stages=tuple(stages),
        stage_channels=tuple(int(last_out[s].shape[1]) for s in stages),
    )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a, b))


def _outermost(group: list[str], outs: dict[str, torch.Tensor], order: list[str]) -> str:
    """Of the modules in ``group`` that returned the group's final map, the least nested one."""
    final = outs[group[-1]]
    same = [n for n in group if _same_tensor(outs[n], final)]
    return min(same, key=lambda n: (n.count("."), order.index(n)))


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during forwards inside the ``with`` block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for n in dict.fromkeys(names):
        mod = get_module(model, n)
        handles.append(mod.register_forward_hook(_recorder(store, n)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _recorder(store: dict[str, torch.Tensor], name: str):
    def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
        store[name] = out

    return hook
