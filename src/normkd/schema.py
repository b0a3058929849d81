"""The base of every typed settings class (recipes and loss-term entries): strict and finite."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors, and no float setting may be inf or NaN (lr=.inf would only fail
    later, as a non-finite loss)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
