"""Training throughput per variant through the real training path; results under results/bench/.

Each variant trains `steps` steps with the preset's recipe (MLflow experiment
`bench`); tokens/s is measured over optimizer steps after the first (which
includes warm-up and compilation), validation excluded. MFU is reported where the
device's bf16 peak is known (`train.peak_flops`).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from bov.config import load_config
from bov.litmodule import device_peak_flops as _peak
from bov.train import run_training

RESULTS = Path("results/bench")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def reset_peak_memory() -> None:
    """Start a new peak: the CUDA allocator's, or on Linux the process's resident-set high-water mark."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_memory() -> tuple[int | None, str]:
    """(bytes, what was measured) since reset_peak_memory()."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "peak CUDA memory allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, ("peak resident set of the bench process (VmHWM, reset before each "
                                                     "variant; it includes what earlier variants left allocated, so "
                                                     "it bounds each variant's peak from above)")
    except OSError:
        pass
    return None, "not measured"


def bench_cfg(preset: str, variant: str, steps: int, overrides: list[str] | None = None):
    """A benchmark run: `steps` optimizer steps, no validation, no checkpoint, the `bench` experiment."""
    return load_config(preset, variant, [f"train.max_steps={steps}", "train.max_tokens=null", "train.max_flops=null",
                                         f"train.val_every={steps + 1}", "train.val_tokens=4096",
                                         "tracking.experiment=bench", *(overrides or [])])


def effective_settings(cfg) -> dict:
    """What a run trained with, after --set overrides (not the preset's values)."""
    from bov.train import precision

    t = cfg.train
    return {"precision": precision(cfg), "compile": t.compile, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
            "seq_len": cfg.model.seq_len, "tokens_per_step": t.batch_size * t.grad_accum * cfg.model.seq_len,
            "optimizer": t.optimizer}


def output_dir(overrides: list[str] | None) -> Path:
    """Where `bov bench-train` writes: results/bench for a preset as it is, the runs dir's bench/ when --set
    changed it (a changed architecture is not the preset's number, and the committed one stays)."""
    from bov.paths import runs_dir

    return runs_dir() / "bench" if overrides else RESULTS


def bench_train(preset: str, variants: list[str], steps: int, overrides: list[str] | None = None, log=print,
                data=None, tag: str | None = None, command: str | None = None, out: Path = RESULTS) -> dict:
    """Train each variant `steps` steps through the real training path; rows of tokens/s, MFU, peak memory.

    `data` (a PreparedData) replaces the preset's corpus, e.g. random tokens for a GPU check."""
    rows = []
    for variant in variants:
        cfg = bench_cfg(preset, variant, steps, overrides)
        reset_peak_memory()
        s = run_training(cfg, log=lambda m: None, data=data, bench=True)
        peak, _ = peak_memory()
        mfu = s.get("mfu")
        rows.append({"variant": variant, "tokens_per_s": round(s["tokens_per_s"]), "flops_per_token": s["flops_per_token"],
                     "params": s["params"], "mfu": mfu, "peak_memory_bytes": peak, "train_loss": s["train_loss"],
                     "run_id": s["run_id"]})
        log(f"{variant:<18} {s['tokens_per_s']:>10,.0f} tokens/s  {s['flops_per_token']:.3e} FLOPs/token"
            + (f"  MFU {mfu:.1%}" if mfu else "") + (f"  peak {peak / 2**20:,.0f} MiB" if peak else ""))
    cfg = bench_cfg(preset, variants[0], steps, overrides)
    sets = "".join(f" --set {o}" for o in overrides or [])
    result = {"preset": preset, "device": device_name(), "torch": torch.__version__, "steps": steps,
              **effective_settings(cfg), "overrides": list(overrides or []),
              "mfu_peak_flops": cfg.train.peak_flops or _peak(),
              "peak_memory": peak_memory()[1],
              "command": command or f"make bench-train PRESET={preset} STEPS={steps}" + (f" (bov bench-train{sets})" if sets else ""),
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    tag = tag or ("gpu" if torch.cuda.is_available() else "cpu")
    (out / f"train_{preset}_{tag}.json").write_text(json.dumps(result, indent=2))
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "baseline"), None)
    lines = [f"# Training throughput: {preset} on {result['device']}", "",
             f"torch {result['torch']}, {steps} steps, {result['tokens_per_step']:,} tokens/step "
             f"({result['batch_size']} x {result['grad_accum']} x {result['seq_len']}), precision {result['precision']}, "
             f"compile {result['compile']}, optimizer {result['optimizer']}. Command: `{result['command']}`. "
             f"Tokens/s over the steps after the first (compilation excluded), validation excluded. "
             + (f"MFU against a bf16 peak of {result['mfu_peak_flops'] / 1e12:,.0f} TFLOP/s. " if result["mfu_peak_flops"]
                else "No MFU: the device's bf16 peak is unknown (set train.peak_flops). ")
             + f"Peak memory: {result['peak_memory']}, per variant.", "",
             "| variant | tokens/s | vs baseline | FLOPs/token | params | MFU | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,} | {rel} | {r['flops_per_token']:.3e} | {r['params']:,} | {mfu} "
                     f"| {_mib(r['peak_memory_bytes'])} |")
    (out / f"train_{preset}_{tag}.md").write_text("\n".join(lines) + "\n")
    return result


