"""MLflow runs -> tidy pandas -> comparison tables and paper-style figures.

The notebooks under `analysis/` are thin: they call this module. Every number
comes from MLflow (`mlflow.search_runs` and the client's metric histories), never
from files parsed by hand, so any tracking URI works: the embedded SQLite store
or a shared server.

* `load_study(name)`: the runs of one sweep (one row per run: flattened params,
  tags, final metrics, derived columns) and its definition (axis, level order,
  baseline level) from the sweep's parent run.
* `load_history(runs)`: a long frame of metric histories (step, tokens, FLOPs, value).
* `compare(runs)`: one row per level: seeds, mean and std of `val/bpb` and
  `val/loss`, delta vs the baseline with a 95% interval (paired t over seeds when
  both levels ran the same seeds, bootstrap of the mean difference otherwise,
  none for a single seed), parameters, FLOPs per token, tokens, epochs, tokens/s.
* `write_table`: Markdown, CSV and LaTeX. Figures (bov.figures, re-exported here): `plot_curves` (BPB against
  tokens or FLOPs, seed bands), `plot_coefficients`, `plot_axis`, `plot_epochs`,
  `plot_vcache`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bov import tracking as T
from bov.figures import (cacheless_layers, plot_axis, plot_coefficients, plot_curves, plot_deltas, plot_epochs,  # noqa: F401
                         plot_vcache, probe_figures, save, style, vcache_saving, vcache_saving_bytes)
from bov.paths import tracking_uri as default_tracking_uri
from bov.stats import (compare, compare_within, delta_cell, format_table, format_verdicts, mean_pm_std, rank_agreement,
                       verdicts)

PARAM_GROUPS = ("matrix", "embedding", "unembedding", "bank", "scalar")
# MLflow tag -> column. Plain training runs have variant/preset/seed; sweep trials add the bov.* ones.
TAG_COLUMNS = {T.TAG_STUDY: "study", T.TAG_LEVEL: "level", T.TAG_AXIS: "axis", T.TAG_TRIAL: "trial",
               T.TAG_VARIANT: "variant", T.TAG_PRESET: "preset", T.TAG_SEED: "seed", T.TAG_GIT: "git_commit",
               T.TAG_CONFIG_HASH: "config_hash", T.TAG_ERROR: "error", T.TAG_REPEATED: "data_repeated",
               T.TAG_DATA: "data_fingerprint", T.TAG_CORPUS: "corpus"}


RECORD, RUNS = "study.json", "runs.csv"  # written by `make figures` beside a study's tables; read by bov.reproduce


def results_dir() -> Path:
    """Where tables and figures go: BOV_RESULTS_DIR, else ./results."""
    return Path(os.environ.get("BOV_RESULTS_DIR", "results"))


# ----------------------------------------------------------------------------- loading


@dataclass
class Study:
    """One sweep as the analysis sees it."""

    name: str
    runs: pd.DataFrame  # one row per finished trial run
    axis: str = "level"
    levels: list[str] = field(default_factory=list)  # in the sweep's order
    baseline: str | None = None
    references: list[str] = field(default_factory=list)  # every level is compared with each, baseline first
    paper: dict[str, Any] | None = None  # the paper's values and claims for these levels (bov.stats)
    axes: list[dict[str, Any]] = field(default_factory=list)  # a crossed study: its two axes (name, kind, levels)
    metric: str = T.VAL_BPB
    preset: str | None = None
    definition: str | None = None  # the sweep file base name, e.g. bank_layers

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.runs["seed"].dropna().unique()) if "seed" in self.runs else []


def _number(v: Any) -> Any:
    """MLflow params are strings; give numbers back as numbers."""
    if not isinstance(v, str):
        return v
    try:
        f = float(v)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(v, v)
    return int(f) if f.is_integer() and re.fullmatch(r"-?\d+", v) else f


def load_runs(experiment: str, tracking_uri: str | None = None, status: Sequence[str] | None = ("FINISHED",),
              include_sweep_parents: bool = False) -> pd.DataFrame:
    """All runs of an MLflow experiment as one tidy row each.

    Columns: run_id, status, the tags of TAG_COLUMNS, every param under its config key
    (`model.bank_layers`, `train.lr_bank`, `budget.tokens`, `params.bank`, ...), every final
    metric under its name (`val/bpb`, `coeff/layer04/b`, ...), and derived columns:
    `params` (total), `params_non_embedding`, `tokens`, `flops_per_token`, `epochs`,
    `tokens_per_param`, `tokens_per_s`, `wall_s` (the MLflow run's start to end).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found at {mlflow.get_tracking_uri()}")
    raw = mlflow.search_runs(experiment_names=[experiment], max_results=100_000, output_format="pandas")
    if raw.empty:
        return pd.DataFrame(columns=["run_id", "status", "level", "seed"])
    if not include_sweep_parents and f"tags.{T.TAG_ROLE}" in raw:
        raw = raw[raw[f"tags.{T.TAG_ROLE}"] != T.ROLE_SWEEP]
    if status is not None:
        raw = raw[raw["status"].isin(status)]
    out = pd.DataFrame({"run_id": raw["run_id"].to_numpy(), "status": raw["status"].to_numpy()})
    for tag, col in TAG_COLUMNS.items():
        out[col] = raw[f"tags.{tag}"].to_numpy() if f"tags.{tag}" in raw else None
    for col in [c for c in raw if c.startswith(f"tags.{T.TAG_COORD}")]:  # a crossed study: coord.<axis>
        out["coord." + col.removeprefix(f"tags.{T.TAG_COORD}")] = raw[col].to_numpy()
    params = {c[len("params."):]: raw[c].map(_number).to_numpy() for c in raw if c.startswith("params.")}
    metrics = {c[len("metrics."):].removeprefix(T.SETUP): raw[c].to_numpy(dtype=float) for c in raw
               if c.startswith("metrics.")}
    for key in set(params) & set(metrics):  # a run's setup: params in older runs, `setup/` metrics since (T.SETUP)
        params[key] = np.where(pd.isna(metrics[key]), params[key], metrics.pop(key))
    if "start_time" in raw and "end_time" in raw:  # a run resumed after a stop counts the stop too
        ends, starts = (pd.to_datetime(raw[k], utc=True) for k in ("end_time", "start_time"))  # no end: NaN
        out["wall_s"] = (ends - starts).dt.total_seconds().to_numpy()
    out = pd.concat([out, pd.DataFrame(params), pd.DataFrame(metrics)], axis=1)
    out = out.loc[:, ~out.columns.duplicated()]  # the config's own `variant`/`preset` equal the tags
    out["seed"] = pd.to_numeric(out["seed"], errors="coerce").astype("Int64")
    out["level"] = out["level"].fillna(out["variant"])  # a plain training run is its variant
    return _derive(out).reset_index(drop=True)


def _derive(df: pd.DataFrame) -> pd.DataFrame:
    groups = [f"params.{g}" for g in PARAM_GROUPS if f"params.{g}" in df]
    if groups:
        df["params"] = df[groups].sum(axis=1)
        df["params_non_embedding"] = df["params"] - df.get("params.embedding", 0) - df.get("params.bank", 0)
    if "tokens" not in df and "budget.tokens" in df:
        df["tokens"] = df["budget.tokens"]
    if "budget.flops_per_token" in df:
        df["flops_per_token"] = df["budget.flops_per_token"].astype(float)
    unique = df["data.train_tokens"].astype(float) if "data.train_tokens" in df else None
    if "regime.unique_tokens" in df:  # what the run could read: a prefix with data.max_unique_tokens
        unique = df["regime.unique_tokens"].astype(float).fillna(unique) if unique is not None else df["regime.unique_tokens"]
    if "tokens" in df and unique is not None:
        df["epochs"] = df["tokens"] / unique
    if "tokens" in df and "params" in df:
        df["tokens_per_param"] = df["tokens"] / df["params"]
        df["tokens_per_param_non_embedding"] = df["tokens"] / df["params_non_embedding"]
    if "throughput/tokens_per_s" in df:
        df["tokens_per_s"] = df["throughput/tokens_per_s"]
    return df


def study_from_environment(default: str) -> tuple[Study, Path, str | None]:
    """A notebook's parameters: the study `BOV_STUDY` (else `default`), loaded from `MLFLOW_TRACKING_URI`
    (else the embedded store), and its output folder `<BOV_RESULTS_DIR>/<study>`."""
    name = os.environ.get("BOV_STUDY", default)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return load_study(name, uri), results_dir() / name, uri


def references_of(definition: dict[str, Any]) -> list[str]:
    """The levels a study compares every level with, from its recorded definition: its baseline first."""
    first = [definition["baseline_level"]] if definition.get("baseline_level") else []
    return list(dict.fromkeys(first + (definition.get("references") or [])))


def load_study(name: str, tracking_uri: str | None = None) -> Study:
    """A sweep's finished trial runs plus its definition, read from its MLflow parent run (bov.tracking)."""
    import mlflow

    runs = load_runs(name, tracking_uri)
    study = Study(name, runs)
    parents = _parent_ids(name)
    if not parents:  # plain runs grouped into an experiment by hand: levels are variants
        study.levels = list(dict.fromkeys(runs["level"].dropna()))
        return study
    d = T.read_study_definition(mlflow.MlflowClient(mlflow.get_tracking_uri()).get_run(parents[0]))
    study.axis, study.levels, study.metric = d["axis"], [str(lv) for lv in d["levels"]], d["metric"]
    study.preset, study.baseline, study.definition = d["preset"], d["baseline_level"], d["definition"]
    study.references, study.paper = references_of(d), d.get("paper")
    study.axes = d.get("axes") or []
    return study


def _parent_ids(experiment: str) -> list[str]:
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{T.TAG_ROLE}` = '{T.ROLE_SWEEP}'",
                               output_format="list")
    return [r.info.run_id for r in found]


def sweep_experiments(tracking_uri: str | None = None) -> list[str]:
    """Names of the MLflow experiments that hold a sweep (a parent run tagged bov.role=sweep)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    names = []
    for exp in mlflow.search_experiments():
        if mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{T.TAG_ROLE}` = '{T.ROLE_SWEEP}'",
                              max_results=1, output_format="list"):
            names.append(exp.name)
    return sorted(names)


