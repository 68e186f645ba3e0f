"""The training benchmark runs the real training path and writes its JSON and Markdown tables."""

from __future__ import annotations

import json
from pathlib import Path

from bov.bench import bench_train


def test_bench_train_writes_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOV_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("BOV_PROGRESS", "0")
    result = bench_train("micro", ["baseline", "bov"], steps=4, log=lambda m: None)
    saved = json.loads((tmp_path / "results/bench/train_micro_cpu.json").read_text())
    assert saved == result and [r["variant"] for r in saved["rows"]] == ["baseline", "bov"]
    assert all(r["tokens_per_s"] > 0 for r in saved["rows"])
    assert saved["rows"][1]["flops_per_token"] < saved["rows"][0]["flops_per_token"]  # BoV drops W_V matmuls
    md = (tmp_path / "results/bench/train_micro_cpu.md").read_text()
    assert "| bov |" in md and "make bench-train PRESET=micro STEPS=4" in md
    assert all(r["peak_memory_bytes"] > 2**20 for r in saved["rows"])  # Linux VmHWM on CPU


def test_bench_train_with_set_leaves_the_committed_numbers_alone(tmp_path, monkeypatch):
    from bov.bench import RESULTS, output_dir

    monkeypatch.setenv("BOV_RUNS_DIR", str(tmp_path / "runs"))
    assert output_dir(None) == RESULTS == Path("results/bench")  # the preset as it is: the committed table
    assert output_dir(["model.n_layers=2"]) == tmp_path / "runs" / "bench"  # a changed one: never over it
