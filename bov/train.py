"""Train one variant: LightningModule, optimizers, schedule, budget, MLflow run, resume.

`run_training(cfg, resume=...)` is what `bov train` and every sweep trial call.
The budget is exactly one of steps, tokens or FLOPs; with FLOPs, the token count
is max_flops / flops_per_token(variant), so cheaper variants see more tokens at
equal compute. Checkpoints live in a fixed per-run directory under the runs dir,
so `--resume` finds them from the same command line and continues the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from bov import console, tracking
from bov.budget import Budget, DataRegime, data_regime, model_shape, plan_budget, world_size  # noqa: F401 (re-exported)
from bov.config import ExperimentConfig
from bov.data import PreparedData, Recorded, TokenDataModule, check_identity, prepare
from bov.infer import checkpoint_extras
from bov.model import build_model
from bov.optim import build_optimizer
from bov.paths import RunLock, StoreError, cache_dir, runs_dir, tracking_uri
from bov.tracking import ensure_experiment, git_commit  # noqa: F401 (re-exported)


# Checkpoints are taken after the optimizer step on purpose (state == global_step); the
# warning about "pre-optimization state" is noise here.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


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


def check_compile(cfg: ExperimentConfig) -> None:
    """train.compile off a GPU compiles C++ kernels: fail in one line, before any compute, without a compiler."""
    import shutil

    if not cfg.train.compile or torch.cuda.is_available():
        return
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        raise ValueError(f"train.compile: compiling for the CPU needs a C++ compiler ({' / '.join(compilers)} not "
                         "found); install one, or set train.compile=false")


def check_trainer(cfg: ExperimentConfig) -> None:
    """train.strategy, devices, num_nodes and precision as Lightning reads them, before any data or compute."""
    import logging

    quiet = logging.getLogger("lightning.pytorch")
    level, quiet.level = quiet.level, logging.WARNING  # no "GPU available" lines for a dry construction
    try:
        pl.Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=cfg.train.devices,
                   num_nodes=cfg.train.num_nodes, strategy=cfg.train.strategy, precision=_precision(cfg),
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:
        raise ValueError(f"train.strategy {cfg.train.strategy!r} / train.devices {cfg.train.devices!r}: "
                         f"{str(e).strip().splitlines()[0][:240]}") from None
    finally:
        quiet.level = level


def check_loss(loss: float, step: int, vocab_size: int) -> None:
    """Diverged when the loss is NaN or infinite, or has exploded: above 4 x ln |V|, four times what guessing
    uniformly over the vocabulary costs, which no training run passes through on its way down."""
    if not math.isfinite(loss):
        raise Diverged(f"train loss is {loss} at step {step}; stopping (lower the LR?)")
    if loss > 4 * math.log(vocab_size):
        raise Diverged(f"train loss exploded to {loss:.4g} at step {step} (uniform guessing costs "
                       f"{math.log(vocab_size):.2f}); stopping (lower the LR?)")


@contextlib.contextmanager
def ctrl_c_after():
    """Ctrl-C waits for the write in flight: a KeyboardInterrupt inside a SQLite transaction leaves the embedded
    MLflow store locked, and the run's end could then not be recorded (CI saw "database is locked" once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if held and callable(before):
            before(signal.SIGINT, None)  # e.g. Python's default handler: KeyboardInterrupt, now
        elif held and before == signal.SIG_DFL:
            raise KeyboardInterrupt


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


