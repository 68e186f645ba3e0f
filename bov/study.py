"""A study as a researcher reads it: `sweeps/<name>.yaml` -> validated cells with their budgets.

A study file names a base preset and variant, an axis and its levels (a list of values of one config key,
or named sets of overrides), seeds, a budget (every level's, unless a level names its own), and a sampler:
`grid` crosses levels with seeds, `tpe` searches a space. `load_sweep` resolves it at one scale into every
cell's validated `ExperimentConfig`, before any compute; nothing here touches Optuna or MLflow (bov.sweep
runs a study).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bov.budget import Budget, model_shape, plan_budget, world_size
from bov.config import ConfigError, ExperimentConfig, load_config, override_value, parse_overrides
from bov.tracking import VAL_BPB, VAL_LOSS

SWEEPS_DIR = Path(os.environ.get("BOV_SWEEPS_DIR", Path(__file__).resolve().parent.parent / "sweeps"))
BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.max_flops")



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Base(_Strict):
    preset: str
    variant: str = "baseline"


class BudgetSpec(_Strict):
    """`steps` of the reference cell, turned into the same FLOPs (or tokens) for every cell; or, with
    `tokens_per_param`, that many tokens per non-embedding parameter of the reference cell (at its size)."""

    steps: int | None = Field(None, ge=1)  # None: the preset's own train.max_steps
    tokens_per_param: float | None = Field(None, gt=0)
    match: Literal["flops", "tokens", "steps"] = "flops"


class Cross(_Strict):
    """A second axis crossed with the first as one grid: a cell is (first level, second level, seed).

    `axis: budget`: levels are multiples of the study's budget (0.5, 1, 2, 4). `axis: size`: levels are model
    depths; width, heads and the embedding-like learning rates follow the base preset (`size_overrides`).
    Otherwise a dotted config key with a list of values, or a name with named override sets. `keep` selects
    the cells that run (a cell runs if it matches one selector, e.g. `{variant: baseline}`); default: all.
    """

    axis: str
    levels: Union[list[Any], dict[str, dict[str, Any]]]
    keep: list[dict[str, Any]] = []


class SearchParam(_Strict):
    low: float | None = None
    high: float | None = None
    log: bool = False
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None


class Pruner(_Strict):
    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


class Claim(_Strict):
    """A direction the paper reports without a number: `level` is `paper` (better or worse) than `than`."""

    level: str
    than: str
    paper: Literal["better", "worse"]


class PaperClaims(_Strict):
    """What the paper reports for this study's levels, checked by the verdict table (bov.stats.verdicts)."""

    source: str  # where: paper, table, scale, metric
    values: dict[str, float] = {}  # the paper's metric per level: the paper's delta of any two levels follows
    claims: list[Claim] = []  # directions the paper states without a number


class SweepSpec(_Strict):
    """One sweeps/<name>.yaml."""

    study: str
    description: str = ""
    base: Base
    axis: str  # a config key (model.bank_layers), `variant`, or a name for a mapping of override sets
    levels: Union[list[Any], dict[str, dict[str, Any]]] = []
    recipes: dict[str, dict[str, Any]] = {}  # named override sets a level can `extends:` without running them
    baseline_level: str | None = None
    cross: Cross | None = None  # a second axis (budget, size, ...) crossed with `axis`
    references: list[str] = []  # levels every level is compared with (default: the baseline level)
    paper: PaperClaims | None = None
    seeds: list[int] = [0]
    budget: BudgetSpec = BudgetSpec()
    overrides: dict[str, Any] = {}
    sampler: Literal["grid", "tpe"] = "grid"
    metric: Literal[VAL_BPB, VAL_LOSS] = VAL_BPB  # type: ignore[valid-type]
    space: dict[str, SearchParam] = {}  # tpe only
    n_trials: int | None = Field(None, ge=1)  # tpe only
    pruner: Pruner = Pruner()


@dataclass(frozen=True)
class Cell:
    level: str
    seed: int
    cfg: ExperimentConfig
    overrides: dict[str, Any] = field(default_factory=dict)  # what load_config got on top of preset + variant
    coords: dict[str, str] = field(default_factory=dict)  # a crossed study's cell: axis -> its level there