# ----------------------------------------------------------------------------- cached inference

def _measure_alloc(make, device, storage_bytes=lambda obj: obj.nbytes()) -> tuple[object, int]:
    """Build something and return it with the bytes it allocated: the CUDA allocator's count on a GPU,
    `storage_bytes(obj)` (its tensors' storages) on CPU, which has no allocator statistics."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        obj = make()
        torch.cuda.synchronize()
        return obj, torch.cuda.memory_allocated() - before
    obj = make()
    return obj, storage_bytes(obj)


def _table_bytes(cfg, dtype, device) -> int:
    """Bytes of the model's bank tables, allocated (V-cache savings are net of them)."""
    from bov.model import GPT

    with torch.device("meta"):
        shapes = GPT(cfg).banks.to(dtype)
    _, n = _measure_alloc(lambda: shapes.to_empty(device=device), device,
                          lambda banks: sum(p.untyped_storage().nbytes() for p in banks.parameters()))
    return n  # the tables are freed on return


def cache_memory(preset: str, variants: list[str], contexts: list[int], dtype=torch.bfloat16, device="cpu",
                 overrides: list[str] | None = None) -> list[dict]:
    """Cache bytes per sequence (batch 1) per variant and context, measured next to the analytic value."""
    from bov.infer import KVCache, analytic_cache_bytes

    width = torch.tensor([], dtype=dtype).element_size()
    rows, base = [], {}
    for variant in variants:
        cfg = load_config(preset, variant, overrides or []).model
        tables = _table_bytes(cfg, dtype, device)
        for T in contexts:
            cache, measured = _measure_alloc(lambda: KVCache(cfg, 1, T, dtype, device), device)
            analytic = analytic_cache_bytes(cfg, T, 1, width)
            banked = [b for b, p in zip(cache.value_bytes(), cache.plan) if p.value_cache != "values"]
            if variant == "baseline":
                base[T] = measured
            rows.append({"variant": variant, "context": T, "measured_bytes": measured, "analytic_bytes": analytic["total"],
                         "rel_error": measured / analytic["total"] - 1, "value_bytes": sum(cache.value_bytes()),
                         "layers_without_values": analytic["layers_without_values"],
                         "value_bytes_of_those_layers": sum(banked), "table_bytes": tables,
                         "saved_vs_baseline": base[T] - measured - tables if T in base else None})
            del cache
    for variant in variants:  # where the saving is linear in T: saved(T) = s * (T - T*)
        mine = [r for r in rows if r["variant"] == variant and r["saved_vs_baseline"] is not None]
        t_star = None
        if len(mine) >= 2:
            (t1, s1), (t2, s2) = [(r["context"], r["saved_vs_baseline"]) for r in (mine[0], mine[-1])]
            slope = (s2 - s1) / (t2 - t1)
            if slope > 0:
                t_star = max(0, round(t1 - s1 / slope))  # 0: saves at every context
            else:  # flat or shrinking: it saves at every context (0) or never pays off (None)
                t_star = 0 if s1 > 0 else None
        for r in mine:
            r["break_even_context"] = t_star
    return rows


def vcache_points(preset: str, variant: str, vocabs: list[int], contexts: list[int], dtype=torch.bfloat16,
                  device="cpu") -> list[dict]:
    """Measured V-cache saving (baseline cache - variant cache - tables) per vocabulary and context (Fig. 5a)."""
    rows = []
    for V in vocabs:
        both = cache_memory(preset, ["baseline", variant], contexts, dtype, device, [f"model.vocab_size={V}"])
        rows += [{"vocab": V, "context": r["context"], "saved_bytes": r["saved_vs_baseline"],
                  "break_even_context": r["break_even_context"]} for r in both if r["variant"] == variant]
    return rows


