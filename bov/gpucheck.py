"""`bov bench-gpu` (`make gpu-check`): one prepared check of the paper's scale on one GPU.

Designed to finish in about 8 minutes on one H100/H200 with no network and no hub data
(training reads random tokens: throughput does not depend on the text). In order, each
section saved as soon as it is measured, so a run cut short still reports what it did:

1. the device and its bf16 matmul ceiling (8192^3, median of 10);
2. windowed attention on the device: FlexAttention's logits and gradients against the dense-mask
   reference, and the attention kernels one 135m training step launches, per kind;
3. cached decoding equals the full forward pass, every variant, with sliding windows (fp32);
4. bf16 logits against fp32 on a 135m-shaped model;
5. cache bytes from the CUDA allocator against the analytic formula (135m, 4k and 64k context);
6. decode tokens/s of 135m (baseline, BoV, BoV with offloaded tables);
7. training tokens/s, MFU and peak memory of 135m and 780m, baseline and BoV: compiled, bf16, the
   preset's micro-batch, a short accumulation (tokens/s per micro-batch does not depend on it).

`--cpu` runs the same sections at toy widths on the CPU (the test suite does), so the only untested
thing is the GPU itself. Results: results/bench/gpu_<device>.{json,md}.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bov.bench import RESULTS, bench_train, cache_memory, decode_speed, device_name
from bov.config import VARIANT_ORDER, load_config

# The scales of a real check, and the toy stand-ins of `--cpu` (SSSL windows kept so every path runs).
TOY = ["model.n_layers=4", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=2", "model.head_dim=32",
       "model.vocab_size=512", "model.seq_len=128", "model.short_window=32", "train.batch_size=2",
       "train.compile=false", "train.precision=32-true"]


def synthetic_data(vocab: int, n_tokens: int = 2_000_000, seed: int = 0):
    """PreparedData of random tokens (no corpus, no tokenizer training): for throughput only."""
    from tokenizers import Tokenizer, models

    from bov.data import PreparedData, TokenStream
    from bov.paths import cache_dir

    root = cache_dir("synthetic") / f"v{vocab}-n{n_tokens}-s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    streams = {}
    for name, n in (("train", n_tokens), ("val", 65_536)):
        path = root / f"{name}.bin"
        if not path.is_file() or path.stat().st_size != 2 * n:
            rng.integers(0, vocab, n, dtype=np.uint16).tofile(path)
        streams[name] = TokenStream(path, n, n, 1, "uint16")
    tok = root / "tokenizer.json"
    tok.write_text(Tokenizer(models.BPE()).to_str())
    return PreparedData(streams["train"], streams["val"], np.ones(vocab, dtype=np.int64), tok, f"synthetic-{vocab}", 0,
                        {"fingerprint": f"synthetic-{vocab}"})


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device, n: int) -> dict:
    """bf16 (CPU: fp32) n^3 matmul, median of 10 after 3 warm-ups, on random data."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_s": med, "tflops": 2 * n**3 / med / 1e12}


def window_equality(device, overrides: list[str], T: int) -> dict:
    """FlexAttention vs the dense-mask reference on the device: logits and gradients (fp32, sliding windows)."""
    import bov.model as M
    from bov.model import build_model

    cfg = load_config("135m", "bov", overrides).model
    torch.manual_seed(0)
    model = build_model(cfg, device)
    ids = torch.randint(0, cfg.vocab_size, (2, T), device=device)
    out = {}
    kernels = ("flex", "mask") if torch.device(device).type == "cuda" else ("blocks", "mask")
    saved = M.WINDOW_KERNEL
    try:
        for kernel in kernels:
            M.WINDOW_KERNEL = kernel
            model.zero_grad()
            loss = model(ids, targets=ids.roll(-1, 1)).mean()
            loss.backward()
            out[kernel] = (model(ids).detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None])
    finally:
        M.WINDOW_KERNEL = saved
    (la, ga), (lb, gb) = out[kernels[0]], out["mask"]
    return {"kernel": kernels[0], "T": T, "windows": sorted(model.windows), "max_abs_logits": (la - lb).abs().max().item(),
            "max_abs_grad": max((x - y).abs().max().item() for x, y in zip(ga, gb)),
            "grad_scale": max(y.abs().max().item() for y in gb)}


