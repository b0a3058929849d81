"""Fuzzing the recipe loader: any dict or ``--set`` string either validates or raises ConfigError.

ConfigError is the documented user error (one line, exit code 2 in the CLI); any other exception
escaping recipe_from_dict / apply_overrides / load_recipe would be a traceback, i.e. a bug.
"""

import contextlib
import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from normkd.config import (
    ConfigError,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

BASE = {
    "name": "fuzz",
    "task": "distill",
    "data": {"kind": "digits", "n_train": 300},
    "teacher": {"model": "resnet8x4", "weights": "teacher.safetensors"},
    "student": {"model": "resnet8", "kwargs": {}},
    "loss": [{"kind": "ce"}, {"kind": "kd", "temperature": 4.0}, {"kind": "norm", "n": 4}],
    "logit_standardization": {"enabled": False},
    "optim": {"epochs": 20, "lr": 0.05, "milestones": [10, 15]},
    "engine": {"device": "cpu", "amp": "off"},
}
FUZZ = settings(max_examples=250, deadline=None)

# Keys the recipe knows (so edits often land on real fields), list indices and junk.
KNOWN = sorted(
    {
        *BASE,
        *(k for v in BASE.values() if isinstance(v, dict) for k in v),
        *("weight", "temperature", "n", "bn", "residual", "reduce", "ramp", "stage", "p"),
        *("alpha", "beta", "warmup", "feat_dim", "nce_k", "negatives", "label_smoothing"),
        *("schedule", "momentum", "nesterov", "weight_decay", "warmup_epochs", "step_size"),
        *("root", "batch_size", "workers", "seed", "out_dir", "run_name", "scale", "base"),
        *("0", "1", "2", "3", "-1", "\u00b2", "\u0663", "a\nb", ""),  # superscript 2, Arabic 3
    }
)
keys = st.sampled_from(KNOWN) | st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["ce", "kd", "norm", "dkd", "crd", "cosine", "resnet8", "cpu", "max"])
    | st.binary(max_size=4)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(keys | st.integers(-2, 2), inner, max_size=3)
    ),
    max_leaves=8,
)


def _edit(data: dict, path: list[str], value) -> None:
    """Set ``value`` at ``path`` where the path exists or can be created; stop where it cannot."""
    node = data
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and part.isascii() and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and last.isascii() and last.isdigit() and int(last) < len(node):
        node[int(last)] = value


def _validates_or_config_error(data) -> None:
    try:
        recipe = recipe_from_dict(data, "fuzz.yaml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml: ")
        assert "\n" not in str(err)
        return
    # A recipe that validates survives the trip through config.yaml unchanged.
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_base_recipe_is_valid():
    recipe_from_dict(copy.deepcopy(BASE))


@FUZZ
@given(st.lists(st.tuples(st.lists(keys, min_size=1, max_size=4), values), max_size=4))
def test_random_edits_of_a_valid_recipe(edits):
    data = copy.deepcopy(BASE)
    for path, value in edits:
        _edit(data, path, value)
    _validates_or_config_error(data)


@FUZZ
@given(values)
def test_any_document_as_a_whole_recipe(doc):
    _validates_or_config_error(doc)


# --set strings: a dotted key (often a real one) = a YAML value (often a tricky one).
dotted = st.lists(keys.filter(lambda k: "." not in k and "=" not in k), min_size=0, max_size=4)
yaml_values = st.sampled_from(
    [
        *("1", "-1", "0", "1e400", ".inf", "-.inf", ".nan", "null", "~", "true", "'x'", "''"),
        *("[1, 2]", "[]", "{}", "{a: 1}", "{kind: ce}", "[{kind: magic}]", "[", "]:", "{", "*a"),
        *("!!python/object/apply:os.system ['true']", "!!binary aGk=", "2001-01-01", "0x10"),
        *("&a [*a]", "!!set {a}", "? a", "a: b: c", "- a", '"\\x00"', "%YAML 1.2", "resnet8"),
    ]
) | st.text(max_size=10)
set_items = st.tuples(dotted.map(".".join), yaml_values).map("=".join) | st.text(max_size=12)


@pytest.fixture(scope="module")
def base_yaml(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "_base.yaml").write_text(
        yaml.safe_dump({k: v for k, v in BASE.items() if k != "name"})
    )
    (folder / "recipe.yaml").write_text("base: _base.yaml\nname: fuzz\n")
    return folder / "recipe.yaml"


@FUZZ
@given(items=st.lists(set_items, max_size=4))
@example(items=["-1=\x1f\n"])  # CI found it: the echoed value carried its newline
def test_random_set_overrides(items, base_yaml):
    try:
        recipe = load_recipe(base_yaml, items)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


@FUZZ
@given(items=st.lists(set_items, max_size=4), doc=values)
def test_overrides_on_any_document(items, doc):
    if not isinstance(doc, dict):
        doc = {"x": doc}
    try:
        data = apply_overrides(doc, items)
    except ConfigError:
        return
    assert isinstance(data, dict)
    _validates_or_config_error(data)


# What the fuzzing found (fixed): each was a silent mistake before.


def test_override_below_a_null_section_is_kept():
    data = apply_overrides({"teacher": None}, ["teacher.model=resnet8", "teacher.weights=t.pt"])
    assert data["teacher"] == {"model": "resnet8", "weights": "t.pt"}


@pytest.mark.parametrize("item", ["optim.lr=.inf", "loss.0.weight=.nan", "loss.1.temperature=.inf"])
def test_non_finite_numbers_are_refused(item):
    with pytest.raises(ConfigError, match="finite number"):
        recipe_from_dict(apply_overrides(BASE, [item]))


@pytest.mark.parametrize("key", ["num_classes", "weights"])
def test_model_kwargs_cannot_shadow_recipe_keys(key):
    with pytest.raises(ConfigError, match=f"student.kwargs: {key} cannot be set in kwargs"):
        recipe_from_dict(apply_overrides(BASE, [f"student.kwargs.{key}=3"]))


@FUZZ
@given(items=st.lists(set_items, max_size=4))
def test_overrides_never_edit_the_callers_dict(items):
    data = copy.deepcopy(BASE)
    with contextlib.suppress(ConfigError):
        apply_overrides(data, items)
    assert data == BASE


@pytest.mark.parametrize(
    "item,message",
    [
        ("loss.\u00b2.weight=1", "is not an index"),  # '²'.isdigit() but int('²') fails
        ("loss.\n.weight=1", "unprintable characters"),  # would make a two-line message
    ],
)
def test_odd_override_keys_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(BASE, [item])