def load_history(runs: pd.DataFrame, metrics: Sequence[str] = (T.VAL_BPB, T.VAL_LOSS),
                 tracking_uri: str | None = None) -> pd.DataFrame:
    """Long frame: run_id, level, seed, variant, metric, step, value, tokens, flops (at that step)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri or default_tracking_uri())
    rows = []
    for r in runs.to_dict("records"):
        per_step = r["budget.tokens"] / r["budget.steps"] if r.get("budget.steps") else math.nan
        for key in metrics:
            for m in client.get_metric_history(r["run_id"], key):
                tokens = m.step * per_step
                rows.append({"run_id": r["run_id"], "level": r.get("level"), "seed": r.get("seed"),
                             "variant": r.get("variant"), "metric": key, "step": m.step, "value": m.value,
                             "tokens": tokens, "flops": tokens * r.get("flops_per_token", math.nan)})
    cols = ["run_id", "level", "seed", "variant", "metric", "step", "value", "tokens", "flops"]
    return pd.DataFrame(rows, columns=cols).sort_values(["level", "seed", "metric", "step"], ignore_index=True)


def coefficients(runs: pd.DataFrame) -> pd.DataFrame:
    """Final learned value coefficients, long: level, seed, layer, coeff (a: on own V, b: on the source), value.

    Per-head coefficients are averaged over heads (one number per layer, as in the paper's Figure 2).
    """
    rows = []
    for col in runs.columns:
        m = T.COEFF_METRIC.match(str(col))
        if not m:
            continue
        for r in runs[["level", "seed", col]].dropna().to_dict("records"):
            rows.append({"level": r["level"], "seed": r["seed"], "layer": int(m.group(1)), "coeff": m.group(2),
                         "value": r[col]})
    df = pd.DataFrame(rows, columns=["level", "seed", "layer", "coeff", "value"])
    return df.groupby(["level", "seed", "layer", "coeff"], as_index=False, sort=True)["value"].mean()


def coefficient_table(runs: pd.DataFrame, out_dir: Path, title: str, order: Sequence[str] = (),
                      coeff: str = "b") -> pd.DataFrame:
    """Learned coefficient `coeff` after training, a row per (level, seed) and a column per layer, as shown
    (two decimals, blank where a layer has none); written to `<out_dir>/coefficients.md` under `title`."""
    c = coefficients(runs)
    c = c[c["coeff"] == coeff]
    levels = [lv for lv in order if lv in set(c["level"])] + sorted(set(c["level"]) - set(order))
    table = c.pivot_table(index=["level", "seed"], columns="layer", values="value")
    table = table.reindex([ix for lv in levels for ix in table.index if ix[0] == lv])
    table.columns = [f"layer {layer}" for layer in table.columns]
    shown = table.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "coefficients.md").write_text(
        f"{title}\n\n" + shown.reset_index().to_markdown(index=False, disable_numparse=True) + "\n")
    return shown


# ----------------------------------------------------------------------------- tables


def write_table(table: pd.DataFrame, out_dir: Path, stem: str, by: str = "level", metric: str = T.VAL_BPB,
                baseline: str | None = None, caption: str = "", shown: pd.DataFrame | None = None) -> list[Path]:
    """`<stem>.csv` (numbers), `<stem>.md` and `<stem>.tex` (formatted: format_table's, or `shown`), under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = format_table(table, by, metric, baseline) if shown is None else shown
    csv, md, tex = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "tex"))
    table.to_csv(csv, index=False)
    md.write_text((f"{caption}\n\n" if caption else "") + shown.to_markdown(index=False, disable_numparse=True) + "\n")
    tex.write_text(shown.to_latex(index=False, escape=True, caption=caption or None, label=f"tab:{stem}")
                   .replace("±", r"$\pm$").replace("Δ", r"$\Delta$"))
    return [csv, md, tex]


