"""The data regime: unique tokens, repetition at fixed compute, and what every run records about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

from bov.config import ConfigError, load_config
from bov.data import DataError, TokenStream, TrainWindows
from bov.budget import Budget, data_regime

SPLIT = {"matrix": 600, "embedding": 200, "unembedding": 100, "bank": 100, "scalar": 0}


def regime(limit, available=5000, tokens=1000, seq_len=64):
    cfg = load_config("micro", "baseline", {"data.max_unique_tokens": limit, "model.seq_len": seq_len})
    return data_regime(cfg, Budget(steps=10, tokens_per_step=tokens // 10, flops_per_token=1), available, SPLIT)


def test_unique_tokens_as_a_count_or_a_fraction_of_the_tokens_trained():
    r = regime(None)
    assert (r.unique, r.epochs, r.repeated) == (5000, 0.2, False)
    r = regime("0.25x")
    assert (r.unique, r.epochs, r.repeated) == (250, 4.0, True)
    r = regime(2000)
    assert (r.unique, r.epochs) == (2000, 0.5)
    rec = r.record()
    assert rec["tokens_per_param"] == 1000 / 1000 and rec["tokens_per_param_non_embedding"] == 1000 / 700
    assert rec["params_non_embedding"] == 700 and rec["train_tokens_available"] == 5000


@pytest.mark.parametrize("limit,message", [
    (6000, "data.max_unique_tokens=6000 asks for 6,000 tokens; the training stream of stdlib has 5,000"),
    ("0.05x", "data.max_unique_tokens=0.05x gives 50 tokens, fewer than one window of model.seq_len + 1 = 65"),
])
def test_impossible_unique_budgets_fail_in_one_line(limit, message):
    with pytest.raises(DataError) as e:
        regime(limit)
    assert str(e.value) == message


@pytest.mark.parametrize("value", ["half", "-1x", "0x", 1])
def test_bad_unique_values_name_the_key(value):
    with pytest.raises(ConfigError, match=r"^data.max_unique_tokens: "):
        load_config("micro", "baseline", {"data.max_unique_tokens": value})


def test_unique_windows_are_a_fixed_sample_cycled_once_per_epoch(tmp_path):
    import numpy as np

    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    stream = TokenStream(path, 1000, 1000, 1, "uint16")

    def firsts(seed, n=30):
        ds = TrainWindows(stream, seq_len=10, seed=seed, start=0, rank=0, world=1, batch=3, unique_tokens=101)
        assert ds.n_windows == 10
        it = iter(ds)
        return [int(row[0]) for _ in range(n // 3) for row in next(it)[0]]  # three epochs over the 10 kept windows

    a, b = firsts(0), firsts(1)
    kept = sorted(set(a))
    assert len(kept) == 10 and all(f % 10 == 0 for f in kept)
    assert max(kept) > 100  # spread over the stream, not its first 101 tokens
    for e in range(3):
        assert sorted(a[10 * e : 10 * e + 10]) == kept  # each kept window once per epoch
    assert sorted(set(b)) == kept and a != b  # another seed: the same windows, in another order
    full = TrainWindows(stream, seq_len=10, seed=0, start=0, rank=0, world=1, batch=3)
    assert full.pool is None and full.n_windows == 99  # no limit: every window, as before


def test_repeating_run_says_so_and_records_its_regime(tmp_path):
    env = dict(os.environ, BOV_RUNS_DIR=str(tmp_path / "runs"), BOV_PROGRESS="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "bov.cli", "train", "--preset", "micro", "--variant", "bov",
                          "--set", "data.max_unique_tokens=0.25x", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    note = "note: this run repeats its data: 5,120 tokens over 1,280 unique (4.00 epochs); tagged data_repeated=true"
    assert note in out.stderr  # said before training: the MLflow line comes after it
    assert out.stderr.index(note) < out.stderr.index("mlflow run ")
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert (s["unique_tokens"], s["tokens"], s["epochs"], s["data_repeated"]) == (1280, 5120, 4.0, True)
    split = s["params_split"]
    assert s["params_non_embedding"] == s["params"] - split["embedding"] - split["bank"]
    assert s["tokens_per_param_non_embedding"] == pytest.approx(5120 / s["params_non_embedding"])
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(s["run_id"])
    assert run.data.tags["data_repeated"] == "true"
    assert run.data.metrics["setup/regime.unique_tokens"] == 1280 and run.data.metrics["setup/regime.epochs"] == 4  # derived: metrics
    assert run.data.params["data.max_unique_tokens"] == "0.25x"
