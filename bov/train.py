"""Train one variant to its budget: preflight (the run's state, budget, data), its MLflow run, Lightning's
Trainer around `bov.litmodule.LitBoV`, checkpoints, resume, and the run's final status whatever ends it.

`run_training(cfg, resume=...)` is what `bov train` and every sweep trial call.
The budget is exactly one of steps, tokens or FLOPs; with FLOPs, the token count
is max_flops / flops_per_token(variant), so cheaper variants see more tokens at
equal compute. Checkpoints live in a fixed per-run directory under the runs dir,
so `--resume` finds them from the same command line and continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from bov import console, tracking
from bov.budget import Budget, DataRegime, data_regime, model_shape, plan_budget, world_size
from bov.config import ExperimentConfig
from bov.data import PreparedData, Recorded, TokenDataModule, check_identity, prepare
from bov.litmodule import Diverged, LitBoV, device_peak_flops
from bov.paths import RunLock, StoreError, cache_dir, runs_dir, tracking_uri


# Checkpoints are taken after the optimizer step on purpose (state == global_step); the
# warning about "pre-optimization state" is noise here.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Each checkpoint is written next to its final name, synced, then renamed over it, so a kill mid-save leaves
    the previous checkpoint whole. (Lightning's own save stages the file through fsspec's temp dir, and a move
    from another filesystem is a copy that a kill can cut short, truncating the old checkpoint.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def run_key(cfg: ExperimentConfig) -> str:
    return f"{cfg.preset}-{cfg.variant}-{cfg.config_hash()}"


def precision(cfg: ExperimentConfig) -> str:
    """Lightning's precision for this config: `train.precision`, else bf16-mixed on a GPU and fp32 on a CPU."""
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
    wait: bool = False,
    expect: tuple[Recorded, ...] = (),
    locked: bool = False,
) -> dict[str, Any]:
    """Train cfg to its budget; returns the summary dict (also written as final_metrics.json).

    `run_dir` (default `<runs>/train/<preset>-<variant>-<hash>`) holds checkpoints and run.json;
    a sweep gives each cell its own. `on_run_start(run_id)` is called once the MLflow run exists.
    `bench=True` (throughput benchmarks) saves no checkpoint and skips the final validation.
    The run directory has one writer: a second process refuses (RunBusy), or with `wait` waits; `locked` says
    the caller (a sweep worker) already holds its lock. `expect`: data identities the run must be trained on
    (a study's); a resumed run also expects its checkpoint's.
    """
    run_dir = Path(run_dir) if run_dir is not None else runs_dir() / "train" / run_key(cfg)
    ckpt = run_dir / "last.ckpt"
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if locked or rank_zero_only.rank != 0:  # the DDP ranks of one run are one writer, rank 0
        return _run(cfg, run_dir, resume, data, extra_tags, parent_run_id, callbacks, log, on_run_start, bench, expect)
    with RunLock(run_dir, wait=wait, log=log):
        return _run(cfg, run_dir, resume, data, extra_tags, parent_run_id, callbacks, log, on_run_start, bench, expect)


