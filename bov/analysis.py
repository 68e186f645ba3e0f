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
* `write_table`: Markdown, CSV and LaTeX. Figures: `plot_curves` (BPB against
  tokens or FLOPs, seed bands), `plot_coefficients`, `plot_axis`, `plot_epochs`,
  `plot_vcache`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bov.paths import tracking_uri as default_tracking_uri

PARAM_GROUPS = ("matrix", "embedding", "unembedding", "bank", "scalar")
# MLflow tag -> column. Plain training runs have variant/preset/seed; sweep trials add the bov.* ones.
TAG_COLUMNS = {"bov.study": "study", "bov.level": "level", "bov.axis": "axis", "bov.trial": "trial",
               "variant": "variant", "preset": "preset", "seed": "seed", "git_commit": "git_commit",
               "config_hash": "config_hash", "error": "error", "data_repeated": "data_repeated"}
COEFF = re.compile(r"^coeff/layer(\d+)/([ab])(?:_head(\d+))?$")


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
    metric: str = "val/bpb"
    preset: str | None = None
    definition: str | None = None  # the sweep file base name, e.g. bank_layers


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
    `tokens_per_param`, `tokens_per_s`.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found at {mlflow.get_tracking_uri()}")
    raw = mlflow.search_runs(experiment_names=[experiment], max_results=100_000, output_format="pandas")
    if raw.empty:
        return pd.DataFrame(columns=["run_id", "status", "level", "seed"])
    if not include_sweep_parents and "tags.bov.role" in raw:
        raw = raw[raw["tags.bov.role"] != "sweep"]
    if status is not None:
        raw = raw[raw["status"].isin(status)]
    out = pd.DataFrame({"run_id": raw["run_id"].to_numpy(), "status": raw["status"].to_numpy()})
    for tag, col in TAG_COLUMNS.items():
        out[col] = raw[f"tags.{tag}"].to_numpy() if f"tags.{tag}" in raw else None
    params = {c[len("params."):]: raw[c].map(_number).to_numpy() for c in raw if c.startswith("params.")}
    metrics = {c[len("metrics."):]: raw[c].to_numpy(dtype=float) for c in raw if c.startswith("metrics.")}
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


def load_study(name: str, tracking_uri: str | None = None) -> Study:
    """A sweep's finished trial runs plus its definition, read from its MLflow parent run."""
    import mlflow
    import yaml

    runs = load_runs(name, tracking_uri)
    study = Study(name, runs)
    parents = _parent_ids(name)
    if not parents:  # plain runs grouped into an experiment by hand: levels are variants
        study.levels = list(dict.fromkeys(runs["level"].dropna()))
        return study
    p = mlflow.MlflowClient(mlflow.get_tracking_uri()).get_run(parents[0]).data.params
    study.axis = p.get("axis", "level")
    study.levels = [lv for lv in p.get("levels", "").split(",") if lv]
    study.metric = p.get("metric", "val/bpb")
    study.preset = p.get("preset")
    try:  # the definition as it ran: baseline level and the study's base name
        spec = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{parents[0]}/sweep.yaml"))
        study.baseline = spec.get("baseline_level")
        study.definition = spec.get("study")
    except Exception:
        pass
    return study


def _parent_ids(experiment: str) -> list[str]:
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string="tags.`bov.role` = 'sweep'", output_format="list")
    return [r.info.run_id for r in found]


