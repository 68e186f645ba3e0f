"""Run a study (bov.study): an Optuna study whose trials are training runs, one MLflow child run each.

A grid study crosses the levels of one axis with seeds; every (level, seed) cell runs exactly once,
however many workers or machines share the study. A TPE study samples a search space and prunes on
intermediate `val/bpb`. The two differ only in how a trial finds its cell, which lives in bov.trials (`Grid`,
`Tpe`, the cell bookkeeping and the summary); everything here (claiming under a lock, the objective,
workers) is shared. Re-running the
same command continues the study: finished cells are skipped, a cell whose worker died (heartbeat gone
stale) or was interrupted is run again, from its last checkpoint when it has one.

State: the Optuna storage (bov.storage), MLflow (bov.tracking), per-cell checkpoints under
`<runs>/sweeps/<study>/`. A study records the data identity it was started on (`DATA_ATTR`, per data setting);
continuing it, or any cell of it, on other data stops before any compute. A cell's run directory has one writer
(bov.paths.RunLock): a worker takes it before it lets the claim lock go.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bov import preflight, tracking
from bov.budget import data_regime
from bov.config import ConfigError, DataError
from bov.data import DataDrift, Recorded, prepare
from bov.litmodule import Diverged
from bov.mlflow_store import ensure_experiment
from bov.paths import RunBusy, RunLock, runs_dir, tracking_uri
from bov.storage import ClaimLock, default_storage, fail_dead_local_trials, normalize_storage, open_storage
from bov.study import Sweep, cell_budgets
from bov.train import run_training
from bov.trials import (CONFIG_HASH_ATTR, FINAL_FAILURE, ERROR_ATTR, cell_deltas, cell_of, cell_run_names,
                        changed_cells, failed_cells, format_summary, resumable, run_tag, sampling, study_metrics,
                        summarize, write_summary)


DATA_ATTR = "bov.data"  # study attribute: data setting (data_key) -> the data identity its cells are trained on


def data_key(cfg) -> str:
    """One study's data setting: cells that differ only in how much of the stream they may repeat share it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg.data.hashed(exclude={"max_unique_tokens"}), separators=(",", ":"))
                          .encode()).hexdigest()[:16]


def _existing(sweep: Sweep, storage):
    import optuna

    try:
        return optuna.load_study(study_name=sweep.name, storage=storage)
    except KeyError:  # a new study
        return None


def _records(sweep: Sweep, study, uri: str) -> dict[str, Recorded]:
    """What the study's cells were trained on, per data setting: its DATA_ATTR, or (studies from before it) the
    data fingerprint tag of a finished cell's MLflow run."""
    import mlflow
    from optuna.trial import TrialState

    owner, advice = (f"{sweep.path}: study {sweep.name}", "restore the data its cells were trained on, or run the "
                     "new data as a new study (--study NAME)")
    if study is None:
        return {}
    found = dict(study.user_attrs.get(DATA_ATTR) or {})
    if not found:
        client = mlflow.MlflowClient(uri)
        keys = {(c.level, c.seed): data_key(c.cfg) for c in sweep.cells}
        for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
            key = keys.get(cell_of(t))
            if key is not None and key not in found and (tag := run_tag(client, t, tracking.TAG_DATA)):
                found[key] = {"fingerprint": tag}
    return {k: Recorded(owner, v, advice) for k, v in found.items()}


def _refuse_changed_cells(sweep: Sweep, study, uri: str) -> None:
    """A study whose finished cells ran another config than its file and presets now give stops here, before
    any compute: continuing it would mix two recipes in one table."""
    if study is None:
        return
    changed = changed_cells(sweep, study, study.user_attrs.get(tracking.STUDY_TRACKING_URI, uri))
    if changed:
        level, seed, ran, now = changed[0]
        raise ConfigError(
            f"{sweep.path}: study {sweep.name} has {len(changed)} finished cell(s) run with another config than "
            f"its study file and presets now give (level {level} seed {seed}: config {ran}, now {now}); "
            f"run the new config as a new study (--study NAME), or restore the old one to continue")