@dataclass
class Sweep:
    """A definition resolved at one scale: every cell's validated config, before any compute."""

    name: str  # the Optuna study and MLflow experiment
    spec: SweepSpec
    path: Path
    preset: str
    cells: list[Cell] = field(default_factory=list)  # grid; for tpe, one template cell
    overrides: dict[str, Any] = field(default_factory=dict)
    axes: list[dict[str, Any]] = field(default_factory=list)  # a crossed study's two axes: name, kind, levels

    @property
    def levels(self) -> list[str]:
        return list(dict.fromkeys(c.level for c in self.cells))

    @property
    def references(self) -> list[str]:
        """The levels every level is compared with, the baseline level first: analysis only, never a cell's config."""
        first = [self.spec.baseline_level] if self.spec.baseline_level else []
        return list(dict.fromkeys(first + self.spec.references))

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(c.seed for c in self.cells))

    def coords(self, level: str) -> dict[str, str]:
        """A crossed study's level as its coordinates ({} for a single axis)."""
        return next((c.coords for c in self.cells if c.level == level), {})

    def cell(self, level: str, seed: int) -> Cell:
        return next(c for c in self.cells if c.level == level and c.seed == seed)


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "layers_" + "_".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _read_spec(name: str, seeds: list[int] | None) -> tuple[Path, SweepSpec]:
    """The study file a name or path means, read and validated (with `seeds` in place of its own)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = SWEEPS_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown sweep {name!r}; available: {', '.join(list_sweeps())}")
    elif not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        spec = SweepSpec.model_validate(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "dict[")))
        raise ConfigError(f"{path}: {loc}: {err['msg']}") from None
    if spec.sampler == "grid" and not spec.levels:
        raise ConfigError(f"{path}: levels: a grid sweep needs at least one level")
    if spec.sampler == "tpe" and (not spec.space or spec.n_trials is None):
        raise ConfigError(f"{path}: a tpe sweep needs space and n_trials")
    if seeds is not None:
        spec = spec.model_copy(update={"seeds": list(seeds)})
    if len(set(spec.seeds)) != len(spec.seeds) or not spec.seeds:
        raise ConfigError(f"{path}: seeds must be distinct and not empty (got {spec.seeds})")
    return path, spec


def load_sweep(
    name: str,
    scale: str | None = None,
    seeds: list[int] | None = None,
    study: str | None = None,
    steps: int | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Sweep:
    """sweeps/<name>.yaml (or a path) -> Sweep with every cell validated; ConfigError names the file and key."""
    path, spec = _read_spec(name, seeds)
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {steps})")
    preset = scale or spec.base.preset
    if scale is None or scale == spec.base.preset:
        steps = steps if steps is not None else spec.budget.steps
    sweep = Sweep(study or f"{spec.study}-{preset}", spec, path, preset, overrides=parse_flat(overrides))
    if "/" in sweep.name or "\\" in sweep.name or sweep.name.startswith("."):  # the study gets a folder
        key = "--study" if study else f"{path}: study"
        raise ConfigError(f"{key} {sweep.name!r}: a study name cannot contain '/' or start with '.'")
    levels = _levels(spec, path)
    if bad := [lv for lv in levels if "/" in lv or lv.startswith(".")]:  # each level gets a folder
        raise ConfigError(f"{path}: level {bad[0]!r}: a level name cannot contain '/' or start with '.'")
    if spec.baseline_level is not None and spec.baseline_level not in levels:
        raise ConfigError(f"{path}: baseline_level {spec.baseline_level!r} is not a level ({', '.join(levels)})")
    _check_named_levels(spec, path, levels)

    groups = _second_levels(spec, path, preset)  # one group, None, unless the study is crossed

    def cell(level: str, group: str | None, seed: int, budget: dict[str, Any]) -> Cell:
        own_over, _ = groups[group]
        over = {**spec.overrides, **levels[level], **own_over, **sweep.overrides}
        variant = over.pop("variant", spec.base.variant)
        # a level that names its own budget keeps it (e.g. more epochs of the same unique tokens)
        own = {k: v for k, v in levels[level].items() if k in BUDGET_KEYS}
        budget = {**dict.fromkeys(BUDGET_KEYS), **own} if own else budget
        over = {**over, **budget, "train.seed": seed, "tracking.experiment": sweep.name}
        label = level if group is None else f"{level}@{group}"
        coords = {} if group is None else {spec.axis: level, spec.cross.axis: group}
        try:
            return Cell(label, seed, load_config(preset, variant, over), over, coords)
        except ConfigError as e:
            raise ConfigError(f"{path}: level {label}: {e}") from None

    # the budget: the reference cell's steps (or tokens per parameter), as FLOPs (or tokens) every cell of its
    # group gets; a budget axis scales it
    ref_level = spec.baseline_level or next(iter(levels))
    for group, (_, multiple) in groups.items():
        ref = cell(ref_level, group, spec.seeds[0], {}).cfg
        budget = _scaled(_budget(ref, spec.budget.match, steps, spec.budget.tokens_per_param), multiple)
        sweep.cells += [cell(level, group, seed, budget) for level in levels for seed in spec.seeds
                        if _kept(spec, level, group)]
    if spec.cross is not None:
        sweep.axes = [{"name": spec.axis, "kind": "levels", "levels": list(levels)},
                      {"name": spec.cross.axis, "kind": _kind(spec.cross.axis), "levels": list(groups)}]
    return sweep


def _check_named_levels(spec: SweepSpec, path: Path, levels: dict[str, Any]) -> None:
    """references and the paper's claims name levels of this study."""
    named = [("references", lv) for lv in spec.references]
    if spec.paper is not None:
        named += [("paper.values", lv) for lv in spec.paper.values]
        named += [(f"paper.claims[{i}]", lv) for i, c in enumerate(spec.paper.claims) for lv in (c.level, c.than)]
    for key, lv in named:
        if lv not in levels:
            raise ConfigError(f"{path}: {key}: {lv!r} is not a level ({', '.join(levels)})")


