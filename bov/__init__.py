"""bov: systematic ablations of how attention layers compute their value vectors.

Pipeline: bov.config -> bov.data -> bov.model -> bov.train -> bov.sweep -> bov.analysis -> bov.evaluate.
"""

__version__ = "0.1.0"

# The floors of the package, lowest first. A module imports only modules of its own floor or below, never
# one above, and no two modules of a floor import each other in a circle; imports inside functions count
# too (tests/test_layers.py checks every one). A new module takes its place here.
LAYERS = (
    ("paths",),  # the runs dir, locks, store errors
    ("config", "stats", "scaling"),  # typed configs; the statistics and fits of a comparison (pure)
    ("corpora",),  # a corpus name -> its local copy, or its public equivalent from the Hub
    ("plan", "sources"),  # config axes -> per-layer plan; corpora -> documents
    ("model", "optim"),
    ("budget", "data"),
    ("infer", "scoring"),  # the cache, checkpoints; exact bits per byte of a model on a text
    ("mlflow_store",),  # the MLflow store, checked before it is opened
    ("tracking", "console"),  # the MLflow run schema; what training prints
    ("storage", "litmodule", "train"),  # Optuna storages; a training step; one training run
    ("study", "preflight"),  # sweeps/<study>.yaml -> cells; what a run or study is refused for, before compute
    ("trials",),  # Optuna trials <-> cells, the summary
    ("sweep",),  # a study -> runs
    ("figures",),
    ("analysis",),  # MLflow runs -> tables and figures
    ("reproduce",),  # a committed study, run again and compared
    ("crossed", "notebooks"),
    ("lmeval",),
    ("evaluate", "probe"),  # checkpoints of runs and studies -> eval/, task/, probe metrics
    ("bench", "gpucheck"),
    ("cli_common",),  # what every command shares: options, the one-line failure
    ("cli_measure",),  # eval, probe, generate, bench-*
    ("lm_eval_hook", "cli"),
)
