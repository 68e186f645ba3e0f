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
# # Which layers need a bank, on natural text (`make sweep AXIS=bank_layers_wikipedia`)
#
# The paper finds a bank in every layer hurts and a bank in the last third helps. Here: no bank, the last
# third, every layer, and every layer at a quarter of the table learning rate (do every layer's tables
# simply learn too fast?), three seeds each. The learned coefficient on each bank layer's values says what
# the trained model kept of each bank.
# Parameters: `BOV_STUDY` (default `bank_layers_wikipedia-tiny`), `MLFLOW_TRACKING_URI`, `BOV_RESULTS_DIR`.

# %%
from bov import analysis as A
from bov import stats as S

study, OUT, TRACKING_URI = A.study_from_environment("bank_layers_wikipedia-tiny")
out = A.report(study, OUT, TRACKING_URI)
runs, metric = study.runs, study.metric
out["shown"]

# %% [markdown]
# ## Every layer against the last third, paired by seed
#
# The paper's claim is about this difference; a 95% t interval over the seeds.

# %%
banked = runs[runs["level"] != study.baseline]
vs_last = S.compare(banked, baseline="last_third", metric=metric, order=study.levels)
A.write_markdown(S.format_table(vs_last, metric=metric, baseline="last_third"), OUT, "vs_last_third",
                 f"{study.name}: each bank placement against the last third, paired over seeds {study.seeds} "
                 "(95% t interval)")

# %% [markdown]
# ## What the trained model kept of each bank
#
# The learned coefficient `gamma_l` on each bank layer's values (`v = gamma_l * E_v^l[i]`, init 1), per
# seed. A coefficient near 0 means the model switched that layer's attention output off: the layer's
# context-free values were worth less than nothing to it.

# %%
A.coefficient_table(runs, OUT, f"{study.name}: learned coefficient on each bank layer's values after training "
                    "(init 1)", order=study.levels)
