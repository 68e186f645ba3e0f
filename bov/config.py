"""Typed, validated experiment configuration: presets + variants + dotted overrides.

`load_config("tiny", "bov", ["model.bank_layers=every_other"])` merges, in order,
the scale preset `ablations/scales/<preset>.yaml`, the named variant
`ablations/variants/<variant>.yaml` and the overrides, then validates the result
into one `ExperimentConfig`. Every error is one line that names the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ABLATIONS_DIR = Path(os.environ.get("BOV_ABLATIONS_DIR", Path(__file__).resolve().parent.parent / "ablations"))

BankRule = Literal[
    "none", "last_third", "every_other", "second_half", "last_two_thirds", "all", "all_but_first"
]
BANK_RULES: tuple[str, ...] = BankRule.__args__  # type: ignore[attr-defined]
GATE_CHANNELS = 12  # value-embedding gate reads x[..., :12] (modded-nanogpt / nanochat)


# ----------------------------------------------------------------------------- the value-path vocabulary
# The levels users type, defined once: the config validates against them, bov.plan resolves them into a
# per-layer plan, bov.model computes them (bov.model.VALUE_SOURCES holds one function per source).


@dataclass(frozen=True)
class SourceSpec:
    """What a context-free (or earlier-layer) value source needs from the rest of the model."""

    symbol: str  # how `bov describe` writes it in a layer's value formula
    doc: str
    applies_w_v: bool = False  # it projects with the layer's own W_V (so the layer keeps one)
    reads: Callable[[int], tuple[int, ...]] = lambda layer: ()  # earlier layers whose values it reads


VALUE_SOURCES: dict[str, SourceSpec] = {
    "bank": SourceSpec("E_v[i]", "a learned table row of the token id"),
    "x0": SourceSpec("x0 W_V", "the layer's own projection of the initial embedding", applies_w_v=True),
    "v1": SourceSpec("V_0", "the first layer's value (at layer 0: its own x W_V)", reads=lambda layer: (0,) if layer else ()),
    "own": SourceSpec("x_l W_V", "the layer's own value, only rescaled (the control of BoV Table 1 row 2)",
                      applies_w_v=True),
}
Source = Literal[tuple(VALUE_SOURCES)]  # type: ignore[valid-type]
Coeff = Literal["fixed", "learned", "learned_per_head", "gate"]


def resolve_bank_layers(rule: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """A `bank_layers` level -> sorted target layer indices (documented in docs/axes.md)."""
    L = n_layers
    if not isinstance(rule, str):
        layers = list(rule)
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"model.bank_layers: layer {bad[0]} out of range 0..{L - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"model.bank_layers: duplicate layer in {layers}")
        if not layers:
            raise ValueError("model.bank_layers: empty list; use none for no target layer")
        return tuple(sorted(layers))
    rules = {
        "none": lambda l: False,
        "last_third": lambda l: l >= (2 * L) // 3,
        "every_other": lambda l: l % 2 == (L - 1) % 2,  # the last layer is always in
        "second_half": lambda l: l >= L // 2,
        "last_two_thirds": lambda l: l >= L // 3,
        "all": lambda l: True,
        "all_but_first": lambda l: l >= 1,
    }
    layers = tuple(l for l in range(L) if rules[rule](l))
    if rule != "none" and not layers:
        raise ValueError(f"model.bank_layers={rule} selects no layer of a {L}-layer model")
    return layers


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class ConfigError(ValueError):
    """A configuration problem, always reported as one line naming the key."""


class DataError(ValueError):
    """A data problem (missing file, unreachable hub id, empty corpus), one line naming the key or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Section):
    """Decoder shape plus the value-path design axes (names are what users type)."""

    n_layers: int = Field(4, ge=1)
    d_model: int = Field(64, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(16, ge=2)
    vocab_size: int = Field(512, ge=2)
    seq_len: int = Field(64, ge=1)
    mlp: Literal["relu2", "swiglu"] = "relu2"
    mlp_ratio: float = Field(4.0, gt=0)
    rope_base: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    logit_softcap: float | None = Field(None, gt=0)
    # Initialisation of what the optimizer starts from. "scaled": GPT-2's residual-branch outputs (attention
    # o_proj, MLP down) drawn with std 1/sqrt(fan_in * 2L); "zero": those start at zero, as the paper's
    # nanochat-based code, so every block starts as the identity. unembedding_init_std None: 1/sqrt(d_model).
    residual_init: Literal["scaled", "zero"] = "scaled"
    unembedding_init_std: float | None = Field(None, gt=0)
    # Sliding windows as in the paper's 135M/780M ("SSSL"): the pattern repeats over
    # layers, S = short window, L = full context; the last layer is always L.
    window_pattern: str = Field("L", pattern=r"^[SL]+$")
    short_window: int = Field(512, ge=1)

    # --- value-path design axes -------------------------------------------------
    bank_layers: Union[BankRule, list[int]] = "none"
    # "own": the layer's own x_l W_V, scaled by the coefficient (the control of BoV Table 1 row 2)
    value_source: Source = "bank"  # VALUE_SOURCES
    value_mode: Literal["context_free", "mixed"] = "context_free"
    value_coeff: Coeff = "learned"
    value_residual: Literal["off", "identity", "learned", "neutreno"] = "off"
    neutreno_lambda: float = 0.4  # NeuTRENO: y_l += lam * (V_0 - V_l) after attention
    # Depth-Attention: before sequence attention, attend over earlier layers' (key, mixed value)
    depth_attention: bool = False
    depth_stride: int | None = Field(None, ge=1)  # candidates j < l with j % stride == 0; None: L // 2
    # DenseFormer: after each block, a learned depth-weighted average of all earlier block outputs
    denseformer: bool = False
    bank_init: Literal["aligned", "normal", "uniform", "zeros"] = "aligned"
    bank_init_std: float = Field(0.02, gt=0)
    bank_sharing: Literal["per_layer", "shared"] = "per_layer"

    @field_validator("bank_layers", mode="before")
    @classmethod
    def _bank_layers_kind(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in BANK_RULES:
            raise ValueError(f"unknown level {v!r}; allowed: {', '.join(BANK_RULES)} or a list of layer indices")
        if isinstance(v, (list, tuple)) and not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ValueError("an explicit layer list must hold integers")
        return list(v) if isinstance(v, tuple) else v

    @field_validator("value_residual", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @field_validator("depth_attention", "denseformer", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        return {"on": True, "off": False}.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim ({self.head_dim}) must be even for RoPE")
        targets = resolve_bank_layers(self.bank_layers, self.n_layers)  # raises on bad lists
        set_by_user = self.model_fields_set
        defaults = {k: f.default for k, f in type(self).model_fields.items()}

        def changed(key: str) -> bool:
            return key in set_by_user and getattr(self, key) != defaults[key]

        if not targets:
            for key in ("value_source", "value_mode", "value_coeff", "bank_init", "bank_sharing"):
                if changed(key):
                    raise ValueError(f"model.{key} has no effect when model.bank_layers resolves to no layer")
        if self.value_source != "bank":
            for key in ("bank_init", "bank_sharing", "bank_init_std"):
                if changed(key):
                    raise ValueError(
                        f"model.{key}={getattr(self, key)} needs model.value_source=bank "
                        f"(got {self.value_source}: there is no table)"
                    )
        if self.value_source == "own" and targets and self.value_mode != "context_free":
            raise ValueError(
                "model.value_mode=mixed with model.value_source=own adds the own value to itself; "
                "value_source=own already scales the contextual value"
            )
        if self.value_coeff == "gate" and targets:
            if self.value_mode != "mixed":
                raise ValueError(
                    "model.value_coeff=gate needs model.value_mode=mixed (a gate reads the residual stream, "
                    "so a gated value is not context-free)"
                )
            if self.d_model < GATE_CHANNELS:
                raise ValueError(f"model.value_coeff=gate needs model.d_model >= {GATE_CHANNELS}")
        if self.value_residual != "off" and not [l for l in range(1, self.n_layers) if l not in targets]:
            raise ValueError(
                "model.value_residual acts on layers >= 1 that hold no bank, and "
                f"model.bank_layers={self.bank_layers} leaves none"
            )
        if self.depth_stride is not None and not self.depth_attention:
            raise ValueError("model.depth_stride needs model.depth_attention=on")
        if changed("neutreno_lambda") and self.value_residual != "neutreno":
            raise ValueError("model.neutreno_lambda needs model.value_residual=neutreno")
        if self.window_pattern != "L" and "S" in self.window_pattern and self.short_window >= self.seq_len:
            raise ValueError(f"model.short_window ({self.short_window}) must be < model.seq_len ({self.seq_len})")
        return self


# A named corpus (`corpus:wikipedia-en/<files>`, bov.corpora) hashes as the path the studies gave before names
# existed, so their stores and the records in results/ keep their config hashes.
CORPUS_PREFIX, LEGACY_CORPUS_ROOT = "corpus:", "../shared/data"


def _hashed_source(source: str | None) -> str | None:
    if source and source.startswith(CORPUS_PREFIX):
        return f"{LEGACY_CORPUS_ROOT}/{source[len(CORPUS_PREFIX):]}"
    return source


class DataConfig(_Section):
    """Where text comes from and how it is tokenized (used by bov.data)."""

    source: str = "stdlib"  # "stdlib" (embedded offline corpus), a path/glob, or a hub dataset id
    hub_config: str | None = None
    streaming: bool = False
    text_field: str = "text"
    doc_split: Literal["file", "blank_line"] = "file"
    tokenizer: str | None = None  # tokenizer.json / directory; None trains a byte-level BPE
    val_fraction: float = Field(0.05, gt=0, lt=1)
    val_source: str | None = None  # a separate validation corpus; else a document-level split
    max_docs: int | None = Field(None, ge=1)
    num_proc: int | None = Field(None, ge=1)  # tokenizing processes; None: every core
    # Train only on N tokens of the training stream (a fixed random sample of its windows, the same
    # for every seed and variant), repeated as the budget needs: a count, or "0.5x" = half the
    # tokens the run trains on (repetition at fixed compute).
    max_unique_tokens: Union[int, str, None] = None

    def hashed(self, exclude: set[str] | None = None) -> dict[str, Any]:
        """This data setting as hashes see it: a named corpus as its legacy path."""
        d = self.model_dump(mode="json", exclude=exclude)
        return {**d, "source": _hashed_source(d["source"]), "val_source": _hashed_source(d["val_source"])}

    @field_validator("max_unique_tokens")
    @classmethod
    def _unique(cls, v: Any) -> Any:
        if isinstance(v, str) and not (v.endswith("x") and _positive_float(v[:-1])):
            raise ValueError(f"{v!r} is neither a token count nor a fraction of the tokens trained like 0.5x")
        if isinstance(v, int) and v < 2:
            raise ValueError(f"{v} must be at least 2 tokens")
        return v


class TrainConfig(_Section):
    """Optimization recipe and budget (used by bov.train)."""

    seed: int = Field(0, ge=0, lt=2**32)  # what numpy's seeding accepts
    batch_size: int = Field(8, ge=1)  # sequences per device per micro-batch
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_flops: float | None = Field(None, gt=0)
    optimizer: Literal["adamw", "muon", "normuon"] = "adamw"  # bov.optim says what each is
    lr_matrix: float = Field(3e-3, gt=0)
    lr_embedding: float = Field(3e-3, gt=0)
    lr_unembedding: float = Field(3e-3, gt=0)
    lr_bank: float = Field(3e-3, gt=0)
    lr_scalar: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    bank_weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd", "constant"] = "wsd"
    warmup_steps: int = Field(40, ge=0)
    decay_start: float = Field(0.65, ge=0, le=1)  # wsd: fraction of training before the decay
    final_lr_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    compile: bool = False
    val_every: int = Field(100, ge=1)
    ckpt_every: int = Field(0, ge=0)  # steps between checkpoints; 0: at every validation
    val_tokens: int = Field(65536, ge=1)
    devices: Union[int, str] = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    peak_flops: float | None = Field(None, gt=0)  # the device's bf16 peak, for MFU

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        given = [k for k in ("max_steps", "max_tokens", "max_flops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of train.max_steps, train.max_tokens, train.max_flops must be set "
                f"(got {', '.join(given) or 'none'})"
            )
        return self


class TrackingConfig(_Section):
    """MLflow experiment naming and logging cadence."""

    experiment: str = "bov"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under the runs dir
    run_name: str | None = None
    log_every: int = Field(10, ge=1)
    # CPU, memory, disk, network as system/* metrics: off, since they head every run's charts and pick the
    # compare page's axes; `tracking.system_metrics=true` (or BOV_SYSTEM_METRICS=1) turns them on
    system_metrics: bool = Field(default_factory=lambda: os.environ.get("BOV_SYSTEM_METRICS", "0") == "1")


# (section, key, default) of keys added after runs were made: hashed only when set away from the default.
# A new key belongs here, or every study made before it is refused by `bov sweep` (bov.trials.changed_cells).
_ADDED_AT_DEFAULT = (("model", "residual_init", "scaled"), ("model", "unembedding_init_std", None))


class ExperimentConfig(_Section):
    """The single source of truth for one run."""

    preset: str = "custom"
    variant: str = "baseline"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(max_steps=100)
    tracking: TrackingConfig = TrackingConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, as MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def config_hash(self) -> str:
        """Stable hash of everything that defines the run (names excluded)."""
        d = self.model_dump(mode="json")
        d.pop("tracking", None)
        d["data"] = self.data.hashed(exclude={"num_proc"})  # how fast the data is made, not what it is
        for section, key, default in _ADDED_AT_DEFAULT:  # keys added later keep older runs' hashes at their default
            if d[section].get(key) == default:
                d[section].pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in (ABLATIONS_DIR / "scales").glob("*.yaml"))


# The named variants in the order tables and benchmarks list them: the baseline, the paper's, then its peers.
VARIANT_ORDER = ("baseline", "bov", "bov_add", "x0_replace", "v1_replace", "resformer", "resformer_learned",
                 "svformer", "value_embed", "depth_attention", "neutreno", "denseformer")


def list_variants() -> list[str]:
    return sorted(p.stem for p in (ABLATIONS_DIR / "variants").glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    return data


def _named_yaml(kind: str, name: str, choices: list[str]) -> dict[str, Any]:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{kind} file not found: {path}")
        return _read_yaml(path)
    path = ABLATIONS_DIR / f"{kind}s" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} {name!r}; available: {', '.join(choices)}")
    return _read_yaml(path)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    """Unknown keys are the commonest typo; name the key and the valid ones."""
    fields = model.model_fields
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown key {prefix}{k}; valid keys: {', '.join(prefix + f for f in fields)}")
        ann = fields[k].annotation
        if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(v, ann, f"{prefix}{k}.")


def override_value(key: str, text: str) -> Any:
    """The value of `key=text` as a YAML scalar or flow collection (`none`, `0.5`, `[1, 3]`); empty is None."""
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={text}: not a valid YAML value ({str(e).splitlines()[0]})") from None


def parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """`["a.b=1"]` or `{"a.b": 1}` -> nested dict; string values parse as YAML scalars."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            k, v = item.split("=", 1)
            items.append((k.strip(), override_value(k.strip(), v)))
    nested: dict[str, Any] = {}
    for key, value in items:
        parts = key.split(".")
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        cur[parts[-1]] = value
    return nested


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "literal[", "list[")))
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def validate(data: dict[str, Any]) -> ExperimentConfig:
    """Dict -> ExperimentConfig, or ConfigError with one line naming the key."""
    _check_keys(data, ExperimentConfig)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(
    preset: str,
    variant: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> ExperimentConfig:
    """Scale preset + named variant + dotted overrides -> validated ExperimentConfig."""
    data = _named_yaml("scale", preset, list_presets())
    data.setdefault("preset", Path(preset).stem)
    if variant is not None:
        var = _named_yaml("variant", variant, list_variants())
        data = _deep_merge(data, var)
        data["variant"] = Path(variant).stem
    data = _deep_merge(data, parse_overrides(overrides))
    return validate(data)