def _study(sweep: Sweep, storage):
    import optuna

    kind = sampling(sweep)
    return optuna.load_study(study_name=sweep.name, storage=storage, sampler=kind.sampler(), pruner=kind.pruner())


# ----------------------------------------------------------------------------- one trial


class Objective:
    def __init__(self, sweep: Sweep, lock: ClaimLock, parent_run_id: str, retry_failed: bool, log=print,
                 records: dict[str, Recorded] | None = None):
        self.sweep, self.lock, self.parent, self.retry_failed, self.log = sweep, lock, parent_run_id, retry_failed, log
        self.kind = sampling(sweep)
        self.records = records or {}  # data_key -> the study's data identity: every cell is trained on it
        self.stop: DataError | None = None  # the study's data changed under it: no cell may run
        self.busy = False  # the last claimed cell had a live writer

    def __call__(self, trial) -> float:
        self.busy = False
        try:
            level, seed, cfg, run_dir = self.kind.cell(trial)
        except Exception as e:  # final: a cell that cannot even be set up would otherwise be claimed forever
            self._final(trial, f"{type(e).__name__}: {e}")
            self.lock.release()
            raise
        try:  # the run directory's own lock, taken while no other worker can claim: one writer per cell
            run_lock = RunLock(run_dir).acquire()
        except RunBusy as e:  # e.g. a worker whose heartbeat went stale but that still runs: not run twice
            trial.set_user_attr(ERROR_ATTR, str(e)[:2000])
            self.log(f"[trial {trial.number}] {level} seed {seed}: {e}; later")
            self.busy = True
            self.lock.release()
            raise
        try:
            return self._run(trial, level, seed, cfg, run_dir)
        finally:
            run_lock.release()

    def _run(self, trial, level, seed, cfg, run_dir) -> float:
        import optuna

        sweep, spec = self.sweep, self.sweep.spec
        resume = self._was_tried(trial, level, seed) and (run_dir / "last.ckpt").is_file() and (run_dir / "run.json").is_file()
        tags = {tracking.TAG_STUDY: sweep.name, tracking.TAG_TRIAL: str(trial.number), tracking.TAG_AXIS: spec.axis,
                tracking.TAG_LEVEL: level, tracking.TAG_CELL_SEED: str(seed), tracking.TAG_SWEEP_FILE: sweep.path.name,
                **{tracking.TAG_COORD + axis: lv for axis, lv in sweep.coords(level).items()}}
        for k, v in (("axis", spec.axis), ("level", level), ("seed", seed), ("host", socket.gethostname()),
                     ("pid", os.getpid()), ("run_dir", str(run_dir)), (CONFIG_HASH_ATTR, cfg.config_hash())):
            trial.set_user_attr(k, v)
        keep = None
        if resume:
            try:
                keep = json.loads((run_dir / "run.json").read_text())["run_id"]
            except (OSError, ValueError, KeyError, TypeError):  # a damaged state file: the cell starts afresh
                resume = False
        cell = {tracking.TAG_STUDY: sweep.name, tracking.TAG_LEVEL: level, tracking.TAG_CELL_SEED: str(seed)}
        if tracking.retire_orphan_runs(tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment, cell, keep):
            self.log(f"[trial {trial.number}] removed a run of this cell that a killed worker left RUNNING")
        # Only now let other workers claim: the trial is RUNNING with its params, heartbeat and pid stored.
        self.lock.release()
        pruning = self.kind.pruning(trial)
        self.log(f"[trial {trial.number}] {spec.axis}={level} seed={seed}" + (" (resuming)" if resume else ""))
        t0 = time.time()
        record = self.records.get(data_key(cfg))
        try:
            summary = run_training(
                cfg, resume=resume, extra_tags=tags, parent_run_id=self.parent,
                callbacks=[pruning.callback] if pruning else None, log=lambda *_: None, run_dir=run_dir,
                on_run_start=lambda run_id: trial.set_user_attr(tracking.TRIAL_RUN_ID, run_id),
                expect=(record,) if record else (), locked=True)
        except DataDrift as e:  # not the cell's fault: it runs again once the data is restored
            trial.set_user_attr(ERROR_ATTR, str(e)[:2000])
            self.stop = e
            raise
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
        value = summary[tracking.SUMMARY_KEYS[spec.metric]]
        if pruning is not None and pruning.pruned_at is not None:
            tracking.mark_pruned(tracking_uri(cfg.tracking.tracking_uri), summary["run_id"], pruning.pruned_at)
            self.log(f"[trial {trial.number}] pruned at step {pruning.pruned_at}: {spec.metric} {value:.4f}")
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        self.log(f"[trial {trial.number}] {spec.axis}={level} seed={seed}: {spec.metric} {value:.4f} "
                 f"({summary['tokens'] / 1e6:.2f}M tokens, {time.time() - t0:.0f}s)")
        return value

    def _final(self, trial, reason: str) -> None:
        trial.set_user_attr(FINAL_FAILURE, True)
        trial.set_user_attr(ERROR_ATTR, reason[:2000])
        self.log(f"[trial {trial.number}] failed: {reason.splitlines()[0][:300]}")

    @staticmethod
    def _was_tried(trial, level: str, seed: int) -> bool:
        return resumable(trial.study.get_trials(deepcopy=False), trial.number, level, seed)


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
    """Claim cells until the study is complete; wait while others still run the last ones. Stops with
    DataDrift when the study's data changed under it (every later cell would be trained on other data)."""
    import optuna

    _quiet()
    storage = open_storage(storage_url, heartbeat)
    study = _study(sweep, storage)
    lock = ClaimLock(storage_url, sweep.name)
    records = _records(sweep, study, tracking_uri(sweep.cells[0].cfg.tracking.tracking_uri))
    objective = Objective(sweep, lock, parent_run_id, retry_failed, log, records)
    while True:
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # dead workers' trials -> FAIL, runs -> KILLED
            if storage_url.startswith("sqlite:"):
                fail_dead_local_trials(study)
            what = sampling(sweep).claim(study, retry_failed)
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
        if objective.stop is not None:
            raise objective.stop
        if objective.busy:
            time.sleep(heartbeat)


