"""How much a run trains and on what: the budget (steps, tokens, FLOPs) and the data regime (unique tokens,
epochs, tokens per parameter). Arithmetic only: used by training, sweeps and the CLI alike.

With a FLOPs budget, tokens = max_flops / flops_per_token(variant), so cheaper variants see more tokens
at equal compute. A model's FLOPs per token and parameter split come from its shape on the meta device,
computed once per model config (`model_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from bov.config import DataError, ExperimentConfig, ModelConfig

@lru_cache(maxsize=256)
def _shape(model_json: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    import torch

    from bov.model import GPT

    cfg = ModelConfig.model_validate_json(model_json)
    with torch.device("meta"):  # shapes only: no memory, no RNG
        model = GPT(cfg)
    return model.flops_per_token(cfg.seq_len), tuple(model.param_breakdown().items())


def model_shape(cfg: ModelConfig) -> tuple[int, dict[str, int]]:
    """(training FLOPs per token at seq_len, parameters by optimizer group), once per distinct model config."""
    fpt, params = _shape(cfg.model_dump_json())
    return fpt, dict(params)


def world_size(cfg: ExperimentConfig) -> int:
    return (cfg.train.devices if isinstance(cfg.train.devices, int) else 1) * cfg.train.num_nodes


@dataclass(frozen=True)
class Budget:
    """A run's length in optimizer steps, with what each step costs."""

    steps: int
    tokens_per_step: int
    flops_per_token: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return float(self.tokens) * self.flops_per_token


def plan_budget(cfg: ExperimentConfig, flops_per_token: int, world: int = 1) -> Budget:
    """train.max_steps, max_tokens or max_flops -> steps at this batch, accumulation and world size."""
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * cfg.model.seq_len * world
    if t.max_steps is not None:
        steps = t.max_steps
    elif t.max_tokens is not None:
        steps = t.max_tokens // per_step
    else:
        steps = int(t.max_flops / flops_per_token) // per_step
    if steps < 1:
        raise ValueError(f"train budget gives {steps} steps at {per_step} tokens per step; raise the budget")
    return Budget(steps, per_step, flops_per_token)


@dataclass(frozen=True)
class DataRegime:
    """How much distinct data a run sees: the numbers that decide whether a bank memorizes."""

    available: int  # tokens in the packed training stream
    unique: int  # tokens the run may read: the stream, or its first data.max_unique_tokens
    tokens: int  # tokens the run trains on
    params: int  # all parameters
    params_non_embedding: int  # without the lookup tables (token embedding and banks)

    @property
    def epochs(self) -> float:
        return self.tokens / self.unique

    @property
    def repeated(self) -> bool:
        return self.tokens > self.unique

    def record(self) -> dict[str, float]:
        """What MLflow params and the run summary carry."""
        return {"unique_tokens": self.unique, "train_tokens_available": self.available, "tokens": self.tokens,
                "epochs": self.epochs, "params_non_embedding": self.params_non_embedding,
                "tokens_per_param": self.tokens / self.params,
                "tokens_per_param_non_embedding": self.tokens / self.params_non_embedding}


def data_regime(cfg: ExperimentConfig, budget: Budget, available: int, params: dict[str, int]) -> DataRegime:
    """Resolve data.max_unique_tokens (a count or "<f>x" of the tokens trained) against the stream."""
    limit = cfg.data.max_unique_tokens
    if isinstance(limit, str):
        limit = round(float(limit[:-1]) * budget.tokens)
    if limit is not None and limit > available:
        raise DataError(f"data.max_unique_tokens={cfg.data.max_unique_tokens} asks for {limit:,} tokens; "
                        f"the training stream of {cfg.data.source} has {available:,}")
    if limit is not None and limit <= cfg.model.seq_len:
        raise DataError(f"data.max_unique_tokens={cfg.data.max_unique_tokens} gives {limit:,} tokens, "
                        f"fewer than one window of model.seq_len + 1 = {cfg.model.seq_len + 1}")
    total = sum(params.values())
    return DataRegime(available, limit or available, budget.tokens, total, total - params["embedding"] - params["bank"])
