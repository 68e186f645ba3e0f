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
# # BoV's components, removed one at a time (the paper's Figure 5b)
#
# Every layer instead of the last third, keeping V (add instead of replace), a fixed
# coefficient, one table shared by all target layers; deltas are against BoV itself.
# Parameters: `BOV_STUDY` (default `component_ablation-tiny`), `MLFLOW_TRACKING_URI`,
# `BOV_RESULTS_DIR`.

# %%
from bov import analysis as A

study, OUT, TRACKING_URI = A.study_from_environment("component_ablation-tiny")
out = A.report(study, OUT, TRACKING_URI, highlight="bov")
out["shown"]
