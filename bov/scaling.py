"""What a variant is worth in compute, and whether its gain holds as models grow: fits over a crossed study.

* `fit_ladder(compute, loss)`: the baseline's loss against training FLOPs, L(C) = E + A (C / C0)^-alpha, with
  C0 the ladder's smallest compute (so A is the loss above the floor E there). For a given E, log(L - E) is
  linear in log C (least squares); E itself is a bounded one-dimensional search on the squared error of L. So
  the fit has no starting point to guess and cannot fail to converge.
* `multipliers(runs, ...)`: for every variant cell, C_baseline(L_variant) / C_variant: the compute the baseline
  would need for the variant's loss, over the compute the variant used. Above 1, the variant is worth that many
  times the baseline's compute. A 95% interval by bootstrap: the seeds are resampled within every budget of the
  ladder and within the variant, and the ladder refitted, N_BOOT times. A variant whose loss lies outside the
  losses the ladder measured is flagged `extrapolated`; one below the fitted floor E has no finite multiplier.
* The same without a law (`interpolated`): the baseline's compute for the variant's loss read between the two
  measured budgets that bracket it (log compute linear in loss), with the same bootstrap; NaN outside them. Where
  the law misses the ladder's points (its residuals are in `.attrs["residuals"]`), the two differ, and the
  difference is the law's, not the variant's.
* `size_trend(runs, ...)`: per model size, the variant's delta against the baseline, paired by seed, and its
  multiplier read along the baseline's sizes (`along_ladder`: with tokens tied to size, the sizes are a ladder
  in compute, the model and its tokens grown together; no law, so no reading beyond the largest size); the gain
  (-delta) fitted against log10 of the non-embedding parameters; the slope's 95% interval from the sizes'
  own standard errors (Welch-Satterthwaite degrees of freedom: with 3 seeds a bootstrap of the seeds would be
  too narrow); the trend in words (shrinks, holds, grows) and the range the fit may be read in.

With three seeds per cell the multiplier's percentile bootstrap is narrower than a t interval would be (a
bootstrap of n values has the spread of n, not n - 1): read its interval as a lower bound on the uncertainty.

A ladder with fewer than MIN_BUDGETS budgets (or a size ladder with fewer than MIN_SIZES sizes), or a baseline
whose loss does not fall with compute, raises LadderError: one line, no number.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bov.stats import interval

MIN_BUDGETS, MIN_SIZES, N_BOOT = 4, 3, 2000
ALONG_SIZES = ("× compute along sizes: the baseline's compute, read between the two sizes whose losses bracket the "
               "variant's (log compute linear in loss, no law; with tokens tied to size the baseline grows in "
               "parameters and tokens together), over the variant's compute, 95% bootstrap interval over seeds; '-' "
               "outside the baselines' losses")


class LadderError(ValueError):
    """A ladder that cannot carry a fit: said in one line instead of a number."""


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A (C / c0)^-alpha."""

    E: float
    A: float
    alpha: float
    c0: float

    def loss(self, compute) -> np.ndarray:
        return self.E + self.A * (np.asarray(compute, dtype=float) / self.c0) ** -self.alpha

    def compute(self, loss) -> np.ndarray:
        """The inverse: the compute at which the fit reaches `loss` (inf at or below the floor E)."""
        above = np.asarray(loss, dtype=float) - self.E
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where(above > 0, self.c0 * (np.maximum(above, 1e-300) / self.A) ** (-1 / self.alpha), np.inf)

    def __str__(self) -> str:
        return f"L(C) = {self.E:.4f} + {self.A:.4f} (C / {self.c0:.3g})^-{self.alpha:.3f}"


def format_multiplier(m: float, lo: float, hi: float, extrapolated: bool) -> str:
    """`1.52 [1.48, 1.57]`, `(extrapolated)` when flagged, `-` where there is none."""
    if m is None or pd.isna(m):
        return "-"
    if math.isinf(m):
        return "beyond the fit's floor"
    cell = f"{m:.2f}" + ("" if pd.isna(lo) else f" [{lo:.2f}, {hi:.2f}]")
    return cell + (" (extrapolated)" if extrapolated is True else "")


def _loglinear(x: np.ndarray, loss: np.ndarray, floor: float) -> tuple[float, float, float]:
    """(A, alpha, squared error in L) of log(L - floor) = log A - alpha x, least squares."""
    slope, intercept = np.polyfit(x, np.log(loss - floor), 1)
    fitted = floor + np.exp(intercept + slope * x)
    return float(np.exp(intercept)), float(-slope), float(((loss - fitted) ** 2).sum())


