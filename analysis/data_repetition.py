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
# # The data regime: what repetition does to a bank (`make sweep AXIS=data_repetition`)
#
# At fixed compute, each variant trains on its budget's tokens once, or on half or a quarter
# of them repeated. With the paper's own code on Wikipedia (shared/spec section 7), BoV leads
# on unique data and trails the baseline at 2.3 epochs, while x0 and v1 keep helping.
# Parameters: `BOV_STUDY` (default `data_repetition-tiny`), `MLFLOW_TRACKING_URI`, `BOV_RESULTS_DIR`.

# %%
from bov import analysis as A

study, OUT, TRACKING_URI = A.study_from_environment("data_repetition-tiny")
out = A.report(study, OUT, TRACKING_URI)
out["shown"]

# %% [markdown]
# ## Validation BPB against epochs, one line per variant

# %%
fig = A.plot_epochs(study.runs, metric=study.metric, title=f"{study.name}: repetition at fixed compute")
files = A.save(fig, OUT, "bpb_vs_epochs")
study.runs.pivot_table(index="variant", columns="data.max_unique_tokens", values=study.metric)