def write_markdown(shown: pd.DataFrame, out_dir: Path, stem: str, title: str, index: bool = False,
                   numbers: pd.DataFrame | None = None) -> pd.DataFrame:
    """`<stem>.md`: a title line, then the table as shown (and `<stem>.csv` of `numbers`, when given). Returns
    `shown`, for a notebook cell to display."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(f"{title}\n\n{shown.to_markdown(index=index, disable_numparse=True)}\n")
    if numbers is not None:
        numbers.to_csv(out_dir / f"{stem}.csv", index=False)
    return shown


def deltas_within(runs: pd.DataFrame, group: str, by: str, baseline: str, metric: str,
                  label=lambda g: f"{g:g}") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each `by` level against `baseline` inside each value of `group` (e.g. epochs), paired by seed: the
    numbers (bov.stats.compare_within), and a table of `delta [lo, hi]` cells, a row per level and a column
    per group value (named by `label`). The baseline's own row is left out."""
    within = compare_within(runs, group=group, by=by, baseline=baseline, metric=metric)
    within = within[within[by] != baseline]
    cells = within.assign(cell=[delta_cell(*v) for v in zip(within["delta"], within["ci_low"], within["ci_high"],
                                                                within["ci_method"])])
    shown = cells.pivot_table(index=by, columns=group, values="cell", aggfunc="first").fillna("-")
    shown.columns = [label(c) for c in shown.columns]
    return within, shown


