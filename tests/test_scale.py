"""The scale path on CPU: window kernels equal the dense-mask reference, the loss inside the model, ring caches
for window layers, compile that holds over many runs, data tokenized once, offline hub mode, MFU peaks, DDP
accumulation without per-micro-batch all-reduce, and the GPU check's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bov.model as M
from bov.config import load_config
from bov.data import DataError, prepare
from bov.sources import check_source, load_documents
from bov.infer import KVCache, analytic_cache_bytes, cache_lengths, decode_error
from bov.litmodule import device_peak_flops
from bov.train import run_training
from conftest import VARIANTS, make

WINDOWED = {"model__window_pattern": "SL", "model__short_window": 8}


def _forward_backward(model, ids, kernel):
    saved = M.WINDOW_KERNEL
    M.WINDOW_KERNEL = kernel
    try:
        model.zero_grad()
        model(ids, targets=ids.roll(-1, 1)).mean().backward()
        with torch.no_grad():
            logits = model(ids)
        return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        M.WINDOW_KERNEL = saved


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_kernels_equal_the_dense_mask_path(variant):
    model, cfg = make(variant, **WINDOWED)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 43), generator=torch.Generator().manual_seed(3))  # not a multiple of 8
    ref_logits, ref_grads = _forward_backward(model, ids, "mask")
    logits, grads = _forward_backward(model, ids, "blocks")
    assert (logits - ref_logits).abs().max().item() < 1e-5
    assert grads.keys() == ref_grads.keys()
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) < 1e-5
    M.WINDOW_KERNEL = "flex"  # FlexAttention runs forward only on CPU (no backward there): logits
    try:
        with torch.no_grad():
            assert (model(ids) - ref_logits).abs().max().item() < 1e-5
    finally:
        M.WINDOW_KERNEL = "auto"
    # not vacuous: without the window the logits differ
    full, _ = make(variant)
    with torch.no_grad():
        assert (full(ids) - ref_logits).abs().max().item() > 1e-3


def test_blocked_window_attention_is_exact_at_every_length_and_window():
    g = torch.Generator().manual_seed(0)
    for T, W in ((1, 4), (5, 4), (8, 4), (9, 4), (33, 7), (64, 16)):
        q, k, v = (torch.randn(2, 3, T, 8, generator=g) for _ in range(3))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < W))
        assert (M.blocked_window_attention(q, k, v, W) - ref).abs().max().item() < 1e-6, (T, W)


def test_loss_inside_the_model_equals_cross_entropy_of_its_logits():
    model, cfg = make("bov", model__logit_softcap=15.0, **WINDOWED)
    ids = torch.randint(0, cfg.model.vocab_size, (3, 40))
    targets = torch.randint(0, cfg.model.vocab_size, (3, 40))
    with torch.no_grad():
        nats = model(ids, targets=targets)
        logits = model(ids)
    assert nats.shape == targets.shape
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    assert (nats - ref).abs().max().item() < 1e-5
    assert logits.abs().max().item() <= 15.0  # the soft-cap is applied before the loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_layers_keep_a_ring_of_their_window(variant):
    _, cfg = make(variant, model__window_pattern="SSSL", model__short_window=8)
    klen, vlen = cache_lengths(cfg.model, 40)
    assert klen == [8, 8, 8, 40]  # the last layer is always full
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KVCache(cfg.model, batch=2, max_len=40, dtype=dtype)
        assert [k.size(1) for k in cache.k] == klen
        assert [0 if v is None else v.size(1) for v in cache.v] == vlen
        assert cache.nbytes() == analytic_cache_bytes(cfg.model, 40, batch=2, bytes_per=width)["total"]
    if variant == "svformer":  # layer 3 (full) rebuilds its values from V_0: layer 0 keeps all of them
        assert vlen == [40, 0, 0, 0]
    model, _ = make(variant, model__window_pattern="SSSL", model__short_window=8, model__seq_len=40)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    assert decode_error(model.eval(), ids, prefill=19, chunk=11) < 1e-5  # a chunk longer than the window


def test_cache_formula_counts_windows():
    cfg = load_config("135m", "baseline").model  # 9 window layers of 512, 3 full
    per_position = cfg.n_kv_heads * cfg.head_dim * 2
    a = analytic_cache_bytes(cfg, 65536)
    assert a["keys"] == a["values"] == (9 * 512 + 3 * 65536) * per_position
    short = analytic_cache_bytes(cfg, 256)  # shorter than the window: every layer keeps everything
    assert short["keys"] == 12 * 256 * per_position


@pytest.mark.slow  # compiles several models: about 10 s; the default suite stays under 10 minutes on 2 cores
def test_compile_holds_over_many_runs_in_one_process(runs, monkeypatch):
    """Each run gets a compiled model: without a fresh dynamo cache per run, these four runs would hit the
    recompile limit (set low here) and fall back to eager, which this makes an error."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    for variant in ("baseline", "bov", "resformer", "svformer"):
        cfg = load_config("micro", variant, {"train.max_steps": 2, "train.compile": True, "train.val_every": 3,
                                             "tracking.system_metrics": False})
        s = run_training(cfg, log=lambda m: None, bench=True)
        assert s["status"] == "FINISHED" and s["steps"] == 2


def test_two_budgets_tokenize_once(runs):
    said = []
    a = prepare(load_config("micro", "baseline", {"train.max_steps": 5}), stream_tokens=1000, log=said.append)
    b = prepare(load_config("micro", "bov", {"train.max_steps": 50}), stream_tokens=9000, log=said.append)
    assert sum("tokenizing" in m for m in said) == 2  # train and val, once
    assert a.fingerprint == b.fingerprint and a.train.path == b.train.path


