"""The term registry: kinds that hold '_' read one way in method names, and what cannot is refused."""

from typing import Literal

import pytest

from normkd.losses import TERMS, method_kinds, method_label, register_term
from normkd.losses.kd import KDTerm


def _term(kind: str) -> type:
    return type(f"T_{kind}", (KDTerm,), {"__annotations__": {"kind": Literal[kind]}, "kind": kind})


@pytest.fixture
def registered():
    """Register throw-away kinds for one test, and take them out again."""
    added: list[str] = []

    def add(kind: str) -> None:
        register_term(_term(kind))
        added.append(kind)

    yield add
    for kind in added:
        TERMS.pop(kind, None)


def test_a_kind_with_an_underscore_works_in_every_spelling_of_a_method(registered):
    registered("mse_logits")
    for method in ("mse_logits", "norm+mse_logits", "norm_mse_logits", "mse_logits norm"):
        kinds = method_kinds(method)
        assert sorted(kinds) == ["mse_logits", "norm"][: len(kinds)] or kinds == ["mse_logits"]
    assert method_kinds("norm_mse_logits") == ["norm", "mse_logits"]
    assert method_kinds("mse_logits_kd") == ["mse_logits", "kd"]
    assert method_label("norm+mse_logits").startswith("NORM+")


def test_kinds_that_would_read_two_ways_or_cannot_be_written_are_refused(registered):
    for bad in ("norm_kd", "kd_norm_dkd", "Mse", "mse-logits", "mse__x", "_x", "vanilla", "kd"):
        with pytest.raises(ValueError):
            register_term(_term(bad))
        assert bad not in TERMS or bad == "kd"


def test_unknown_parts_are_named(registered):
    with pytest.raises(ValueError, match=r"\(unknown: foo\)"):
        method_kinds("norm_foo")
    with pytest.raises(ValueError, match=r"\(unknown: mse_logits\)"):
        method_kinds("norm+mse_logits")
    with pytest.raises(ValueError, match="names a term twice"):
        method_kinds("kd+kd")