def sweep_experiments(tracking_uri: str | None = None) -> list[str]:
    """Names of the MLflow experiments that hold a sweep (a parent run tagged bov.role=sweep)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    names = []
    for exp in mlflow.search_experiments():
        if mlflow.search_runs([exp.experiment_id], filter_string="tags.`bov.role` = 'sweep'", max_results=1,
                              output_format="list"):
            names.append(exp.name)
    return sorted(names)


def load_history(runs: pd.DataFrame, metrics: Sequence[str] = ("val/bpb", "val/loss"),
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
        m = COEFF.match(str(col))
        if not m:
            continue
        for r in runs[["level", "seed", col]].dropna().to_dict("records"):
            rows.append({"level": r["level"], "seed": r["seed"], "layer": int(m.group(1)), "coeff": m.group(2),
                         "value": r[col]})
    df = pd.DataFrame(rows, columns=["level", "seed", "layer", "coeff", "value"])
    return df.groupby(["level", "seed", "layer", "coeff"], as_index=False, sort=True)["value"].mean()


# ----------------------------------------------------------------------------- statistics


def _interval(x: pd.Series, base: pd.Series, confidence: float, n_boot: int, seed: int) -> tuple[float, float, float, str]:
    """delta = mean(x) - mean(base) and its interval; x and base are indexed by seed."""
    from scipy import stats

    delta = float(x.mean() - base.mean())
    if len(x) < 2 or len(base) < 2:
        return delta, math.nan, math.nan, "single seed: no interval"
    if set(x.index) == set(base.index):  # the same seeds: the difference is paired by seed
        d = (x - base.reindex(x.index)).to_numpy(dtype=float)
        half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        return float(d.mean()), float(d.mean() - half), float(d.mean() + half), f"paired t, n={len(d)}"
    rng = np.random.default_rng(seed)
    xa, ba = x.to_numpy(dtype=float), base.to_numpy(dtype=float)
    boots = (rng.choice(xa, (n_boot, len(xa))).mean(1) - rng.choice(ba, (n_boot, len(ba))).mean(1))
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return delta, float(lo), float(hi), f"bootstrap, {n_boot} resamples"


def compare(runs: pd.DataFrame, by: str = "level", baseline: str | None = None, metric: str = "val/bpb",
            order: Sequence[str] | None = None, confidence: float = 0.95, n_boot: int = 10_000,
            seed: int = 0) -> pd.DataFrame:
    """One row per level: runs, seeds, mean/std of the metric and val/loss, delta vs baseline with an interval."""
    levels = [lv for lv in (order or []) if lv in set(runs[by])] + sorted(set(runs[by]) - set(order or []))
    base = runs[runs[by] == baseline].set_index("seed")[metric] if baseline is not None else None
    rows = []
    for level in levels:
        g = runs[runs[by] == level]
        vals = g.set_index("seed")[metric]
        row: dict[str, Any] = {by: level, "runs": len(g), "seeds": ",".join(str(s) for s in sorted(g["seed"].dropna())),
                               f"{metric} mean": vals.mean(), f"{metric} std": vals.std(ddof=1) if len(g) > 1 else math.nan}
        if metric != "val/loss" and "val/loss" in g:
            row["val/loss mean"] = g["val/loss"].mean()
            row["val/loss std"] = g["val/loss"].std(ddof=1) if len(g) > 1 else math.nan
        if base is not None and len(base):
            if level == baseline:
                row.update(delta=0.0, ci_low=math.nan, ci_high=math.nan, ci_method="baseline")
            else:
                d, lo, hi, how = _interval(vals, base, confidence, n_boot, seed)
                row.update(delta=d, ci_low=lo, ci_high=hi, ci_method=how)
        for col in ("params", "params_non_embedding", "params.bank", "flops_per_token", "tokens", "epochs",
                    "tokens_per_param", "tokens_per_param_non_embedding", "tokens_per_s"):
            if col in g:
                row[col] = g[col].mean()
        rows.append(row)
    if not rows:  # nothing finished yet: the columns a caller indexes still exist
        return pd.DataFrame(columns=[by, "runs", "seeds", f"{metric} mean", f"{metric} std"])
    return pd.DataFrame(rows)


def compare_within(runs: pd.DataFrame, group: str, by: str = "variant", baseline: str = "baseline",
                   metric: str = "val/bpb", **kw) -> pd.DataFrame:
    """`compare` inside each value of `group` (e.g. each unique-token budget), against that group's baseline.

    For a crossed study this is the fair delta: a variant at 4 epochs against the baseline at 4 epochs.
    """
    parts = [compare(g, by=by, baseline=baseline, metric=metric, **kw).assign(**{group: value})
             for value, g in runs.groupby(group, sort=False)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[group, by])


# ----------------------------------------------------------------------------- tables


def _si(v: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def format_table(table: pd.DataFrame, by: str = "level", metric: str = "val/bpb", baseline: str | None = None) -> pd.DataFrame:
    """Numbers -> the strings a paper shows: `mean ± std`, `delta [lo, hi]`, sizes in k/M/B."""

    def pm(mean: float, std: float) -> str:
        if pd.isna(mean):
            return "-"  # a level with no finished run yet
        return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"

    out = pd.DataFrame({by: table[by], "seeds": table["runs"]})
    out[metric] = [pm(m, s) for m, s in zip(table[f"{metric} mean"], table[f"{metric} std"])]
    if "delta" in table:
        cells = []
        for r in table.to_dict("records"):
            if pd.isna(r["delta"]):
                cells.append("-")
            elif r["ci_method"] == "baseline":
                cells.append("(baseline)")
            elif pd.isna(r["ci_low"]):
                cells.append(f"{r['delta']:+.4f} (single seed)")
            else:
                cells.append(f"{r['delta']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]")
        out[f"Δ vs {baseline} (95% CI)"] = cells
    if "val/loss mean" in table:
        out["val/loss"] = [pm(m, s) for m, s in zip(table["val/loss mean"], table["val/loss std"])]
    for col, name, fmt in (("params", "params", _si), ("params.bank", "bank params", _si),
                           ("flops_per_token", "FLOPs/token", lambda v: f"{v:.3e}"), ("tokens", "tokens", _si),
                           ("epochs", "epochs", lambda v: f"{v:.2f}"), ("tokens_per_param", "tokens/param", lambda v: f"{v:.2f}"),
                           ("tokens_per_param_non_embedding", "tokens/param w/o tables", lambda v: f"{v:.2f}"),
                           ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}")):
        if col in table and table[col].notna().any():
            out[name] = [fmt(v) if not pd.isna(v) else "-" for v in table[col]]
    return out


def write_table(table: pd.DataFrame, out_dir: Path, stem: str, by: str = "level", metric: str = "val/bpb",
                baseline: str | None = None, caption: str = "") -> list[Path]:
    """`<stem>.csv` (numbers), `<stem>.md` and `<stem>.tex` (formatted), under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = format_table(table, by, metric, baseline)
    csv, md, tex = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "tex"))
    table.to_csv(csv, index=False)
    md.write_text((f"{caption}\n\n" if caption else "") + shown.to_markdown(index=False, disable_numparse=True) + "\n")
    tex.write_text(shown.to_latex(index=False, escape=True, caption=caption or None, label=f"tab:{stem}")
                   .replace("±", r"$\pm$").replace("Δ", r"$\Delta$"))
    return [csv, md, tex]


