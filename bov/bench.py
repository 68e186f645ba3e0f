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


def bench_train(preset: str, variants: list[str], steps: int, overrides: list[str] | None = None, log=print) -> dict:
    rows = []
    for variant in variants:
        cfg = load_config(preset, variant, [f"train.max_steps={steps}", "train.max_tokens=null", "train.max_flops=null",
                                            f"train.val_every={steps}", "train.val_tokens=4096",
                                            "tracking.experiment=bench", *(overrides or [])])
        s = run_training(cfg, log=lambda m: None)
        mfu = (s["tokens_per_s"] * s["flops_per_token"] / cfg.train.peak_flops) if cfg.train.peak_flops else None
        rows.append({"variant": variant, "tokens_per_s": round(s["tokens_per_s"]), "flops_per_token": s["flops_per_token"],
                     "params": s["params"], "mfu": mfu, "run_id": s["run_id"]})
        log(f"{variant:<18} {s['tokens_per_s']:>10,.0f} tokens/s  {s['flops_per_token']:.3e} FLOPs/token"
            + (f"  MFU {mfu:.1%}" if mfu else ""))
    cfg = load_config(preset)
    result = {"preset": preset, "device": device_name(), "torch": torch.__version__, "steps": steps,
              "precision": cfg.train.precision, "compile": cfg.train.compile,
              "tokens_per_step": cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len,
              "command": f"make bench PRESET={preset} STEPS={steps}", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    (RESULTS / f"train_{preset}_{tag}.json").write_text(json.dumps(result, indent=2))
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "baseline"), None)
    lines = [f"# Training throughput: {preset} on {result['device']}", "",
             f"torch {result['torch']}, {steps} steps, {result['tokens_per_step']:,} tokens/step, "
             f"precision {cfg.train.precision}, compile {cfg.train.compile}. Command: `{result['command']}`.", "",
             "| variant | tokens/s | vs baseline | FLOPs/token | params | MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,} | {rel} | {r['flops_per_token']:.3e} | {r['params']:,} | {mfu} |")
    (RESULTS / f"train_{preset}_{tag}.md").write_text("\n".join(lines) + "\n")
    return result
