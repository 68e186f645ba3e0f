"""`bov eval`: exact bits per byte of trained checkpoints on any text (bov.scoring), and lm-eval tasks
(bov.lmeval), for single checkpoints or every run of a study. Results go to each checkpoint's MLflow run as
`eval/<text>/bpb`, `eval/<text>/loss`, `eval/<text>/tokens`, and `task/<task>/<metric>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bov.scoring import Text, load_text, score

# ----------------------------------------------------------------------------- checkpoints and runs


def run_id_of(checkpoint: Path) -> str | None:
    """The MLflow run that wrote a checkpoint: `run.json` beside it (bov.tracking writes it)."""
    state = Path(checkpoint).parent / "run.json"
    try:
        return json.loads(state.read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def study_checkpoints(study: str, uri: str) -> list[tuple[Path, str]]:
    """(last.ckpt, run id) of every finished run of a study that still has its checkpoint."""
    from bov.analysis import load_study
    from bov.paths import runs_dir

    runs = load_study(study, uri).runs
    wanted = set(runs["run_id"]) if not runs.empty else set()
    found = []
    for state in sorted(runs_dir().rglob("run.json")):
        rid = run_id_of(state)
        if rid in wanted and (state.parent / "last.ckpt").is_file():
            found.append((state.parent / "last.ckpt", rid))
    return found


def find_checkpoints(checkpoint: list[Path] | None, study: list[str] | None, uri: str) -> list[tuple[Path, str | None]]:
    """`--checkpoint` files (with the run beside each) and every finished run of each `--study` that kept one;
    what is not there is a ValueError naming the option."""
    found = []
    for path in checkpoint or []:
        if not path.is_file():
            raise ValueError(f"--checkpoint: no file at {path}")
        found.append((path, run_id_of(path)))
    for name in study or []:
        try:
            got = study_checkpoints(name, uri)
        except ValueError as e:
            raise ValueError(f"--study {name}: {e}") from None
        if not got:
            raise ValueError(f"--study {name}: no finished run of it has a checkpoint under the runs dir")
        found += got
    if not found:
        raise ValueError("give --checkpoint PATH or --study NAME")
    return found


def format_rows(rows: list[dict]) -> list[str]:
    """`bov eval`'s table: a line per (checkpoint, text) with bits per byte, loss and the unigram reference, then
    a line per (checkpoint, task metric)."""
    lines = []
    texts = [r for r in rows if "text" in r]
    if texts:
        lines.append(f"{'variant':<18} {'seed':>4} {'text':<16} {'tokens':>10} {'bits/byte':>9} {'loss':>7} {'unigram':>8}")
        lines += [f"{r['variant']:<18} {r['seed']:>4} {r['text']:<16} {r['tokens']:>10,} {r['bpb']:>9.4f} "
                  f"{r['loss']:>7.4f} {r['unigram_bpb']:>8.4f}" for r in texts]
        lines.append(f"(windows of {texts[0]['context']} tokens, stride {texts[0]['stride']}; unigram: fitted on the "
                     "text itself)")
    lines += [f"{r['variant']:<18} {r['seed']:>4} task {r['task']:<28} {r['metric']:<18} {r['value']:.4f}"
              for r in rows if "task" in r]
    return lines


def log_to_run(uri: str, run_id: str, text: str, result: dict[str, float], context: int, stride: int) -> None:
    """`eval/<text>/{bpb,loss,tokens}` on the checkpoint's run (which may have ended: metrics can be added)."""
    import mlflow

    from bov import tracking as T

    client = mlflow.MlflowClient(uri)
    for metric in ("bpb", "loss", "tokens"):
        client.log_metric(run_id, T.eval_metric(text, metric), float(result[metric]))
    client.set_tag(run_id, f"eval.{text}.windows", f"context {context}, stride {stride}")


def task_metrics(results: dict) -> dict[str, float]:
    """lm-eval's results -> `task/<task>/<metric>` (filters other than `none` kept in the name), plus CORE's
    centered accuracies as `task/<name>/centered` and `task/core/centered` where CORE tasks ran."""
    from bov import tracking as T
    from bov.lmeval import core_score

    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            metric = name if filt == "none" else f"{name}_{re.sub(r'[^A-Za-z0-9_.-]', '_', filt)}"
            out[T.task_metric(re.sub(r"[^A-Za-z0-9_.\- ]", "_", task), metric)] = float(value)
    for name, value in core_score(results.get("results", {})).items():
        out[T.task_metric(name, "centered")] = value
    return out


def evaluate(checkpoints: list[tuple[Path, str | None]], texts: list[tuple[str, str]], stride: int | None = None,
             max_tokens: int | None = None, batch_size: int = 8, device: str = "cpu", tasks: list[str] | None = None,
             include_path: str | None = None, num_fewshot: int | None = None, limit: float | None = None,
             uri: str | None = None, log=print) -> list[dict]:
    """Score each checkpoint on each text (and on lm-eval tasks); log to the checkpoint's run when it has
    one and `uri` is given. One row per (checkpoint, text) and one per (checkpoint, task metric)."""
    import hashlib

    from bov.data import token_byte_lengths
    from bov.infer import load_checkpoint

    manager = None
    if tasks:  # names checked before any model is loaded
        from bov.lmeval import run_tasks, task_manager

        manager = task_manager(tasks, include_path)
    rows: list[dict] = []
    by_tokenizer: dict[str, dict[str, Text]] = {}
    for path, run_id in checkpoints:
        loaded = load_checkpoint(path, device=device)
        context = loaded.model.rope.max_len
        step = stride or context
        if not 1 <= step <= context:
            raise ValueError(f"--stride {step}: must be between 1 and the model's context ({context})")
        key = hashlib.sha256(loaded.tokenizer.to_str().encode()).hexdigest()
        texts_here = by_tokenizer.setdefault(key, {})
        who = {"checkpoint": str(path), "run_id": run_id, "variant": loaded.cfg.variant, "seed": loaded.cfg.train.seed}
        for name, source in texts:
            if name not in texts_here:
                texts_here[name] = load_text(source, name, loaded.tokenizer, loaded.bos_id,
                                             token_byte_lengths(loaded.tokenizer), max_tokens)
            text = texts_here[name]
            result = score(loaded.model, text.ids, text.token_bytes, context, step, batch_size, device)
            rows.append({**who, "text": name, **{k: result[k] for k in ("bpb", "loss", "tokens", "bytes")},
                         "unigram_bpb": text.unigram_bpb(), "context": context, "stride": step})
            log(f"{path}: {name} {result['bpb']:.4f} bits/byte over {result['tokens']:,} tokens")
            if uri and run_id:
                log_to_run(uri, run_id, name, result, context, step)
        if tasks:
            out = run_tasks(loaded, tasks, manager, num_fewshot, limit, batch_size)
            metrics = task_metrics(out)
            rows += [{**who, "task": k.split("/")[1], "metric": k.split("/", 2)[2], "value": v} for k, v in metrics.items()]
            if uri and run_id:
                import mlflow

                client = mlflow.MlflowClient(uri)
                for k, v in metrics.items():
                    client.log_metric(run_id, k, v)
    return rows
