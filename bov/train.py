"""Train one variant: LightningModule, optimizers, schedule, budget, MLflow run, resume.

`run_training(cfg, resume=...)` is what `bov train` and every sweep trial call.
The budget is exactly one of steps, tokens or FLOPs; with FLOPs, the token count
is max_flops / flops_per_token(variant), so cheaper variants see more tokens at
equal compute. Checkpoints live in a fixed per-run directory under the runs dir,
so `--resume` finds them from the same command line and continues the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from bov.config import ExperimentConfig
from bov.data import DataError, PreparedData, TokenDataModule, prepare
from bov.infer import checkpoint_extras
from bov.model import GPT, build_model
from bov.paths import runs_dir, tracking_uri


# Checkpoints are taken after the optimizer step on purpose (state == global_step); the
# warning about "pre-optimization state" is noise here.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
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


# Dense bf16 peaks (vendor datasheets, FLOP/s) for MFU; `train.peak_flops` overrides. Matched in order
# against the CUDA device name.
BF16_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12))


def device_peak_flops(name: str | None = None) -> float | None:
    """The bf16 peak of this process's GPU (or of a device name); None where unknown (a CPU: no MFU)."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def lr_factor(step: int, total: int, cfg) -> float:
    """Multiplier on every group's LR: linear warmup, then constant / cosine / warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    start = cfg.decay_start * total  # wsd: flat, then linear decay to final_lr_frac
    if step < start:
        return 1.0
    p = (step - start) / max(1.0, total - start)
    return 1.0 - (1.0 - cfg.final_lr_frac) * min(1.0, p)


# ----------------------------------------------------------------------------- module


class MatricesAndRest(torch.optim.Optimizer):
    """Muon for the matrices and AdamW for the rest, as one optimizer: one step, one LR schedule, one
    gradient clip, so Lightning's automatic optimization (accumulation, clipping, DDP's skipped all-reduce
    on non-final micro-batches) drives both. `param_groups` are the inner optimizers' own group dicts."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"] if "optimizers" in state else [state]  # a checkpoint of one plain AdamW
        if len(states) != len(self.optimizers):
            raise ValueError(f"checkpoint holds {len(states)} optimizer states, this run has {len(self.optimizers)}")
        for o, st in zip(self.optimizers, states):
            o.load_state_dict(st)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