class LitBoV(pl.LightningModule):
    """Any variant. The step is nanoGPT's loop body; Lightning accumulates, clips, steps and schedules."""

    def __init__(self, cfg: ExperimentConfig, budget: Budget, token_bytes: torch.Tensor, tokenizer_json: str | None = None,
                 peak_flops: float | None = None, data_identity: dict | None = None):
        super().__init__()
        self.cfg, self.budget = cfg, budget
        self.tokenizer_json, self.data_identity = tokenizer_json, data_identity
        self.peak_flops = peak_flops  # the device's bf16 peak, for MFU (None: unknown device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model)
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self._t_last: float | None = None
        self._tokens_timed = 0
        self._time_timed = 0.0
        self._accum_loss: torch.Tensor | float = 0.0
        self._last_loss: torch.Tensor | None = None

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Model FLOPs utilization against the device's bf16 peak, over all ranks (None: unknown device)."""
        if not tokens_per_s or not self.peak_flops:
            return None
        world = self.trainer.world_size if self._trainer is not None else 1
        return tokens_per_s * self.budget.flops_per_token / (self.peak_flops * world)

    def forward(self, ids, targets=None):
        return self.model(ids, targets=targets)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `bov generate` reads the config and tokenizer; `--resume` refuses other data than `data`
        checkpoint["bov"] = {**checkpoint_extras(self.cfg, self.tokenizer_json), "data": self.data_identity}

    # -- optimizers
    def configure_optimizers(self):
        t = self.cfg.train
        opt = build_optimizer(self.model.param_groups(), t, self.budget.steps)
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
        check_loss(self.last_train_loss, step, self.cfg.model.vocab_size)  # at the logging cadence (a sync on GPU)
        tokens = step * self.budget.tokens_per_step
        m: dict[str, float] = {tracking.TRAIN_LOSS: self.last_train_loss, tracking.TOKENS: float(tokens),
                               tracking.FLOPS: float(tokens) * self.budget.flops_per_token}
        for g in self.optimizers().optimizer.param_groups:
            m[tracking.LR_PREFIX + g["name"]] = g["lr"]
        if self._time_timed > 0:
            tps = self._tokens_timed / self._time_timed
            m[tracking.TOKENS_PER_S] = tps
            if self.peak_flops:
                m[tracking.MFU] = self.mfu(tps)
        if torch.cuda.is_available():
            m[tracking.PEAK_MEMORY] = torch.cuda.max_memory_allocated() / 2**30
        m.update({tracking.coeff_metric(*k): v for k, v in self.model.value_coefficients().items()})
        self._log(m)

    def _log(self, metrics: dict[str, float]) -> None:
        # straight to the logger: Lightning's self.log steps by batches, MLflow should step by optimizer steps
        if self.logger is not None and self.trainer.is_global_zero:
            with ctrl_c_after():
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
        self.val_metrics = {tracking.VAL_LOSS: nats / ntok, tracking.VAL_BPB: nats / (math.log(2) * nbytes)}
        self._log(self.val_metrics)


# ----------------------------------------------------------------------------- run


def run_key(cfg: ExperimentConfig) -> str:
    return f"{cfg.preset}-{cfg.variant}-{cfg.config_hash()}"


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


