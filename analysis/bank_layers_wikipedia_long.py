# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Does a bank in every layer fall behind the last third as the budget grows? (`make sweep AXIS=bank_layers_wikipedia_long`)
#
# At 200 baseline steps (`bank_layers_wikipedia`) a bank in every layer was at least as good as the last
# third, while the paper, at billions of tokens, finds every layer hurts. Here the same model, data and
# recipe train 4x as long. If budget is what separates the two, the paired gap `all - last_third` grows
# with tokens: between the two studies, and along these runs (validation every 200 steps).
# Parameters: `BOV_STUDY` (default `bank_layers_wikipedia_long-tiny`), `BOV_SHORT_STUDY` (default
# `bank_layers_wikipedia-tiny`), `MLFLOW_TRACKING_URI`, `BOV_RESULTS_DIR`.

# %%
import os

import numpy as np
import pandas as pd

from bov import analysis as A
from bov import stats as S

study, OUT, TRACKING_URI = A.study_from_environment("bank_layers_wikipedia_long-tiny")
out = A.report(study, OUT, TRACKING_URI)
runs, metric = study.runs, study.metric
out["shown"]

# %% [markdown]
# ## The gap `all - last_third` against tokens trained
#
# Paired by seed, a 95% t interval. The short study's final numbers (its own runs, 200 baseline steps) and
# this study's validations along the way: at an intermediate step the two levels have seen the same tokens
# (same batch), but the learning rate has not yet decayed, so those points are not the final numbers of a
# shorter run.


# %%
def paired(a: pd.Series, b: pd.Series) -> dict:
    """a - b over the seeds both have, with bov.analysis's interval (paired t)."""
    both = a.dropna().index.intersection(b.dropna().index)
    d, lo, hi, _ = S.interval(a[both], b[both], 0.95, 10_000, 0)
    return {"seeds": len(both), "Δ all - last_third": d, "ci_low": lo, "ci_high": hi}


rows = []
short_name = os.environ.get("BOV_SHORT_STUDY", "bank_layers_wikipedia-tiny")
short_gap = None
try:
    short = A.load_study(short_name, TRACKING_URI).runs
    final = short.pivot_table(index="seed", columns="level", values=metric)
    short_gap = final["all"] - final["last_third"]
    rows.append({"where": f"{short_name}, end of run", "tokens": short[short["level"] == "all"]["tokens"].mean(),
                 **paired(final["all"], final["last_third"])})
except Exception as e:  # the short study is context, not this study's result
    print(f"{short_name}: not loaded ({type(e).__name__}: {e})")
history = out["history"]
along = history[history["metric"] == metric].pivot_table(index=["step", "seed"], columns="level", values="value")
for step, g in along.groupby(level="step"):
    if {"all", "last_third"} <= set(g.columns) and g[["all", "last_third"]].notna().all(axis=1).any():
        g = g.droplevel("step")
        rows.append({"where": f"{study.name}, step {step}", "tokens": step * runs["budget.tokens"].iloc[0] / runs["budget.steps"].iloc[0],
                     **paired(g["all"], g["last_third"])})
final = runs.pivot_table(index="seed", columns="level", values=metric)
rows.append({"where": f"{study.name}, end of run", "tokens": runs[runs["level"] == "all"]["tokens"].mean(),
             **paired(final["all"], final["last_third"])})
if short_gap is not None:  # a seed starts from the same weights and reads the same windows in both studies
    shift = paired(final["all"] - final["last_third"], short_gap)
    rows.append({"where": "change of the gap from the short study to this one, paired by seed",
                 "tokens": np.nan, **shift})
gap = pd.DataFrame(rows)
shown_gap = gap.assign(
    **{"tokens (every layer)": gap["tokens"].map(lambda t: "" if np.isnan(t) else f"{t / 1e6:.2f}M")},
    **{"Δ all - last_third (95% CI)": [S.delta_cell(d, lo, hi, "paired t") for d, lo, hi in
                                      zip(gap["Δ all - last_third"], gap["ci_low"], gap["ci_high"])]},
)[["where", "tokens (every layer)", "seeds", "Δ all - last_third (95% CI)"]]
A.write_markdown(shown_gap, OUT, "gap_vs_tokens", f"{study.name}: {metric} of a bank in every layer minus the last "
                 "third, paired over seeds (95% t interval)", numbers=gap)

# %% [markdown]
# ## What the trained model kept of each bank
#
# The learned coefficient on each bank layer's values after training (init 1), per seed; near 0, the
# model switched that layer's attention output off.

# %%
A.coefficient_table(runs, OUT, f"{study.name}: learned coefficient on each bank layer's values after training "
                    "(init 1)", order=study.levels)