@pytest.mark.slow  # datasets' own offline lookup takes about 20 s on 2 cores; the default suite stays under 10 minutes on 2 cores
def test_offline_hub_mode_asks_no_server(monkeypatch, tmp_path, runs):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE=1")

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", no_network)
    cfg = load_config("micro", "baseline", {"data.source": "no-such-org/no-such-dataset-bov"})
    t = time.time()
    check_source(cfg.data)  # offline: the datasets cache decides, when the data is read
    with pytest.raises(DataError) as e:
        load_documents(cfg.data.source, cfg.data)
    assert time.time() - t < 60
    msg = str(e.value)
    assert "\n" not in msg and "no-such-org/no-such-dataset-bov" in msg and "local files" in msg
    # local files work offline, and their datasets cache stays under the runs dir
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i} " * 30}) + "\n" for i in range(200)))
    d = prepare(load_config("micro", "baseline", {"data.source": str(tmp_path / "d.jsonl")}), log=lambda m: None)
    assert d.train.n_tokens > 0
    assert (runs / "cache" / "datasets").is_dir() and not (tmp_path / "hf_home" / "datasets").exists()


def test_unreachable_hub_names_the_local_alternative(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*a, **k):
        raise ConnectionError("no route")

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", unreachable)
    with pytest.raises(DataError, match=r"not reachable \(ConnectionError\); give local files .* HF_HUB_OFFLINE=1"):
        check_source(load_config("micro", "baseline", {"data.source": "org/name"}).data)


def test_mfu_peaks_by_device_name():
    assert device_peak_flops("NVIDIA H200") == device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_flops("NVIDIA L40S") == 362e12 and device_peak_flops("NVIDIA L4") == 121e12
    assert device_peak_flops("Some Future Accelerator") is None
    if not torch.cuda.is_available():
        assert device_peak_flops() is None  # a CPU: no MFU, and the bench says so


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import lightning.pytorch as pl
    from bov.config import load_config
    from bov.train import run_training

    class CountAllReduces(pl.Callback):
        """Per micro-batch: how many gradient all-reduces its backward launched (a DDP comm hook counts)."""
        def on_train_start(self, trainer, module):
            self.calls, self.seen = 0, []
            def hook(state, bucket):
                self.calls += 1
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
                return allreduce_hook(None, bucket)
            if hasattr(trainer.strategy.model, "register_comm_hook"):  # DDP only
                trainer.strategy.model.register_comm_hook(None, hook)
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seen.append(self.calls)
            self.calls = 0
        def on_train_end(self, trainer, module):
            out = os.environ["OUT"] + f".rank{trainer.global_rank}"
            json.dump({"per_micro_batch": self.seen,
                       "param_sum": float(sum(p.double().sum() for p in module.model.parameters()))}, open(out, "w"))

    if __name__ == "__main__":
        over = dict(a.split("=", 1) for a in sys.argv[1:])
        cfg = load_config("micro", "bov", {"train.max_steps": 3, "train.val_every": 3, "tracking.system_metrics": False,
                                           "train.optimizer": "adamw",  # accumulation, not the optimizer, is tested
                                           **{k: int(v) if v.isdigit() else v for k, v in over.items()}})
        run_training(cfg, log=lambda m: None, callbacks=[CountAllReduces()])
''')


def test_ddp_accumulation_all_reduces_once_per_step_and_equals_one_large_batch(tmp_path):
    script = tmp_path / "ddp_count.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, BOV_RUNS_DIR=str(tmp_path / "runs"), BOV_PROGRESS="0", OUT=str(tmp_path / "ddp"),
               PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, str(script), "train.devices=2", "train.strategy=ddp", "train.grad_accum=2",
            "train.batch_size=2"]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp.rank{i}").read_text()) for i in (0, 1)]
    for rank in ranks:
        calls = rank["per_micro_batch"]
        assert len(calls) == 6 and calls[0::2] == [0, 0, 0] and all(c > 0 for c in calls[1::2])
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    # the same global batches (2 ranks x 2 samples per micro-batch) in one process: the same model
    env["OUT"] = str(tmp_path / "one")
    r = subprocess.run([sys.executable, str(script), "train.grad_accum=2", "train.batch_size=4"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "one.rank0").read_text())
    assert one["param_sum"] == pytest.approx(ranks[0]["param_sum"], rel=1e-5)


@pytest.mark.slow  # every section of the GPU check, on CPU: about 11 s; the default suite stays under 10 minutes on 2 cores
def test_gpu_check_dry_run_runs_every_section(tmp_path):
    env = dict(os.environ, BOV_RUNS_DIR=str(tmp_path / "runs"), BOV_PROGRESS="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "bov.cli", "bench-gpu", "--cpu", "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_cpu_dry_run.json").read_text())
    from bov.gpucheck import SECTIONS

    assert list(result["sections"]) == list(SECTIONS) and all(s["ok"] for s in result["sections"].values())
    s = result["sections"]
    assert s["window_equality"]["max_abs_logits"] < 1e-5 and s["window_equality"]["max_abs_grad"] < 1e-5
    assert all(row["max_abs"] < 1e-5 for row in s["decode_equality"]["rows"])
    assert all(row["rel_error"] == 0 for row in s["cache_memory"]["rows"])
    assert [row["variant"] for row in s["train_780m"]["rows"]] == ["baseline", "bov"]
    md = (tmp_path / "out" / "gpu_cpu_dry_run.md").read_text()
    assert "A CPU dry run at toy widths" in md and "## train_135m" in md
    bad = subprocess.run([sys.executable, "-m", "bov.cli", "bench-gpu", "--only", "nope"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "'nope'" in bad.stderr
    assert np.isfinite(s["matmul"]["tflops"])