def _timed(fn, device) -> float:
    import time

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def decode_speed(preset: str, variants: list[str], contexts: list[int], new_tokens: int, dtype=torch.float32,
                 device="cpu", repeats: int = 3, offload_banks: bool = False, overrides: list[str] | None = None) -> list[dict]:
    """Prefill tokens/s (one prompt of T tokens) and decode tokens/s (the next `new_tokens`, one at a time,
    from the cache), batch 1, random weights; best of `repeats`. `offload_banks`: tables in host memory."""
    from bov.infer import KVCache
    from bov.model import build_model

    rows = []
    for variant in variants:
        cfg = load_config(preset, variant, [*(overrides or []), f"model.seq_len={max(contexts) + new_tokens}"]).model
        torch.manual_seed(0)
        model = build_model(cfg, device).to(dtype).eval()
        if offload_banks:
            model.banks.to("cpu")
        for T in contexts:
            ids = torch.randint(0, cfg.vocab_size, (1, T + new_tokens), device=device)
            best_p = best_d = float("inf")
            for _ in range(repeats):
                cache = KVCache.for_model(model, 1, T + new_tokens, offload_banks and len(model.banks) > 0)
                best_p = min(best_p, _timed(lambda: model(ids[:, :T], cache), device))
                best_d = min(best_d, _timed(lambda: [model(ids[:, t : t + 1], cache) for t in range(T, T + new_tokens)],
                                            device))
            rows.append({"variant": variant, "context": T, "offload_banks": offload_banks, "prefill_tokens_per_s": T / best_p,
                         "decode_tokens_per_s": new_tokens / best_d, "cache_bytes": cache.nbytes()})
    return rows


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def bench_infer(memory_preset: str, speed_preset: str, variants: list[str], contexts: list[int],
                speed_contexts: list[int], new_tokens: int, vocabs: list[int], command: str, log=print) -> dict:
    """Cache memory (measured vs analytic), the V-cache saving of banks, and prefill/decode speed.

    Writes results/bench/infer_<cpu|gpu>.{json,md} and results/bench/vcache.json (read by
    analysis/vcache_memory.py for Figure 5a).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speed_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    memory = cache_memory(memory_preset, variants, contexts, torch.bfloat16, device)
    worst = max(abs(r["rel_error"]) for r in memory)
    log(f"cache memory ({memory_preset}, bf16, batch 1): {len(memory)} rows, largest |measured/analytic - 1| = {worst:.2e}")
    points = vcache_points(memory_preset, "bov", vocabs, sorted(set(contexts) | {131072}), torch.bfloat16, device)
    speed = decode_speed(speed_preset, variants, speed_contexts, new_tokens, speed_dtype, device)
    for r in speed:
        log(f"{r['variant']:<18} T={r['context']:>6}  prefill {r['prefill_tokens_per_s']:>10,.0f} tokens/s  "
            f"decode {r['decode_tokens_per_s']:>8,.1f} tokens/s")
    meta = {"device": device_name(), "torch": torch.__version__, "command": command}
    result = {**meta, "memory": {"preset": memory_preset, "dtype": "bfloat16", "batch": 1,
                                 "method": "torch.cuda.memory_allocated delta" if device == "cuda"
                                 else "bytes of the cache tensors' storages", "rows": memory},
              "speed": {"preset": speed_preset, "dtype": str(speed_dtype).removeprefix("torch."), "batch": 1,
                        "new_tokens": new_tokens, "weights": "random init", "rows": speed}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device == "cuda" else "cpu"
    (RESULTS / f"infer_{tag}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "vcache.json").write_text(json.dumps({**meta, "preset": memory_preset, "variant": "bov",
                                                      "dtype": "bfloat16", "rows": points}, indent=2))
    lines = [f"# Cached inference on {meta['device']}", "",
             f"torch {meta['torch']}. Command: `{command}`.", "",
             f"## Cache memory per sequence: {memory_preset}, bf16, batch 1 ({result['memory']['method']})", "",
             "Analytic: keys for every layer, values for every layer that caches them, token ids "
             "(`bov.infer.analytic_cache_bytes`, spec section 2). Saved = baseline cache - this cache - "
             "bank tables; break-even T where that crosses zero.", "",
             "| variant | context | measured MiB | analytic MiB | measured/analytic - 1 | layers w/o V cache "
             "| their V bytes | tables MiB | saved MiB | break-even T |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in memory:
        be = r["break_even_context"]
        lines.append(f"| {r['variant']} | {r['context']:,} | {_mib(r['measured_bytes'])} | {_mib(r['analytic_bytes'])} | "
                     f"{r['rel_error']:.1e} | {r['layers_without_values']} | {r['value_bytes_of_those_layers']} | "
                     f"{_mib(r['table_bytes'])} | {_mib(r['saved_vs_baseline'])} | "
                     f"{'-' if r['variant'] == 'baseline' else ('never' if be is None else 'always' if be == 0 else f'{be:,}')} |")
    lines += ["", f"## V cache saved by BoV ({memory_preset}; `results/bench/vcache.json`, Figure 5a)", "",
              "| vocab | context | saved MiB |", "|---|---|---|"]
    lines += [f"| {p['vocab']:,} | {p['context']:,} | {_mib(p['saved_bytes'])} |" for p in points]
    lines += ["", f"## Prefill and decode speed: {speed_preset}, {result['speed']['dtype']}, batch 1, random weights", "",
              f"Prefill: one forward over T prompt tokens into an empty cache. Decode: the next {new_tokens} tokens, "
              "one forward each, from the cache. Best of 3.", "",
              "| variant | context | prefill tokens/s | decode tokens/s | cache MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['context']:,} | {r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.1f} | "
              f"{_mib(r['cache_bytes'])} |" for r in speed]
    (RESULTS / f"infer_{tag}.md").write_text("\n".join(lines) + "\n")
    return result
