"""Cached inference: decoding from the cache equals the full forward pass for every variant,
bank layers cache no values, cache bytes equal the spec's formula, generation and its CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bov.bench import bench_infer, cache_memory
from bov.cli import app
from bov.config import load_config
from bov.infer import KVCache, analytic_cache_bytes, generate, generate_text, load_checkpoint, sample
from bov.train import run_training
from conftest import VARIANTS, make

WINDOWS = {"full": {}, "window": {"model__window_pattern": "SL", "model__short_window": 8}}


def perturbed(variant, **over):
    """A model whose learned coefficients are off their init, so rebuilt values must apply them."""
    model, cfg = make(variant, **over)
    with torch.no_grad():
        for blk in model.blocks:
            mix = blk.attn.mix
            if mix is not None and isinstance(mix.b, torch.nn.Parameter):
                mix.b.add_(0.3)
    return model.eval(), cfg


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant, window):
    model, cfg = perturbed(variant, **WINDOWS[window])
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 40)
        # prefill, a multi-token chunk on top of a history, then one token at a time (past the window of 8)
        steps = [model(ids[:, :17], cache), model(ids[:, 17:22], cache)]
        steps += [model(ids[:, t : t + 1], cache) for t in range(22, 40)]
    assert cache.length == 40
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    # not vacuous: a cache holding other tokens gives other logits
    with torch.no_grad():
        other = KVCache.for_model(model, 2, 40)
        model(ids[:, :17].flip(1), other)
        assert (model(ids[:, 17:22], other) - full[:, 17:22]).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_bytes_equal_the_formula(variant):
    _, cfg = make(variant)
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KVCache(cfg.model, batch=3, max_len=100, dtype=dtype)
        want = analytic_cache_bytes(cfg.model, 100, batch=3, bytes_per=width)
        assert cache.nbytes() == want["total"]
        assert sum(v is None for v in cache.v) == want["layers_without_values"]


def test_bank_layers_allocate_no_value_tensor():
    expect = {  # micro: 4 layers; last_third = {2, 3}, every_other = {1, 3}
        "baseline": [False] * 4,
        "bov": [False, False, True, True],
        "v1_replace": [False, False, True, True],
        "svformer": [False, True, True, True],  # reuses layer 0's cached values
        "value_embed": [False] * 4,  # gated by x: contextual
        "bov_add": [False] * 4,  # keeps x W_V
        "resformer": [False] * 4,  # caches its mixed values
    }
    for variant, none in expect.items():
        _, cfg = make(variant)
        cache = KVCache(cfg.model, 1, 16)
        assert [v is None for v in cache.v] == none, variant
        assert all(cache.value_bytes()[l] == 0 for l, n in enumerate(none) if n)
    _, cfg = make("bov", model__depth_attention=True)  # depth-mixed bank values depend on context
    assert all(v is not None for v in KVCache(cfg.model, 1, 16).v)


def test_cache_limits_are_clear_errors():
    model, cfg = make("bov")
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_len 8"):
            model(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="batch 2"):
            model(torch.zeros(2, 1, dtype=torch.long), cache)
        big = KVCache.for_model(model, 1, cfg.model.seq_len + 1)
        with pytest.raises(ValueError, match="RoPE table"):
            model(torch.zeros(1, cfg.model.seq_len + 1, dtype=torch.long), big)


def test_greedy_generation_matches_uncached_argmax():
    model, cfg = perturbed("bov")
    prompt = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    new = generate(model, prompt, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole sequence every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 9:])


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model, cfg = perturbed("svformer")
    prompt = torch.randint(0, cfg.model.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))

    def draw(seed, **kw):
        return generate(model, prompt, 10, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(0, temperature=1.0), draw(0, temperature=1.0))
    assert not torch.equal(draw(0, temperature=1.0), draw(1, temperature=1.0))
    assert torch.equal(draw(5, temperature=0.7, top_k=1), generate(model, prompt, 10))
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    picks = {sample(logits, 2.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert picks == {1, 3}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_round_trips_through_a_checkpoint_dump(variant):
    from bov.config import validate

    cfg = load_config("tiny", variant)
    assert validate(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOV_RUNS_DIR", str(root / "runs"))
        mp.setenv("BOV_PROGRESS", "0")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config("micro", "bov", {"train.max_steps": 10, "train.val_every": 10})
        s = run_training(cfg, log=lambda m: None, run_dir=root / "run")
    assert s["status"] == "FINISHED"
    return root / "run" / "last.ckpt"


def test_checkpoint_loads_the_trained_model_and_generates(trained_checkpoint):
    loaded = load_checkpoint(trained_checkpoint)
    assert loaded.cfg.variant == "bov" and loaded.cfg.preset == "micro"
    state = torch.load(trained_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(loaded.model.banks[0].weight, state["model.banks.0.weight"])
    text = generate_text(loaded, "def ", 8)
    ids = [loaded.bos_id, *loaded.tokenizer.encode("def ").ids]
    want = generate(loaded.model, torch.tensor([ids]), 8, stop_id=loaded.bos_id)[0].tolist()
    assert text == loaded.tokenizer.decode(want)

    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(trained_checkpoint), "--prompt", "def ",
                                      "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.output == "def " + text + "\n"
    offloaded = CliRunner().invoke(app, ["generate", "--checkpoint", str(trained_checkpoint), "--prompt", "def ",
                                         "--max-new-tokens", "8", "--offload-banks"])
    assert offloaded.exit_code == 0 and offloaded.output == result.output
    sampled = CliRunner().invoke(app, ["generate", "-c", str(trained_checkpoint), "--prompt", "import", "-n", "6",
                                       "-t", "0.8", "--top-k", "20", "--seed", "3"])
    assert sampled.exit_code == 0 and sampled.output.startswith("import")
    # without -n: 64 new tokens, or what micro's 64-token context leaves after BOS and the prompt
    room = loaded.model.rope.max_len - len(ids)
    assert generate_text(loaded, "def ", None) == loaded.tokenizer.decode(
        generate(loaded.model, torch.tensor([ids]), room, stop_id=loaded.bos_id)[0].tolist())
    default = CliRunner().invoke(app, ["generate", "-c", str(trained_checkpoint), "--prompt", "def "])
    assert default.exit_code == 0, default.output


def test_generate_cli_bad_input_is_one_line(trained_checkpoint, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path / "nope.ckpt"), "--prompt", "x"])
    assert missing.exit_code == 2 and missing.output.strip() == f"error: --checkpoint: no file at {tmp_path / 'nope.ckpt'}"
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    bad = runner.invoke(app, ["generate", "--checkpoint", str(junk)])
    assert bad.exit_code == 2 and bad.output.startswith("error: --checkpoint:") and bad.output.count("\n") == 1
    old = tmp_path / "old.ckpt"  # a Lightning checkpoint without bov's config and tokenizer
    torch.save({"state_dict": torch.load(trained_checkpoint, weights_only=True)["state_dict"]}, old)
    stale = runner.invoke(app, ["generate", "--checkpoint", str(old)])
    assert stale.exit_code == 2 and "holds no bov config and tokenizer" in stale.output
    long = runner.invoke(app, ["generate", "-c", str(trained_checkpoint), "--prompt", "x", "-n", "200"])
    assert long.exit_code == 2 and "context of 64 tokens" in long.output and long.output.count("\n") == 1


def test_bank_saving_breaks_even_at_the_vocabulary_size():
    rows = cache_memory("micro", ["baseline", "bov", "svformer", "bov_add"], [256, 512, 1024])
    assert all(r["rel_error"] == 0 for r in rows)
    by = {(r["variant"], r["context"]): r for r in rows}
    kv = 2 * 16  # micro: H_kv * d_h
    for T in (256, 512, 1024):  # 2 bank layers x kv x 2 bytes x (T - |V|=512), per sequence
        assert by["bov", T]["saved_vs_baseline"] == 2 * kv * 2 * (T - 512)
        assert by["bov", T]["value_bytes_of_those_layers"] == 0
    assert by["bov", 256]["break_even_context"] == 512
    assert by["svformer", 256]["break_even_context"] == 0  # saves values and holds no table
    assert by["bov_add", 256]["break_even_context"] is None  # a table and every value cached: never


def test_bench_infer_writes_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = bench_infer("micro", "micro", ["baseline", "bov"], [128, 1024], [32], 4, [512], "cmd", log=lambda m: None)
    saved = json.loads((tmp_path / "results/bench/infer_cpu.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["context"] for r in saved["speed"]["rows"]] == [32, 32]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in saved["speed"]["rows"])
    points = json.loads((tmp_path / "results/bench/vcache.json").read_text())
    assert {tuple(sorted(p)) for p in points["rows"]} == {("break_even_context", "context", "saved_bytes", "vocab")}
    at = {p["context"]: p["saved_bytes"] for p in points["rows"]}
    assert at[128] < 0 < at[1024] and at[131072] == 2 * 32 * 2 * (131072 - 512)
    md = (tmp_path / "results/bench/infer_cpu.md").read_text()
    assert "| bov | 1,024 |" in md and "`cmd`" in md


@pytest.mark.parametrize("variant,over", [("bov", {}), ("bov", {"model__bank_sharing": "shared"}),
                                          ("value_embed", {}), ("baseline", {})])
def test_offloaded_banks_give_the_same_logits_and_copy_each_row_once(variant, over):
    model, cfg = perturbed(variant, **over)
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(2))  # 40 of 512 tokens occur
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 30, offload_banks=True)
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    if variant == "baseline":  # no table to offload
        assert cache.banks is None
        return
    distinct = len(torch.unique(ids))
    assert cache.banks.n_rows == distinct and cache.banks.rows_copied == distinct * len(model.banks)
    assert cache.banks.rows[0].size(0) == 60  # capacity min(|V|, B * T), not |V| = 512
