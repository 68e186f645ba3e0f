"""Run a study: `sweeps/<name>.yaml` -> an Optuna study whose trials are training runs.

A grid study crosses the levels of one axis with seeds; every (level, seed) cell
runs exactly once, however many workers or machines share the study. A TPE
study samples a search space and prunes on intermediate `val/bpb`. Each trial is
one `run_training` call logged as an MLflow child run under one parent run per
study. Re-running the same command continues the study: finished cells are
skipped, a cell whose worker died (heartbeat gone stale) or was interrupted is
run again, from its last checkpoint when it has one.

State: the Optuna storage (default `sqlite:///<runs>/optuna.db`, or a PostgreSQL
URL shared by many machines), MLflow (the runs dir, or `MLFLOW_TRACKING_URI`), and
per-cell checkpoints under `<runs>/sweeps/<study>/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bov.config import ConfigError, ExperimentConfig, load_config, parse_overrides
from bov.paths import runs_dir, tracking_uri

SWEEPS_DIR = Path(os.environ.get("BOV_SWEEPS_DIR", Path(__file__).resolve().parent.parent / "sweeps"))
BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.max_flops")
METRIC_KEYS = {"val/bpb": "val_bpb", "val/loss": "val_loss", "train/loss": "train_loss"}


# ----------------------------------------------------------------------------- definitions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Base(_Strict):
    preset: str
    variant: str = "baseline"


class Budget(_Strict):
    """`steps` of the reference cell, turned into the same FLOPs (or tokens) for every cell."""

    steps: int | None = Field(None, ge=1)  # None: the preset's own train.max_steps
    match: Literal["flops", "tokens", "steps"] = "flops"


class SearchParam(_Strict):
    low: float | None = None
    high: float | None = None
    log: bool = False
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None


class Pruner(_Strict):
    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


class SweepSpec(_Strict):
    """One sweeps/<name>.yaml."""

    study: str
    description: str = ""
    base: Base
    axis: str  # a config key (model.bank_layers), `variant`, or a name for a mapping of override sets
    levels: Union[list[Any], dict[str, dict[str, Any]]] = []
    baseline_level: str | None = None
    seeds: list[int] = [0]
    budget: Budget = Budget()
    overrides: dict[str, Any] = {}
    sampler: Literal["grid", "tpe"] = "grid"
    metric: Literal["val/bpb", "val/loss"] = "val/bpb"
    space: dict[str, SearchParam] = {}  # tpe only
    n_trials: int | None = Field(None, ge=1)  # tpe only
    pruner: Pruner = Pruner()


@dataclass(frozen=True)
class Cell:
    level: str
    seed: int
    cfg: ExperimentConfig
    overrides: dict[str, Any] = field(default_factory=dict)  # what load_config got on top of preset + variant


@dataclass
class Sweep:
    """A definition resolved at one scale: every cell's validated config, before any compute."""

    name: str  # the Optuna study and MLflow experiment
    spec: SweepSpec
    path: Path
    preset: str
    cells: list[Cell] = field(default_factory=list)  # grid; for tpe, one template cell
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def levels(self) -> list[str]:
        return list(dict.fromkeys(c.level for c in self.cells))

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(c.seed for c in self.cells))

    def cell(self, level: str, seed: int) -> Cell:
        return next(c for c in self.cells if c.level == level and c.seed == seed)


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "layers_" + "_".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_sweep(
    name: str,
    scale: str | None = None,
    seeds: list[int] | None = None,
    study: str | None = None,
    steps: int | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Sweep:
    """sweeps/<name>.yaml (or a path) -> Sweep with every cell validated; ConfigError names the file and key."""
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
    preset = scale or spec.base.preset
    if scale is None or scale == spec.base.preset:
        steps = steps or spec.budget.steps
    sweep = Sweep(study or f"{spec.study}-{preset}", spec, path, preset, overrides=parse_flat(overrides))
    levels = _levels(spec, path)
    if bad := [lv for lv in levels if "/" in lv or lv.startswith(".")]:  # each level gets a folder
        raise ConfigError(f"{path}: level {bad[0]!r}: a level name cannot contain '/' or start with '.'")
    if spec.baseline_level is not None and spec.baseline_level not in levels:
        raise ConfigError(f"{path}: baseline_level {spec.baseline_level!r} is not a level ({', '.join(levels)})")

    def cell(level: str, seed: int, budget: dict[str, Any]) -> Cell:
        over = {**spec.overrides, **levels[level], **sweep.overrides}
        variant = over.pop("variant", spec.base.variant)
        over = {**over, **budget, "train.seed": seed, "tracking.experiment": sweep.name}
        try:
            return Cell(level, seed, load_config(preset, variant, over), over)
        except ConfigError as e:
            raise ConfigError(f"{path}: level {level}: {e}") from None

    # the budget: the reference cell's steps, as FLOPs (or tokens) every cell gets
    ref_level = spec.baseline_level or next(iter(levels))
    budget = _budget(cell(ref_level, spec.seeds[0], {}).cfg, spec.budget.match, steps)
    sweep.cells = [cell(level, seed, budget) for level in levels for seed in spec.seeds]
    return sweep


def parse_flat(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["train.lr_bank=0.1"]` -> {"train.lr_bank": 0.1} (dotted keys kept flat)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parse_overrides(overrides)  # same syntax checks as `bov train --set`
    return {k.strip(): yaml.safe_load(v) if v.strip() else None for k, v in (o.split("=", 1) for o in overrides)}


def _levels(spec: SweepSpec, path: Path) -> dict[str, dict[str, Any]]:
    """Level label -> the overrides that make it."""
    if spec.sampler == "tpe":
        return {"trial": {}}
    if isinstance(spec.levels, dict):
        return {str(k): dict(v or {}) for k, v in spec.levels.items()}
    key = "variant" if spec.axis == "variant" else spec.axis
    if key != "variant" and "." not in key:
        raise ConfigError(f"{path}: axis {key!r}: a list of levels needs a dotted config key (e.g. model.{key})")
    labels = [_label(v) for v in spec.levels]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: levels: duplicate level in {spec.levels}")
    return {lab: {key: v} for lab, v in zip(labels, spec.levels)}


def _budget(ref: ExperimentConfig, match: str, steps: int | None) -> dict[str, Any]:
    """Every cell's budget override, from the reference cell at the sweep's scale."""
    import torch

    from bov.model import GPT
    from bov.train import plan_budget

    if steps is not None:
        ref = ref.model_copy(update={"train": ref.train.model_copy(
            update={"max_steps": steps, "max_tokens": None, "max_flops": None})})
    with torch.device("meta"):
        fpt = GPT(ref.model).flops_per_token(ref.model.seq_len)
    b = plan_budget(ref, fpt)
    none = dict.fromkeys(BUDGET_KEYS)
    if match == "steps":
        return {**none, "train.max_steps": b.steps}
    if match == "tokens":
        return {**none, "train.max_tokens": b.tokens}
    return {**none, "train.max_flops": b.flops}


# ----------------------------------------------------------------------------- storage


def default_storage() -> str:
    return os.environ.get("BOV_OPTUNA_STORAGE") or f"sqlite:///{(runs_dir() / 'optuna.db').resolve()}"


def normalize_storage(url: str) -> str:
    if url.startswith("postgresql://"):  # SQLAlchemy's default driver is psycopg2; we ship psycopg 3
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    if not url.startswith(("sqlite:///", "postgresql+", "mysql")):
        raise ConfigError(f"optuna storage {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
    return url


class ClaimLock:
    """Serializes "which cell next" across workers: a file lock for SQLite, an advisory lock on a server.

    Optuna's GridSampler picks cells at random and hands out running cells again once the
    grid is exhausted, so two workers can run one cell; claiming under this lock cannot.
    """

    def __init__(self, url: str, study: str):
        self.url, self.key = url, zlib.crc32(study.encode()) & 0x7FFFFFFF
        self._file = self._conn = None
        if url.startswith("sqlite:///"):
            self._path = Path(url[len("sqlite:///"):] + ".claim.lock")
        else:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    def acquire(self) -> None:
        if self.url.startswith("sqlite:///"):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a")
            fcntl.flock(self._file, fcntl.LOCK_EX)
            return
        import sqlalchemy

        self._conn = self._engine.connect()
        sql = "SELECT pg_advisory_lock(:k)" if "postgresql" in self.url else "SELECT GET_LOCK(:k, -1)"
        self._conn.execute(sqlalchemy.text(sql), {"k": self.key})

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            import sqlalchemy

            sql = "SELECT pg_advisory_unlock(:k)" if "postgresql" in self.url else "SELECT RELEASE_LOCK(:k)"
            with contextlib.suppress(Exception):
                self._conn.execute(sqlalchemy.text(sql), {"k": self.key})
            self._conn.close()
            self._conn = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _mark_lost_run(study, trial, why: str = "no heartbeat") -> None:
    """Heartbeat callback: a trial whose worker died; its MLflow run ends KILLED, not RUNNING."""
    import mlflow

    uri = study.user_attrs.get("mlflow_tracking_uri")
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not uri or not run_id:
        return
    client = mlflow.MlflowClient(uri)
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", f"worker lost ({why}); trial {trial.number} will be retried")
            client.set_terminated(run_id, status="KILLED")


def fail_dead_local_trials(study) -> None:
    """Fail at once the running trials of workers on this machine whose process is gone.

    Only for SQLite (one machine by construction): there a re-run after a SIGKILL need not
    wait out the heartbeat grace period. On a shared server a host name may repeat across
    containers, so only heartbeats decide there.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(pid, t.datetime_start):
            continue
        with contextlib.suppress(UpdateFinishedTrialError):  # the same call optuna's fail_stale_trials makes
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                _mark_lost_run(study, t, why=f"process {pid} is gone")


def _alive(pid: int, since) -> bool:
    """The process `pid` exists and is the one that started at `since` (not a reused pid)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() <= since.timestamp() + 1.0
    except psutil.Error:
        return False


def open_storage(url: str, heartbeat: int):
    import optuna

    kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=heartbeat,
                                          grace_period=3 * heartbeat, heartbeat_stale_trial_callback=_mark_lost_run)
    except Exception as e:
        raise ConfigError(f"optuna storage {url} not usable: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _sampler(sweep: Sweep):
    import optuna

    if sweep.spec.sampler == "grid":
        return optuna.samplers.GridSampler({"level": sweep.levels, "seed": sweep.seeds}, seed=0)
    return optuna.samplers.TPESampler(seed=sweep.spec.seeds[0], n_startup_trials=sweep.spec.pruner.n_startup_trials)


def _pruner(sweep: Sweep):
    import optuna

    if sweep.spec.sampler == "grid":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.spec.pruner.n_startup_trials,
                                       n_warmup_steps=sweep.spec.pruner.n_warmup_steps)


def _study(sweep: Sweep, storage):
    import optuna

    return optuna.load_study(study_name=sweep.name, storage=storage, sampler=_sampler(sweep), pruner=_pruner(sweep))


# ----------------------------------------------------------------------------- claiming cells


def _cell_of(t) -> tuple[str, int] | None:
    # fixed_params first: a running trial's params are written one by one while it starts
    p = t.system_attrs.get("fixed_params") or t.params
    return (p["level"], p["seed"]) if "level" in p and "seed" in p else None


def cell_states(study, retry_failed: bool = False) -> dict[tuple[str, int], str]:
    """(level, seed) -> done | failed | running | waiting, from every trial of the study.

    A failed trial counts as final only when it says so (diverged, or an error in training);
    a worker that was killed or interrupted leaves its cell to be run again.
    """
    from optuna.trial import TrialState

    states: dict[tuple[str, int], str] = {}
    rank = {"done": 4, "running": 3, "waiting": 2, "failed": 1}
    for t in study.get_trials(deepcopy=False):
        cell = _cell_of(t)
        if cell is None:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            s = "done"
        elif t.state == TrialState.RUNNING:
            s = "running"
        elif t.state == TrialState.WAITING:
            s = "waiting"
        elif t.state == TrialState.FAIL and t.user_attrs.get("bov.final_failure") and not retry_failed:
            s = "failed"
        else:
            continue
        if rank[s] > rank.get(states.get(cell, ""), 0):
            states[cell] = s
    return states


def _claim(study, sweep: Sweep, retry_failed: bool) -> Literal["run", "wait", "done"]:
    """Under the claim lock: queue the next cell (or leave a queued one to pop); else wait or stop."""
    import optuna
    from optuna.trial import TrialState

    if sweep.spec.sampler == "tpe":
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    or (t.state == TrialState.FAIL and t.user_attrs.get("bov.final_failure"))]
        live = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if any(t.state == TrialState.WAITING for t in live) or len(finished) + len(live) < sweep.spec.n_trials:
            return "run"
        return "wait" if live else "done"
    states = cell_states(study, retry_failed)
    if "waiting" in states.values():
        return "run"
    todo = [(c.level, c.seed) for c in sweep.cells if (c.level, c.seed) not in states]
    if todo:
        level, seed = todo[0]
        # what study.enqueue_trial does, plus GridSampler's own bookkeeping (its grid id, search space),
        # so the sampler sees the grid as we do: ids index product(levels, seeds)
        space = {"level": sweep.levels, "seed": sweep.seeds}
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={
            "fixed_params": {"level": level, "seed": seed}, "search_space": space,
            "grid_id": sweep.levels.index(level) * len(sweep.seeds) + sweep.seeds.index(seed)}))
        return "run"
    return "wait" if "running" in states.values() else "done"


# ----------------------------------------------------------------------------- one trial


class StepPruning:
    """Report `metric` to the trial after each validation at `trainer.global_step`; stop if pruned.

    Lightning's stock Optuna callback reports per epoch, and our runs are one endless epoch.
    """

    def __init__(self, trial, metric: str):
        import lightning.pytorch as pl

        class _Callback(pl.Callback):
            def on_validation_end(cb, trainer, module):
                value = (getattr(module, "val_metrics", None) or {}).get(metric)
                if value is None or trainer.sanity_checking:
                    return
                trial.report(value, step=trainer.global_step)
                if trial.should_prune():
                    self.pruned_at = trainer.global_step
                    trainer.should_stop = True

        self.pruned_at: int | None = None
        self.callback = _Callback()


class Objective:
    def __init__(self, sweep: Sweep, lock: ClaimLock, parent_run_id: str, retry_failed: bool, log=print):
        self.sweep, self.lock, self.parent, self.retry_failed, self.log = sweep, lock, parent_run_id, retry_failed, log

    def __call__(self, trial) -> float:
        import mlflow
        import optuna

        from bov.train import Diverged, run_training

        sweep, spec = self.sweep, self.sweep.spec
        if spec.sampler == "grid":
            level = trial.suggest_categorical("level", sweep.levels)
            seed = trial.suggest_categorical("seed", sweep.seeds)
            cfg = sweep.cell(level, seed).cfg
            run_dir = runs_dir() / "sweeps" / sweep.name / f"{level}-seed{seed}"
        else:
            level, seed = "trial", spec.seeds[0]
            values = {k: self._suggest(trial, k, p) for k, p in spec.space.items()}
            base = sweep.cells[0]
            try:
                cfg = load_config(base.cfg.preset, base.cfg.variant, {**base.overrides, **values})
            except ConfigError as e:
                trial.set_user_attr("bov.final_failure", True)
                trial.set_user_attr("bov.error", str(e))
                raise
            level = f"trial{trial.number}"
            run_dir = runs_dir() / "sweeps" / sweep.name / level
        resume = self._was_tried(trial, level, seed) and (run_dir / "last.ckpt").is_file() and (run_dir / "run.json").is_file()
        tags = {"bov.study": sweep.name, "bov.trial": str(trial.number), "bov.axis": spec.axis,
                "bov.level": level, "bov.seed": str(seed), "bov.sweep_file": sweep.path.name}
        for k, v in (("axis", spec.axis), ("level", level), ("seed", seed), ("host", socket.gethostname()),
                     ("pid", os.getpid()), ("run_dir", str(run_dir))):
            trial.set_user_attr(k, v)
        # Only now let other workers claim: the trial is RUNNING with its params, heartbeat and pid stored.
        self.lock.release()
        pruning = StepPruning(trial, spec.metric) if spec.sampler == "tpe" else None
        self.log(f"[trial {trial.number}] {spec.axis}={level} seed={seed}" + (" (resuming)" if resume else ""))
        t0 = time.time()
        try:
            summary = run_training(
                cfg, resume=resume, extra_tags=tags, parent_run_id=self.parent,
                callbacks=[pruning.callback] if pruning else None, log=lambda *_: None, run_dir=run_dir,
                on_run_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        except Diverged as e:
            self._final(trial, str(e))
            raise
        except SystemExit as e:  # Lightning's answer to Ctrl-C, after its graceful stop
            raise KeyboardInterrupt from e
        except KeyboardInterrupt:
            raise
        except Exception as e:
            self._final(trial, f"{type(e).__name__}: {e}")
            raise
        for k in ("val_bpb", "val_loss", "tokens", "flops_per_token", "params", "epochs", "steps"):
            trial.set_user_attr(k, summary[k])
        value = summary[METRIC_KEYS[spec.metric]]
        if pruning is not None and pruning.pruned_at is not None:
            client = mlflow.MlflowClient(tracking_uri(cfg.tracking.tracking_uri))
            client.set_tag(summary["run_id"], "bov.pruned_at_step", str(pruning.pruned_at))
            client.set_terminated(summary["run_id"], status="KILLED")
            self.log(f"[trial {trial.number}] pruned at step {pruning.pruned_at}: {spec.metric} {value:.4f}")
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        self.log(f"[trial {trial.number}] {spec.axis}={level} seed={seed}: {spec.metric} {value:.4f} "
                 f"({summary['tokens'] / 1e6:.2f}M tokens, {time.time() - t0:.0f}s)")
        return value

    def _final(self, trial, reason: str) -> None:
        trial.set_user_attr("bov.final_failure", True)
        trial.set_user_attr("bov.error", reason[:2000])
        self.log(f"[trial {trial.number}] failed: {reason.splitlines()[0][:300]}")

    @staticmethod
    def _suggest(trial, key: str, p: SearchParam):
        if p.choices is not None:
            return trial.suggest_categorical(key, p.choices)
        if p.type == "int":
            return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        return trial.suggest_float(key, p.low, p.high, log=p.log)

    @staticmethod
    def _was_tried(trial, level: str, seed: int) -> bool:
        """An earlier trial ran this cell and did not fail on its own (killed or interrupted)."""
        study_trials = trial.study.get_trials(deepcopy=False)
        return any(_cell_of(t) == (level, seed) and t.number != trial.number and not t.user_attrs.get("bov.final_failure")
                   for t in study_trials)


# ----------------------------------------------------------------------------- workers


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "optuna", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats: experimental since 2.9, relied on widely
    os.environ.setdefault("BOV_PROGRESS", "0")


def worker_loop(sweep: Sweep, storage_url: str, heartbeat: int, parent_run_id: str,
                retry_failed: bool = False, log=print) -> None:
    """Claim cells until the study is complete; wait while others still run the last ones."""
    import optuna

    _quiet()
    storage = open_storage(storage_url, heartbeat)
    study = _study(sweep, storage)
    lock = ClaimLock(storage_url, sweep.name)
    objective = Objective(sweep, lock, parent_run_id, retry_failed, log)
    while True:
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # dead workers' trials -> FAIL, runs -> KILLED
            if storage_url.startswith("sqlite:"):
                fail_dead_local_trials(study)
            what = _claim(study, sweep, retry_failed)
        except BaseException:
            lock.release()
            raise
        if what != "run":
            lock.release()
            if what == "done":
                return
            time.sleep(heartbeat)
            continue
        try:  # pops the queued trial, starts its heartbeat, and the objective releases the lock
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        finally:
            lock.release()


def _worker_main(index: int, workers: int, sweep: Sweep, storage_url: str, heartbeat: int,
                 parent_run_id: str, retry_failed: bool, runs: str, gpus: int = 0) -> None:
    """Entry point of a spawned worker: its own GPU (if several), its share of CPU threads."""
    os.environ["BOV_RUNS_DIR"] = runs
    if gpus > 1:  # before torch is imported here, so CUDA never initialises with every GPU visible
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        worker_loop(sweep, storage_url, heartbeat, parent_run_id, retry_failed,
                    log=lambda m: print(f"[worker {index}] {m}", flush=True))
    except KeyboardInterrupt:
        pass


@dataclass
class SweepResult:
    name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    complete: bool
    interrupted: bool
    table: Any  # pandas DataFrame (see summarize)
    trials: dict[str, int]
    files: list[Path]


def run_sweep(sweep: Sweep, workers: int = 1, storage: str | None = None, heartbeat: int = 30,
              retry_failed: bool = False, log=print) -> SweepResult:
    """Create or continue the study, run `workers` local workers to completion, summarize."""
    import mlflow
    import optuna

    from bov.data import DataError, prepare
    from bov.train import data_regime, ensure_experiment

    if workers < 1:
        raise ConfigError(f"workers must be >= 1 (got {workers})")
    url = normalize_storage(storage or default_storage())
    uri = tracking_uri(sweep.cells[0].cfg.tracking.tracking_uri)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet()
    st = open_storage(url, heartbeat)

    # data once, here, so that workers only read caches (the largest budget of any cell); and every
    # cell's data regime (data.max_unique_tokens against the stream) checked before any training
    shapes = _budgets(sweep)
    most = max(b.tokens for b, _ in shapes)
    prepared: dict[str, Any] = {}
    for c, (budget, params) in zip(sweep.cells, shapes):
        key = c.cfg.data.model_dump_json(exclude={"max_unique_tokens"})  # a prefix of the same streams
        if key not in prepared:
            prepared[key] = prepare(c.cfg, stream_tokens=most + c.cfg.model.seq_len + 1, log=log)
        try:
            data_regime(c.cfg, budget, prepared[key].train.n_tokens, params)
        except DataError as e:
            raise ConfigError(f"{sweep.path}: level {c.level}: {e}") from None

    with ClaimLock(url, sweep.name):  # one creator of the study and of its parent run
        study = optuna.create_study(study_name=sweep.name, storage=st, sampler=_sampler(sweep),
                                    pruner=_pruner(sweep), direction="minimize", load_if_exists=True)
        parent = study.user_attrs.get("mlflow_parent_run_id")
        client = mlflow.MlflowClient(uri)
        if parent is None:
            parent = _create_parent(sweep, client, ensure_experiment(sweep.name, uri), url)
            study.set_user_attr("mlflow_parent_run_id", parent)
            study.set_user_attr("mlflow_tracking_uri", uri)
            for k, v in (("axis", sweep.spec.axis), ("levels", sweep.levels), ("seeds", sweep.seeds),
                         ("metric", sweep.spec.metric), ("baseline_level", sweep.spec.baseline_level),
                         ("sweep_file", str(sweep.path.name)), ("preset", sweep.preset)):
                study.set_user_attr(k, v)
        else:
            client.update_run(parent, status="RUNNING")
    log(f"study {sweep.name}: {len(sweep.cells) if sweep.spec.sampler == 'grid' else sweep.spec.n_trials} "
        f"cells, {workers} worker(s); optuna {url}; mlflow {uri} (experiment {sweep.name})")

    interrupted = False
    try:
        if workers == 1:
            worker_loop(sweep, url, heartbeat, parent, retry_failed, log)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            import torch

            gpus = torch.cuda.device_count()  # NVML's count: does not initialise CUDA in this process
            procs = [ctx.Process(target=_worker_main, args=(i, workers, sweep, url, heartbeat, parent, retry_failed,
                                                             str(runs_dir().resolve()), gpus), daemon=False)
                     for i in range(workers)]
            for p in procs:
                p.start()
            try:
                for p in procs:
                    p.join()
            except KeyboardInterrupt:  # the workers got the same SIGINT: let them end their runs cleanly
                for p in procs:
                    p.join()
                raise
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: runs in flight ended KILLED; re-run the same command to continue")

    study = _study(sweep, st)
    states = cell_states(study, retry_failed=False)
    complete = sweep.spec.sampler == "tpe" or all(s in ("done", "failed") for s in
                                                   (states.get((c.level, c.seed)) for c in sweep.cells))
    status = "KILLED" if interrupted else ("FINISHED" if complete else "FAILED")
    mlflow.MlflowClient(uri).set_terminated(parent, status=status)
    table = summarize(study, sweep)
    files = write_summary(table, sweep)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return SweepResult(sweep.name, url, uri, parent, complete, interrupted, table, counts, files)


def _budgets(sweep: Sweep) -> list[tuple[Any, dict[str, int]]]:
    """(Budget, parameter split) of every cell, from shapes on the meta device."""
    import torch

    from bov.model import GPT
    from bov.train import plan_budget

    out = []
    for c in sweep.cells:
        with torch.device("meta"):
            shape = GPT(c.cfg.model)
        out.append((plan_budget(c.cfg, shape.flops_per_token(c.cfg.model.seq_len)), shape.param_breakdown()))
    return out


def _create_parent(sweep: Sweep, client, experiment_id: str, storage_url: str) -> str:
    from bov.train import git_commit

    spec = sweep.spec
    tags = {"bov.study": sweep.name, "bov.axis": spec.axis, "bov.sweep_file": sweep.path.name,
            "bov.role": "sweep", "preset": sweep.preset, "git_commit": git_commit(),
            "optuna_storage": storage_url.split("@")[-1]}  # never a password
    run = client.create_run(experiment_id, tags=tags, run_name=f"sweep {sweep.name}")
    from mlflow.entities import Param

    params = {"axis": spec.axis, "levels": ",".join(sweep.levels), "seeds": ",".join(map(str, sweep.seeds)),
              "sampler": spec.sampler, "metric": spec.metric, "preset": sweep.preset,
              "baseline_level": spec.baseline_level or "-",
              "budget": ", ".join(f"{k}={v:g}" for k, v in sweep.cells[0].overrides.items()
                                  if k in BUDGET_KEYS and v is not None)}
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, sweep.path.read_text(), "sweep.yaml")
    return run.info.run_id


# ----------------------------------------------------------------------------- summary


def summarize(study, sweep: Sweep):
    """A DataFrame: per grid level, bov.analysis.compare over the completed trials (seeds, mean, std,
    delta vs the baseline level with its interval, tokens, epochs) plus a count of failed cells;
    for TPE, the ten best trials."""
    import pandas as pd
    from optuna.trial import TrialState

    from bov.analysis import compare

    metric = sweep.spec.metric
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if sweep.spec.sampler == "tpe":
        best = sorted(done, key=lambda t: t.value)[:10]
        return pd.DataFrame([{"trial": t.number, **t.params, metric: t.value,
                              "tokens": t.user_attrs.get("tokens"), "epochs": t.user_attrs.get("epochs")} for t in best])
    runs = pd.DataFrame([{"level": _cell_of(t)[0], "seed": _cell_of(t)[1], metric: t.value,
                          "tokens": t.user_attrs.get("tokens"), "epochs": t.user_attrs.get("epochs")}
                         for t in done if _cell_of(t)], columns=["level", "seed", metric, "tokens", "epochs"])
    table = compare(runs, baseline=sweep.spec.baseline_level, metric=metric, order=sweep.levels)
    table = table.set_index("level").reindex(sweep.levels).rename_axis("level").reset_index()  # levels yet to run too
    table["runs"] = table["runs"].fillna(0).astype(int)
    failed = {_cell_of(t) for t in trials if t.state == TrialState.FAIL and _cell_of(t) and t.user_attrs.get("bov.final_failure")}
    table["failed"] = [sum(c[0] == lv for c in failed) for lv in table["level"]]
    return table


def format_summary(table, sweep: Sweep) -> str:
    """The summary as Markdown: bov.analysis.format_table's columns, a failed column when some cell failed."""
    from bov.analysis import format_table

    if table.empty:
        return "(no completed trials)"
    if sweep.spec.sampler == "tpe":
        return table.to_markdown(index=False, floatfmt=".4g")
    shown = format_table(table, metric=sweep.spec.metric, baseline=sweep.spec.baseline_level)
    if table["failed"].any():
        shown.insert(2, "failed", table["failed"])
    text = shown.to_markdown(index=False, disable_numparse=True)
    epochs = table["epochs"].dropna() if "epochs" in table else []
    if len(epochs) and (epochs > 1).any():
        text += "\n\nNote: some cells saw their training data more than once (epochs > 1)."
    if len(epochs) and epochs.max() > 1.05 * epochs.min():
        text += f"\nNote: the cells differ in epochs ({epochs.min():.2f} to {epochs.max():.2f}), not only in the axis."
    return text


def write_summary(table, sweep: Sweep) -> list[Path]:
    out = runs_dir() / "sweeps" / sweep.name
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / "summary.md", out / "summary.csv"
    md.write_text(f"# {sweep.name}\n\n{format_summary(table, sweep)}\n")
    table.to_csv(csv, index=False)
    return [md, csv]
