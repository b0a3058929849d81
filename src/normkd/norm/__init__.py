"""NORM (N-to-One Representation Matching, ICLR 2023): the paper in :mod:`normkd.norm.paper`,
read top to bottom; the wiring into models, the token and pooled forms, the factored speed path
and the authors' inner FT each in their own module. Everything is importable from here."""

from normkd.models.taps import max_logit_diff
from normkd.norm.factored import FactoredMap
from normkd.norm.forms import PooledExpanded, check_linear_head, ft_form, pooled_norm_loss
from normkd.norm.inner import (
    INNER_FT,
    ExpandedMaps,
    InnerFT,
    inner_stage_count,
    restore_inner_ft,
)
from normkd.norm.paper import FORMS, FeatureTransform, fold_ft, norm_loss, spatial_ratio
from normkd.norm.student import FTStudent, attach_ft, attach_inner_ft, merge_ft

__all__ = [
    "FORMS",
    "INNER_FT",
    "ExpandedMaps",
    "FTStudent",
    "FactoredMap",
    "FeatureTransform",
    "InnerFT",
    "PooledExpanded",
    "attach_ft",
    "attach_inner_ft",
    "check_linear_head",
    "fold_ft",
    "ft_form",
    "inner_stage_count",
    "max_logit_diff",
    "merge_ft",
    "norm_loss",
    "pooled_norm_loss",
    "restore_inner_ft",
    "spatial_ratio",
]