def recorded_data(run_dir: Path, uri: str, cfg: ExperimentConfig) -> dict[str, str]:
    """The data identity a run directory's checkpoint was trained on. An unreadable checkpoint, or one of
    another config (copied in from another run), is one line (StoreError). Checkpoints of an older bov carry no
    data identity: their MLflow run's fingerprint tag stands in."""
    ckpt, state = run_dir / "last.ckpt", run_dir / "run.json"
    try:  # mmap: only the small metadata is read, not the tensors
        extras = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("bov") or {}
    except Exception as e:
        raise StoreError(f"--resume: {ckpt} is not a readable checkpoint ({type(e).__name__}); move it away and "
                         "start a new run (without --resume)") from None
    try:
        made_by = ExperimentConfig.model_validate(extras["config"]).config_hash()
    except Exception:  # no config, or one this bov no longer reads: nothing to compare
        made_by = None
    if made_by is not None and made_by != cfg.config_hash():
        raise StoreError(f"--resume: {ckpt} holds a run of another config ({made_by}; this command's is "
                         f"{cfg.config_hash()}); move it away, or resume with the command that made it")
    if extras.get("data"):
        return extras["data"]
    try:
        run_id = json.loads(state.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    import mlflow

    try:
        tag = mlflow.MlflowClient(uri).get_run(run_id).data.tags.get(tracking.TAG_DATA)
    except Exception:
        return {}
    return {"fingerprint": tag} if tag else {}


@dataclass
class _Setup:
    """What preflight resolved for one run, before its MLflow run is opened."""

    cfg: ExperimentConfig
    run_dir: Path
    uri: str
    budget: Budget
    params: dict[str, int]
    data: PreparedData
    regime: DataRegime
    is_zero: bool  # rank 0 writes the run's state and its MLflow run

    @property
    def state_path(self) -> Path:
        return self.run_dir / "run.json"


def _run(cfg, run_dir, resume, data, extra_tags, parent_run_id, callbacks, log, on_run_start, bench, expect):
    """The phases of one run: preflight (state, budget, data), open (the MLflow run), fit, finish (the
    summary and the run's final status, whatever ended it)."""
    import mlflow

    s = _preflight(cfg, run_dir, resume, data, expect, log)
    run_id = _open(s, resume, extra_tags, parent_run_id, on_run_start, log)
    trainer = module = system = None
    status, error = "FAILED", None
    try:  # from here on, whatever happens, the MLflow run ends with a final status
        trainer = _trainer(s, run_id, callbacks, bench)
        module = _module(s)
        if s.is_zero:
            system = mlflow.start_run(run_id=run_id, log_system_metrics=cfg.tracking.system_metrics)
        status, error = _fit(s, trainer, module, resume, bench)
    except BaseException as e:  # Lightning turns Ctrl-C into SystemExit after a graceful stop, SIGTERM into its own
        status, error = _ended_by(e, trainer)
        raise
    finally:
        summary = _finish(s, trainer, module, run_id, status, error, system, log)
    return summary


def _preflight(cfg, run_dir, resume, data, expect, log) -> _Setup:
    """The run's state checked (a resume reads its run and checkpoint first), its budget, its data built or
    checked against what it must be trained on, its data regime."""
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    state_path, is_zero = run_dir / "run.json", rank_zero_only.rank == 0
    uri = tracking_uri(cfg.tracking.tracking_uri)
    if resume:  # before any data is built: the run's state is readable, and the checkpoint's data is the run's
        if state_path.is_file():
            tracking.resumed_run_id(uri, state_path)
        expect = (*expect, Recorded(f"--resume: the run in {run_dir}", recorded_data(run_dir, uri, cfg),
                                    "restore the data it was trained on, or start a new run (without --resume)"))
    if not resume and is_zero and run_dir.exists():
        for old in run_dir.glob("*.ckpt"):
            old.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    for orphan in run_dir.glob(".*.tmp*"):  # a save that a kill interrupted (no other writer: we hold the lock)
        orphan.unlink(missing_ok=True)
    flops_per_token, params = model_shape(cfg.model)
    budget = plan_budget(cfg, flops_per_token, world_size(cfg))
    if data is not None:
        check_identity(expect, data.identity)
    # a streaming source packs exactly what the budget reads, plus one window
    data = data or prepare(cfg, stream_tokens=budget.tokens + cfg.model.seq_len + 1, log=log, expect=expect)
    data.check_windows(cfg.model.seq_len)
    regime = data_regime(cfg, budget, data.train.n_tokens, params)
    if regime.repeated:  # said before training: repeated data changes what a comparison means
        log(f"note: this run repeats its data: {regime.tokens:,} tokens over {regime.unique:,} unique "
            f"({regime.epochs:.2f} epochs); tagged data_repeated=true")
    return _Setup(cfg, run_dir, uri, budget, params, data, regime, is_zero)


def _open(s: _Setup, resume, extra_tags, parent_run_id, on_run_start, log) -> str | None:
    """The MLflow run (rank 0): the config as params, what preflight derived as setup/ metrics."""
    if not s.is_zero:
        return None
    derived = {"budget.steps": s.budget.steps, "budget.tokens": s.budget.tokens,
               "budget.flops_per_token": s.budget.flops_per_token, "data.train_tokens": s.data.train.n_tokens,
               **{f"params.{k}": v for k, v in s.params.items()},
               **{f"regime.{k}": v for k, v in s.regime.record().items()}}
    run_id = tracking.open_run(s.cfg, s.uri, run_name=tracking.run_name(s.cfg, extra_tags), params=derived,
                               data=s.data.identity, repeated=s.regime.repeated, state_path=s.state_path,
                               resume=resume, extra_tags=extra_tags, parent_run_id=parent_run_id)
    log(f"mlflow run {run_id} ({s.uri})")
    if on_run_start is not None:
        on_run_start(run_id)
    return run_id


def _trainer(s: _Setup, run_id, callbacks, bench) -> pl.Trainer:
    """Lightning's Trainer: one endless epoch to the budget's steps, validation every `val_every` steps,
    checkpoints beside run.json (none for a benchmark), MLflow as its logger on rank 0."""
    from lightning.pytorch.loggers import MLFlowLogger

    cfg = s.cfg
    logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=s.uri, run_id=run_id) if s.is_zero else False
    ckpt_cb = ModelCheckpoint(dirpath=s.run_dir, filename="step{step:06d}", save_last=True, save_top_k=0,
                              every_n_train_steps=cfg.train.ckpt_every or cfg.train.val_every, auto_insert_metric_name=False)
    progress = s.is_zero and os.environ.get("BOV_PROGRESS", "1") == "1"
    console.quiet_tips()
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes, strategy=cfg.train.strategy, precision=precision(cfg),
        max_steps=s.budget.steps, max_epochs=-1, check_val_every_n_epoch=None,
        val_check_interval=cfg.train.val_every * cfg.train.grad_accum,  # counted in micro-batches
        accumulate_grad_batches=cfg.train.grad_accum, gradient_clip_val=cfg.train.grad_clip,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0, logger=logger, enable_model_summary=False, enable_progress_bar=progress,
        callbacks=[*([] if bench else [ckpt_cb]), *(callbacks or []), *([console.progress_bar()] if progress else [])],
        use_distributed_sampler=False,  # TrainWindows gives each rank its own slice
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(s.run_dir),
    )


