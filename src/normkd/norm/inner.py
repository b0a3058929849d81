"""The authors' inner FT (``--use_layer3``, passed by none of their scripts): a second FT *in the
student's path* after the stage before the last one, its expanded map matched to the teacher's
stage of the same depth (recipe ``loss: {kind: norm, stages: layer3}``). That FT feeds further
convolutions, so it cannot be folded away exactly: the deployed student keeps it
(:class:`InnerFT`, rebuilt by :func:`restore_inner_ft`). It is attached by
:func:`normkd.norm.student.attach_inner_ft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from normkd.models.taps import TapShapes, get_module
from normkd.norm.forms import PooledExpanded
from normkd.norm.paper import FeatureTransform

# Name of the in-path inner FT's module on a student that carries one (its state_dict prefix).
INNER_FT = "norm_inner_ft"


def inner_stage_count(shapes: TapShapes) -> int:
    """How many of a model's stages lie before the one global pooling reads.

    The last stage is ``feat``'s own when it has ``feat``'s resolution (``feat`` itself, or the
    map ``feat`` is computed from, as WRN's block3 before its final BN-ReLU); a stage list that
    stops earlier has all its stages inner. Reading shapes, not ``stages[-1] == feat``, keeps the
    inner stages right for stage lists that follow the peers' feature lists.
    """
    n = len(shapes.stages)
    return n - 1 if n and tuple(shapes.stages[-1][1:]) == tuple(shapes.feat[1:]) else n


class ExpandedMaps(NamedTuple):
    """The expanded maps of one forward of a student with an inner FT, shallow to deep."""

    inner: torch.Tensor
    last: torch.Tensor | PooledExpanded


class InnerFT(nn.Module):
    """An FT kept in the student's path after an inner stage (the authors' ``--use_layer3``).

    It lives on the student itself (child :data:`INNER_FT`, a forward hook on ``stage``), so the
    deployed student keeps it: its contracted map feeds further convolutions (zero-padded, after
    BN-ReLU in pre-activation nets), through which its constant terms and channel mixing cannot
    be folded exactly, unlike the last FT's through pooling and the classifier. Two buffers record
    where it sits and whether it is residual, so a saved student rebuilds (:func:`restore_inner_ft`).
    While an :class:`FTStudent` runs, ``sink`` collects the expanded map for the loss; otherwise
    nothing is kept (no tensor outlives a forward, so the student deep-copies). Its hook is
    registered before any tap's, so the ``stages`` tap at ``stage`` reads its output (what the next
    stage reads): other terms (AT, FitNet) see the student as it is deployed.
    """

    def __init__(self, ft: FeatureTransform, stage: str) -> None:
        super().__init__()
        if not stage:
            raise ValueError("the inner FT needs a stage module name")
        self.ft = ft
        self.stage = stage
        name = torch.tensor(list(stage.encode()), dtype=torch.uint8)
        self.register_buffer("stage_name", name)
        self.register_buffer("residual", torch.tensor(int(ft.residual), dtype=torch.uint8))
        self.sink: list[torch.Tensor] | None = None

    def hook(self, _mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        """Forward hook on ``stage``: its map -> FT -> the contracted map the next stage reads."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"stage {self.stage!r} returned {type(out).__name__}, not a tensor")
        contracted, expanded = self.ft(out)
        if self.sink is not None:
            self.sink.append(expanded)
        return contracted


def _install_inner(model: nn.Module, ft: FeatureTransform, stage: str) -> InnerFT:
    """Make ``ft`` part of ``model`` for good: child :data:`INNER_FT` and a hook on ``stage``."""
    target = get_module(model, stage)
    inner = InnerFT(ft, stage)
    model.add_module(INNER_FT, inner)
    # A bound method: deepcopy (merge_ft) re-binds the copied hook to the copied InnerFT.
    target.register_forward_hook(inner.hook)
    return inner


def restore_inner_ft(model: nn.Module, path: str | Path) -> nn.Module:
    """Give ``model`` (built by name) the inner FT a saved ``stages: layer3`` student carries.

    A no-op for files without one. The file's own buffers say where the FT sits and whether it is
    residual; its weights' shapes give its channels (only N * C_t matters to run it). The weights
    themselves are loaded afterwards, e.g. by ``normkd.models.load_weights``.
    """
    from normkd.models.weights import CheckpointError, read_state_dict

    state = read_state_dict(path)
    pre = INNER_FT + "."
    if not any(k.startswith(pre) for k in state):
        return model
    try:
        stage = bytes(state[pre + "stage_name"].tolist()).decode()
        residual = bool(state[pre + "residual"].item())
        w = state[pre + "ft.expand.0.weight"]
        ft = FeatureTransform(
            w.shape[1],
            w.shape[0],
            1,
            bn=pre + "ft.expand.1.weight" in state,
            residual=residual,
            init="pytorch",
        )
        _install_inner(model, ft, stage)
    except (KeyError, ValueError, UnicodeDecodeError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: its inner FT ({pre}*, NORM stages: layer3) cannot be rebuilt on "
            f"{type(model).__name__}: {err}"
        ) from None
    return model