def _end_with_parent(parent_pid: int, every: float = 1.0) -> None:
    """A worker stops when the sweep process is gone, even SIGKILLed (which no handler sees); otherwise it
    would go on and share the cores with the next `bov sweep`. It sends itself SIGTERM, which Lightning turns
    into a clean stop with the run KILLED. Polling rather than Linux's PR_SET_PDEATHSIG: it works wherever
    spawn does."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bov-parent-watch", daemon=True).start()


def _worker_main(index: int, workers: int, sweep: Sweep, storage_url: str, heartbeat: int,
                 parent_run_id: str, retry_failed: bool, runs: str, gpus: int = 0, parent_pid: int = 0) -> None:
    """Entry point of a spawned worker: its own GPU (if several), its share of CPU threads."""
    if parent_pid:
        _end_with_parent(parent_pid)
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
    except DataError as e:  # one line, as the sweep itself says it
        print(f"[worker {index}] error: {e}", flush=True)
        raise SystemExit(2) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM to the sweep process: stops as Ctrl-C does, and `bov sweep` exits 143 rather than 130."""


def _by_sigterm(e: BaseException) -> bool:
    """Whether a stop came from SIGTERM: ours (several workers) or Lightning's (one worker, mid-training)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    while e is not None:
        if isinstance(e, (Terminated, SIGTERMException)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _forward_sigterm(procs) -> Any:
    """`kill <sweep pid>` reaches only this process: pass SIGTERM on to the workers, then stop as Ctrl-C does.
    Returns the handler it replaced (None off the main thread, where Python cannot set one)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        raise Terminated

    return signal.signal(signal.SIGTERM, handler)


