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
# # One axis sweep: the metric at every level, against the baseline level
#
# Any grid study under `sweeps/` (`make sweep AXIS=<study>`). Parameters come from the
# environment so that `make figures` can run this for every study:
# `BOV_STUDY` (the MLflow experiment, e.g. `bank_layers-tiny`), `MLFLOW_TRACKING_URI`
# (default: the embedded store under the runs dir), `BOV_RESULTS_DIR` (default `results`).

# %%
from bov import analysis as A

study, OUT, TRACKING_URI = A.study_from_environment("bank_layers-tiny")
print(f"{study.name}: axis {study.axis}, levels {study.levels}, baseline {study.baseline}, {len(study.runs)} finished runs")

# %% [markdown]
# ## Table: mean ± std over seeds, delta vs the baseline with a 95% interval

# %%
out = A.report(study, OUT, TRACKING_URI)
out["shown"]

# %% [markdown]
# Figures written: `metric_by_level` (every seed, the mean and its bootstrap 95% interval)
# and `curves` (validation BPB against training tokens and FLOPs, ± one std over seeds).

# %%
print("\n".join(str(p) for p in out["files"]))