def mean_std(runs: pd.DataFrame, keys: list[str], columns: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and std over seeds of `columns` per `keys`: the numbers (`<col> mean`, `<col> std`) and the table
    as shown (`mean ± std`, the mean alone for one seed)."""
    g = runs[[*keys, *columns]].groupby(keys).agg(["mean", "std"])
    g.columns = [f"{c} {s}" for c, s in g.columns]
    shown = pd.DataFrame({c: [mean_pm_std(m, sd) for m, sd in zip(g[f"{c} mean"], g[f"{c} std"])] for c in columns},
                         index=g.index)
    return g.reset_index(), shown.reset_index()


# ----------------------------------------------------------------------------- one study, end to end


def report(study: Study, out_dir: Path, tracking_uri: str | None = None, highlight: str | None = None) -> dict[str, Any]:
    """What every study notebook writes: the comparison table, the metric per level, the learning curves."""
    if study.runs.empty:
        raise ValueError(f"study {study.name!r} has no finished runs yet (run the sweep first)")
    metric, axis, refs = study.metric, study.axis, study.references
    table = compare(study.runs, baseline=study.baseline, metric=metric, order=study.levels, references=refs)
    caption = (f"{study.name}: {metric} by {axis} level; mean ± std over seeds; Δ = level - reference "
               f"({', '.join(refs)}) with a 95% interval (paired t over seeds, or bootstrap)" if refs else f"{study.name}: {metric}")
    if refs and table["runs"].max() <= 1:
        caption += ". One seed per level: every difference here is an anecdote, not a finding"
    files = write_table(table, out_dir, "table", metric=metric, baseline=study.baseline, caption=caption)
    files += save(plot_axis(study.runs, metric=metric, order=study.levels, baseline=study.baseline,
                            title=study.name, xlabel=axis), out_dir, "metric_by_level")
    if refs:
        files += save(plot_deltas(deltas(table, study.baseline, refs), metric=metric, order=study.levels,
                                  title=f"{study.name}: Δ {metric} against each reference"), out_dir, "deltas")
    if study.paper:
        files += write_verdicts(study, out_dir)
    history = load_history(study.runs, tracking_uri=tracking_uri)
    files += save(plot_curves(history, metric=metric, order=study.levels, highlight=highlight, title=study.name),
                  out_dir, "curves")
    files += eval_tables(study, out_dir)
    probes = load_probes(study.runs, tracking_uri)
    if probes:
        files += probe_figures(probes, out_dir, order=study.levels, title=study.name)
    return {"table": table, "shown": format_table(table, metric=metric, baseline=study.baseline),
            "history": history, "files": files, "probes": probes}


def deltas(table: pd.DataFrame, baseline: str | None, references: Sequence[str]) -> pd.DataFrame:
    """compare()'s table, long: level, vs, delta, ci_low, ci_high, ci_method (one row per level and reference)."""
    parts = []
    for ref in references:
        sfx = "" if ref == baseline else f" vs {ref}"
        cols = [f"{k}{sfx}" for k in ("delta", "ci_low", "ci_high", "ci_method")]
        if cols[0] in table:
            part = table[["level", *cols]].set_axis(["level", "delta", "ci_low", "ci_high", "ci_method"], axis=1)
            parts.append(part.assign(vs=ref))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["level", "vs", "delta"])