class LitBoV(pl.LightningModule):
    """Any variant. The step is nanoGPT's loop body; Lightning accumulates, clips, steps and schedules."""

    def __init__(self, cfg: ExperimentConfig, budget: Budget, token_bytes: torch.Tensor, tokenizer_json: str | None = None,
                 peak_flops: float | None = None):
        super().__init__()
        self.cfg, self.budget = cfg, budget
        self.tokenizer_json = tokenizer_json
        self.peak_flops = peak_flops  # the device's bf16 peak, for MFU (None: unknown device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model)
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self._t_last: float | None = None
        self._tokens_timed = 0
        self._time_timed = 0.0
        self._accum_loss: torch.Tensor | float = 0.0
        self._last_loss: torch.Tensor | None = None

    def forward(self, ids, targets=None):
        return self.model(ids, targets=targets)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bov"] = checkpoint_extras(self.cfg, self.tokenizer_json)  # `bov generate` reads it

    # -- optimizers
    def configure_optimizers(self):
        t = self.cfg.train
        groups = self.model.param_groups()
        lr = {"matrix": t.lr_matrix, "embedding": t.lr_embedding, "unembedding": t.lr_unembedding,
              "bank": t.lr_bank, "scalar": t.lr_scalar}
        wd = {"matrix": t.weight_decay, "embedding": 0.0, "unembedding": 0.0, "bank": t.bank_weight_decay, "scalar": 0.0}
        adam_groups = [{"params": ps, "lr": lr[k], "weight_decay": wd[k], "name": k}
                       for k, ps in groups.items() if ps and not (k == "matrix" and t.optimizer == "muon")]
        opt = torch.optim.AdamW(adam_groups, betas=t.betas, eps=1e-10, fused=torch.cuda.is_available())
        if t.optimizer == "muon":
            muon = torch.optim.Muon(groups["matrix"], lr=t.lr_matrix, weight_decay=t.weight_decay,
                                    adjust_lr_fn="match_rms_adamw")
            muon.param_groups[0]["name"] = "matrix"
            opt = MatricesAndRest([muon, opt])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, self.budget.steps, t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- training
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model(x, targets=y).mean()
        self._accum_loss = self._accum_loss + loss.detach() / self.cfg.train.grad_accum  # on device: no sync
        return loss  # Lightning divides by grad_accum, backpropagates, clips and steps at the boundary

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.cfg.train.grad_accum:
            return  # mid-accumulation: no optimizer step happened
        self._last_loss, self._accum_loss = self._accum_loss, 0.0
        self._log_step()

    @property
    def last_train_loss(self) -> float:
        return float(self._last_loss) if self._last_loss is not None else float("nan")

    def _log_step(self) -> None:
        step = self.global_step  # already advanced by the optimizer step
        now = time.perf_counter()
        if self._t_last is not None:
            self._time_timed += now - self._t_last
            self._tokens_timed += self.budget.tokens_per_step
        self._t_last = now
        if step % self.cfg.tracking.log_every and step != self.budget.steps:
            return
        if not math.isfinite(self.last_train_loss):  # checked at the logging cadence (a sync on GPU)
            raise Diverged(f"train loss is {self.last_train_loss} at step {step}; stopping (lower the LR?)")
        tokens = step * self.budget.tokens_per_step
        m: dict[str, float] = {"train/loss": self.last_train_loss, "tokens": float(tokens),
                               "flops": float(tokens) * self.budget.flops_per_token}
        for g in self.optimizers().optimizer.param_groups:
            m[f"lr/{g['name']}"] = g["lr"]
        if self._time_timed > 0:
            tps = self._tokens_timed / self._time_timed
            m["throughput/tokens_per_s"] = tps
            if self.peak_flops:
                m["throughput/mfu"] = tps * self.budget.flops_per_token / (self.peak_flops * self.trainer.world_size)
        if torch.cuda.is_available():
            m["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        m.update(self.model.value_coefficients())
        self._log(m)

    def _log(self, metrics: dict[str, float]) -> None:
        # straight to the logger: Lightning's self.log steps by batches, MLflow should step by optimizer steps
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=self.global_step)

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self._t_last = None  # do not count validation time as training throughput

    # -- validation: exact sums of nats and bytes, reduced across ranks
    def on_validation_epoch_start(self):
        self._val = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, bytes, tokens

    def validation_step(self, batch, batch_idx):
        x, y = batch
        nats = self.model(x, targets=y).sum()
        self._val += torch.stack([nats.double(), self.token_bytes[y].sum().double(),
                                  torch.tensor(float(y.numel()), dtype=torch.float64, device=self.device)])

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        nats, nbytes, ntok = total.tolist()
        self.val_metrics = {"val/loss": nats / ntok, "val/bpb": nats / (math.log(2) * nbytes)}
        self._log(self.val_metrics)


# ----------------------------------------------------------------------------- run