def attention_kernels(device, overrides: list[str], batch: int) -> dict:
    """The attention kernels one training step (forward + backward, bf16 autocast) launches, by name."""
    from torch.profiler import ProfilerActivity, profile

    from bov.model import build_model, layer_windows, window_kernel

    cfg = load_config("135m", "baseline", overrides).model
    model = build_model(cfg, device)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    cuda = torch.device(device).type == "cuda"

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            model(ids, targets=ids).mean().backward()

    step()  # compile the FlexAttention kernels outside the profile
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    pattern = re.compile(r"flash|flex|fmha|efficient_attention|attention|triton_tem|scaled_dot", re.I)
    names: dict[str, int] = {}
    for ev in prof.key_averages():
        on_device = cuda and getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA
        if (on_device or not cuda) and pattern.search(ev.key):
            names[ev.key[:120]] = names.get(ev.key[:120], 0) + ev.count
    plan = [{"layer": l, "window": w, "path": ("flex/blocks window " + str(w)) if w and w < cfg.seq_len
             else "sdpa causal"} for l, w in enumerate(layer_windows(cfg))]
    return {"window_kernel": window_kernel(torch.device(device)), "layers": plan,
            "kernels": dict(sorted(names.items(), key=lambda kv: -kv[1])[:15])}


def decode_equality(device, overrides: list[str]) -> list[dict]:
    """Every variant, SSSL windows: prefill, a chunk, then single tokens from the cache vs one forward (fp32)."""
    from bov.infer import decode_error
    from bov.model import build_model

    rows = []
    for variant in VARIANT_ORDER:
        cfg = load_config("micro", variant, overrides).model
        torch.manual_seed(0)
        model = build_model(cfg, device).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), device=device)
        rows.append({"variant": variant, "max_abs": decode_error(model, ids, cfg.seq_len // 2, 7)})
    return rows


def bf16_vs_fp32(device, overrides: list[str], batch: int) -> dict:
    """One forward of a 135m-shaped model in fp32 and under bf16 autocast: relative logits error, loss gap."""
    from bov.model import build_model

    cfg = load_config("135m", "baseline", overrides).model
    torch.manual_seed(0)
    model = build_model(cfg, device).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    with torch.no_grad():
        ref = model(ids).double()
        loss32 = torch.nn.functional.cross_entropy(ref.flatten(0, 1), ids.roll(-1, 1).flatten()).item()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            low = model(ids).double()
        loss16 = torch.nn.functional.cross_entropy(low.flatten(0, 1), ids.roll(-1, 1).flatten()).item()
    return {"rel_err": ((low - ref).norm() / ref.norm()).item(), "loss_fp32": loss32, "loss_bf16": loss16}


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", result["device"]).strip("_").lower() + result.get("suffix", "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(render(result) + "\n")
    result["files"] = [str(out / f"{name}.json"), str(out / f"{name}.md")]


SECTIONS = ("matmul", "window_equality", "attention_kernels", "decode_equality", "bf16_vs_fp32", "cache_memory",
            "decode_speed", "train_135m", "train_780m")


def gpu_check(cpu: bool = False, out: Path = RESULTS, steps: int = 12, only: list[str] | None = None,
              grad_accum: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every section (or `only` those); returns the result dict (also written after each section)."""
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run on a GPU machine, or pass --cpu for the toy dry run")
    device = "cpu" if cpu else "cuda"
    toy = TOY if cpu else []
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the equality checks
    result: dict = {"device": device_name() if not cpu else "cpu-dry-run", "torch": torch.__version__, "cpu_dry_run": cpu,
                    "command": "make gpu-check" + (" (bov bench-gpu --cpu)" if cpu else "")
                    + (f" (bov bench-gpu --only {','.join(only)})" if only else ""), "sections": {},
                    "suffix": ("_" + "_".join(only) if only else "") + (f"_accum{grad_accum}" if grad_accum else "")}
    if not cpu:
        p = torch.cuda.get_device_properties(0)
        result["device_info"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                                 "multiprocessors": p.multi_processor_count}
    sec = result["sections"]

    def section(name: str, fn):
        if only and name not in only:
            return
        t = time.perf_counter()
        try:
            sec[name] = {"ok": True, **({"rows": v} if isinstance(v := fn(), list) else v)}
        except Exception as e:  # a check that breaks is a result too; the rest still runs
            sec[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"}
        sec[name]["seconds"] = round(time.perf_counter() - t, 1)
        log(f"[{sec[name]['seconds']:>6.1f}s] {name}: " + ("ok" if sec[name]["ok"] else sec[name]["error"]))
        _write(result, out)

    section("matmul", lambda: matmul_ceiling(device, 256 if cpu else 8192))
    section("window_equality", lambda: window_equality(device, toy or ["model.n_layers=4", "model.seq_len=1024",
                                                                           "model.short_window=256"], 128 if cpu else 1024))
    section("attention_kernels", lambda: attention_kernels(device, toy, 2 if cpu else 4))
    dec = ["model.window_pattern=SSSL", "model.short_window=8", "model.seq_len=48"]
    section("decode_equality", lambda: decode_equality(device, dec))
    section("bf16_vs_fp32", lambda: bf16_vs_fp32(device, toy, 2 if cpu else 4))
    section("cache_memory", lambda: cache_memory("135m", ["baseline", "bov", "svformer"], [256, 1024] if cpu else [4096, 65536],
                                                 torch.bfloat16, device, toy))
    section("decode_speed", lambda: decode_speed("135m", ["baseline", "bov"], [64 if cpu else 1024], 16 if cpu else 64,
                                                 torch.float32 if cpu else torch.bfloat16, device, 2, False, toy)
            + decode_speed("135m", ["bov"], [64 if cpu else 1024], 16 if cpu else 64,
                           torch.float32 if cpu else torch.bfloat16, device, 2, True, toy))
    for preset, accum in (("135m", 2), ("780m", 1)):  # short accumulations keep the check inside 8 minutes
        over = [*toy, f"train.grad_accum={grad_accum or accum}", "tracking.system_metrics=false"]
        vocab = load_config(preset, "baseline", over).model.vocab_size
        section(f"train_{preset}", lambda: bench_train(preset, ["baseline", "bov"], 3 if cpu else steps, over,
                                                       log=lambda m: None, data=synthetic_data(vocab),
                                                       tag=f"gpucheck_{device}", command=result["command"], out=out))
    return result


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def render(r: dict) -> str:
    """The Markdown report."""
    s = r["sections"]
    lines = [f"# GPU check: {r['device']}", "", f"torch {r['torch']}. Command: `{r['command']}`."
             + (" A CPU dry run at toy widths: no number here says anything about a GPU." if r["cpu_dry_run"] else ""), ""]
    if "device_info" in r:
        lines += [f"Device: {r['device_info']}", ""]
    for name, body in s.items():
        lines.append(f"## {name} ({body.get('seconds', '?')} s)")
        lines.append("")
        if not body["ok"]:
            lines += [f"FAILED: {body['error']}", ""]
            continue
        if name.startswith("train_"):
            lines += [f"{body['tokens_per_step']:,} tokens/step ({body['batch_size']} x {body['grad_accum']} x "
                      f"{body['seq_len']}), {body['precision']}, compile {body['compile']}, {body['optimizer']}, "
                      f"{body['steps']} steps (the first, with compilation, not timed); random tokens.", "",
                      "| variant | tokens/s | MFU | FLOPs/token | params | peak GiB |", "|---|---|---|---|---|---|"]
            lines += [f"| {x['variant']} | {x['tokens_per_s']:,} | {'-' if not x['mfu'] else format(x['mfu'], '.1%')} | "
                      f"{x['flops_per_token']:.3e} | {x['params']:,} | "
                      f"{'-' if x['peak_memory_bytes'] is None else format(x['peak_memory_bytes'] / 2**30, '.1f')} |"
                      for x in body["rows"]]
        elif "rows" in body and body["rows"]:
            keys = [k for k in body["rows"][0] if k not in ("run_id",)]
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(x.get(k)) for k in keys) + " |" for x in body["rows"]]
        else:
            lines += [f"- {k}: {_fmt(v)}" for k, v in body.items() if k not in ("ok", "seconds")]
        lines.append("")
    return "\n".join(lines)