@dataclass
class SweepResult:
    name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    complete: bool
    interrupted: str | None  # None, or how: "SIGINT" (Ctrl-C) or "SIGTERM"
    failed: list[tuple[str, int, str]]  # (level, seed, reason) of cells that failed on their own
    table: Any  # pandas DataFrame (see summarize)
    trials: dict[str, int]
    files: list[Path]


def prepare_study(sweep: Sweep, records: dict[str, Recorded] | None = None, log=print) -> dict[str, Any]:
    """Every data setting of the study tokenized once (the largest budget of any cell), so that workers only read
    caches; and every cell's data regime (data.max_unique_tokens against the stream) checked before any training.
    `bov prepare --study` runs this alone, e.g. as one cluster job before a job array of workers."""

    records = records or {}
    shapes = cell_budgets(sweep)
    most = max(b.tokens for b, _ in shapes)
    prepared: dict[str, Any] = {}
    for c, (budget, params) in zip(sweep.cells, shapes):
        key = data_key(c.cfg)  # a prefix of the same streams
        if key not in prepared:
            prepared[key] = prepare(c.cfg, stream_tokens=most + c.cfg.model.seq_len + 1, log=log,
                                    expect=[records[key]] if key in records else [])
        try:
            data_regime(c.cfg, budget, prepared[key].train.n_tokens, params)
        except DataError as e:
            raise ConfigError(f"{sweep.path}: level {c.level}: {e}") from None
    return prepared


def run_sweep(sweep: Sweep, workers: int = 1, storage: str | None = None, heartbeat: int = 30,
              retry_failed: bool = False, log=print) -> SweepResult:
    """Create or continue the study, run `workers` local workers to completion, summarize."""
    import optuna

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat must be >= 1 second (got {heartbeat})")
    # what the data sources, the compiler, Lightning and the tracking store will refuse: before any store or data
    preflight.study(sweep)

    url = normalize_storage(storage or default_storage())
    uri = tracking_uri(sweep.cells[0].cfg.tracking.tracking_uri)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet()
    st = open_storage(url, heartbeat)
    existing = _existing(sweep, st)
    _refuse_changed_cells(sweep, existing, uri)
    prepared = prepare_study(sweep, _records(sweep, existing, uri), log)
    parent = _open_study(sweep, st, url, uri, prepared)
    tracking.mark_sweep_process(uri, parent)
    log(f"study {sweep.name}: {sampling(sweep).n_trials} cells, {workers} worker(s); optuna {url}; mlflow {uri} "
        f"(experiment {sweep.name})")
    interrupted = _run_workers(sweep, workers, url, uri, heartbeat, parent, retry_failed, log)
    return _finish(sweep, st, url, uri, parent, interrupted)


