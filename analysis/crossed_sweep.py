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
# # A crossed study: two axes as one grid (variant x budget, variant x size)
#
# Any study under `sweeps/` with a `cross:` axis. Parameters come from the environment, as for
# `axis_sweep.py`: `BOV_STUDY`, `MLFLOW_TRACKING_URI`, `BOV_RESULTS_DIR`. Runs are grouped by their
# coordinates (`coord.<axis>`), never by parsing level names.

# %%
from bov import analysis as A
from bov import crossed

study, OUT, TRACKING_URI = A.study_from_environment("compute_multiplier_wikipedia-tiny")
print(f"{study.name}: axes {[a['name'] for a in study.axes]}, baseline {study.baseline}, {len(study.runs)} finished runs")

# %% [markdown]
# ## Table: each level against the baseline at the same budget or size; the compute multiplier where the
# second axis is a budget ladder (bov.scaling: L(C) = E + A C^-alpha fitted to the baseline, inverted)

# %%
out = crossed.report(study, OUT, TRACKING_URI)
print(out["caption"])
out["shown"]

# %% [markdown]
# Figures written: `compute` (the metric against training FLOPs with the baseline's fit), `multipliers`
# (budget ladders), `size_trend_<variant>` (size ladders) and `curves`.

# %%
print("\n".join(str(p) for p in out["files"]))