def _module(s: _Setup) -> LitBoV:
    """The LightningModule around the model, compiled when `train.compile` says so."""
    module = LitBoV(s.cfg, s.budget, torch.from_numpy(s.data.token_bytes), s.data.tokenizer_path.read_text(),
                    s.cfg.train.peak_flops or device_peak_flops(), s.data.identity)
    if s.cfg.train.compile:
        # compiled kernels are cached with the run state, not in /tmp or ~ (unless the user says where)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir("torchinductor")))
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir("triton")))
        # A fresh dynamo cache per run: otherwise every run of a process (a sweep worker, a bench over
        # variants) adds graphs until dynamo's recompile limit turns compilation off for the rest.
        torch._dynamo.reset()
        module.model = torch.compile(module.model)
    return module


def _fit(s: _Setup, trainer: pl.Trainer, module: LitBoV, resume: bool, bench: bool) -> tuple[str, str | None]:
    """Train to the budget (from the checkpoint when resuming); then a checkpoint and a validation of the
    trained model if the last step had none. (status, error)."""
    cfg, ckpt_every = s.cfg, s.cfg.train.ckpt_every or s.cfg.train.val_every
    dm = TokenDataModule(cfg, s.data, s.regime.unique)
    trainer.fit(module, datamodule=dm, ckpt_path=str(s.run_dir / "last.ckpt") if resume else None)
    if trainer.interrupted:
        return "KILLED", "interrupted"
    # ModelCheckpoint saves only every n steps: a budget that is no multiple of n would leave last.ckpt
    # short of the trained model, which eval, probe, generate and lm-eval read
    if not bench and trainer.global_step % ckpt_every:
        trainer.save_checkpoint(s.run_dir / "last.ckpt")
    if not bench and (module.val_metrics is None or trainer.global_step % cfg.train.val_every):
        trainer.validate(module, datamodule=dm, verbose=False)
    return "FINISHED", None


def _ended_by(e: BaseException, trainer) -> tuple[str, str]:
    """(status, error) of a run an exception ended: KILLED for Ctrl-C and SIGTERM, FAILED otherwise."""
    sigterm = isinstance(e, SIGTERMException)
    killed = sigterm or isinstance(e, KeyboardInterrupt) or (trainer is not None and trainer.interrupted
                                                             and isinstance(e, SystemExit))
    if killed:
        return "KILLED", "interrupted (SIGTERM)" if sigterm else "interrupted"
    return "FAILED", str(e) if isinstance(e, Diverged) else f"{type(e).__name__}: {e}"


def _finish(s: _Setup, trainer, module, run_id, status, error, system, log) -> dict[str, Any]:
    """The summary (final_metrics.json) and the MLflow run's end. What ended the run, if anything did, is not
    masked by a failure to record its end."""
    import mlflow

    pending = sys.exc_info()[1]
    summary: dict[str, Any] = {}
    try:
        steps = trainer.global_step if trainer is not None else 0
        summary = _summary(s.cfg, module, s.budget, s.params, s.data, s.regime, run_id, status, error, steps)
        if s.is_zero:
            (s.run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
            if system is not None:
                mlflow.end_run(status=status)
            tracking.end_run(s.uri, run_id, status, error, summary)
    except Exception as e:
        if pending is None:
            raise
        log(f"note: the run's end ({status}) could not be fully recorded: {type(e).__name__}: {e}")
    return summary


def _summary(cfg, module, budget, params, data, regime, run_id, status, error, steps) -> dict[str, Any]:
    val = (module.val_metrics if module is not None else None) or {}
    tokens = steps * budget.tokens_per_step
    done = replace(regime, tokens=tokens)  # as trained, which a failed or pruned run cut short
    tps = module.tokens_per_s if module is not None else None
    checksum = None
    if module is not None:
        with torch.no_grad():
            checksum = float(sum(p.double().sum() for p in module.model.parameters()))
    return {
        "run_id": run_id, "variant": cfg.variant, "preset": cfg.preset, "seed": cfg.train.seed, "status": status,
        "error": error, "steps": steps, "val_bpb": val.get(tracking.VAL_BPB), "val_loss": val.get(tracking.VAL_LOSS),
        "train_loss": module.last_train_loss if module is not None else float("nan"), "flops": float(tokens) * budget.flops_per_token,
        "flops_per_token": budget.flops_per_token, "params": sum(params.values()), "params_split": params,
        "tokens_per_s": tps, "mfu": module.mfu(tps) if module is not None else None,
        "unigram_bpb": data.unigram_bpb(), "param_checksum": checksum,
        **done.record(), "data_repeated": done.repeated,
    }
