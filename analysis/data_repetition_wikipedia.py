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
# # Where banks stop paying (`make sweep AXIS=data_repetition_wikipedia`)
#
# As the paper's own code was run on Wikipedia (shared/spec section 7), the unique training tokens are
# fixed and each run trains 1, 2 or 4 epochs of them; BoV's tables are sized toward the reference's
# ratios (tokens trained per vocabulary entry, table parameters per unique token). There BoV led the
# baseline on unique data and trailed it by 0.045 BPB at 2.3 epochs, its train loss far below the
# others'. Does BoV cross the baseline here, and do table weight decay or a lower table learning rate
# move the crossing?
# Parameters: `BOV_STUDY` (default `data_repetition_wikipedia-tiny`), `MLFLOW_TRACKING_URI`, `BOV_RESULTS_DIR`.

# %%
import numpy as np
import pandas as pd

from bov import analysis as A
from bov import tracking as T

study, OUT, TRACKING_URI = A.study_from_environment("data_repetition_wikipedia-tiny")
out = A.report(study, OUT, TRACKING_URI)  # every level against the baseline at 1 epoch
runs = study.runs.assign(arm=study.runs["level"].str.rsplit("_", n=1).str[0])  # bov_bank_wd_4ep -> bov_bank_wd
metric = study.metric
out["shown"]

# %% [markdown]
# ## The regime reached, against the reference's
#
# Tokens trained per vocabulary entry and table parameters per unique token, the two ratios that
# decide whether a table can memorize (the reference: about 1,500 and 2.4, at 2.3 epochs).

# %%
bov_runs = runs[runs["params.bank"] > 0]
unique = runs["regime.unique_tokens"].astype(float)
regime = pd.DataFrame({
    "epochs": runs["epochs"].map(lambda e: f"{e:g}"), "tokens trained": runs["tokens"], "unique tokens": unique,
    "tokens trained / vocab": runs["tokens"] / runs["model.vocab_size"].astype(float),
    "table params / unique token": bov_runs["params.bank"].max() / unique,
}).groupby("epochs").first()
regime.loc["2.3 (reference, section 7)"] = [48e6, 21.0e6, 48e6 / 32768, 50e6 / 21.0e6]
shown_regime = regime.copy().astype(object)
for col, fmt in (("tokens trained", "{:,.0f}"), ("unique tokens", "{:,.0f}"), ("tokens trained / vocab", "{:,.0f}"),
                 ("table params / unique token", "{:.2f}")):
    shown_regime[col] = regime[col].map(fmt.format)
A.write_markdown(shown_regime, OUT, "regime", f"{study.name}: the data regime reached", index=True)
regime

# %% [markdown]
# ## Each arm against the baseline trained on the same epochs
#
# Δ val BPB paired by seed (the same unique tokens, the same validation text); a 95% t interval.

# %%
within, same = A.deltas_within(runs, group="epochs", by="arm", baseline="baseline", metric=metric,
                               label=lambda e: f"{e:g} epochs")
A.write_markdown(same, OUT, "delta_same_epochs", f"{study.name}: Δ {metric} vs the baseline at the same epochs, "
                 f"paired over seeds {study.seeds} (95% t interval)", index=True, numbers=within)

# %% [markdown]
# ## Train loss and validation against epochs
#
# Train loss is the mean of the losses logged in the last 20% of a run's steps (nats per token, on text
# the model has already seen `epochs - 1` times); the gap to the validation loss (same units, same
# tokenizer) is what memorization looks like.

# %%
history = A.load_history(runs, metrics=[T.TRAIN_LOSS], tracking_uri=TRACKING_URI)
TRAIN = "train loss (last 20% of steps)"
late = history[history["step"] >= 0.8 * history.groupby("run_id")["step"].transform("max")]
runs[TRAIN] = runs["run_id"].map(late.groupby("run_id")["value"].mean())
runs["val loss - train loss"] = runs[T.VAL_LOSS] - runs[TRAIN]
by_epochs, shown = A.mean_std(runs, ["arm", "epochs"], [metric, T.VAL_LOSS, TRAIN, "val loss - train loss"])
shown["epochs"] = shown["epochs"].map(lambda e: f"{e:g}")
A.write_markdown(shown, OUT, "by_epochs", f"{study.name}: mean ± std over seeds {study.seeds}", numbers=by_epochs)
order = ["baseline", "bov", "bov_bank_wd", "bov_lr_bank_quarter"]
xlabel = "epochs over a fixed set of unique training tokens"
files = A.save(A.plot_epochs(runs, metric=metric, hue="arm", order=order, title=study.name, xlabel=xlabel),
               OUT, "bpb_vs_epochs")
files += A.save(A.plot_epochs(runs, metric=TRAIN, hue="arm", order=order, title=study.name, xlabel=xlabel,
                              ylabel="train loss, nats/token (last 20% of steps)"), OUT, "train_loss_vs_epochs")
shown

# %% [markdown]
# ## Does BoV cross the baseline?
#
# The mean paired Δ at each epoch count; where it changes sign, the crossing by linear interpolation in
# log2(epochs). Only the measured epoch counts are data: an interpolated crossing is an estimate.

# %%
def crossing(arm: str) -> str:
    d = within[within["arm"] == arm].sort_values("epochs")
    e, delta = d["epochs"].to_numpy(float), d["delta"].to_numpy(float)
    for i in range(len(e) - 1):
        if delta[i] < 0 <= delta[i + 1]:
            x0, x1 = np.log2(e[i]), np.log2(e[i + 1])
            return f"crosses near {2 ** (x0 + (x1 - x0) * delta[i] / (delta[i] - delta[i + 1])):.2f} epochs"
    if len(delta) and (delta < 0).all():
        return f"leads at every measured epoch count (up to {e.max():g})"
    if len(delta) and (delta >= 0).all():
        return f"never leads (from {e.min():g} epochs)"
    return "no single crossing"


crossings = {arm: crossing(arm) for arm in order[1:] if arm in set(within["arm"])}
(OUT / "crossing.md").write_text(f"{study.name}: BoV against the baseline at the same epochs\n\n"
                                 + "\n".join(f"- {arm}: {c}" for arm, c in crossings.items()) + "\n")
crossings

# %% [markdown]
# ## What table weight decay and a lower table learning rate do, at each epoch count
#
# Each against plain BoV trained on the same epochs, paired by seed.

# %%
_, reg = A.deltas_within(runs[runs["arm"].str.startswith("bov")], group="epochs", by="arm", baseline="bov",
                         metric=metric, label=lambda e: f"{e:g} epochs")
A.write_markdown(reg, OUT, "bank_regularization", f"{study.name}: each BoV arm against plain BoV at the same epochs, "
                 f"paired over seeds {study.seeds} (95% t interval)", index=True)
