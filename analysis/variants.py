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
# # The named variants side by side (`make sweep AXIS=variants`)
#
# Standard attention, BoV, its additive form, the parameter-free context-free sources
# (x0, v1), ResFormer, SVFormer, value embeddings, Depth-Attention, NeuTRENO and
# DenseFormer, compute-matched. Parameters: `BOV_STUDY` (default `variants-tiny`),
# `MLFLOW_TRACKING_URI`, `BOV_RESULTS_DIR`.

# %%
from bov import analysis as A

study, OUT, TRACKING_URI = A.study_from_environment("variants-tiny")

# %% [markdown]
# ## Table and the paper's Figure 4 (validation BPB against tokens and FLOPs)

# %%
out = A.report(study, OUT, TRACKING_URI, highlight="bov")
out["shown"]

# %% [markdown]
# ## The paper's Figure 2: learned value coefficients per layer at the end of training
#
# `b` scales the context-free value (bank row, x0 W_V or V_0), `a` the layer's own value
# (additive variants). The paper finds `b` growing with depth and `a` going to about 0.

# %%
coeffs = A.coefficients(study.runs)
learned = [lv for lv in study.levels if lv in set(coeffs["level"])]
fig = A.plot_coefficients(coeffs, order=learned, title=f"{study.name}: learned value coefficients")
files = A.save(fig, OUT, "coefficients")
coeffs.pivot_table(index=["level", "coeff"], columns="layer", values="value")