# ----------------------------------------------------------------------------- figures


def style() -> None:
    """One look for every figure."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    """PNG (200 dpi) and PDF of a figure; closes it."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=200, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_curves(history: pd.DataFrame, metric: str = "val/bpb", order: Sequence[str] | None = None,
                highlight: str | None = None, title: str = ""):
    """Figure 4 of the paper: the metric against training tokens and against FLOPs, one line per level.

    Bands are ± one standard deviation over seeds (none where a level has one seed).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    h = history[history["metric"] == metric]
    order = [lv for lv in (order or sorted(h["level"].unique())) if lv in set(h["level"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x, label in ((axes[0], "tokens", "training tokens"), (axes[1], "flops", "training FLOPs")):
        sns.lineplot(data=h, x=x, y="value", hue="level", hue_order=order, errorbar="sd", marker="o",
                     markersize=4, ax=ax, legend=ax is axes[1])
        if highlight is not None:
            hl = h[h["level"] == highlight].groupby(x)["value"].mean()
            ax.plot(hl.index, hl.to_numpy(), color="black", lw=2.5, alpha=0.35, zorder=0)
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {metric.split('/')[-1]}" if ax is axes[0] else "")
    axes[1].legend(title=None, fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_coefficients(coeffs: pd.DataFrame, order: Sequence[str] | None = None, title: str = ""):
    """Figure 2 of the paper: learned value coefficients per target layer at the end of training.

    `b` multiplies the context-free source (bank row, x0 W_V, V_0); `a` the layer's own V (add variants).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    kinds = [k for k in ("b", "a") if k in set(coeffs["coeff"])]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5.5 * max(1, len(kinds)), 4), squeeze=False)
    names = {"b": "coefficient on the context-free value (b)", "a": "coefficient on the contextual value (a)"}
    order = [lv for lv in (order or sorted(coeffs["level"].unique())) if lv in set(coeffs["level"])]
    for ax, kind in zip(axes[0], kinds):
        sns.pointplot(data=coeffs[coeffs["coeff"] == kind], x="layer", y="value", hue="level", hue_order=order,
                      errorbar=None, dodge=0.3, ax=ax, markersize=5)
        ax.axhline(1.0 if kind == "b" else 0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(names[kind], fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("value at the end of training")
        ax.legend(fontsize=8, title=None)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_axis(runs: pd.DataFrame, by: str = "level", metric: str = "val/bpb", order: Sequence[str] | None = None,
              baseline: str | None = None, title: str = "", xlabel: str | None = None):
    """The metric at each level of an axis: mean over seeds with a 95% bootstrap interval, and every seed."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    order = [lv for lv in (order or sorted(runs[by].unique())) if lv in set(runs[by])]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(order) + 2), 4))
    sns.stripplot(data=runs, x=by, y=metric, order=order, color="grey", alpha=0.6, size=4, ax=ax)
    sns.pointplot(data=runs, x=by, y=metric, order=order, errorbar=("ci", 95), linestyle="none", capsize=0.2,
                  marker="D", ax=ax, seed=0)
    if baseline is not None and baseline in set(runs[by]):
        ax.axhline(runs.loc[runs[by] == baseline, metric].mean(), color="black", lw=0.8, ls="--",
                   label=f"{baseline} (mean)")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel or by)
    ax.set_ylabel(f"validation {metric.split('/')[-1]}")
    ax.tick_params(axis="x", rotation=30)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_epochs(runs: pd.DataFrame, metric: str = "val/bpb", hue: str = "variant", order: Sequence[str] | None = None,
                title: str = ""):
    """The metric against epochs over the training data, one line per variant (± one std over seeds).

    Compute is fixed; fewer unique tokens means more epochs. A bank's tables can memorize what
    a parameter-free source cannot (shared/spec section 7).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    order = [v for v in (order or sorted(runs[hue].unique())) if v in set(runs[hue])]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=runs, x="epochs", y=metric, hue=hue, hue_order=order, errorbar="sd", marker="o", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epochs over the unique training tokens (fixed compute)")
    ax.set_ylabel(f"validation {metric.split('/')[-1]}")
    ax.legend(fontsize=8, title=None)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def vcache_saving_bytes(n_bank_layers: int, kv_dim: int, vocab: int, context: np.ndarray, bytes_per: int = 2) -> np.ndarray:
    """The spec's formula (section 2), which ignores sliding windows: layers * H_kv d_h * b * (T - |V|)."""
    return n_bank_layers * kv_dim * bytes_per * (np.asarray(context, dtype=np.float64) - vocab)


def cacheless_layers(preset: str, variant: str) -> tuple[int, int]:
    """(bank layers that cache no values, H_kv * d_h) of a preset/variant (`LayerPlan.value_cache`)."""
    from bov.config import load_config
    from bov.plan import build_plan

    cfg = load_config(preset, variant).model
    plan = build_plan(cfg)
    return sum(p.value_cache == "bank" for p in plan), cfg.n_kv_heads * cfg.head_dim


def vcache_saving(preset: str, variant: str, vocab: int, contexts: Sequence[int], bytes_per: int = 2) -> np.ndarray:
    """Cache bytes saved per sequence against the baseline, net of the bank tables, as bov.infer allocates them:
    the plan's value caches and the sliding windows' rings (`bov.infer.analytic_cache_bytes`)."""
    from bov.config import load_config
    from bov.infer import analytic_cache_bytes
    from bov.plan import build_plan, num_banks

    over = [f"model.vocab_size={vocab}"]
    base, var = load_config(preset, "baseline", over).model, load_config(preset, variant, over).model
    tables = num_banks(build_plan(var)) * vocab * var.n_kv_heads * var.head_dim * bytes_per
    return np.array([analytic_cache_bytes(base, T, 1, bytes_per)["total"] - analytic_cache_bytes(var, T, 1, bytes_per)["total"]
                     - tables for T in contexts], dtype=np.float64)


def plot_vcache(preset: str = "135m", variant: str = "bov", vocabs: Sequence[int] = (32768, 131072),
                contexts: Sequence[int] = tuple(2 ** k for k in range(10, 18)), bytes_per: int = 2,
                measured: pd.DataFrame | None = None, title: str = ""):
    """Figure 5a of the paper: V-cache memory saved by banks against context length, two vocabulary sizes.

    Solid lines: what bov's cache allocates (window layers keep a ring of their window, so a windowed bank
    layer saves only that much); dashed: the paper's formula, which ignores windows. `measured` (columns
    vocab, context, saved_bytes) adds points.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    n, kv = cacheless_layers(preset, variant)
    T = np.asarray(contexts)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, V in enumerate(vocabs):
        color = sns.color_palette()[i]
        ax.plot(T, vcache_saving(preset, variant, V, T, bytes_per) / 2**20, marker="o", ms=3, color=color,
                label=f"|V| = {V:,}, bov's cache (windows as rings)")
        ax.plot(T, vcache_saving_bytes(n, kv, V, T, bytes_per) / 2**20, ls="--", lw=1, color=color,
                label=f"|V| = {V:,}, paper's formula (no windows; break-even T = |V|)")
        if measured is not None and len(m := measured[measured["vocab"] == V]):
            ax.scatter(m["context"], m["saved_bytes"] / 2**20, color=color, marker="x", s=40, zorder=3,
                       label=f"|V| = {V:,}, measured")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length T (tokens)")
    ax.set_ylabel("V cache saved per sequence (MiB)")
    ax.set_title(title or f"{preset} {variant}: {n} bank layers x {kv} values x {bytes_per} bytes", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- one study, end to end


def report(study: Study, out_dir: Path, tracking_uri: str | None = None, highlight: str | None = None) -> dict[str, Any]:
    """What every study notebook writes: the comparison table, the metric per level, the learning curves."""
    if study.runs.empty:
        raise ValueError(f"study {study.name!r} has no finished runs yet (run the sweep first)")
    metric, axis = study.metric, study.axis
    table = compare(study.runs, baseline=study.baseline, metric=metric, order=study.levels)
    caption = (f"{study.name}: {metric} by {axis} level; mean ± std over seeds; Δ = level - {study.baseline} "
               "with a 95% interval (paired t over seeds, or bootstrap)" if study.baseline else f"{study.name}: {metric}")
    files = write_table(table, out_dir, "table", metric=metric, baseline=study.baseline, caption=caption)
    files += save(plot_axis(study.runs, metric=metric, order=study.levels, baseline=study.baseline,
                            title=study.name, xlabel=axis), out_dir, "metric_by_level")
    history = load_history(study.runs, tracking_uri=tracking_uri)
    files += save(plot_curves(history, metric=metric, order=study.levels, highlight=highlight, title=study.name),
                  out_dir, "curves")
    return {"table": table, "shown": format_table(table, metric=metric, baseline=study.baseline),
            "history": history, "files": files}


# ----------------------------------------------------------------------------- notebooks


NOTEBOOKS = Path(__file__).resolve().parent.parent / "analysis"


def notebook_for(definition: str | None) -> Path:
    """analysis/<study>.py when the study has its own notebook, else the generic axis_sweep.py."""
    own = NOTEBOOKS / f"{definition}.py"
    return own if definition and own.is_file() else NOTEBOOKS / "axis_sweep.py"


def run_notebook(notebook: Path, out_dir: Path, env: dict[str, str], execute: bool) -> Path | None:
    """Run a jupytext notebook headlessly: executed into `<out_dir>/<name>.ipynb` (nbclient), or as a script."""
    import subprocess
    import sys

    out_dir.mkdir(parents=True, exist_ok=True)
    if not execute:
        done = subprocess.run([sys.executable, str(notebook)], env=env, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{notebook.name} failed: {tail[0]}")
        return None
    import jupytext
    import nbclient
    import nbformat

    nb = jupytext.read(notebook)
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits the parameters
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=3600,
                                resources={"metadata": {"path": str(Path.cwd())}}).execute()
    except nbclient.exceptions.CellExecutionError as e:
        raise RuntimeError(f"{notebook.name} failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    target = out_dir / f"{notebook.stem}.ipynb"
    nbformat.write(nb, target)
    return target


def can_execute_notebooks() -> bool:
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
    except ImportError:
        return False
    return True
