"""How a study's trials map to its cells: bookkeeping over Optuna trials and the summary of a study.

A grid trial runs one (level, seed) cell; which cells are done, running, waiting, failed on their own, or
resumable from a checkpoint is read from the trials alone (`cell_states`), so any number of workers on any
number of machines agree. `Grid` and `Tpe` are the two ways a trial finds its cell (claim the next one, set
it up, prune it or not, summarize the study); bov.sweep runs the trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from bov import tracking
from bov.config import ConfigError, ExperimentConfig, load_config
from bov.paths import runs_dir
from bov.scaling import ALONG_SIZES, LadderError, along_ladder, format_multiplier, multipliers
from bov.stats import compare, compare_within, format_table, format_verdicts, verdicts
from bov.study import SearchParam, Sweep

FINAL_FAILURE, ERROR_ATTR = "bov.final_failure", "bov.error"  # trial attributes: failed on its own, and why
CONFIG_HASH_ATTR = "bov.config_hash"  # trial attribute: ExperimentConfig.config_hash() of the config it ran
MAX_ATTEMPTS = 3  # --retry-failed runs a failed cell again until it has failed on its own this many times


def cell_of(t) -> tuple[str, int] | None:
    """A grid trial's (level, seed), from the queued cell (a grid trial suggests no parameters; older
    studies' trials also have them as params)."""
    p = t.system_attrs.get("fixed_params") or t.params
    return (p["level"], p["seed"]) if "level" in p and "seed" in p else None


def failed_cells(study) -> list[tuple[str, int, str]]:
    """(level, seed, reason) of the cells whose last trial failed on its own (diverged, an error in training)
    and that no later trial completed."""
    from optuna.trial import TrialState

    last: dict[tuple[str, int], Any] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        cell = cell_of(t)
        if cell is not None and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            last[cell] = t
    return [(lv, seed, t.user_attrs.get(ERROR_ATTR, "failed").splitlines()[0][:300])
            for (lv, seed), t in sorted(last.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
            if t.state == TrialState.FAIL and t.user_attrs.get(FINAL_FAILURE)]


def resumable(trials, number: int, level: str, seed: int) -> bool:
    """Trial `number` may resume the cell's checkpoint: the cell's latest earlier trial was killed or
    interrupted. After a failure of its own (divergence, an unreadable checkpoint, an error in training) a
    retry starts from scratch, so a bad checkpoint is never read twice."""
    earlier = [t for t in trials if cell_of(t) == (level, seed) and t.number < number]
    return bool(earlier) and not max(earlier, key=lambda t: t.number).user_attrs.get(FINAL_FAILURE)


def cell_states(study, retry_failed: bool = False) -> dict[tuple[str, int], str]:
    """(level, seed) -> done | failed | running | waiting, from every trial of the study.

    A failed trial counts as final only when it says so (diverged, or an error in training);
    a worker that was killed or interrupted leaves its cell to be run again.
    """
    from optuna.trial import TrialState

    states: dict[tuple[str, int], str] = {}
    rank = {"done": 4, "running": 3, "waiting": 2, "failed": 1}
    trials = study.get_trials(deepcopy=False)
    failures: dict[tuple[str, int], int] = {}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(FINAL_FAILURE) and cell_of(t) is not None:
            failures[cell_of(t)] = failures.get(cell_of(t), 0) + 1
    for t in trials:
        cell = cell_of(t)
        if cell is None:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            s = "done"
        elif t.state == TrialState.RUNNING:
            s = "running"
        elif t.state == TrialState.WAITING:
            s = "waiting"
        elif t.state == TrialState.FAIL and t.user_attrs.get(FINAL_FAILURE) and (
                not retry_failed or failures[cell] >= MAX_ATTEMPTS):  # retried a bounded number of times
            s = "failed"
        else:
            continue
        if rank[s] > rank.get(states.get(cell, ""), 0):
            states[cell] = s
    return states


def run_tag(client, trial, tag: str) -> str | None:
    """A tag of the MLflow run a trial recorded: how studies from before a trial attribute existed are read
    back (None: no run recorded, or it was deleted, so nothing to compare against)."""
    import mlflow

    run_id = trial.user_attrs.get(tracking.TRIAL_RUN_ID)
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.tags.get(tag)
    except mlflow.exceptions.MlflowException:
        return None


def changed_cells(sweep: Sweep, study, tracking_uri: str | None) -> list[tuple[str, int, str, str]]:
    """(level, seed, hash it ran, hash now) of the grid's completed cells whose config differs from what the
    study file and presets give that cell today. Continuing such a study would put two recipes in one table
    as if they were one. Trials from before the hash was recorded are read back from their MLflow run's tag."""
    import mlflow
    from optuna.trial import TrialState

    if sweep.spec.sampler != "grid":  # a TPE trial's config is its sampled point: nothing to compare against
        return []
    now = {(c.level, c.seed): c.cfg.config_hash() for c in sweep.cells}
    client = mlflow.MlflowClient(tracking_uri) if tracking_uri else None
    changed = []
    for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED]):
        cell = cell_of(t)
        if cell not in now:
            continue
        ran = t.user_attrs.get(CONFIG_HASH_ATTR)
        if ran is None and client is not None:
            ran = run_tag(client, t, tracking.TAG_CONFIG_HASH)
        if ran is not None and ran != now[cell]:
            changed.append((*cell, ran, now[cell]))
    return sorted(changed)