def write_verdicts(study: Study, out_dir: Path) -> list[Path]:
    """`verdicts.{md,csv}`: every claim of the study file's `paper:` block against this suite (bov.stats)."""
    v = verdicts(study.runs, study.paper, study.references, metric=study.metric)
    rho, n = rank_agreement(study.runs, study.paper.get("values") or {}, metric=study.metric)
    counts = ", ".join(f"{(v['verdict'] == k).sum()} {k}" for k in ("agrees", "disagrees", "unresolved"))
    seeds = sorted(set(v["seeds"])) if len(v) else []
    text = (f"{study.name}: the paper's claims ({study.paper['source']}) against this suite's Δ {study.metric} with "
            f"its paired 95% interval over {'/'.join(map(str, seeds)) or 'no'} seeds: {counts}. Resolved: the interval "
            "excludes 0. Seeds to resolve paper Δ: the seeds this suite's measured spread would need for a 95% "
            "interval narrower than the paper's difference. The paper's numbers are on its data and scale: a "
            "verdict compares directions only.")
    if not math.isnan(rho):
        text += f" Rank agreement with the paper over {n} levels: Spearman ρ = {rho:+.2f}."
    if seeds and max(seeds) <= 1:
        text += " One seed: nothing here is resolved; an anecdote."
    out_dir.mkdir(parents=True, exist_ok=True)
    v.to_csv(out_dir / "verdicts.csv", index=False)
    (out_dir / "verdicts.md").write_text(
        f"{text}\n\n" + format_verdicts(v).to_markdown(index=False, disable_numparse=True) + "\n")
    return [out_dir / "verdicts.csv", out_dir / "verdicts.md"]


