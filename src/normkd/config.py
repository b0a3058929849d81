"""Typed recipes: YAML (+ ``base:`` inheritance) + ``--set key=value`` overrides -> validated Recipe.

All validation of user settings happens here, so the engine can trust what it receives; every
error names the key and, where there is a fixed set, the allowed values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from normkd.errors import ConfigError
from normkd.losses import TERMS
from normkd.schema import Strict

__all__ = [
    "ConfigError",
    "Recipe",
    "apply_overrides",
    "load_recipe",
    "recipe_from_dict",
]


# Bounds on the integers a recipe feeds to torch, numpy and allocations, checked where the recipe
# is read: far beyond any real run, well within what a seeded generator (numpy: < 2**32) and a
# tensor shape can hold, so a typo is one line and never an overflow or a huge allocation.
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
MAX_IMAGE_SIZE = 4096
MAX_BATCH = 65536
MAX_WORKERS = 256
MAX_EPOCHS = 1_000_000
MAX_COUNT = 1_000_000_000
MAX_INT = SEED_MAX  # any integer in a recipe (loss terms and model kwargs included)


class DataCfg(Strict):
    """Where the images come from and how they are batched."""

    # folder: ROOT/<class>/* images (or ROOT/train/<class>/, ROOT/val/<class>/); external:
    # loaders passed from Python (normkd.distill), nothing for the CLI to build.
    kind: Literal["digits", "cifar100", "imagenet", "folder", "external"] = "digits"
    root: Path | None = None
    image_size: Annotated[int, Field(ge=1, le=MAX_IMAGE_SIZE)] = (
        224  # folder: train crop / val centre crop side
    )
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2  # folder without train/ and val/
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 64
    eval_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 256
    workers: Annotated[int, Field(ge=0, le=MAX_WORKERS)] = 4
    augment: bool = True
    n_train: Annotated[int, Field(ge=1, le=MAX_COUNT)] = (
        1000  # digits: size of the seeded train split (the rest is test)
    )
    split_seed: Seed = 0
    # digits / cifar100: train and test on a seeded random part of each (smoke runs); 1 = all
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # folder / imagenet: leave out files whose header is no readable image (not an image, empty,
    # absurdly large) instead of refusing the folder; they are counted in data.json.
    skip_bad: bool = False
    # random images of the kind's shape instead of the real data: for dry runs only
    # (`--dry-run --fake-data`), which otherwise fail on missing or broken data like a run does.
    fake: bool = False


class ModelCfg(Strict):
    """A zoo model by name, ``timm:<name>``, ``torchvision:<name>`` or ``external`` (an object
    passed from Python), with optional local weights, or timm's pretrained weights.

    A student's ``weights`` whose classifier has another class count (ImageNet weights, 10
    classes here) load all but that classifier, which starts fresh; a teacher's must fit whole.
    """

    model: str
    weights: Path | None = None
    # timm: models only, through timm's own loader (which replaces a classifier of another class
    # count): pretrained fetches timm's weights (a download, into timm's cache); pretrained_file
    # reads the same file from disk (offline).
    pretrained: bool = False
    pretrained_file: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelCfg:
        """Pretrained weights come through timm's loader, so only timm: models take them."""
        chosen = [k for k in ("pretrained", "pretrained_file") if getattr(self, k)]
        if chosen and not self.model.startswith("timm:"):
            raise ValueError(
                f"{' and '.join(chosen)}: only timm: models load pretrained weights through "
                f"timm; for {self.model!r} save them to a file and set weights: FILE (a student's "
                "classifier of another class count is replaced)"
            )
        if chosen and self.weights is not None:
            raise ValueError(
                f"weights and {' and '.join(chosen)} are both set: choose one (weights: a "
                "checkpoint of your own; pretrained/pretrained_file: timm's weights)"
            )
        return self

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        from normkd.models import list_models
        from normkd.models.external import check_name
        from normkd.models.registry import unknown_model_message

        # timm:/torchvision: names are checked there (an unknown one lists close matches)
        if not check_name(v) and v not in list_models():
            raise ValueError(unknown_model_message(v))
        return v

    @field_validator("kwargs")
    @classmethod
    def _own_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(
            {"num_classes", "weights", "pretrained", "pretrained_file", "pretrained_cfg_overlay"}
            & set(v)
        )
        if taken:
            raise ValueError(
                f"{', '.join(taken)} cannot be set in kwargs (num_classes comes from the data; "
                "weights, pretrained and pretrained_file are keys of their own)"
            )
        return v