# ----------------------------------------------------------------------------- grid and TPE


class Grid:
    """Every (level, seed) cell exactly once: cells are queued one at a time under the claim lock."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    @property
    def n_trials(self) -> int:
        return len(self.sweep.cells)

    def sampler(self):
        import optuna

        return optuna.samplers.GridSampler({"level": self.sweep.levels, "seed": self.sweep.seeds}, seed=0)

    def pruner(self):
        import optuna

        return optuna.pruners.NopPruner()

    def claim(self, study, retry_failed: bool) -> Literal["run", "wait", "done"]:
        """Queue the next cell (or leave a queued one to pop); else wait for running ones, or stop."""
        import optuna
        from optuna.trial import TrialState

        sweep = self.sweep
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

    def cell(self, trial) -> tuple[str, int, ExperimentConfig, Path]:
        # The queued cell, read back rather than suggested: Optuna refuses a categorical parameter whose
        # choices change, so suggesting would break a study re-run with more seeds (SEEDS=3) or levels.
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        level, seed = cell_of(frozen)
        return level, seed, self.sweep.cell(level, seed).cfg, runs_dir() / "sweeps" / self.sweep.name / f"{level}-seed{seed}"

    def pruning(self, trial):
        return None

    def complete(self, study) -> bool:
        states = cell_states(study, retry_failed=False)
        return all(states.get((c.level, c.seed)) in ("done", "failed") for c in self.sweep.cells)

    def summarize(self, study):
        """Per level, bov.analysis.compare over the completed trials (seeds, mean, std, delta vs the baseline
        level with its interval, tokens, epochs) plus a count of failed cells."""
        import pandas as pd
        from optuna.trial import TrialState

        sweep, metric = self.sweep, self.sweep.spec.metric
        trials = study.get_trials(deepcopy=False)
        runs = pd.DataFrame([{"level": cell_of(t)[0], "seed": cell_of(t)[1], metric: t.value,
                              "tokens": t.user_attrs.get("tokens"), "epochs": t.user_attrs.get("epochs"),
                              "flops_per_token": t.user_attrs.get("flops_per_token")}
                             for t in trials if t.state == TrialState.COMPLETE and cell_of(t)],
                            columns=["level", "seed", metric, "tokens", "epochs", "flops_per_token"])
        if sweep.axes:
            table = self._crossed(runs)
        else:
            table = compare(runs, baseline=sweep.spec.baseline_level, metric=metric, order=sweep.levels,
                            references=sweep.references)
        table = table.set_index("level").reindex(sweep.levels).rename_axis("level").reset_index()  # levels yet to run
        table["runs"] = table["runs"].fillna(0).astype(int)
        failed = {cell_of(t) for t in trials if t.state == TrialState.FAIL and cell_of(t) and t.user_attrs.get(FINAL_FAILURE)}
        table["failed"] = [sum(c[0] == lv for c in failed) for lv in table["level"]]
        if sweep.spec.paper is not None:  # the paper's claims against these seeds, shown by format

            table.attrs["verdicts"] = verdicts(runs, sweep.spec.paper.model_dump(), sweep.references, metric=metric)
        return table

    def _crossed(self, runs):
        """A crossed study: each first-axis level against the baseline at the same second-axis level, and with a
        budget ladder the compute multiplier (bov.scaling), or the line that says why there is none."""

        sweep, (a, b) = self.sweep, (ax["name"] for ax in self.sweep.axes)
        runs = runs.assign(**{axis: [sweep.coords(lv)[axis] for lv in runs["level"]] for axis in (a, b)},
                           compute=runs["tokens"] * runs["flops_per_token"])
        table = compare_within(runs, group=b, by=a, baseline=sweep.spec.baseline_level, metric=sweep.spec.metric,
                               order=sweep.axes[0]["levels"], references=sweep.references)
        if table.empty:
            return table.assign(level=[], runs=[])
        table["level"] = table[a] + "@" + table[b]
        if sweep.axes[1]["kind"] == "budget":
            try:
                m = multipliers(runs, by=a, budget=b, baseline=sweep.spec.baseline_level, metric=sweep.spec.metric)
                table = table.merge(m[[a, b, "multiplier", "ci_low", "ci_high", "extrapolated"]].rename(
                    columns={"ci_low": "multiplier_low", "ci_high": "multiplier_high"}), on=[a, b], how="left")
            except LadderError as e:
                table.attrs["no_multiplier"] = str(e)
        if sweep.axes[1]["kind"] == "size":  # the baseline's sizes as a compute ladder, read without a law
            try:
                m = along_ladder(runs, by=a, rung=b, baseline=sweep.spec.baseline_level, metric=sweep.spec.metric)
                table = table.merge(m.rename(columns={"ci_low": "multiplier_low", "ci_high": "multiplier_high"})
                                    .assign(extrapolated=False), on=[a, b], how="left")
                table.attrs["multiplier_along"] = b
            except LadderError as e:
                table.attrs["no_multiplier"] = str(e)
        return table

    def format(self, table) -> str:

        spec = self.sweep.spec
        shown = format_table(table, metric=spec.metric, baseline=spec.baseline_level)
        if table["failed"].any():
            shown.insert(2, "failed", table["failed"])
        if "multiplier" in table:
            shown["× compute (95% CI)"] = [format_multiplier(*r) for r in zip(
                table["multiplier"], table["multiplier_low"], table["multiplier_high"], table["extrapolated"])]
        text = shown.to_markdown(index=False, disable_numparse=True)
        if self.sweep.axes:
            axis = self.sweep.axes[1]["name"]
            text += f"\n\nΔ: against {spec.baseline_level} at the same {axis}, paired by seed."
            if "multiplier_along" in table.attrs:
                text += f" {ALONG_SIZES}."
            elif "multiplier" in table:
                text += (" × compute: the baseline's compute at which its fitted ladder reaches the level's loss, over "
                         "the level's own (bov.scaling); 95% interval by bootstrap over seeds.")
            if "no_multiplier" in table.attrs:
                text += f" No compute multiplier: {table.attrs['no_multiplier']}."
        v = table.attrs.get("verdicts")
        if v is not None and len(v):

            counts = ", ".join(f"{(v['verdict'] == k).sum()} {k}" for k in ("agrees", "disagrees", "unresolved"))
            text += (f"\n\nThe paper's claims ({spec.paper.source}) against this study: {counts}\n\n"
                     + format_verdicts(v).to_markdown(index=False, disable_numparse=True))
        if spec.baseline_level and table["runs"].max() <= 1:
            text += ("\n\nNote: one seed per level, so no difference here carries an interval: it is an anecdote, "
                     "not a finding. Run more seeds (SEEDS=3) before reading an ordering into it.")
        epochs = table["epochs"].dropna() if "epochs" in table else []
        if len(epochs) and (epochs > 1).any():  # under one epoch, FLOPs-matched cells differ in tokens, harmlessly
            text += "\n\nNote: some cells saw their training data more than once (epochs > 1)."
            if epochs.max() > 1.05 * epochs.min():
                text += (f"\nNote: the cells differ in epochs ({epochs.min():.3g} to {epochs.max():.3g}), "
                         "not only in the axis.")
        return text


class Tpe:
    """`n_trials` trials sampled by TPE over `space`, median-pruned on intermediate validation."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    @property
    def n_trials(self) -> int:
        return self.sweep.spec.n_trials

    def sampler(self):
        import optuna

        return optuna.samplers.TPESampler(seed=self.sweep.spec.seeds[0], n_startup_trials=self.sweep.spec.pruner.n_startup_trials)

    def pruner(self):
        import optuna

        p = self.sweep.spec.pruner
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)

    def claim(self, study, retry_failed: bool) -> Literal["run", "wait", "done"]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    or (t.state == TrialState.FAIL and t.user_attrs.get(FINAL_FAILURE))]
        live = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if any(t.state == TrialState.WAITING for t in live) or len(finished) + len(live) < self.n_trials:
            return "run"
        return "wait" if live else "done"

    def cell(self, trial) -> tuple[str, int, ExperimentConfig, Path]:
        values = {k: self._suggest(trial, k, p) for k, p in self.sweep.spec.space.items()}
        base = self.sweep.cells[0]
        try:
            cfg = load_config(base.cfg.preset, base.cfg.variant, {**base.overrides, **values})
        except ConfigError as e:
            trial.set_user_attr(FINAL_FAILURE, True)
            trial.set_user_attr(ERROR_ATTR, str(e))
            raise
        level = f"trial{trial.number}"
        return level, self.sweep.spec.seeds[0], cfg, runs_dir() / "sweeps" / self.sweep.name / level

    @staticmethod
    def _suggest(trial, key: str, p: SearchParam):
        if p.choices is not None:
            return trial.suggest_categorical(key, p.choices)
        if p.type == "int":
            return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        return trial.suggest_float(key, p.low, p.high, log=p.log)

    def pruning(self, trial):
        return StepPruning(trial, self.sweep.spec.metric)

    def complete(self, study) -> bool:
        return True

    def summarize(self, study):
        """The ten best trials."""
        import pandas as pd
        from optuna.trial import TrialState

        done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        return pd.DataFrame([{"trial": t.number, **t.params, self.sweep.spec.metric: t.value,
                              "tokens": t.user_attrs.get("tokens"), "epochs": t.user_attrs.get("epochs")}
                             for t in sorted(done, key=lambda t: t.value)[:10]])

    def format(self, table) -> str:
        return table.to_markdown(index=False, floatfmt=".4g")


