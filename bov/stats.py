"""Statistics of a comparison over seeds: per-level tables with paired deltas, and the paper's claims.

* `compare(runs, baseline=..., references=...)`: one row per level: seeds, mean and std of the metric (and
  val/loss), its delta against the baseline level and each other reference with a 95% interval, sizes and
  throughput; `compare_within` does it inside each value of a grouping column; `format_table` gives the
  strings a paper shows (`mean ± std`, `delta [lo, hi]`, sizes in k/M/B).
* `interval(x, base)`: a level's delta against a reference level with its 95% interval (paired t when both
  ran the same seeds, a bootstrap of the difference of means otherwise, none for one seed).
* `seeds_needed(sd, diff)`: how many seeds a spread of per-seed differences `sd` needs before the paired 95%
  interval's half-width falls below `|diff|`.
* `verdicts(runs, paper, references)`: one row per claim of a study file's `paper:` block (bov.study): the
  paper's delta (from its `values`, against each reference that has one) or direction (its `claims`), this
  suite's delta with its paired interval, whether the seeds resolve it (the interval excludes zero), the
  verdict (agrees, disagrees, unresolved), and the seeds the measured spread would need to resolve the
  paper's own difference.

The paper's numbers are on its data, tokenizer and scale; ours are on this suite's. So a verdict compares
directions, and `seeds needed` sets the paper's magnitude against this suite's seed-to-seed noise: what this
scale can and cannot resolve, not a prediction of the paper's result.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

AGREES, DISAGREES, UNRESOLVED = "agrees", "disagrees", "unresolved"
MAX_SEEDS = 10_000  # past this, "seeds needed" says "> 10,000": the difference is out of reach here


def interval(x: pd.Series, base: pd.Series, confidence: float = 0.95, n_boot: int = 10_000,
             seed: int = 0) -> tuple[float, float, float, str]:
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
            seed: int = 0, references: Sequence[str] = ()) -> pd.DataFrame:
    """One row per level: runs, seeds, mean/std of the metric and val/loss, delta vs baseline with an interval
    (`delta`, `ci_low`, `ci_high`, `ci_method`), and the same against each other reference level
    (`delta vs <ref>`, `ci_low vs <ref>`, ...)."""
    levels = [lv for lv in (order or []) if lv in set(runs[by])] + sorted(set(runs[by]) - set(order or []))
    base = runs[runs[by] == baseline].set_index("seed")[metric] if baseline is not None else None
    others = {r: runs[runs[by] == r].set_index("seed")[metric] for r in references if r != baseline}
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
                d, lo, hi, how = interval(vals, base, confidence, n_boot, seed)
                row.update(delta=d, ci_low=lo, ci_high=hi, ci_method=how)
        for ref, ref_vals in others.items():
            d, lo, hi, how = ((0.0, math.nan, math.nan, "reference") if level == ref else
                              interval(vals, ref_vals, confidence, n_boot, seed) if len(ref_vals) else (math.nan,) * 3 + ("",))
            row.update({f"delta vs {ref}": d, f"ci_low vs {ref}": lo, f"ci_high vs {ref}": hi, f"ci_method vs {ref}": how})
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


def _si(v: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def delta_cell(delta: float, lo: float, hi: float, method: str) -> str:
    if pd.isna(delta):
        return "-"
    if method in ("baseline", "reference"):
        return f"({method})"
    if pd.isna(lo):
        return f"{delta:+.4f} (single seed)"
    return f"{delta:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def mean_pm_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"  # a level with no finished run yet
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def format_table(table: pd.DataFrame, by: str = "level", metric: str = "val/bpb", baseline: str | None = None) -> pd.DataFrame:
    """Numbers -> the strings a paper shows: `mean ± std`, `delta [lo, hi]` against each reference, sizes in k/M/B."""
    pm = mean_pm_std

    out = pd.DataFrame({by: table[by], "seeds": table["runs"]})
    out[metric] = [pm(m, s) for m, s in zip(table[f"{metric} mean"], table[f"{metric} std"])]
    if "delta" in table:
        out[f"Δ vs {baseline} (95% CI)"] = [delta_cell(*v) for v in
                                            zip(table["delta"], table["ci_low"], table["ci_high"], table["ci_method"])]
    for ref in [c.removeprefix("delta vs ") for c in table if c.startswith("delta vs ")]:
        out[f"Δ vs {ref} (95% CI)"] = [delta_cell(*v) for v in zip(*(table[f"{k} vs {ref}"] for k in
                                                                     ("delta", "ci_low", "ci_high", "ci_method")))]
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


def difference_sd(x: pd.Series, base: pd.Series) -> float:
    """The spread of one seed's difference: the std of paired differences when both ran the same seeds,
    else the two levels' spreads combined (NaN with fewer than two seeds on either side)."""
    if len(x) < 2 or len(base) < 2:
        return math.nan
    if set(x.index) == set(base.index):
        return float((x - base.reindex(x.index)).std(ddof=1))
    return float(math.hypot(x.std(ddof=1), base.std(ddof=1)))