def _run(cfg, run_dir, resume, data, extra_tags, parent_run_id, callbacks, log, on_run_start, bench, expect):
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    state_path = run_dir / "run.json"
    ckpt = run_dir / "last.ckpt"
    is_zero = rank_zero_only.rank == 0
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

    world = world_size(cfg)
    flops_per_token, params = model_shape(cfg.model)
    budget = plan_budget(cfg, flops_per_token, world)
    # a streaming source packs exactly what the budget reads, plus one window
    if data is not None:
        check_identity(expect, data.identity)
    data = data or prepare(cfg, stream_tokens=budget.tokens + cfg.model.seq_len + 1, log=log, expect=expect)
    data.check_windows(cfg.model.seq_len)
    regime = data_regime(cfg, budget, data.train.n_tokens, params)
    if regime.repeated:  # said before training: repeated data changes what a comparison means
        log(f"note: this run repeats its data: {regime.tokens:,} tokens over {regime.unique:,} unique "
            f"({regime.epochs:.2f} epochs); tagged data_repeated=true")

    peak = cfg.train.peak_flops or device_peak_flops()
    run_id = None
    if is_zero:
        recorded = {"budget.steps": budget.steps, "budget.tokens": budget.tokens,
                    "budget.flops_per_token": budget.flops_per_token, "data.train_tokens": data.train.n_tokens,
                    **{f"params.{k}": v for k, v in params.items()},
                    **{f"regime.{k}": f"{v:.6g}" if isinstance(v, float) else v for k, v in regime.record().items()}}
        run_id = tracking.open_run(cfg, uri, run_name=tracking.run_name(cfg, extra_tags), params=recorded,
                                   data=data.identity, repeated=regime.repeated, state_path=state_path,
                                   resume=resume, extra_tags=extra_tags, parent_run_id=parent_run_id)
        log(f"mlflow run {run_id} ({uri})")
        if on_run_start is not None:
            on_run_start(run_id)

    trainer = module = system = None
    status, error = "FAILED", None
    try:  # from here on, whatever happens, the MLflow run ends with a final status
        logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=uri, run_id=run_id) if is_zero else False
        ckpt_every = cfg.train.ckpt_every or cfg.train.val_every
        ckpt_cb = ModelCheckpoint(dirpath=run_dir, filename="step{step:06d}", save_last=True, save_top_k=0,
                                  every_n_train_steps=ckpt_every,
                                  auto_insert_metric_name=False)
        progress = is_zero and os.environ.get("BOV_PROGRESS", "1") == "1"
        console.quiet_tips()
        trainer = pl.Trainer(
            accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=cfg.train.devices,
            num_nodes=cfg.train.num_nodes, strategy=cfg.train.strategy, precision=_precision(cfg),
            max_steps=budget.steps, max_epochs=-1, check_val_every_n_epoch=None,
            val_check_interval=cfg.train.val_every * cfg.train.grad_accum,  # counted in micro-batches
            accumulate_grad_batches=cfg.train.grad_accum, gradient_clip_val=cfg.train.grad_clip,
            gradient_clip_algorithm="norm",
            num_sanity_val_steps=0, logger=logger, enable_model_summary=False, enable_progress_bar=progress,
            callbacks=[*([] if bench else [ckpt_cb]), *(callbacks or []), *([console.progress_bar()] if progress else [])],
            use_distributed_sampler=False,  # TrainWindows gives each rank its own slice
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(run_dir),
        )
        module = LitBoV(cfg, budget, torch.from_numpy(data.token_bytes), data.tokenizer_path.read_text(), peak,
                        data.identity)
        if cfg.train.compile:
            # compiled kernels are cached with the run state, not in /tmp or ~ (unless the user says where)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir("torchinductor")))
            os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir("triton")))
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
            # ModelCheckpoint saves only every n steps: a budget that is no multiple of n would leave last.ckpt
            # short of the trained model, which eval, probe, generate and lm-eval read
            if not bench and trainer.global_step % ckpt_every:
                trainer.save_checkpoint(ckpt)
            if not bench and (getattr(module, "val_metrics", None) is None or trainer.global_step % cfg.train.val_every):
                trainer.validate(module, datamodule=dm, verbose=False)
            status = "FINISHED"
    except BaseException as e:  # Lightning turns Ctrl-C into SystemExit after a graceful stop, SIGTERM into its own
        sigterm = isinstance(e, SIGTERMException)
        killed = sigterm or isinstance(e, KeyboardInterrupt) or (trainer is not None and trainer.interrupted
                                                                 and isinstance(e, SystemExit))
        status = "KILLED" if killed else "FAILED"
        error = ("interrupted (SIGTERM)" if sigterm else "interrupted") if killed else (
            str(e) if isinstance(e, Diverged) else f"{type(e).__name__}: {e}")
        raise
    finally:
        pending = sys.exc_info()[1]  # what ended the run, if anything did: recording the end must not mask it
        try:
            steps = trainer.global_step if trainer is not None else 0
            summary = _summary(cfg, module, budget, params, data, regime, run_id, status, error, steps)
            if is_zero:
                (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
                if system is not None:
                    mlflow.end_run(status=status)
                tracking.end_run(uri, run_id, status, error, summary)
        except Exception as e:
            if pending is None:
                raise
            log(f"note: the run's end ({status}) could not be fully recorded: {type(e).__name__}: {e}")
    return summary


def _summary(cfg, module, budget, params, data, regime, run_id, status, error, steps) -> dict[str, Any]:
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
        "error": error, "steps": steps, "val_bpb": val.get(tracking.VAL_BPB), "val_loss": val.get(tracking.VAL_LOSS),
        "train_loss": module.last_train_loss if module is not None else float("nan"), "flops": float(tokens) * budget.flops_per_token,
        "flops_per_token": budget.flops_per_token, "params": sum(params.values()), "params_split": params,
        "tokens_per_s": tps, "mfu": module.mfu(tps) if module is not None else None,
        "unigram_bpb": data.unigram_bpb(), "param_checksum": checksum,
        **done.record(), "data_repeated": done.repeated,
    }