def sampling(sweep: Sweep) -> Grid | Tpe:
    return Tpe(sweep) if sweep.spec.sampler == "tpe" else Grid(sweep)



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


# ----------------------------------------------------------------------------- summary


def summarize(study, sweep: Sweep):
    """A DataFrame: per grid level, the comparison with the baseline level; for TPE, the ten best trials."""
    return sampling(sweep).summarize(study)


def format_summary(table, sweep: Sweep) -> str:
    """The summary as Markdown: bov.analysis.format_table's columns, a failed column when some cell failed."""
    if table.empty:
        return "(no completed trials)"
    return sampling(sweep).format(table)


def study_metrics(table, sweep: Sweep) -> dict[str, float]:
    """The parent run's metrics from the summary table: per level its mean, its delta against each reference
    with the interval, and its compute multiplier where there is one (`val_bpb_mean/last_third`,
    `val_bpb_delta_vs_none/last_third`, `..._ci_low/...`)."""
    name = sweep.spec.metric.replace("/", "_")
    out: dict[str, float] = {}
    refs = sweep.references
    for r in table.to_dict("records") if "level" in table else []:
        lv = r["level"]
        out[tracking.metric_key(f"{name}_mean", lv)] = r.get(f"{sweep.spec.metric} mean")
        for ref in refs:
            sfx = "" if ref == sweep.spec.baseline_level else f" vs {ref}"
            if lv.split("@")[0] == ref or f"delta{sfx}" not in r:
                continue
            for col, tail in (("delta", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                out[tracking.metric_key(f"{name}_delta_vs_{ref}{tail}", lv)] = r.get(f"{col}{sfx}")
        for col, tail in (("multiplier", ""), ("multiplier_low", "_ci_low"), ("multiplier_high", "_ci_high")):
            if r.get(col) is not None:
                out[tracking.metric_key(f"compute_multiplier{tail}", lv)] = r[col]
    return {k: v for k, v in out.items() if v is not None and v == v and abs(v) != float("inf")}


def cell_deltas(study, sweep: Sweep) -> dict[str, dict[str, float]]:
    """Each finished cell's run -> its delta against each reference level's cell of the same seed (and, in a
    crossed study, the same second-axis level): `val_bpb_delta_vs_none`, a column of the MLflow runs table."""
    from optuna.trial import TrialState

    done = {cell_of(t): t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and cell_of(t)}
    name, out = sweep.spec.metric.replace("/", "_"), {}
    for (level, seed), t in done.items():
        run_id = t.user_attrs.get(tracking.TRIAL_RUN_ID)
        first, _, group = level.partition("@")
        for ref in sweep.references:
            other = done.get((f"{ref}@{group}" if group else ref, seed))
            if run_id and other is not None and first != ref:
                out.setdefault(run_id, {})[f"{name}_delta_vs_{ref}"] = t.value - other.value
    return out


def cell_run_names(study, sweep: Sweep) -> dict[str, str]:
    """Each finished cell's run -> the name the MLflow UI lists it by (`last_third s0`; runs of stores made before
    cells were named at creation get it here), unless the study names its runs (`tracking.run_name`)."""
    from optuna.trial import TrialState

    out, cells = {}, {(c.level, c.seed) for c in sweep.cells}
    for t in study.get_trials(deepcopy=False):
        cell, run_id = cell_of(t), t.user_attrs.get(tracking.TRIAL_RUN_ID)
        if t.state == TrialState.COMPLETE and cell and run_id and cell in cells:
            if not sweep.cell(*cell).cfg.tracking.run_name:
                out[run_id] = f"{cell[0]} s{cell[1]}"
    return out


def write_summary(table, sweep: Sweep, failed: list[tuple[str, int, str]] = ()) -> list[Path]:
    out = runs_dir() / "sweeps" / sweep.name
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / "summary.md", out / "summary.csv"
    why = "".join(f"- {lv}, seed {sd}: {reason}\n" for lv, sd, reason in failed)
    md.write_text(f"# {sweep.name}\n\n{format_summary(table, sweep)}\n" + (f"\n## Failed cells\n\n{why}" if failed else ""))
    table.to_csv(csv, index=False)
    return [md, csv]