def write_record(definition: dict, runs: pd.DataFrame, metric: str, git_commit: str | None, out_dir: Path) -> list[Path]:
    """What `bov reproduce` needs of a study, beside its tables: its definition and every run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORD).write_text(json.dumps({**definition, "git_commit": git_commit}, indent=1, default=str) + "\n")
    cols = [c for c in ("level", "seed", metric, "config_hash", "data_fingerprint") if c in runs]
    runs[cols].sort_values(["level", "seed"]).to_csv(out_dir / RUNS, index=False)
    return [out_dir / RECORD, out_dir / RUNS]


def publish(name: str, uri: str, out_dir: Path) -> None:
    """After a study's notebook ran: the record `bov reproduce` reads (`study.json`, `runs.csv`) beside its
    tables, and its MLflow parent run showing them (its description: the tables; its artifacts: every file)."""
    import mlflow

    parent = T.sweep_parent(uri, name)
    if parent is None:
        return
    run = mlflow.MlflowClient(uri).get_run(parent)
    loaded = load_study(name, uri)
    write_record(T.read_study_definition(run), loaded.runs, loaded.metric, run.data.tags.get(T.TAG_GIT), out_dir)
    tables = [out_dir / f for f in ("table.md", "verdicts.md", "size_trend.md") if (out_dir / f).is_file()]
    T.attach_results(uri, parent, out_dir, f"# {name}\n\n" + "\n\n".join(t.read_text() for t in tables))


def eval_tables(study: Study, out_dir: Path) -> list[Path]:
    """`bov eval` results of the study's runs: a table per scored text (`eval_<text>`, bits per byte by level,
    with the same intervals as the main table) and one of downstream task scores by level (`tasks`)."""
    runs, files = study.runs, []
    texts = sorted(c[len(T.EVAL_PREFIX):-len("/bpb")] for c in runs if c.startswith(T.EVAL_PREFIX) and c.endswith("/bpb"))
    for text in texts:
        metric = T.eval_metric(text, "bpb")
        scored = runs[runs[metric].notna()]
        table = compare(scored, baseline=study.baseline if study.baseline in set(scored["level"]) else None,
                        metric=metric, order=study.levels)
        files += write_table(table, out_dir, f"eval_{text}", metric=metric, baseline=study.baseline,
                             caption=f"{study.name}: bits per byte on {text} (bov eval); mean ± std over seeds")
    tasks = [c for c in runs if c.startswith(T.TASK_PREFIX)]
    if tasks:
        scored = runs[runs[tasks].notna().any(axis=1)]
        means = scored.groupby("level")[tasks].agg(lambda x: f"{x.mean():.4f}" + (f" ± {x.std():.4f}" if len(x) > 1 else ""))
        means.insert(0, "seeds", scored.groupby("level").size())
        means = means.reindex([lv for lv in study.levels if lv in means.index] + sorted(set(means.index) - set(study.levels)))
        means.columns = [c.removeprefix(T.TASK_PREFIX) for c in means.columns]
        out_dir.mkdir(parents=True, exist_ok=True)
        scored.groupby("level")[tasks].mean().to_csv(out_dir / "tasks.csv")
        (out_dir / "tasks.md").write_text(f"{study.name}: downstream tasks (bov eval --tasks); mean ± std over seeds\n\n"
                                          + means.reset_index().to_markdown(index=False, disable_numparse=True) + "\n")
        files += [out_dir / "tasks.csv", out_dir / "tasks.md"]
    return files


def load_probes(runs: pd.DataFrame, tracking_uri: str | None = None) -> list[dict]:
    """The `bov probe` artifact of each run that has one, labelled with the run's level and seed."""
    uri = tracking_uri or default_tracking_uri()
    probes = []
    for r in runs.to_dict("records"):
        found = T.read_probe(uri, r["run_id"])
        if found is not None:
            probes.append({**found, "level": r["level"], "seed": r["seed"]})
    return probes
