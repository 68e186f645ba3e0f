"""The measuring commands of `bov`: `eval`, `probe` (checkpoints on texts and tasks), `generate`, and the
benchmarks `bench-train`, `bench-gpu`, `bench-infer`; each parses its options and calls the library."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bov.cli_common import PRESET, SET, checkpoints_or_exit, device_or_exit, fail, load_or_exit, store
from bov.config import VARIANT_ORDER


def bench_train_cmd(
    preset: str = PRESET,
    variants: str = typer.Option(",".join(VARIANT_ORDER), help="comma-separated"),
    steps: int = typer.Option(30, min=1, help="optimizer steps per variant"),
    set_: Optional[List[str]] = SET,
    out: Optional[Path] = typer.Option(None, "--out", help="where train_<preset>_<cpu|gpu>.{json,md} go (default: "
                                       "results/bench; with --set, <runs>/bench, so the committed numbers stay)"),
) -> None:
    """Training tokens/s (and MFU on GPU) per variant; writes results/bench/train_<preset>_<cpu|gpu>.{json,md}."""
    from bov.bench import bench_train, output_dir

    names = [v.strip() for v in variants.split(",") if v.strip()]
    for v in names:
        load_or_exit(preset, v, set_)  # every variant valid before any compute
    where = out or output_dir(set_)
    bench_train(preset, names, steps, set_, log=typer.echo, out=where)
    typer.echo(f"written: {where}/train_{preset}_*.{{json,md}}")


def bench_gpu_cmd(
    cpu: bool = typer.Option(False, "--cpu", help="the same sections at toy widths on the CPU (a dry run)"),
    steps: int = typer.Option(12, "--steps", min=2, help="training steps per 135m/780m variant"),
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated sections (default: all): "
                                       "matmul, window_equality, attention_kernels, decode_equality, bf16_vs_fp32, "
                                       "cache_memory, decode_speed, train_135m, train_780m"),
    out: Path = typer.Option(Path("results/bench"), "--out", help="where gpu_<device>.{json,md} go"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1, help="micro-batches per training step "
                                             "(default 2 at 135m, 1 at 780m; the presets use 16 and 32)"),
) -> None:
    """The prepared GPU check (`make gpu-check`): matmul ceiling, attention kernels, decode equality, bf16,
    cache bytes, decode speed, 135m/780m training tokens/s and MFU; writes results/bench/gpu_<device>.{json,md}."""
    import torch

    from bov.gpucheck import SECTIONS, gpu_check

    chosen = [x.strip() for x in only.split(",") if x.strip()] if only else None
    if chosen and (bad := [x for x in chosen if x not in SECTIONS]):
        fail(f"--only: unknown section {bad[0]!r}; sections: {', '.join(SECTIONS)}")
    if not cpu and not torch.cuda.is_available():
        fail("no CUDA device here: run `make gpu-check` on a GPU machine, or `bov bench-gpu --cpu` for the dry run")
    result = gpu_check(cpu=cpu, out=out, steps=steps, only=chosen, grad_accum=grad_accum, log=typer.echo)
    failed = [k for k, v in result["sections"].items() if not v["ok"]]
    typer.echo(f"written: {', '.join(result['files'])}")
    if failed:
        fail(f"sections that failed: {', '.join(failed)} (see the report)", code=1)


def _ints(text: str, option: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        fail(f"{option} {text!r}: a comma-separated list of positive integers")
    return out


def bench_infer_cmd(
    preset: str = typer.Option("135m", "--preset", "-p", help="preset whose cache memory is measured"),
    speed_preset: str = typer.Option("tiny", "--speed-preset", help="preset timed for prefill/decode "
                                     "(random weights; its seq_len is raised to the longest context)"),
    variants: str = typer.Option(",".join(VARIANT_ORDER), help="comma-separated"),
    contexts: str = typer.Option("1024,4096,16384,65536", help="context lengths for cache memory"),
    speed_contexts: str = typer.Option("256,1024,4096", help="context lengths for prefill/decode speed"),
    new_tokens: int = typer.Option(64, "--new-tokens", help="decoded tokens per timing", min=1),
    vocabs: str = typer.Option("32768,131072", help="vocabulary sizes for the V-cache saving (Figure 5a)"),
) -> None:
    """Cache bytes (measured vs analytic), V-cache saving and prefill/decode tokens/s; writes results/bench/."""
    from bov.bench import bench_infer

    names = [v.strip() for v in variants.split(",") if v.strip()]
    for v in names:
        load_or_exit(preset, v, None)
        load_or_exit(speed_preset, v, None)
    ctx, sctx, voc = _ints(contexts, "--contexts"), _ints(speed_contexts, "--speed-contexts"), _ints(vocabs, "--vocabs")
    command = (f"bov bench-infer --preset {preset} --speed-preset {speed_preset} --contexts {contexts} "
               f"--speed-contexts {speed_contexts} --new-tokens {new_tokens} --vocabs {vocabs}")
    bench_infer(preset, speed_preset, names, ctx, sctx, new_tokens, voc, command, log=typer.echo)


def generate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="a .ckpt written by `bov train` or a sweep"),
    prompt: str = typer.Option("", "--prompt", help="text to continue (a BOS token is put first, as in training)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1,
                                                 help="default: 64, or fewer where the context has less room"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0: greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="sample among the k most likely tokens"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu or cuda"),
    offload_banks: bool = typer.Option(False, "--offload-banks", help="keep bank tables in host memory; copy only "
                                       "the rows of tokens that occur to the device"),
) -> None:
    """Continue a prompt from a trained checkpoint with cached decoding."""
    from bov.infer import generate_text, load_checkpoint

    device = device_or_exit(device)
    try:
        loaded = load_checkpoint(checkpoint, device=device)
        text = generate_text(loaded, prompt, max_new_tokens, temperature, top_k, seed, offload_banks)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(prompt + text)


def eval_cmd(
    checkpoint: Optional[List[Path]] = typer.Option(None, "--checkpoint", "-c", help="a .ckpt (repeatable)"),
    study: Optional[List[str]] = typer.Option(None, "--study", help="every finished run of a study (repeatable)"),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d", help="[NAME=]SOURCE: what data.source takes "
                                             "(files, globs, .xz/.gz, a hub id, stdlib); repeatable"),
    stride: Optional[int] = typer.Option(None, "--stride", min=1, help="window stride in tokens (default: the "
                                         "context, disjoint windows); each scored token sees >= context - stride"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=2, help="score only the first N tokens"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated (`core`: DCLM's CORE)"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="a directory of lm-eval task YAMLs"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="default: each task's own"),
    limit: Optional[float] = typer.Option(None, "--limit", min=0, help="examples per task (or a fraction < 1)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    no_log: bool = typer.Option(False, "--no-log", help="do not write eval/* and task/* to the runs"),
) -> None:
    """Bits per byte of checkpoints on any text (sliding windows), and lm-eval downstream tasks."""
    import json

    from bov.config import DataError
    from bov.evaluate import evaluate, format_rows
    from bov.paths import tracking_uri
    from bov.scoring import parse_texts

    if not data and not tasks:
        fail("give --data [NAME=]SOURCE (a text to score) or --tasks NAME[,NAME]")
    if include_path is not None and not include_path.is_dir():
        fail(f"--include-path: no directory at {include_path}")
    uri = store() if study or not no_log else tracking_uri()
    found = checkpoints_or_exit(checkpoint, study, uri)
    device = device_or_exit(device)
    try:
        texts = parse_texts(data or [])
        rows = evaluate(found, texts, stride, max_tokens, batch_size, device,
                        [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
                        str(include_path) if include_path else None, num_fewshot, limit,
                        None if no_log else uri, log=lambda m: typer.echo(m, err=True))
    except (DataError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if shown := (json.dumps(rows, indent=2) if as_json else "\n".join(format_rows(rows))):
        typer.echo(shown)


def probe_cmd(
    checkpoint: Optional[List[Path]] = typer.Option(None, "--checkpoint", "-c", help="a .ckpt (repeatable)"),
    study: Optional[List[str]] = typer.Option(None, "--study", help="every finished run of a study (repeatable)"),
    data: str = typer.Option(..., "--data", "-d", help="[NAME=]SOURCE: the text to probe on"),
    max_tokens: int = typer.Option(65536, "--max-tokens", min=2, help="tokens read from the text"),
    windows: int = typer.Option(64, "--windows", min=1, help="context windows probed, at most"),
    out: Optional[Path] = typer.Option(None, "--out", help="write probe JSONs and figures here (default: "
                                       "<runs>/probe/<text>)"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu or cuda"),
    no_log: bool = typer.Option(False, "--no-log", help="do not attach probe.json to the runs"),
) -> None:
    """Per-layer mechanisms: attention entropy and first-token mass, representation and value similarity,
    value norms, learned coefficients, bank-row drift; one figure per probe, a line per variant."""
    from bov.config import DataError
    from bov.paths import runs_dir, tracking_uri
    from bov.probe import probe_report
    from bov.scoring import parse_texts

    uri = store() if study or not no_log else tracking_uri()
    try:
        ((name, source),) = parse_texts([data])
    except DataError as e:
        fail(str(e))
    found = checkpoints_or_exit(checkpoint, study, uri)
    device = device_or_exit(device)
    out = out or runs_dir() / "probe" / name
    try:
        files = probe_report(found, source, name, out, max_tokens, windows, device=device,
                             uri=None if no_log else uri, log=lambda m: typer.echo(m, err=True))
    except (DataError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(f"written: {out}/ (probes.json, {len(files) // 2} figures)")


def register(app: typer.Typer) -> None:
    """Add these commands to the `bov` app."""
    app.command("bench-train")(bench_train_cmd)
    app.command("bench-gpu")(bench_gpu_cmd)
    app.command("bench-infer")(bench_infer_cmd)
    app.command()(generate)
    app.command("eval")(eval_cmd)
    app.command("probe")(probe_cmd)