def parse_flat(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["train.lr_bank=0.1"]` -> {"train.lr_bank": 0.1} (dotted keys kept flat)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parse_overrides(overrides)  # same syntax checks as `bov train --set`
    return {k.strip(): override_value(k.strip(), v) for k, v in (o.split("=", 1) for o in overrides)}


def _levels(spec: SweepSpec, path: Path) -> dict[str, dict[str, Any]]:
    """Level label -> the overrides that make it."""
    if spec.sampler == "tpe":
        return {"trial": {}}
    if isinstance(spec.levels, dict):
        named = {**spec.recipes, **{str(k): dict(v or {}) for k, v in spec.levels.items()}}
        return {str(k): _extended(str(k), named, path, ()) for k in spec.levels}
    key = "variant" if spec.axis == "variant" else spec.axis
    if key != "variant" and "." not in key:
        raise ConfigError(f"{path}: axis {key!r}: a list of levels needs a dotted config key (e.g. model.{key})")
    labels = [_label(v) for v in spec.levels]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: levels: duplicate level in {spec.levels}")
    return {lab: {key: v} for lab, v in zip(labels, spec.levels)}


def _extended(name: str, named: dict[str, dict[str, Any]], path: Path, seen: tuple[str, ...]) -> dict[str, Any]:
    """A level's overrides with what it `extends:` (another level or a recipe, which may extend in turn) first."""
    own = dict(named[name])
    parent = own.pop("extends", None)
    if parent is None:
        return own
    if parent not in named:
        raise ConfigError(f"{path}: {name}.extends: {parent!r} is neither a level nor a recipe "
                          f"({', '.join(named)})")
    if parent in (*seen, name):
        raise ConfigError(f"{path}: {name}.extends: a cycle ({' -> '.join((*seen, name, parent))})")
    return {**_extended(parent, named, path, (*seen, name)), **own}


def _budget(ref: ExperimentConfig, match: str, steps: int | None, tokens_per_param: float | None = None) -> dict[str, Any]:
    """Every cell's budget override, from the reference cell at the sweep's scale."""
    if tokens_per_param is not None:  # tokens tied to the model's size, at this batch and sequence length
        _, params = model_shape(ref.model)
        per_step = ref.train.batch_size * ref.train.grad_accum * ref.model.seq_len * world_size(ref)
        non_embedding = sum(params.values()) - params["embedding"] - params["bank"]
        steps = max(1, round(tokens_per_param * non_embedding / per_step))
    if steps is not None:
        ref = ref.model_copy(update={"train": ref.train.model_copy(
            update={"max_steps": steps, "max_tokens": None, "max_flops": None})})
    b = plan_budget(ref, model_shape(ref.model)[0])
    none = dict.fromkeys(BUDGET_KEYS)
    if match == "steps":
        return {**none, "train.max_steps": b.steps}
    if match == "tokens":
        return {**none, "train.max_tokens": b.tokens}
    return {**none, "train.max_flops": b.flops}



def _scaled(budget: dict[str, Any], multiple: float) -> dict[str, Any]:
    if multiple == 1:
        return budget
    key, value = next((k, v) for k, v in budget.items() if v is not None)
    return {**budget, key: value * multiple if key == "train.max_flops" else max(1, round(value * multiple))}


def _kind(axis: str) -> str:
    return axis if axis in ("budget", "size") else "levels"


def _second_levels(spec: SweepSpec, path: Path, preset: str) -> dict[str | None, tuple[dict[str, Any], float]]:
    """A crossed study's second axis: level label -> (its overrides, its budget multiple); {None: ({}, 1)} if none."""
    c = spec.cross
    if c is None:
        return {None: ({}, 1.0)}
    if spec.sampler != "grid":
        raise ConfigError(f"{path}: cross: a crossed study is a grid (sampler: grid)")
    if c.axis in ("budget", "size") and not (isinstance(c.levels, list) and c.levels):
        raise ConfigError(f"{path}: cross.levels: a {c.axis} axis takes a list of numbers")
    if c.axis == "budget":
        if not all(isinstance(m, (int, float)) and m > 0 for m in c.levels):
            raise ConfigError(f"{path}: cross.levels: budget multiples must be positive numbers (got {c.levels})")
        out = {f"{m:g}x": ({}, float(m)) for m in c.levels}
    elif c.axis == "size":
        if not all(isinstance(d, int) and d >= 1 for d in c.levels):
            raise ConfigError(f"{path}: cross.levels: sizes are model depths, whole numbers >= 1 (got {c.levels})")
        base = load_config(preset, spec.base.variant, {k: v for k, v in spec.overrides.items() if k != "variant"})
        out = {f"depth{d}": (size_overrides(base, d), 1.0) for d in c.levels}
    else:
        out = {k: (v, 1.0) for k, v in _levels(SweepSpec.model_validate({**spec.model_dump(), "axis": c.axis,
                                                                          "levels": c.levels, "cross": None}), path).items()}
    if len(out) != len(c.levels):
        raise ConfigError(f"{path}: cross.levels: duplicate level in {c.levels}")
    if spec.paper is not None:  # its values name levels of one axis; a crossed cell has two
        raise ConfigError(f"{path}: paper: the paper's claims are checked in a single-axis study, not a crossed one")
    first = list(_levels(spec, path))
    for i, sel in enumerate(c.keep):
        for axis, value in sel.items():
            known = first if axis == spec.axis else list(out) if axis == c.axis else None
            if known is None:
                raise ConfigError(f"{path}: cross.keep[{i}]: {axis!r} is not an axis ({spec.axis}, {c.axis})")
            if _cross_label(spec, axis, value) not in known:
                raise ConfigError(f"{path}: cross.keep[{i}]: {axis}={value!r} is not a level ({', '.join(known)})")
    if bad := [lv for lv in out if "/" in lv or "@" in lv or lv.startswith(".")]:
        raise ConfigError(f"{path}: cross level {bad[0]!r}: a level name cannot contain '/' or '@' or start with '.'")
    return out


def _kept(spec: SweepSpec, level: str, group: str | None) -> bool:
    """Whether the cross's `keep` selectors let cell (level, group) run."""
    if group is None or not spec.cross.keep:
        return True
    coords = {spec.axis: level, spec.cross.axis: group}
    return any(all(str(coords.get(axis, "\0")) == _cross_label(spec, axis, v) for axis, v in sel.items())
               for sel in spec.cross.keep)


def _cross_label(spec: SweepSpec, axis: str, value: Any) -> str:
    """A selector's value as the label its axis gives it (budget 1 -> "1x", size 6 -> "depth6")."""
    if axis == spec.cross.axis == "budget" and isinstance(value, (int, float)):
        return f"{value:g}x"
    if axis == spec.cross.axis == "size" and isinstance(value, int):
        return f"depth{value}"
    return _label(value)


def size_overrides(base: ExperimentConfig, depth: int) -> dict[str, Any]:
    """The model at `depth` layers, scaled the way the presets are: width = the base's width per layer x depth
    (rounded to whole heads of the base's head_dim), heads from the width, the base's kv-head ratio; the
    AdamW rates of the embedding-like tables (embedding, unembedding, bank) scale as 1/sqrt(width), the
    reference's rule (tiny's 0.4 = 0.2 x (768/192)^0.5); matrix (Muon) and scalar rates stay."""
    m, t = base.model, base.train
    heads = max(1, round(m.d_model / m.n_layers * depth / m.head_dim))
    width = heads * m.head_dim
    kv = max(1, heads * m.n_kv_heads // m.n_heads)
    scale = (m.d_model / width) ** 0.5
    return {"model.n_layers": depth, "model.d_model": width, "model.n_heads": heads, "model.n_kv_heads": kv,
            "train.lr_embedding": t.lr_embedding * scale, "train.lr_unembedding": t.lr_unembedding * scale,
            "train.lr_bank": t.lr_bank * scale}


def cell_budgets(sweep: Sweep) -> list[tuple[Budget, dict[str, int]]]:
    """(Budget, parameter split) of every cell; each distinct model is sized once (`bov.budget.model_shape`)."""
    out = []
    for c in sweep.cells:
        fpt, params = model_shape(c.cfg.model)
        out.append((plan_budget(c.cfg, fpt, world_size(c.cfg)), params))
    return out