def run_key(cfg: ExperimentConfig) -> str:
    return f"{cfg.preset}-{cfg.variant}-{cfg.config_hash()}"


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it; with the embedded store, artifacts go under the runs dir too."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = uri.startswith("sqlite:")  # a server (MLFLOW_TRACKING_URI) keeps its own artifact store
    return client.create_experiment(name, artifact_location=(runs_dir() / "artifacts").as_uri() if local else None)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _precision(cfg: ExperimentConfig) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def run_training(
    cfg: ExperimentConfig,
    resume: bool = False,
    data: PreparedData | None = None,
    extra_tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
    log=print,
    run_dir: Path | None = None,
    on_run_start=None,
    bench: bool = False,
) -> dict[str, Any]:
    """Train cfg to its budget; returns the summary dict (also written as final_metrics.json).

    `run_dir` (default `<runs>/train/<preset>-<variant>-<hash>`) holds checkpoints and run.json;
    a sweep gives each cell its own. `on_run_start(run_id)` is called once the MLflow run exists.
    `bench=True` (throughput benchmarks) saves no checkpoint and skips the final validation.
    """
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    run_dir = Path(run_dir) if run_dir is not None else runs_dir() / "train" / run_key(cfg)
    state_path = run_dir / "run.json"
    ckpt = run_dir / "last.ckpt"
    is_zero = rank_zero_only.rank == 0
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if not resume and is_zero and run_dir.exists():
        for old in run_dir.glob("*.ckpt"):
            old.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)

    world = (cfg.train.devices if isinstance(cfg.train.devices, int) else 1) * cfg.train.num_nodes
    with torch.device("meta"):
        shape = GPT(cfg.model)
    budget = plan_budget(cfg, shape.flops_per_token(cfg.model.seq_len), world)
    params = shape.param_breakdown()
    del shape
    # a streaming source packs exactly what the budget reads, plus one window
    data = data or prepare(cfg, stream_tokens=budget.tokens + cfg.model.seq_len + 1, log=log)
    regime = data_regime(cfg, budget, data.train.n_tokens, params)
    if regime.repeated:  # said before training: repeated data changes what a comparison means
        log(f"note: this run repeats its data: {regime.tokens:,} tokens over {regime.unique:,} unique "
            f"({regime.epochs:.2f} epochs); tagged data_repeated=true")

    peak = cfg.train.peak_flops or device_peak_flops()
    uri = tracking_uri(cfg.tracking.tracking_uri)
    run_id = None
    if is_zero:
        run_id = _open_mlflow_run(cfg, uri, budget, params, data, regime, state_path, resume, extra_tags, parent_run_id)
        log(f"mlflow run {run_id} ({uri})")
        if on_run_start is not None:
            on_run_start(run_id)

    trainer = module = system = None
    status, error = "FAILED", None
    try:  # from here on, whatever happens, the MLflow run ends with a final status
        logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=uri, run_id=run_id) if is_zero else False
        ckpt_cb = ModelCheckpoint(dirpath=run_dir, filename="step{step:06d}", save_last=True, save_top_k=0,
                                  every_n_train_steps=cfg.train.ckpt_every or cfg.train.val_every,
                                  auto_insert_metric_name=False)
        trainer = pl.Trainer(
            accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=cfg.train.devices,
            num_nodes=cfg.train.num_nodes, strategy=cfg.train.strategy, precision=_precision(cfg),
            max_steps=budget.steps, max_epochs=-1, check_val_every_n_epoch=None,
            val_check_interval=cfg.train.val_every * cfg.train.grad_accum,  # counted in micro-batches
            accumulate_grad_batches=cfg.train.grad_accum, gradient_clip_val=cfg.train.grad_clip,
            gradient_clip_algorithm="norm",
            num_sanity_val_steps=0, logger=logger, callbacks=[*([] if bench else [ckpt_cb]), *(callbacks or [])],
            enable_progress_bar=is_zero and os.environ.get("BOV_PROGRESS", "1") == "1", enable_model_summary=False,
            use_distributed_sampler=False,  # TrainWindows gives each rank its own slice
            default_root_dir=str(run_dir),
        )
        module = LitBoV(cfg, budget, torch.from_numpy(data.token_bytes), data.tokenizer_path.read_text(), peak)
        if cfg.train.compile:
            # A fresh dynamo cache per run: otherwise every run of a process (a sweep worker, a bench over
            # variants) adds graphs until dynamo's recompile limit turns compilation off for the rest.
            torch._dynamo.reset()
            module.model = torch.compile(module.model)
        dm = TokenDataModule(cfg, data, regime.unique)
        if is_zero:
            system = mlflow.start_run(run_id=run_id, log_system_metrics=cfg.tracking.system_metrics)
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if resume else None)
        if trainer.interrupted:
            status, error = "KILLED", "interrupted"
        else:
            if not bench and (getattr(module, "val_metrics", None) is None or trainer.global_step % cfg.train.val_every):
                trainer.validate(module, datamodule=dm, verbose=False)
            status = "FINISHED"
    except BaseException as e:  # Lightning turns Ctrl-C into SystemExit after a graceful stop
        killed = isinstance(e, KeyboardInterrupt) or (trainer is not None and trainer.interrupted
                                                        and isinstance(e, SystemExit))
        status = "KILLED" if killed else "FAILED"
        error = "interrupted" if killed else (str(e) if isinstance(e, Diverged) else f"{type(e).__name__}: {e}")
        raise
    finally:
        steps = trainer.global_step if trainer is not None else 0
        summary = _summary(cfg, module, budget, params, data, regime, run_id, status, error, steps, world)
        if is_zero:
            (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
            client = mlflow.MlflowClient(uri)
            if error:
                client.set_tag(run_id, "error", error[:5000])
            client.log_dict(run_id, summary, "final_metrics.json")
            if system is not None:
                mlflow.end_run(status=status)
            client.set_terminated(run_id, status=status)
        rank = trainer.global_rank if trainer is not None else rank_zero_only.rank
        (run_dir / f"rank{rank}.json").write_text(json.dumps(
            {"final_loss": summary["train_loss"], "param_sum": summary["param_checksum"]}))
    return summary


def _open_mlflow_run(cfg, uri, budget, params, data, regime, state_path, resume, extra_tags, parent_run_id) -> str:
    """Create the run (params, tags, config artifact), or reopen the stored one on resume."""
    import mlflow
    from mlflow.entities import Param

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri)
    if resume and state_path.is_file():
        run_id = json.loads(state_path.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
        error = client.get_run(run_id).data.tags.get("error")
        if error:  # the run goes on: keep why it stopped, but not as its error
            client.set_tag(run_id, "resumed_after_error", error)
            client.delete_tag(run_id, "error")
        for k, v in (extra_tags or {}).items():  # e.g. the sweep trial that took the run over
            client.set_tag(run_id, k, v)
        return run_id
    tags = {"variant": cfg.variant, "preset": cfg.preset, "seed": str(cfg.train.seed), "git_commit": git_commit(),
            "config_hash": cfg.config_hash(), "data_fingerprint": data.fingerprint,
            "data_repeated": str(regime.repeated).lower(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=cfg.tracking.run_name or run_key(cfg)).info.run_id
    state_path.write_text(json.dumps({"run_id": run_id}))
    flat = {k: str(v) for k, v in cfg.flat().items()}
    flat.update({"budget.steps": str(budget.steps), "budget.tokens": str(budget.tokens),
                 "budget.flops_per_token": str(budget.flops_per_token), "data.train_tokens": str(data.train.n_tokens)})
    flat.update({f"params.{k}": str(v) for k, v in params.items()})
    flat.update({f"regime.{k}": f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in regime.record().items()})
    items = [Param(k, v[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def _summary(cfg, module, budget, params, data, regime, run_id, status, error, steps, world=1) -> dict[str, Any]:
    val = getattr(module, "val_metrics", None) or {}
    tokens = steps * budget.tokens_per_step
    done = replace(regime, tokens=tokens)  # as trained, which a failed or pruned run cut short
    tps = module._tokens_timed / module._time_timed if module is not None and module._time_timed else None
    checksum = None
    if module is not None:
        with torch.no_grad():
            checksum = float(sum(p.double().sum() for p in module.model.parameters()))
    return {
        "run_id": run_id, "variant": cfg.variant, "preset": cfg.preset, "seed": cfg.train.seed, "status": status,
        "error": error, "steps": steps, "val_bpb": val.get("val/bpb"), "val_loss": val.get("val/loss"),
        "train_loss": module.last_train_loss if module is not None else float("nan"), "flops": float(tokens) * budget.flops_per_token,
        "flops_per_token": budget.flops_per_token, "params": sum(params.values()), "params_split": params,
        "tokens_per_s": tps, "mfu": tps * budget.flops_per_token / (module.peak_flops * world)
        if tps and module.peak_flops else None, "unigram_bpb": data.unigram_bpb(), "param_checksum": checksum,
        **done.record(), "data_repeated": done.repeated,
    }
