"""Paper-style figures from tidy frames (bov.analysis makes the frames): one seaborn look for all.

Figure 4 (`plot_curves`: BPB against tokens and FLOPs), Figure 2 (`plot_coefficients`), the metric at each
level of an axis (`plot_axis`), each level's delta against each reference (`plot_deltas`), a crossed study's loss against compute with
the baseline's fit (`plot_compute`), its compute multipliers (`plot_multipliers`) and its gain against model
size (`plot_size_trend`), BPB against epochs (`plot_epochs`), and Figure 5a (`plot_vcache`: the
V-cache saved by banks against context length, with the cache bytes bov.infer allocates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bov.tracking import PROBES, VAL_BPB

def style() -> None:
    """One look for every figure."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    """PNG (200 dpi) and PDF of a figure, byte-identical when drawn again from the same numbers; closes it."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:  # no creation date in the PDF: the same figure is the same file (no churn in results/)
        fig.savefig(p, dpi=200, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


def plot_curves(history: pd.DataFrame, metric: str = VAL_BPB, order: Sequence[str] | None = None,
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


def plot_axis(runs: pd.DataFrame, by: str = "level", metric: str = VAL_BPB, order: Sequence[str] | None = None,
              baseline: str | None = None, title: str = "", xlabel: str | None = None):
    """The metric at each level of an axis: mean over seeds with a 95% bootstrap interval, and every seed."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    order = [lv for lv in (order or sorted(runs[by].unique())) if lv in set(runs[by])]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(order) + 2), 4))
    state = np.random.get_state()
    np.random.seed(0)  # seaborn jitters strip points with numpy's global RNG: the same runs, the same figure
    sns.stripplot(data=runs, x=by, y=metric, order=order, color="grey", alpha=0.6, size=4, ax=ax)
    np.random.set_state(state)
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


def plot_deltas(deltas: pd.DataFrame, metric: str = VAL_BPB, order: Sequence[str] | None = None, title: str = ""):
    """Each level's delta against each reference level with its paired 95% interval (one colour per reference;
    a level with one seed shows its point only). `deltas`: level, vs, delta, ci_low, ci_high."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    d = deltas[deltas["level"] != deltas["vs"]]
    order = [lv for lv in (order or sorted(d["level"].unique())) if lv in set(d["level"])]
    refs = list(dict.fromkeys(d["vs"]))
    fig, ax = plt.subplots(figsize=(6.5, 0.38 * len(order) + 1.6))
    colours = sns.color_palette(n_colors=max(1, len(refs)))
    for k, (ref, colour) in enumerate(zip(refs, colours)):
        r = d[d["vs"] == ref].set_index("level").reindex(order)
        y = np.arange(len(order)) + (k - (len(refs) - 1) / 2) * 0.25
        ax.errorbar(r["delta"], y, xerr=[r["delta"] - r["ci_low"], r["ci_high"] - r["delta"]], fmt="o", ms=4,
                    capsize=2.5, color=colour, label=f"vs {ref}")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ validation {metric.split('/')[-1]} (level - reference; left of 0 is better), 95% CI")
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _log_x(fig, ax, xlabel: str, ylabel: str, title: str):
    """A scaling figure's finish: log x, the labels, the legend, the title."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_compute(runs: pd.DataFrame, by: str, fit=None, baseline: str | None = None, metric: str = VAL_BPB,
                 order: Sequence[str] | None = None, title: str = ""):
    """The metric against training FLOPs (log x): every seed's point (small), each cell group's mean (large, ±
    one std over seeds), and the baseline's fitted ladder `fit` (a bov.scaling.PowerLaw) as a line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    order = [lv for lv in (order or sorted(runs[by].unique())) if lv in set(runs[by])]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = dict(zip(order, sns.color_palette(n_colors=len(order))))
    for lv in order:
        g = runs[runs[by] == lv]
        ax.scatter(g["compute"], g[metric], s=10, alpha=0.45, color=colours[lv])
        m = g.groupby("compute_group").agg(c=("compute", "mean"), L=(metric, "mean"), sd=(metric, "std"))
        ax.errorbar(m["c"], m["L"], yerr=m["sd"].fillna(0), fmt="o-" if lv == baseline else "D", ms=6, capsize=3,
                    color=colours[lv], label=lv, lw=0 if lv != baseline else 0.8)
    if fit is not None:
        c = np.geomspace(runs["compute"].min() / 1.3, runs["compute"].max() * 1.3, 100)
        ax.plot(c, fit.loss(c), color="black", lw=1, ls="--", label=f"{baseline} fit: E + A C^-{fit.alpha:.2f}")
    return _log_x(fig, ax, "training FLOPs", f"validation {metric.split('/')[-1]}", title)


def plot_multipliers(table: pd.DataFrame, by: str, title: str = ""):
    """Each variant's compute-equivalent multiplier with its 95% interval (log x; 1 = the baseline's worth);
    extrapolated ones hollow; beside each, the law-free reading where there is one."""
    import matplotlib.pyplot as plt

    style()
    t = table.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(t) + 1.5))
    y = np.arange(len(t))
    finite = np.isfinite(t["multiplier"])
    lo = (t["multiplier"] - t["ci_low"]).clip(lower=0).fillna(0)
    hi = (t["ci_high"] - t["multiplier"]).replace(np.inf, np.nan).fillna(0)
    ax.errorbar(t["multiplier"][finite], y[finite], xerr=[lo[finite], hi[finite]], fmt="none", capsize=3, color="C0")
    for flag, face in ((False, "C0"), (True, "white")):
        k = finite & (t["extrapolated"] == flag)
        ax.scatter(t["multiplier"][k], y[k], facecolor=face, edgecolor="C0", zorder=3,
                   label=("fitted law, extrapolated" if flag else "fitted law") if k.any() else None)
    if "interpolated" in t and t["interpolated"].notna().any():  # the same, read without the law (bov.scaling)
        k = t["interpolated"].notna()
        ilo = (t["interpolated"] - t["interpolated_low"]).clip(lower=0).fillna(0)
        ihi = (t["interpolated_high"] - t["interpolated"]).clip(lower=0).fillna(0)
        ax.errorbar(t["interpolated"][k], y[k] + 0.2, xerr=[ilo[k], ihi[k]], fmt="s", ms=5, capsize=3, color="C1",
                    label="no law: between the measured budgets")
    ax.axvline(1, color="black", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

    ax.xaxis.set_major_locator(MaxNLocator(6))  # multipliers span a narrow range: a few plain ticks, not 10^x
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(y, [f"{a} @ {b}" for a, b in zip(t[by], t.iloc[:, 1])])
    ax.invert_yaxis()
    ax.set_xlabel("compute-equivalent multiplier (× the baseline's FLOPs), 95% CI")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_size_trend(table: pd.DataFrame, trend: dict, title: str = "", metric: str = VAL_BPB):
    """The gain (-delta, 95% interval) against non-embedding parameters (log x), with the fitted trend; beside
    it, where the table has one, the multiplier per size read along the baseline's sizes (bov.scaling)."""
    import matplotlib.pyplot as plt

    style()
    worth = "multiplier" in table and table["multiplier"].notna().any()
    fig, axes = plt.subplots(1, 2 if worth else 1, figsize=(11 if worth else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if worth:
        _plot_worth_per_size(axes[0, 1], table)
    n, gain = table["params_non_embedding"], -table["delta"]
    ax.errorbar(n, gain, yerr=[(gain + table["ci_high"]).fillna(0), (-table["ci_low"] - gain).fillna(0)], fmt="o",
                capsize=3)
    x = np.log10(n)
    a = float(np.mean(gain) - trend["slope"] * np.mean(x))  # the least-squares line passes through the means
    grid = np.linspace(x.min(), x.max(), 20)
    ax.plot(10 ** grid, a + trend["slope"] * grid, color="black", lw=1, ls="--",
            label=f"{trend['slope']:+.4f} per decade [{trend['ci_low']:+.4f}, {trend['ci_high']:+.4f}]: {trend['trend']}")
    ax.axhline(0, color="grey", lw=0.8)
    return _log_x(fig, ax, "non-embedding parameters", f"gain in validation {metric.split('/')[-1]} (baseline - variant)",
                  title)


def _plot_worth_per_size(ax, table: pd.DataFrame) -> None:
    """The multiplier per size with its 95% interval (1 = the baseline's worth); none drawn where there is none."""
    k = table["multiplier"].notna()
    n, m = table["params_non_embedding"][k], table["multiplier"][k]
    ax.errorbar(n, m, yerr=[(m - table["multiplier_low"][k]).clip(lower=0).fillna(0),
                            (table["multiplier_high"][k] - m).clip(lower=0).fillna(0)], fmt="s", color="C1", capsize=3,
                label="× compute along the baseline's sizes")
    ax.axhline(1, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(*(table["params_non_embedding"].agg(["min", "max"]) * [0.8, 1.25]))
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("compute-equivalent multiplier")
    ax.legend(fontsize=8)


def plot_epochs(runs: pd.DataFrame, metric: str = VAL_BPB, hue: str = "variant", order: Sequence[str] | None = None,
                title: str = "", xlabel: str = "epochs over the unique training tokens (fixed compute)",
                ylabel: str | None = None):
    """The metric against epochs over the training data, one line per variant (± one std over seeds).

    By default compute is fixed, so fewer unique tokens means more epochs; a study that fixes the unique
    tokens instead says so in `xlabel`. A bank's tables can memorize what a parameter-free source cannot
    (shared/spec section 7).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    order = [v for v in (order or sorted(runs[hue].unique())) if v in set(runs[hue])]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=runs, x="epochs", y=metric, hue=hue, hue_order=order, errorbar="sd", marker="o", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or f"validation {metric.split('/')[-1]}")
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


# ----------------------------------------------------------------------------- mechanisms (bov probe)



def probe_frame(probes: Sequence[dict]) -> pd.DataFrame:
    """bov.probe outputs (each with `level` and `seed`) -> one row per (level, seed, probe, layer)."""
    rows = []
    for p in probes:
        for name, values in p["per_layer"].items():
            rows += [{"level": p.get("level", p.get("variant")), "seed": p.get("seed"), "probe": name, "layer": l,
                      "value": v} for l, v in enumerate(values) if v is not None]
    return pd.DataFrame(rows, columns=["level", "seed", "probe", "layer", "value"])


def plot_probe(frame: pd.DataFrame, probe: str, order: Sequence[str] | None = None, title: str = ""):
    """One probe against depth, a line per level (band: ± one std over seeds) - ResFormer's concentration plot."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    d = frame[frame["probe"] == probe]
    order = [lv for lv in (order or sorted(d["level"].unique())) if lv in set(d["level"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=d, x="layer", y="value", hue="level", hue_order=order, errorbar="sd", marker="o", ax=ax)
    ax.set_xlabel("layer")
    ax.set_ylabel(PROBES.get(probe, probe))
    ax.legend(title=None, fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_bank_drift(probes: Sequence[dict], title: str = ""):
    """Cosine of each bank row with the row it started from, by token frequency in the probed text."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    rows = [{"level": p.get("level", p.get("variant")), "seed": p.get("seed"), "layer": f"layer {layer}",
             "bucket": bucket, "cosine": cell["cosine"]}
            for p in probes for layer, buckets in p.get("bank_drift", {}).items() for bucket, cell in buckets.items()]
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        d = pd.DataFrame(rows)
        d["series"] = d["level"] + ", " + d["layer"]
        sns.lineplot(data=d, x="bucket", y="cosine", hue="series", errorbar="sd", marker="o", ax=ax, sort=False)
        ax.legend(title=None, fontsize=7)
    ax.set_xlabel("occurrences of the token in the probed text")
    ax.set_ylabel("cos(bank row, its starting row)")
    if title:
        ax.set_title(title)
    return fig


def probe_figures(probes: Sequence[dict], out_dir: Path, order: Sequence[str] | None = None, title: str = "") -> list[Path]:
    """`probe_<name>.png/pdf` for every per-layer probe and `probe_bank_drift` when any run has banks."""
    frame = probe_frame(probes)
    files: list[Path] = []
    # every probe the runs hold, in bov.tracking.PROBES' order, then any it does not name yet
    for name in [n for n in PROBES if n in set(frame["probe"])] + sorted(set(frame["probe"]) - set(PROBES)):
        files += save(plot_probe(frame, name, order, title), out_dir, f"probe_{name}")
    if any(p.get("bank_drift") for p in probes):
        files += save(plot_bank_drift(probes, title), out_dir, "probe_bank_drift")
    return files
