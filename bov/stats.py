"""Statistics of a comparison over seeds: paired intervals, and the paper's claims against this suite's deltas.

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
