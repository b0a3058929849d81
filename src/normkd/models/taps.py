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
from typing import Any

import torch
from torch import nn

# Tap kinds a loss term may ask for, on the student or the teacher:
#   logits  - the model's output (standardised when the recipe says so);
#   feat    - the last conv map (what global pooling reads; the student's is taken before FT);
#   stages  - the stage maps, shallow to deep;
#   pooled  - the classifier's input (the student's is taken after FT).
TAP_KINDS = ("logits", "feat", "stages", "pooled")


@dataclass(frozen=True)
class TapSpec:
    """Names (dotted, as in ``model.named_modules()``) of the modules a distiller reads.

    feat: module whose output is the last convolutional map, i.e. exactly what global pooling reads.
    classifier: the final ``nn.Linear`` (or the 1x1 ``nn.Conv2d`` of a conv head after pooling),
        the layer FT is merged into.
    stages: modules whose outputs are the stage maps, shallow to deep. The last is the deepest
        stage, at ``feat``'s resolution: ``feat`` itself, or the map ``feat`` is computed from
        when the peers' feature lists stop before the head (WRN's block3 before its final
        BN-ReLU, the 1x1 head convs of MobileNetV2 / ShuffleV2).
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
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=gen).to(device=device, dtype=dtype)


@torch.no_grad()
def discover_taps(model: nn.Module, example: torch.Tensor | None = None) -> TapSpec:
    """Find feat/classifier/stages of an arbitrary CNN classifier by tracing one forward pass.

    ``feat`` is the outermost module returning the last 4-D map computed (pooling layers aside);
    the classifier is the first ``nn.Linear`` (or 1x1 conv on the pooled map, as in timm's
    MobileNetV3 head) called after it that reads its channels (for an MLP head that is the head's
    first layer, which is what FT merges into); stages are the last map of
    each spatial resolution along the model's top-level chain of blocks.
    """
    calls = _trace(model, _default_example(model) if example is None else example)

    # Last call per module wins (a module called twice, e.g. a shared ReLU, reports its last output).
    last: dict[str, int] = {}
    for i, (n, _m, _o) in enumerate(calls):
        last[n] = i
    order = sorted((i for n, i in last.items() if n), key=int)
    pools = [  # global pools: adaptive ones (a fixed-size pool on a small input is not one)
        i
        for i in order
        if isinstance(calls[i][1], _GLOBAL_POOLS) or type(calls[i][1]).__name__ in _POOL_NAMES
        if isinstance(calls[i][2], torch.Tensor) and _is_global(calls[i][2])
    ]
    pooled = [calls[i][2] for i in pools]
    maps = [
        i
        for i in order
        if isinstance(calls[i][2], torch.Tensor)
        and calls[i][2].dim() == 4
        and not _is_pool(calls[i][1])
        and not any(_same_tensor(calls[i][2], p) for p in pooled)  # a global pool's wrapper
    ]
    if not maps:
        raise ValueError(f"{type(model).__name__}: no 4-D feature map found; is it a CNN?")
    # A conv head after global pooling (timm MobileNetV3: pool -> 1x1 conv -> act -> linear):
    # the last conv map is the one the global pool reads, and the head's 1x1 conv its classifier.
    gp = pools[-1] if pools else None
    head = [i for i in maps if gp is not None and i > gp]
    if head and len(head) < len(maps) and all(_is_global(calls[i][2]) for i in head):
        maps = [i for i in maps if i not in head]
    final = calls[maps[-1]][2]
    c = int(final.shape[1])
    heads = [i for i in order if i > maps[-1] and _reads_channels(calls[i][1], c)]
    if not heads:
        raise ValueError(
            f"{type(model).__name__}: no nn.Linear reading the {c}-channel last conv map found; "
            "is it a CNN classifier with global pooling and a linear classifier?"
        )
    feat = _outermost([calls[i][0] for i in maps], final, calls, last)

    # Stages: walk the top-level chain of blocks (expanding nn.Sequential containers), group
    # consecutive blocks by output resolution and keep the last block of each group.
    units = [i for i in maps if _is_unit(model, calls[i][0])]
    groups: list[list[int]] = []
    for i in units:
        if i > maps[-1]:
            break
        if groups and calls[groups[-1][-1]][2].shape[-2:] == calls[i][2].shape[-2:]:
            groups[-1].append(i)
        else:
            groups.append([i])
    stages = [_outermost([calls[i][0] for i in maps], calls[g[-1]][2], calls, last) for g in groups]
    if not stages or stages[-1] != feat:
        stages.append(feat)
    return TapSpec(
        feat=feat,
        feat_channels=c,
        classifier=calls[heads[0]][0],
        stages=tuple(stages),
        stage_channels=tuple(int(calls[last[s]][2].shape[1]) for s in stages),
    )


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, object]]:
    """Every module call of one eval-mode forward, in call order: (name, module, output)."""
    calls: list[tuple[str, nn.Module, object]] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [
        m.register_forward_hook(lambda mod, _i, out: calls.append((names[mod], mod, out)))
        for m in model.modules()
    ]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


_POOLS = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
)


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# timm wraps its pools (SelectAdaptivePool2d & co); matched by name so timm stays optional.
_POOL_NAMES = frozenset(
    {
        "SelectAdaptivePool2d",
        "AdaptiveAvgMaxPool2d",
        "AdaptiveCatAvgMaxPool2d",
        "FastAdaptiveAvgPool",
    }
)


def _is_pool(m: nn.Module) -> bool:
    return isinstance(m, _POOLS) or type(m).__name__ in _POOL_NAMES


def _is_global(t: torch.Tensor) -> bool:
    """A globally pooled output: (B, C) or (B, C, 1, 1)."""
    return t.dim() == 2 or (t.dim() == 4 and tuple(t.shape[-2:]) == (1, 1))


def _reads_channels(m: nn.Module, c: int) -> bool:
    """A linear classifier of a ``c``-channel pooled map: nn.Linear, or a plain 1x1 nn.Conv2d."""
    if isinstance(m, nn.Linear):
        return m.in_features == c
    return (
        isinstance(m, nn.Conv2d)
        and m.in_channels == c
        and m.kernel_size == (1, 1)
        and m.groups == 1
        and m.padding in ((0, 0), "valid")
    )


def _is_unit(model: nn.Module, name: str) -> bool:
    """A block of the top-level chain: not a Sequential itself, and only Sequentials above it."""
    parts = name.split(".")
    if isinstance(model.get_submodule(name), nn.Sequential):
        return False
    return all(
        isinstance(model.get_submodule(".".join(parts[:k])), nn.Sequential)
        for k in range(1, len(parts))
    )


def _outermost(
    names: list[str],
    target: torch.Tensor,
    calls: list[tuple[str, nn.Module, object]],
    last: dict[str, int],
) -> str:
    """Of the modules whose (last) output is ``target`` itself, the least nested one."""
    same = [
        n
        for n in names
        if isinstance(calls[last[n]][2], torch.Tensor) and _same_tensor(calls[last[n]][2], target)
    ]
    return min(same, key=lambda n: (n.count("."), last[n]))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Identity, not equality: a parent returns its last child's tensor (or an in-place result).
    return a.shape == b.shape and a.data_ptr() == b.data_ptr()


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


@dataclass
class Taps:
    """The maps one model produced in one forward."""

    logits: torch.Tensor | None = None
    feat: torch.Tensor | None = None
    stages: list[torch.Tensor] = field(default_factory=list)
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class TapShapes:
    """Per-sample tap shapes of one model, so terms can size their own modules at construction."""

    feat: tuple[int, ...]
    stages: tuple[tuple[int, ...], ...]
    pooled: tuple[int, ...]

    @classmethod
    def of(cls, taps: Taps) -> TapShapes:
        """Shapes of example taps (the batch dimension dropped)."""
        if taps.feat is None or taps.pooled is None:
            raise ValueError("TapShapes.of needs taps with feat and pooled collected")
        return cls(
            feat=tuple(taps.feat.shape[1:]),
            stages=tuple(tuple(s.shape[1:]) for s in taps.stages),
            pooled=tuple(taps.pooled.shape[1:]),
        )


@contextlib.contextmanager
def collect_taps(model: nn.Module, spec: TapSpec, needs: frozenset[str]) -> Iterator[Taps]:
    """Hook ``model`` (the plain network) so forwards in the block fill the ``needs`` taps."""
    taps = Taps()
    names = ([spec.feat] if "feat" in needs else []) + (
        list(spec.stages) if "stages" in needs else []
    )
    handle = None
    if "pooled" in needs:

        def grab(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            taps.pooled = args[0]

        handle = get_module(model, spec.classifier).register_forward_pre_hook(grab)
    try:
        with capture(model, names) as maps:
            yield taps
            taps.feat = maps.get(spec.feat) if "feat" in needs else None
            taps.stages = [maps[s] for s in spec.stages] if "stages" in needs else []
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Switch ``models`` to eval mode for the block, then back to what each was."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def example_input(model: nn.Module, in_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A zero batch of ``in_shape`` inputs on the model's device and in its dtype."""
    param = next(model.parameters(), None)
    kw: dict[str, Any] = {} if param is None else {"device": param.device, "dtype": param.dtype}
    return torch.zeros(batch, *in_shape, **kw)


@torch.no_grad()
def probe(model: nn.Module, in_shape: tuple[int, ...]) -> TapShapes:
    """Find ``model``'s taps on inputs of ``in_shape`` (cached on it) and measure every tap once.

    Raises ValueError when the model is no CNN classifier normkd can read.
    """
    example = example_input(model, in_shape)
    spec = get_taps(model, example)
    with eval_mode(model), collect_taps(model, spec, frozenset(TAP_KINDS)) as taps:
        model(example)
    return TapShapes.of(taps)