def _open_study(sweep: Sweep, st, url: str, uri: str, prepared: dict) -> str:
    """Create the study and its MLflow parent run, or reopen both (a re-run records new levels or seeds); record
    the data identity its cells are trained on. The parent run's id."""
    import mlflow
    import optuna

    kind = sampling(sweep)
    with ClaimLock(url, sweep.name):  # one creator of the study and of its parent run
        study = optuna.create_study(study_name=sweep.name, storage=st, sampler=kind.sampler(),
                                    pruner=kind.pruner(), direction="minimize", load_if_exists=True)
        parent = study.user_attrs.get(tracking.STUDY_PARENT_RUN)
        # what the study's cells are trained on, recorded once (a streaming source's training stream is each
        # cell's own prefix of it: not recorded)
        streaming = {data_key(c.cfg): c.cfg.data.streaming for c in sweep.cells}
        now = {k: {stage: v for stage, v in p.identity.items() if not (stage == "train" and streaming[k])}
               for k, p in prepared.items()}
        study.set_user_attr(DATA_ATTR, {**now, **(study.user_attrs.get(DATA_ATTR) or {})})
        if parent is not None:
            mlflow.MlflowClient(uri).update_run(parent, status="RUNNING")
            tracking.extend_sweep_run(sweep, uri, parent)  # a re-run with more levels or seeds records them
            return parent
        parent = tracking.create_sweep_run(sweep, uri, ensure_experiment(sweep.name, uri), url)
        study.set_user_attr(tracking.STUDY_PARENT_RUN, parent)
        study.set_user_attr(tracking.STUDY_TRACKING_URI, uri)
        for k, v in (("axis", sweep.spec.axis), ("levels", sweep.levels), ("seeds", sweep.seeds),
                     ("metric", sweep.spec.metric), ("baseline_level", sweep.spec.baseline_level),
                     ("sweep_file", str(sweep.path.name)), ("preset", sweep.preset)):
            study.set_user_attr(k, v)
        return parent


def _run_workers(sweep: Sweep, workers: int, url: str, uri: str, heartbeat: int, parent: str, retry_failed: bool,
                 log) -> str | None:
    """The workers, here (one) or as spawned processes (several), to the end of the grid; the signal that
    interrupted them ("SIGTERM", "SIGINT") or None. Any other error fails the parent run and is raised."""
    import mlflow

    try:
        if workers == 1:
            worker_loop(sweep, url, heartbeat, parent, retry_failed, log)
            return None
        import multiprocessing as mp

        import torch

        ctx = mp.get_context("spawn")
        gpus = torch.cuda.device_count()  # NVML's count: does not initialise CUDA in this process
        procs = [ctx.Process(target=_worker_main, args=(i, workers, sweep, url, heartbeat, parent, retry_failed,
                                                         str(runs_dir().resolve()), gpus, os.getpid()), daemon=False)
                 for i in range(workers)]
        for p in procs:
            p.start()
        before = _forward_sigterm(procs)
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:  # the workers got the same SIGINT (or SIGTERM): let them end their runs cleanly
            for p in procs:
                p.join()
            raise
        finally:
            if before is not None:
                signal.signal(signal.SIGTERM, before)
        return None
    except KeyboardInterrupt as e:
        log("interrupted: runs in flight ended KILLED; re-run the same command to continue")
        return "SIGTERM" if _by_sigterm(e) else "SIGINT"
    except BaseException:  # e.g. the data changed under the study: the parent run does not stay RUNNING
        mlflow.MlflowClient(uri).set_terminated(parent, status="FAILED")
        raise


def _finish(sweep: Sweep, st, url: str, uri: str, parent: str, interrupted: str | None) -> SweepResult:
    """End the parent run (KILLED, FINISHED or FAILED naming its failed cells) and publish the summary on it."""
    import mlflow

    study = _study(sweep, st)
    complete = sampling(sweep).complete(study)
    failed = failed_cells(study)
    status = "KILLED" if interrupted else ("FINISHED" if complete and not failed else "FAILED")
    client = mlflow.MlflowClient(uri)
    if failed:  # the parent run says which cells failed and why
        client.set_tag(parent, tracking.TAG_FAILED_CELLS, "; ".join(f"{lv} seed {sd}: {why}" for lv, sd, why in failed)[:4900])
    client.set_terminated(parent, status=status)
    table = summarize(study, sweep)
    files = write_summary(table, sweep, failed)
    tracking.publish_study(uri, parent, f"# {sweep.name}\n\n{format_summary(table, sweep)}\n",
                           study_metrics(table, sweep), int(table["runs"].sum()) if "runs" in table else 0,
                           cell_deltas(study, sweep), cell_run_names(study, sweep))
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return SweepResult(sweep.name, url, uri, parent, complete, interrupted, failed, table, counts, files)
