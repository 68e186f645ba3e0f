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
# # V-cache memory saved by banks against context length (the paper's Figure 5a)
#
# A context-free bank layer caches no values: it gathers its table rows from the token
# ids. The paper's formula (spec section 2) counts `layers * H_kv * d_h * bytes * (T - |V|)`
# saved per sequence, so it pays off beyond a context of |V| tokens (dashed lines). In the
# `135m` preset three of BoV's four bank layers are sliding-window layers, whose caches keep
# only their last 512 positions in bov (a ring), so a windowed bank layer saves 512 positions,
# not T: the solid lines, what bov allocates, break even near 4 |V| - 1536. Crosses are
# measured: `make bench-infer` allocates the baseline's and BoV's caches and tables and
# writes `results/bench/vcache.json` (baseline cache - BoV cache - tables, per sequence).

# %%
import json
import os

import pandas as pd

from bov import analysis as A

PRESET = os.environ.get("BOV_PRESET", "135m")
VARIANT = os.environ.get("BOV_VARIANT", "bov")
OUT = A.results_dir() / "vcache_memory"
MEASURED = A.results_dir() / "bench" / "vcache.json"

measured = pd.DataFrame(json.loads(MEASURED.read_text())["rows"]) if MEASURED.is_file() else None
fig = A.plot_vcache(PRESET, VARIANT, vocabs=(32768, 131072), measured=measured)
files = A.save(fig, OUT, "vcache_saved")

# %%
n, kv = A.cacheless_layers(PRESET, VARIANT)
T = [2**k for k in range(10, 18)]
pd.DataFrame({"context": T, **{f"saved MiB, |V|={V}": A.vcache_saving(PRESET, VARIANT, V, T) / 2**20
                                for V in (32768, 131072)},
              **{f"paper's formula MiB, |V|={V}": A.vcache_saving_bytes(n, kv, V, T) / 2**20 for V in (32768, 131072)}})