# The loss list is a union of every registered term's config (losses/<term>.py), told apart by
# ``kind``: a new term file is a new valid kind here, with its own keys and defaults.
Term = Annotated[Union[tuple(TERMS.values())], Field(discriminator="kind")]  # noqa: UP007


class LogitStdCfg(Strict):
    """The authors' code standardises logits before CE/KL (layer norm over classes, x scale)."""

    enabled: bool = False
    scale: PositiveFloat = 2.5


class OptimCfg(Strict):
    """The optimizer (SGD or AdamW) and the learning-rate schedule (per-epoch, with optional
    linear warm-up)."""

    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 240
    # adamw: decoupled weight decay (Loshchilov & Hutter); it wants a far lower lr (about 1e-3)
    # and usually more weight_decay (about 0.05) than SGD's defaults below.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw, each in [0, 1)
    eps: PositiveFloat = 1e-8  # adamw
    weight_decay: NonNegativeFloat = 5e-4
    # false: no decay on 1-D parameters (normalisation layers' scales and shifts) and biases, as
    # timm does; true decays every parameter, as the authors' code (and the shipped recipes).
    weight_decay_norm_bias: bool = True
    grad_clip: NonNegativeFloat = 0.0  # clip the global gradient L2 norm per step to this; 0: off
    schedule: Literal["multistep", "step", "cosine", "constant"] = "multistep"
    milestones: list[PositiveInt] = Field(default_factory=lambda: [150, 180, 210], max_length=1000)
    step_size: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 30
    lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    warmup_epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] = 0
    # data.batch_size is the global batch over all processes; with "linear", the lr used is
    # lr * global_batch / lr_reference_batch (Goyal et al.), so recipes stay valid when it changes.
    lr_scaling: Literal["none", "linear"] = "none"
    lr_reference_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 256

    @model_validator(mode="after")
    def _check(self) -> OptimCfg:
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError(
                f"optim.nesterov is an SGD setting; optim.optimizer is {self.optimizer}"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must each lie in [0, 1), got {list(self.betas)}")
        if sorted(self.milestones) != self.milestones:
            raise ValueError(f"optim.milestones must be increasing, got {self.milestones}")
        return self


class EngineCfg(Strict):
    """How the run executes: device, precision, logging, output."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (default): bf16 autocast where the device runs bf16 natively (CUDA with bf16 support;
    # CPUs with AVX512-BF16 or AMX), fp32 elsewhere (emulated bf16 is ~10x slower on AVX2 CPUs).
    # off: fp32, what the authors'-code fidelity recipes (*_authors.yaml) ask for explicitly.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # auto (default): channels-last memory where amp runs bf16 / fp16 (the oneDNN / cuDNN fast
    # path for reduced-precision convs: +8% a NORM+KD step on an AVX512-BF16 CPU), off in fp32.
    channels_last: bool | Literal["auto"] = "auto"
    # torch.compile of the whole step, NORM included (one graph): +13% a resnet32x4 -> resnet8x4
    # step on a 2-core CPU after ~60 s of compiling; off by default, for long runs.
    compile: bool = False
    seed: Seed = 0
    out_dir: Path = Path("runs")
    run_name: str | None = None
    quiet: bool = False
    eval_every: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1
    sync_bn: bool = False  # multi-GPU: synchronise the student's BatchNorm statistics across ranks
    # Re-estimate the student's BatchNorm running statistics (its terms' modules' too) on training
    # batches before each evaluation, so what is evaluated, checkpointed, merged and saved uses
    # statistics of its final weights. auto: on when a BatchNorm has momentum below 0.1 or None
    # (cumulative), whose running averages lag the weights of a short run (torchvision/timm
    # MobileNets: 0.01).
    bn_recalibrate: Literal["auto", "on", "off"] = "auto"
    bn_recalibrate_batches: Annotated[int, Field(ge=1, le=MAX_COUNT)] = (
        50  # or the whole epoch when it has fewer
    )
    # Warn (once, training goes on) when the evaluation top-1 is still within 1.5x chance after
    # this many epochs (the last epoch of a shorter run); 0: never.
    chance_check_epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] = 3

    @field_validator("bn_recalibrate", "amp", mode="before")
    @classmethod
    def _on_off(cls, v: object) -> object:
        """YAML reads a bare on/off as a boolean."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not (
            v.startswith("cuda:") and v[5:].isdigit()
        ):
            raise ValueError(f"engine.device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v


class Recipe(Strict):
    """One training job: a teacher (``train``) or a distilled student (``distill``)."""

    name: str
    task: Literal["train", "distill"] = "distill"
    data: DataCfg = Field(default_factory=DataCfg)
    teacher: ModelCfg | None = None
    student: ModelCfg
    loss: list[Term] = Field(default_factory=lambda: [TERMS["ce"]()])
    logit_standardization: LogitStdCfg = Field(default_factory=LogitStdCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    engine: EngineCfg = Field(default_factory=EngineCfg)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        kinds = [t.kind for t in self.loss]
        if not kinds:
            raise ValueError("loss must list at least one term")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"loss lists a term kind twice: {kinds}")
        needs_teacher = sorted(t.kind for t in self.loss if t.needs_teacher())
        if self.task == "distill" and self.teacher is None:
            raise ValueError("task 'distill' needs a teacher: {model: NAME, weights: PATH}")
        if self.task == "train" and needs_teacher:
            raise ValueError(
                f"task 'train' has no teacher, but loss terms {needs_teacher} need one; "
                "use task: distill"
            )
        if self.optim.schedule == "multistep" and any(
            m >= self.optim.epochs for m in self.optim.milestones
        ):
            raise ValueError(
                f"optim.milestones {self.optim.milestones} must be < optim.epochs "
                f"({self.optim.epochs})"
            )
        return self

    def term(self, kind: str) -> Any:
        """The settings of the recipe's term of ``kind``, or None when it has none."""
        return next((t for t in self.loss if t.kind == kind), None)

    def run_dir(self) -> Path:
        return self.engine.out_dir / (self.engine.run_name or self.name)


# ----------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' inheritance loops back to itself")
    if not path.is_file():
        raise ConfigError(
            f"recipe not found: {path} (give a path, or a shipped name such as demo/norm_kd; "
            "`normkd recipes` lists them)"
        )
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except ValueError as err:  # YAMLError, duplicate keys, nesting
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string, got {base!r}")
    return _deep_merge(_read_yaml(path.parent / base, (*seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML; list items by index: loss.1.weight)."""
    data = copy.deepcopy(data)  # never edit the caller's nested dicts and lists
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if not key.isprintable():
            raise ConfigError(f"--set {item!r}: the key holds unprintable characters")
        try:
            value = _parse_yaml(raw)
        except ValueError as err:
            raise ConfigError(f"--set {_clip(item)}: value is not valid YAML: {err}") from None
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {key}: {'.'.join(parts[:i])} has {len(node)} items; "
                        f"{part!r} is not an index"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:  # absent or null (teacher: null): a new mapping
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


MAX_DEPTH = 50  # a recipe nests a few levels; far deeper input is an attack or an accident
MAX_ECHO = 80  # characters of a user's value an error message repeats


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (a second ``optim:`` would
    otherwise silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, list | dict):
                continue  # unhashable: SafeLoader reports it itself
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_clip(repr(key))} appears twice (line {line})", None
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    """safe_load with unique keys and bounded nesting; any problem is a one-line ValueError."""
    depth = 0
    for ch in text:  # a cheap bound before the parser recurses into it
        depth += ch in "[{"
        depth -= ch in "]}"
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ValueError(_yaml_problem(err)) from None
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    _count_values(value)  # aliases can make a few hundred bytes stand for millions of values
    return value


MAX_VALUES = 10_000  # values in one recipe (a real one holds about a hundred)


def _count_values(data: Any) -> None:
    """Raise ValueError when ``data`` holds more than MAX_VALUES values, counting a value each
    time it is reached (a YAML alias repeats its whole anchor); stops at the bound."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ValueError(
                f"holds more than {MAX_VALUES:,} values (YAML aliases repeating a structure?)"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def _check_values(data: Any) -> None:
    """Raise ValueError naming the key of an integer beyond MAX_INT or a string holding a
    control character (a NUL cannot be a path); run after :func:`_count_values` bounds it."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            items: Any = ((_loc_part(k), v) for k, v in node.items())
        elif isinstance(node, list | tuple):
            items = ((str(i), v) for i, v in enumerate(node))
        else:
            items = ()
        stack.extend((v, f"{where}.{k}" if where else k) for k, v in items)
        if isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_INT:
            raise ValueError(
                f"{where}: integer out of range (a recipe's integers lie within "
                f"-{MAX_INT}..{MAX_INT})"
            )
        if isinstance(node, str) and any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in node):
            raise ValueError(f"{where}: {_clip(repr(node))} holds a control character")


def _clip(text: str, limit: int = MAX_ECHO) -> str:
    """A user's value as an error message repeats it: one line (unprintables escaped), bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 4])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{where}"


def _loc_part(p: Any) -> str:
    """A key as it appears in an error path; odd keys (empty, newlines) are quoted."""
    return (
        p
        if isinstance(p, str) and p.isprintable() and p and "." not in p
        else (str(p) if isinstance(p, int) else repr(p))
    )


def _format_errors(err: ValidationError, source: str) -> str:
    msgs = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS]:
        loc = ".".join(_loc_part(p) for p in e["loc"] if not (isinstance(p, str) and p in _KINDS))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            kind = next((p for p in e["loc"] if isinstance(p, str) and p in _KINDS), None)
            if kind is not None:
                msg += f"; valid keys for '{kind}': {', '.join(sorted(_TERM_FIELDS[kind]))}"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown loss term kind; valid kinds: {', '.join(_KINDS)}"
        elif e["type"] == "union_tag_not_found":
            msg = f"each loss term needs 'kind' (one of: {', '.join(_KINDS)})"
        msgs.append(_clip(f"{loc}: {msg}" if loc else msg, MAX_MESSAGE))
    if len(errors) > MAX_ERRORS:
        msgs.append(f"and {len(errors) - MAX_ERRORS:,} more")
    return f"{source}: " + "; ".join(msgs)


MAX_ERRORS = 5  # problems one message lists
MAX_MESSAGE = 600  # characters of each


_KINDS = tuple(sorted(TERMS))
_TERM_FIELDS = {kind: list(cls.model_fields) for kind, cls in TERMS.items()}


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a plain dict into a Recipe, raising ConfigError with readable messages."""
    try:
        _count_values(data)
        _check_values(data)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


SHIPPED = Path(__file__).resolve().parent / "configs"


def find_recipe(name: str | Path) -> Path:
    """A recipe file by path, or a shipped one by its name under configs/ (``demo/norm_kd``,
    ``cifar100/resnet32x4__resnet8x4/norm.yaml``), so recipes work from any folder."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (SHIPPED / path, SHIPPED / f"{path}.yaml"):
        if candidate.is_file() and SHIPPED in candidate.resolve().parents:
            return candidate
    return path


def shipped_recipes() -> list[str]:
    """Every shipped recipe's name, as ``normkd recipes`` lists them."""
    return sorted(
        str(p.relative_to(SHIPPED).with_suffix(""))
        for p in SHIPPED.rglob("*.yaml")
        if not p.name.startswith("_")
    )


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, task: str | None = None
) -> Recipe:
    """Read a YAML recipe (a path or a shipped name; following ``base:``), apply ``--set``
    overrides, validate. ``task``: the command's (``normkd train``), for a recipe naming none."""
    path = find_recipe(path)
    data = _read_yaml(Path(path))
    if task is not None:
        data.setdefault("task", task)
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain (YAML/JSON-safe) dict of the resolved recipe, as written to the run directory."""
    return recipe.model_dump(mode="json")