def fit_ladder(compute, loss) -> PowerLaw:
    """Fit L(C) = E + A (C / C0)^-alpha to the ladder's points (every seed of every budget)."""
    from scipy.optimize import minimize_scalar

    c, L = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    c0 = float(c.min())
    x = np.log(c / c0)
    top = float(L.min()) * (1 - 1e-6)  # the floor stays below every measured loss
    best = minimize_scalar(lambda e: _loglinear(x, L, e)[2], bounds=(0.0, top), method="bounded",
                           options={"xatol": 1e-7 * max(top, 1e-12)})
    floor = float(best.x) if _loglinear(x, L, best.x)[2] <= _loglinear(x, L, 0.0)[2] else 0.0
    A, alpha, _ = _loglinear(x, L, floor)
    return PowerLaw(floor, A, alpha, c0)


def _ladder(base: pd.DataFrame, budget: str, metric: str, least: int = MIN_BUDGETS, rung: str = "budget"
            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """budget level -> (compute, loss) per seed of the baseline; checked to carry a fit (`least` rungs, each a
    `rung`: a budget, or a size)."""
    ladder = {b: (g["compute"].to_numpy(float), g[metric].to_numpy(float))
              for b, g in _in_seed_order(base).groupby(budget)}
    if len(ladder) < least:
        raise LadderError(f"the baseline ran at {len(ladder)} {rung}(s) ({', '.join(map(str, ladder)) or 'none'}); "
                          f"a compute multiplier needs a ladder of at least {least}")
    means = sorted((c.mean(), L.mean()) for c, L in ladder.values())
    if not means[-1][1] < means[0][1]:
        raise LadderError(f"the baseline's loss does not fall with compute ({means[0][1]:.4f} at {means[0][0]:.3g} "
                          f"FLOPs, {means[-1][1]:.4f} at {means[-1][0]:.3g}): no compute multiplier")
    return ladder


def _fit(ladder: dict[str, tuple[np.ndarray, np.ndarray]]) -> PowerLaw:
    fit = fit_ladder(np.concatenate([c for c, _ in ladder.values()]), np.concatenate([L for _, L in ladder.values()]))
    if not fit.alpha > 0:
        raise LadderError(f"the fit to the baseline's ladder does not fall with compute ({fit}): no compute multiplier")
    return fit


def interpolated(ladder: dict[str, tuple[np.ndarray, np.ndarray]], loss: float) -> float:
    """The compute at which the baseline reaches `loss`, with no fitted law: between the two measured budgets
    whose mean losses bracket it, log compute linear in loss. NaN outside the measured losses."""
    pts = sorted((float(np.log(c.mean())), float(L.mean())) for c, L in ladder.values())
    for (x0, l0), (x1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            return float(np.exp(x0 + (x1 - x0) * (l0 - loss) / (l0 - l1)))
    return math.nan


def _bootstrap(ladder: dict[str, tuple[np.ndarray, np.ndarray]], groups: list, metric: str, n_boot: int,
               seed: int, law: bool) -> tuple[np.ndarray, np.ndarray]:
    """n_boot x groups resampled multipliers, the seeds drawn again within every rung of the ladder and within
    every variant cell group: read through the refitted law (all NaN when `law` is False, or where a resample's
    fit does not fall) and without a law (NaN outside the resample's measured losses). The ladder's resamples
    come from one stream and each group's from its own, keyed by its name, over its runs in seed order: no
    interval depends on the order the runs were read in or on which other groups are there (the sweep's summary
    and `make figures` print the same)."""
    rng = np.random.default_rng(seed)
    streams = [np.random.default_rng([seed, zlib.crc32(f"{lv}\0{b}".encode())]) for lv, b, _ in groups]
    losses = [_in_seed_order(g)[metric].to_numpy(float) for _, _, g in groups]
    used = [float(g["compute"].mean()) for _, _, g in groups]
    boots = np.full((n_boot, len(groups)), np.nan)
    boots_interp = np.full((n_boot, len(groups)), np.nan)
    for i in range(n_boot):
        resampled = {b: (c[k], L[k]) for b, (c, L) in ladder.items() for k in [rng.integers(0, len(L), len(L))]}
        try:
            f = _fit(resampled) if law else None
        except LadderError:  # a resample whose fit does not fall: no multiplier from it
            f = None
        for j, (L, stream) in enumerate(zip(losses, streams)):
            drawn = L[stream.integers(0, len(L), len(L))].mean()
            if f is not None:
                boots[i, j] = f.compute(drawn) / used[j]
            boots_interp[i, j] = interpolated(resampled, drawn) / used[j]
    return boots, boots_interp


def _in_seed_order(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs sorted by seed (stable), so that a resample picks the same runs whatever order they came in."""
    return runs.sort_values("seed", kind="stable") if "seed" in runs else runs


def _percentiles(draws: np.ndarray, seeds: int, confidence: float) -> tuple[float, float]:
    """The percentile interval of the finite draws; none for one seed or fewer than two draws."""
    ok = draws[~np.isnan(draws)]
    if len(ok) < 2 or seeds < 2:
        return math.nan, math.nan
    lo, hi = np.quantile(ok, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def multipliers(runs: pd.DataFrame, by: str, budget: str, baseline: str, metric: str = "val/bpb",
                n_boot: int = N_BOOT, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """One row per (level, budget) cell group other than the baseline's: seeds, loss, compute, multiplier with
    its bootstrap interval, extrapolated, and a note. `runs` needs columns by, budget, seed, compute, metric.
    The fitted PowerLaw is in `.attrs["fit"]`."""
    ladder = _ladder(runs[runs[by] == baseline], budget, metric)
    fit = _fit(ladder)
    lo_loss = min(L.mean() for _, L in ladder.values())
    hi_loss = max(L.mean() for _, L in ladder.values())
    groups = [(lv, b, g) for (lv, b), g in runs[runs[by] != baseline].groupby([by, budget], sort=False)]
    boots, boots_interp = _bootstrap(ladder, groups, metric, n_boot, seed, law=True)
    rows = []
    for j, (lv, b, g) in enumerate(groups):
        loss, used = float(g[metric].mean()), float(g["compute"].mean())
        point = float(fit.compute(loss)) / used
        lo, hi = _percentiles(boots[:, j], len(g), confidence)
        ilo, ihi = _percentiles(boots_interp[:, j], len(g), confidence)
        outside = not lo_loss <= loss <= hi_loss
        note = ("below the fitted floor E: no finite multiplier" if math.isinf(point) else
                f"extrapolated: loss {'below' if loss < lo_loss else 'above'} the ladder's "
                f"({lo_loss:.4f} to {hi_loss:.4f})" if outside else "")
        if len(g) < 2:
            note = "; ".join(filter(None, [note, "one seed: no interval, an anecdote"]))
        rows.append({by: lv, budget: b, "seeds": len(g), metric: loss, "compute": used, "multiplier": point,
                     "ci_low": float(lo), "ci_high": float(hi), "extrapolated": outside, "note": note,
                     "interpolated": interpolated(ladder, loss) / used, "interpolated_low": float(ilo),
                     "interpolated_high": float(ihi)})
    out = pd.DataFrame(rows, columns=[by, budget, "seeds", metric, "compute", "multiplier", "ci_low", "ci_high",
                                      "extrapolated", "note", "interpolated", "interpolated_low", "interpolated_high"])
    out.attrs["fit"] = fit
    out.attrs["residuals"] = {b: float(L.mean() - fit.loss(c.mean())) for b, (c, L) in ladder.items()}
    return out


def along_ladder(runs: pd.DataFrame, by: str, rung: str, baseline: str, metric: str = "val/bpb",
                 n_boot: int = N_BOOT, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """The law-free multiplier of every variant cell group, read along the baseline's rungs, whatever makes them
    differ in compute: for a size ladder whose tokens are tied to size, the baseline grown in parameters and
    tokens together. Columns by, rung, multiplier, ci_low, ci_high (NaN where the variant's loss lies outside
    the rungs' measured losses: at the largest size, a variant ahead of its baseline). Two rungs at least."""
    ladder = _ladder(runs[runs[by] == baseline], rung, metric, least=2, rung=rung.removeprefix("coord."))
    groups = [(lv, r, g) for (lv, r), g in runs[runs[by] != baseline].groupby([by, rung], sort=False)]
    _, boots = _bootstrap(ladder, groups, metric, n_boot, seed, law=False)
    rows = []
    for j, (lv, r, g) in enumerate(groups):
        lo, hi = _percentiles(boots[:, j], len(g), confidence)
        rows.append({by: lv, rung: r, "multiplier": interpolated(ladder, float(g[metric].mean())) / g["compute"].mean(),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[by, rung, "multiplier", "ci_low", "ci_high"])


def _worth_per_size(runs: pd.DataFrame, table: pd.DataFrame, by: str, size: str, baseline: str, metric: str
                    ) -> tuple[pd.DataFrame, str]:
    """The size table with each size's multiplier along the baseline's sizes (`along_ladder`) and the line that
    says what it is, or why there is none."""
    if "compute" not in runs:
        return table, "no multiplier: the runs carry no training FLOPs"
    try:
        m = along_ladder(runs, by, size, baseline, metric)
    except LadderError as e:
        return table, f"no multiplier: {e}"
    m = m.drop(columns=by).rename(columns={"ci_low": "multiplier_low", "ci_high": "multiplier_high"})
    return table.merge(m, on=size, how="left"), ALONG_SIZES


def _slope_interval(x: np.ndarray, diffs: list[np.ndarray], slope: float, confidence: float) -> tuple[float, float]:
    """The least-squares slope's interval from each size's standard error of its mean paired difference."""
    from scipy import stats

    if min(len(d) for d in diffs) < 2:
        return math.nan, math.nan
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()  # slope = sum(w * gain)
    parts = np.array([wi ** 2 * d.var(ddof=1) / len(d) for wi, d in zip(w, diffs)])
    se = math.sqrt(parts.sum())
    if se == 0:
        return slope, slope
    df = parts.sum() ** 2 / sum(p ** 2 / (len(d) - 1) for p, d in zip(parts, diffs))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return slope - half, slope + half


def size_trend(runs: pd.DataFrame, by: str, size: str, baseline: str, variant: str, metric: str = "val/bpb",
               params: str = "params_non_embedding", confidence: float = 0.95) -> tuple[pd.DataFrame, dict]:
    """Per size: N (the baseline's non-embedding parameters), the variant's delta with its paired interval.
    And the trend: gain = -delta fitted as a + b log10 N, b's interval, shrinks / holds / grows."""
    rows, paired = [], []
    for s, g in runs.groupby(size, sort=False):
        base, var = (g[g[by] == lv].set_index("seed")[metric] for lv in (baseline, variant))
        if not len(base) or not len(var):
            continue
        d, lo, hi, how = interval(var, base, confidence)
        n = float(g.loc[g[by] == baseline, params].mean())
        rows.append({size: s, "params_non_embedding": n, "seeds": min(len(base), len(var)), "delta": d,
                     "ci_low": lo, "ci_high": hi, "ci_method": how})
        common = sorted(set(base.index) & set(var.index))
        paired.append((n, (var[common] - base[common]).to_numpy(float) if common else np.array([d])))
    table = pd.DataFrame(rows).sort_values("params_non_embedding", ignore_index=True) if rows else pd.DataFrame()
    if len(rows) < MIN_SIZES:
        raise LadderError(f"{variant} and {baseline} share {len(rows)} size(s); a trend against size needs {MIN_SIZES}")
    table, worth = _worth_per_size(runs[runs[by].isin([baseline, variant])], table, by, size, baseline, metric)
    x = np.log10([n for n, _ in paired])
    gains = np.array([-d.mean() for _, d in paired])
    slope = float(np.polyfit(x, gains, 1)[0])
    lo, hi = _slope_interval(x, [d for _, d in paired], slope, confidence)
    small, large = table["params_non_embedding"].min(), table["params_non_embedding"].max()
    ahead = gains.mean() >= 0  # the variant ahead on average: its gain grows or shrinks; behind: its deficit
    trend = ("unresolved (one seed: no interval)" if math.isnan(lo) else "holds (no resolved trend)" if lo <= 0 <= hi
             else ("grows" if ahead else "narrows (a deficit)") if lo > 0 else ("shrinks" if ahead else "widens (a deficit)"))
    return table, {"slope": slope, "ci_low": float(lo), "ci_high": float(hi), "trend": trend, "worth": worth,
                   "range": (float(small), float(large)), "read_up_to": float(large * large / small),
                   "text": (f"The gain of {variant} over {baseline} ({baseline} - {variant} in {metric}: "
                            f"{gains[np.argmin(x)]:+.4f} at {small / 1e6:.2f}M, {gains[np.argmax(x)]:+.4f} at "
                            f"{large / 1e6:.2f}M non-embedding parameters) {trend} with size: {slope:+.4f} per decade "
                            f"[{lo:+.4f}, {hi:+.4f}]. Read the fit inside that range, and no further than one ladder "
                            f"span beyond it ({large * large / small / 1e6:.1f}M); 135M is {135e6 / large:.0f}x the "
                            "largest size: " + ("out of its reach." if 135e6 > large * large / small else
                                                 "within that span, an extrapolation all the same."))}