def seeds_needed(sd: float, diff: float, confidence: float = 0.95) -> float:
    """The fewest seeds n >= 2 with t(n-1) * sd / sqrt(n) < |diff|: a true difference of `diff` is then
    resolved by the paired interval on average. NaN when sd or diff is unknown or diff is 0; inf past
    MAX_SEEDS."""
    from scipy import stats

    if not (math.isfinite(sd) and math.isfinite(diff)) or diff == 0:
        return math.nan
    n = np.arange(2, MAX_SEEDS + 1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)
    ok = np.flatnonzero(half < abs(diff))
    return float(n[ok[0]]) if len(ok) else math.inf


def verdict(delta: float, lo: float, hi: float, paper_sign: float) -> str:
    """agrees / disagrees when the interval excludes zero (same / opposite sign to the paper), else unresolved."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return UNRESOLVED
    if paper_sign == 0:  # the paper reports no difference; this suite resolves one
        return DISAGREES
    return AGREES if np.sign(delta) == np.sign(paper_sign) else DISAGREES


def _claims(paper: dict[str, Any], references: Sequence[str]) -> list[dict[str, Any]]:
    """(level, reference, paper value, paper delta, paper sign) of every claim the paper block makes."""
    values, out = paper.get("values") or {}, []
    for ref in references:
        if ref not in values:
            continue
        for level, v in values.items():
            if level != ref:
                diff = v - values[ref]
                out.append({"level": level, "vs": ref, "paper": v, "paper Δ": diff, "sign": np.sign(diff)})
    for c in paper.get("claims") or []:  # lower is better for both metrics (bits per byte, loss)
        out.append({"level": c["level"], "vs": c["than"], "paper": math.nan, "paper Δ": math.nan,
                    "sign": -1.0 if c["paper"] == "better" else 1.0})
    return out


def verdicts(runs: pd.DataFrame, paper: dict[str, Any], references: Sequence[str], by: str = "level",
             metric: str = "val/bpb", confidence: float = 0.95) -> pd.DataFrame:
    """One row per claim whose two levels both have finished runs (see the module docstring)."""
    cols = ["level", "vs", "paper", "paper Δ", "paper says", "delta", "ci_low", "ci_high", "ci_method", "seeds",
            "sd", "resolved", "verdict", "seeds needed"]
    per_level = {lv: g.set_index("seed")[metric] for lv, g in runs.groupby(by)}
    rows = []
    for c in _claims(paper, references):
        x, base = per_level.get(c["level"]), per_level.get(c["vs"])
        if x is None or base is None:
            continue
        d, lo, hi, how = interval(x, base, confidence)
        sd = difference_sd(x, base)
        says = "better" if c["sign"] < 0 else "worse" if c["sign"] > 0 else "equal"
        rows.append({**{k: c[k] for k in ("level", "vs", "paper", "paper Δ")}, "paper says": says, "delta": d,
                     "ci_low": lo, "ci_high": hi, "ci_method": how, "seeds": min(len(x), len(base)), "sd": sd,
                     "resolved": bool(math.isfinite(lo) and not lo <= 0 <= hi), "verdict": verdict(d, lo, hi, c["sign"]),
                     "seeds needed": seeds_needed(sd, c["paper Δ"], confidence)})
    return pd.DataFrame(rows, columns=cols)


def rank_agreement(runs: pd.DataFrame, values: dict[str, float], by: str = "level",
                   metric: str = "val/bpb") -> tuple[float, int]:
    """Spearman's rho between the paper's values and this suite's level means, over the levels both have."""
    from scipy import stats

    means = runs.groupby(by)[metric].mean()
    both = [lv for lv in values if lv in means.index]
    if len(both) < 3:
        return math.nan, len(both)
    return float(stats.spearmanr([values[lv] for lv in both], means[both]).statistic), len(both)


def format_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """The strings the verdict table shows."""

    def needed(n: float, paper_delta: float) -> str:
        if math.isinf(n):
            return f"> {MAX_SEEDS:,}"
        if math.isnan(n):
            return "-" if math.isnan(paper_delta) or paper_delta == 0 else "- (one seed: no spread)"
        return f"{n:.0f}"

    out = pd.DataFrame({"level": table["level"], "vs": table["vs"]})
    out["paper"] = [("-" if math.isnan(p) else f"{p:.3f}") for p in table["paper"]]
    out["paper Δ"] = [(s if math.isnan(d) else f"{d:+.3f}") for d, s in zip(table["paper Δ"], table["paper says"])]
    out["Δ here (95% CI)"] = [f"{d:+.4f}" + (" (single seed)" if math.isnan(lo) else f" [{lo:+.4f}, {hi:+.4f}]")
                              for d, lo, hi in zip(table["delta"], table["ci_low"], table["ci_high"])]
    out["seeds"] = table["seeds"].astype(str)
    out["resolved"] = ["yes" if r else "no" for r in table["resolved"]]
    out["verdict"] = table["verdict"]
    out["seeds to resolve paper Δ"] = [needed(n, d) for n, d in zip(table["seeds needed"], table["paper Δ"])]
    return out
