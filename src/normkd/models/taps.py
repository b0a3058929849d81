"""The feature-tap contract: where a classifier's last representation, classifier and stages live.

Every model used as teacher or student is described by a :class:`TapSpec` that names *modules*,
so maps are read with forward hooks and no model code is edited. Zoo models declare their spec as
a ``tap_spec`` attribute; any other CNN or vision transformer (torchvision, timm, your own) gets
one discovered by a single traced forward pass (:func:`discover_taps`).

The last representation has one of three layouts (``TapSpec.layout``): a conv ``map``
``(B, C, H, W)``; ``tokens`` ``(B, T, D)``, a ViT's sequence after its final norm, whose first
``prefix_tokens`` are class / distillation tokens and the rest a ``grid`` of patches; ``nhwc``
``(B, H, W, D)``, Swin's channels-last map. :func:`collect_taps` hands every ``feat`` and
``stages`` tap to the loss terms as a ``(B, C, H, W)`` map (:func:`as_map`: prefix tokens left
out), so every feature term reads CNNs and transformers alike.
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
#   feat    - the last map (what global pooling reads, a ViT's patch tokens on their grid; the
#             student's is taken before FT);
#   stages  - the stage maps, shallow to deep (as maps too);
#   pooled  - the classifier's input (the student's is taken after FT);
#   preact  - the stage maps before their last activation (``TapSpec.preact_stages``; none for a
#             model that declares none), read by forward pre-hooks only when a term asks.
TAP_KINDS = ("logits", "feat", "stages", "pooled", "preact")
# How a model's last representation holds its channels (TapSpec.layout).
LAYOUTS = ("map", "tokens", "nhwc")


@dataclass(frozen=True)
class TapSpec:
    """Names (dotted, as in ``model.named_modules()``) of the modules a distiller reads.

    feat: module whose output is the last convolutional map, i.e. exactly what global pooling reads
        (a transformer's last token sequence, after its final norm).
    classifier: the final ``nn.Linear`` (or the 1x1 ``nn.Conv2d`` of a conv head after pooling),
        the layer FT is merged into.
    stages: modules whose outputs are the stage maps, shallow to deep. The last is the deepest
        stage, at ``feat``'s resolution: ``feat`` itself, or the map ``feat`` is computed from
        when the peers' feature lists stop before the head (WRN's block3 before its final
        BN-ReLU, the 1x1 head convs of MobileNetV2 / ShuffleV2).
    feat_channels / stage_channels: channel counts of those maps, declared so they can be checked.
    layout: how ``feat`` and ``stages`` hold their channels: ``map`` (B, C, H, W), ``tokens``
        (B, T, D) or ``nhwc`` (B, H, W, D) (see the module doc).
    prefix_tokens / grid: for ``tokens``, how many class / distillation tokens lead the sequence
        and the (rows, columns) of the patch tokens after them, measured on the discovery input.
    heads: further classifiers reading the same representation as ``classifier`` (DeiT's
        distillation head, whose logits are averaged with the class head's): FT merges into each.
    preact_stages: modules whose *input* is each stage's map before its last activation (what
        RepDistiller / mdistiller return as ``preact_feats``), aligned with ``stages`` (same
        length and shapes), or empty when the model declares none. An input, not an output,
        because the pre-activation sum of a residual block is no module's output; a module
        called with several tensors gives their concatenation along channels (see
        :func:`module_input`).
    """

    feat: str
    feat_channels: int
    classifier: str
    stages: tuple[str, ...] = field(default_factory=tuple)
    stage_channels: tuple[int, ...] = field(default_factory=tuple)
    layout: str = "map"
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    heads: tuple[str, ...] = field(default_factory=tuple)
    preact_stages: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.stage_channels):
            raise ValueError(
                f"TapSpec: {len(self.stages)} stages but {len(self.stage_channels)} stage channel counts"
            )
        if self.preact_stages and len(self.preact_stages) != len(self.stages):
            raise ValueError(
                f"TapSpec: {len(self.preact_stages)} pre-activation stages for {len(self.stages)} "
                "stages; declare one per stage or none"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"TapSpec: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "tokens" and (self.grid is None or self.prefix_tokens < 0):
            raise ValueError("TapSpec: a tokens layout needs its patch grid and prefix_tokens >= 0")


def as_map(t: torch.Tensor, spec: TapSpec) -> torch.Tensor:
    """A ``feat`` / ``stages`` output (or FT's expanded output) of ``spec``'s layout as a
    ``(B, C, H, W)`` map: tokens lose their prefix tokens and take their patch grid, channels-last
    maps are permuted. Always a view of ``t``, never a copy."""
    if spec.layout == "map":
        return t
    if spec.layout == "nhwc":
        if t.dim() != 4:
            raise ValueError(f"expected a (B, H, W, C) map, got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2)
    assert spec.grid is not None
    (h, w), n = spec.grid, t.shape[1] if t.dim() == 3 else -1
    if n == h * w + spec.prefix_tokens:
        t = t[:, spec.prefix_tokens :]
    elif n != h * w:
        raise ValueError(
            f"expected (B, {spec.prefix_tokens} + {h}x{w}, C) tokens, got {tuple(t.shape)} (the "
            "taps were found on inputs of another size?)"
        )
    return t.transpose(1, 2).unflatten(2, (h, w))


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
    """Find feat/classifier/stages of an arbitrary classifier by tracing one forward pass.

    Vision transformers (a token sequence or a channels-last map last) are read by
    :func:`_token_taps`. For CNNs, ``feat`` is the outermost module returning the last 4-D map
    computed (pooling layers aside); the classifier is the first ``nn.Linear`` (or 1x1 conv on the
    pooled map, as in timm's MobileNetV3 head) called after it that reads its channels (for an MLP
    head that is the head's first layer, which is what FT merges into); stages are the last map of
    each spatial resolution along the model's top-level chain of blocks.
    """
    x = _default_example(model) if example is None else example
    calls = _trace(model, x)
    # Last call per module wins (a module called twice, e.g. a shared ReLU, reports its last output).
    last = {n: i for i, (n, _m, _o) in enumerate(calls)}
    order = sorted((i for n, i in last.items() if n), key=int)
    token_spec = _token_taps(model, calls, last, order, x)
    if token_spec is not None:
        return token_spec
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


# (module name, module, output) of each call of a traced forward, in call order.
Calls = list[tuple[str, nn.Module, Any]]


def _token_taps(
    model: nn.Module, calls: Calls, last: dict[str, int], order: list[int], x: torch.Tensor
) -> TapSpec | None:
    """The taps of a model whose last representation is a token sequence (ViT, DeiT, hybrids)
    or a channels-last map (Swin), or None for a CNN (its last map holds channels in dim 1).

    The last representation is the last non-pooled tensor of the batch computed (``feat``: the
    outermost module returning it, the final norm in timm's ViTs); the classifier is the first
    linear layer after it reading its ``D`` features, and the linear layers beside it (same
    parent, same width: DeiT's ``head_dist``) are further heads.
    """
    b = x.shape[0]
    reps = [
        i
        for i in order
        if isinstance(out := calls[i][2], torch.Tensor)
        and out.dim() in (3, 4)
        and out.shape[0] == b
        and not _is_global(out)
        and not _is_pool(calls[i][1])
    ]
    if not reps:
        return None
    out = calls[reps[-1]][2]
    assert isinstance(out, torch.Tensor)
    d = int(out.shape[-1])
    after = [i for i in order if i > reps[-1] and isinstance(calls[i][2], torch.Tensor)]
    if out.dim() == 4 and any(_reads_channels(calls[i][1], int(out.shape[1])) for i in after):
        return None  # a conv map: the CNN rules
    heads = [i for i in after if _reads_channels(calls[i][1], d) and _is_global(calls[i][2])]
    if not heads:
        if out.dim() == 3:
            raise ValueError(
                f"{type(model).__name__}: no nn.Linear reading the {d} features of its last "
                f"token sequence {tuple(out.shape)} found; is it a ViT classifier?"
            )
        return None
    layout = "tokens" if out.dim() == 3 else "nhwc"
    feat = _outermost([calls[i][0] for i in reps], out, calls, last)
    head, parent = calls[heads[0]][1], calls[heads[0]][0].rpartition(".")[0]
    extra = tuple(
        calls[i][0]
        for i in heads[1:]
        if calls[i][0].rpartition(".")[0] == parent
        and getattr(calls[i][1], "out_features", None) == getattr(head, "out_features", 0)
    )
    prefix, grid = _token_grid(calls, order, reps, out, x) if layout == "tokens" else (0, None)
    stages = _token_stages(model, calls, last, reps, feat, layout, prefix)
    return TapSpec(
        feat=feat,
        feat_channels=d,
        classifier=calls[heads[0]][0],
        stages=stages,
        stage_channels=tuple(int(calls[last[s]][2].shape[-1]) for s in stages),
        layout=layout,
        prefix_tokens=prefix,
        grid=grid,
        heads=extra,
    )


def _token_grid(
    calls: Calls, order: list[int], reps: list[int], out: torch.Tensor, x: torch.Tensor
) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, patch grid) of a token sequence ``out`` of ``D`` features.

    The grid is the (H, W) of the last ``D``-channel map computed before the first token
    sequence (the patch embedding's conv); without one, the first sequence holds the patches
    alone, laid out with the input's aspect ratio. The prefix is what the final sequence has more.
    """
    d, n = int(out.shape[-1]), int(out.shape[1])
    first = next(i for i in reps if calls[i][2].dim() == 3)
    embeds = [
        calls[i][2].shape[-2:]
        for i in order
        if i < first
        and isinstance(calls[i][2], torch.Tensor)
        and calls[i][2].dim() == 4
        and calls[i][2].shape[:2] == (x.shape[0], d)
    ]
    if embeds:
        h, w = (int(v) for v in embeds[-1])
    else:
        patches = int(calls[first][2].shape[1])
        h = max(1, round((patches * x.shape[-2] / x.shape[-1]) ** 0.5))
        w = patches // h
    if h * w < 1 or not 0 <= n - h * w <= 16:  # class, distillation, register tokens: a few
        raise ValueError(
            f"cannot lay the {n} tokens of the last sequence {tuple(out.shape)} out on a patch "
            f"grid ({h}x{w} found) for inputs {tuple(x.shape[1:])}"
        )
    return n - h * w, (h, w)


def _token_stages(
    model: nn.Module,
    calls: Calls,
    last: dict[str, int],
    reps: list[int],
    feat: str,
    layout: str,
    prefix: int,
) -> tuple[str, ...]:
    """Stages of a transformer: the last block of each resolution along the top-level chain
    (Swin's four stages); a chain of one resolution (ViT) is cut into four equal runs of its
    blocks, as a ResNet's four stages. Ends with ``feat``. Token sequences count their patch
    tokens, so the patch embedding (no class token yet) is at the blocks' resolution."""
    out = calls[reps[-1]][2]
    assert isinstance(out, torch.Tensor)

    def key(t: torch.Tensor) -> tuple[int, ...]:
        if layout == "nhwc":
            return tuple(t.shape[1:3])
        return (t.shape[1] - (prefix if t.shape[1] == out.shape[1] else 0),)

    dims = 3 if layout == "tokens" else 4
    units = [i for i in reps if calls[i][2].dim() == dims and _is_unit(model, calls[i][0])]
    groups: list[list[int]] = []
    for i in units:
        if groups and key(calls[groups[-1][-1]][2]) == key(calls[i][2]):
            groups[-1].append(i)
        else:
            groups.append([i])
    if layout == "tokens":  # only sequences at the final resolution become maps
        groups = [g for g in groups if key(calls[g[-1]][2]) == key(out)]
    ends = [g[-1] for g in groups]
    if len(groups) == 1:
        blocks = [i for i in groups[0] if "." in calls[i][0]]  # children of a Sequential
        k = min(len(blocks), 4)
        ends = [blocks[round(len(blocks) * j / k) - 1] for j in range(1, k)]
    names = [calls[i][0] for i in reps]
    stages = [_outermost(names, calls[i][2], calls, last) for i in ends]
    if not stages or stages[-1] != feat:
        stages.append(feat)
    return tuple(dict.fromkeys(stages))


def _trace(model: nn.Module, x: torch.Tensor) -> Calls:
    """Every module call of one eval-mode forward, in call order: (name, module, output)."""
    calls: list[tuple[str, nn.Module, object]] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [
        m.register_forward_hook(lambda mod, _i, out: calls.append((names[mod], mod, out)))
        for m in model.modules()
    ]
    run_hooked(model, x, handles)
    return calls


def run_hooked(model: nn.Module, x: torch.Tensor, handles: list[Any]) -> None:
    """One eval-mode forward of ``model`` on ``x`` for the hooks it holds, removed after."""
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()


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
    with _hooked(
        model, names, lambda m, n, store: m.register_forward_hook(_recorder(store, n))
    ) as s:
        yield s


@contextlib.contextmanager
def _hooked(
    model: nn.Module, names: Sequence[str], register: Any
) -> Iterator[dict[str, torch.Tensor]]:
    """A store the hooks ``register(module, name, store)`` puts on the named submodules fill,
    the hooks removed on leaving: what :func:`capture` and :func:`capture_inputs` share."""
    store: dict[str, torch.Tensor] = {}
    handles = [register(get_module(model, n), n, store) for n in dict.fromkeys(names)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _recorder(store: dict[str, torch.Tensor], name: str):
    def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
        store[name] = out

    return hook


def module_input(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The map a forward pre-hook on ``mod`` reads: its input, or its several inputs concatenated
    along channels; cloned when ``mod`` works in place, which would overwrite it afterwards."""
    x = args[0] if len(args) == 1 else torch.cat(args, 1)
    return x.clone() if x is args[0] and getattr(mod, "inplace", False) else x


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the inputs (:func:`module_input`) of the named submodules during forwards inside
    the ``with`` block: how pre-activation maps, which no module returns, are read."""

    def register(m: nn.Module, n: str, store: dict[str, torch.Tensor]) -> Any:
        return m.register_forward_pre_hook(_input_recorder(store, n))

    with _hooked(model, names, register) as s:
        yield s


def _input_recorder(store: dict[str, torch.Tensor], name: str):
    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        store[name] = module_input(mod, args)

    return hook


@dataclass
class Taps:
    """The maps one model produced in one forward."""

    logits: torch.Tensor | None = None
    feat: torch.Tensor | None = None
    stages: list[torch.Tensor] = field(default_factory=list)
    pooled: torch.Tensor | None = None
    preact: list[torch.Tensor] = field(default_factory=list)  # empty unless a term asks
    # What a term's own modules on the student handed on in this forward (see StudentWrapper):
    # collected for the terms that declare the ``wrapper`` tap.
    wrapper: Any = None


class StudentWrapper(nn.Module):
    """A student as one loss term trains it, with the term's own modules in its path (NORM: FT).

    ``student`` is the plain model inside: the taps are read on it, and the term's deploy starts
    from it. After each forward :meth:`handed` is what the wrapper hands its term, through the
    ``wrapper`` tap. The engine knows only this interface, so a new term that changes the student
    (a projector kept at deploy) needs no engine edit.
    """

    student: nn.Module

    @property
    def form(self) -> str | None:
        """Where the term's modules sit (recorded in a run's summary), if it says."""
        return None

    def handed(self) -> Any:
        """The state of the last forward the term reads (its ``wrapper`` tap)."""
        return None

    def describe(self) -> str:
        """One line for a dry run: what the term put on the student."""
        return type(self).__name__

    def hooks_kept(self) -> contextlib.AbstractContextManager[None]:
        """Keep the wrapper's own hooks registered for a block (see ``Distiller.hooks_kept``)."""
        return contextlib.nullcontext()


@dataclass(frozen=True)
class TapShapes:
    """Per-sample tap shapes of one model, so terms can size their own modules at construction."""

    feat: tuple[int, ...]
    stages: tuple[tuple[int, ...], ...]
    pooled: tuple[int, ...]
    preact: tuple[tuple[int, ...], ...] = ()  # empty: the model declares no pre-activation maps

    @classmethod
    def of(cls, taps: Taps) -> TapShapes:
        """Shapes of example taps (the batch dimension dropped)."""
        if taps.feat is None or taps.pooled is None:
            raise ValueError("TapShapes.of needs taps with feat and pooled collected")
        return cls(
            feat=tuple(taps.feat.shape[1:]),
            stages=tuple(tuple(s.shape[1:]) for s in taps.stages),
            pooled=tuple(taps.pooled.shape[1:]),
            preact=tuple(tuple(p.shape[1:]) for p in taps.preact),
        )


class TapHooks:
    """Forward hooks on one model's tap modules that record only inside :meth:`collect`.

    Kept registered for a whole run (``Distiller.hooks_kept``), they let ``torch.compile``
    trace a step end to end: registering a hook inside traced code breaks its graph.
    :func:`collect_taps` registers them for one block. ``feat``, ``stages`` and ``preact`` come
    as ``(B, C, H, W)`` maps in every layout (:func:`as_map`). Only the kinds in ``needs`` are
    hooked: a run whose terms read no ``preact`` carries no pre-hook for it.
    """

    def __init__(self, model: nn.Module, spec: TapSpec, needs: frozenset[str]) -> None:
        self.spec, self.needs = spec, needs
        self._taps: Taps | None = None  # recording while not None
        self._maps: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}  # the preact modules' inputs
        names = ([spec.feat] if "feat" in needs else []) + (
            list(spec.stages) if "stages" in needs else []
        )
        self._handles = [
            get_module(model, n).register_forward_hook(self._recorder(n))
            for n in dict.fromkeys(names)
        ]
        if "preact" in needs:
            self._handles += [
                get_module(model, n).register_forward_pre_hook(self._input_recorder(n))
                for n in dict.fromkeys(spec.preact_stages)
            ]
        if "pooled" in needs:

            def grab(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                if self._taps is not None:
                    self._taps.pooled = args[0]

            classifier = get_module(model, spec.classifier)
            self._handles.append(classifier.register_forward_pre_hook(grab))

    def _recorder(self, name: str):
        def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
            if self._taps is not None:
                self._maps[name] = out

        return hook

    def _input_recorder(self, name: str):
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._taps is not None:
                self._inputs[name] = module_input(mod, args)

        return hook

    @contextlib.contextmanager
    def collect(self) -> Iterator[Taps]:
        """Forwards of the model inside the block fill the yielded taps (the last call wins)."""
        taps = self._taps = Taps()
        self._maps = {}
        try:
            yield taps
            spec, maps = self.spec, self._maps
            feat = maps.get(spec.feat) if "feat" in self.needs else None
            taps.feat = None if feat is None else as_map(feat, spec)
            taps.stages = (
                [as_map(maps[s], spec) for s in spec.stages] if "stages" in self.needs else []
            )
            if "preact" in self.needs:
                taps.preact = [as_map(self._inputs[n], spec) for n in spec.preact_stages]
        finally:
            self._taps, self._maps = None, {}
            if self._inputs:  # only a preact-reading run has any
                self._inputs = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def collect_taps(model: nn.Module, spec: TapSpec, needs: frozenset[str]) -> Iterator[Taps]:
    """Hook ``model`` (the plain network) so forwards in the block fill the ``needs`` taps."""
    hooks = TapHooks(model, spec, needs)
    try:
        with hooks.collect() as taps:
            yield taps
    finally:
        hooks.remove()


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


@torch.no_grad()
def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between two models on ``x`` (both in eval mode)."""
    with eval_mode(a, b):
        return float((a(x).float() - b(x).float()).abs().max())


def example_input(model: nn.Module, in_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A zero batch of ``in_shape`` inputs on the model's device and in its dtype."""
    param = next(model.parameters(), None)
    kw: dict[str, Any] = {} if param is None else {"device": param.device, "dtype": param.dtype}
    return torch.zeros(batch, *in_shape, **kw)


@torch.no_grad()
def probe(model: nn.Module, in_shape: tuple[int, ...]) -> TapShapes:
    """Find ``model``'s taps on inputs of ``in_shape`` (cached on it) and measure every tap once.

    Raises ValueError when the model is no CNN or ViT classifier normkd can read.
    """
    example = example_input(model, in_shape)
    spec = get_taps(model, example)
    with eval_mode(model), collect_taps(model, spec, frozenset(TAP_KINDS)) as taps:
        model(example)
    return TapShapes.of(taps)
