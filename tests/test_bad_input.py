"""Bad input, table-driven: each case exits 2 with one line that names the key or file, before any compute,
and leaves nothing behind (no MLflow or Optuna store, no tokenizer, token stream or dataset cache entry)."""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bov.cli import app

BOV = [str(Path(sys.executable).with_name("bov"))]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    f = {}

    def put(name: str, data: bytes) -> None:
        f[name] = d / name
        f[name].write_bytes(data)

    put("binary.jsonl", b"\x00\x01\x02\xff\xfe binary")
    put("bad_line.jsonl", b'{"text": "ok"}\n{not json\n')
    put("array_line.jsonl", b'{"text": "ok"}\n[1, 2]\n')
    put("null_text.jsonl", b'{"text": null}\n{"text": "a"}\n')
    put("number_text.jsonl", b'{"text": 5}\n')
    put("no_text.jsonl", b'{"body": "x"}\n')
    put("empty.jsonl", b"")
    put("one_doc.jsonl", b'{"text": "a single document leaves the validation split empty"}\n')
    put("blank_text.jsonl", b'{"text": ""}\n{"text": ""}\n')
    put("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    varied = " ".join(str(i * 7919 % 100003) for i in range(20000))
    put("truncated.txt.xz", lzma.compress(varied.encode())[:-100])  # cut before the end-of-stream footer
    put("truncated.jsonl.xz", lzma.compress("".join(json.dumps({"text": w}) + "\n" for w in varied.split()).encode())[:-100])
    put("tokenizer.json", b"{ this is not a tokenizer")
    put("junk.ckpt", b"not a checkpoint")
    put("not_yaml.yaml", b"study: [unclosed\n")
    put("list.yaml", b"- a\n- b\n")
    good = {"study": "s", "base": {"preset": "micro", "variant": "baseline"}, "axis": "variant",
            "levels": {"baseline": {"variant": "baseline"}, "bov": {"variant": "bov"}},
            "baseline_level": "baseline", "seeds": [0], "budget": {"steps": 2, "match": "flops"}}
    for name, change in {
        "sweep_unknown_key.yaml": {"colour": "red"},
        "sweep_bad_override.yaml": {"levels": {"a": {"model.nope": 1}}, "baseline_level": "a"},
        "sweep_bad_baseline.yaml": {"baseline_level": "missing"},
        "sweep_no_seeds.yaml": {"seeds": []},
        "sweep_bad_sampler.yaml": {"sampler": "annealing"},
        "sweep_bad_metric.yaml": {"metric": "val/accuracy"},
        "sweep_bad_value.yaml": {"levels": {"a": {"model.n_layers": 0}}, "baseline_level": "a"},
        "sweep_missing_data.yaml": {"overrides": {"data.source": str(d / "nothing-*.jsonl")}},
        "sweep_bad_budget.yaml": {"budget": {"steps": 0, "match": "flops"}},
    }.items():
        put(name, json.dumps({**good, **change}).encode())  # JSON is YAML
    torch.save({"epoch": 0}, d / "no_weights.ckpt")
    f["no_weights.ckpt"] = d / "no_weights.ckpt"
    torch.save({"state_dict": {}, "bov": {"config": {}, "tokenizer": "{ broken"}}, d / "bad_tokenizer.ckpt")
    f["bad_tokenizer.ckpt"] = d / "bad_tokenizer.ckpt"
    f["dir"] = d
    return f


def T(*args: str) -> list[str]:
    """`bov train` on micro with overrides."""
    return ["train", "-p", "micro", *[x for a in args for x in ("-s", a)]]


# (case id, argv given the files, extra environment, what the one line must name)
CASES = [
    # --- configuration: presets, variants, overrides, typed values
    ("unknown preset", lambda f: ["train", "-p", "nosuch"], {}, "unknown scale 'nosuch'"),
    ("unknown variant", lambda f: ["train", "-p", "micro", "-v", "nosuch"], {}, "unknown variant 'nosuch'"),
    ("missing preset file", lambda f: ["train", "-p", str(f["dir"] / "nope.yaml")], {}, "scale file not found"),
    ("preset is not a mapping", lambda f: ["train", "-p", str(f["list.yaml"])], {}, "expected a mapping"),
    ("preset is not YAML", lambda f: ["train", "-p", str(f["not_yaml.yaml"])], {}, "invalid YAML"),
    ("override without =", lambda f: ["train", "-p", "micro", "-s", "model.n_layers"], {}, "must look like section.key=value"),
    ("override unclosed list", lambda f: T("model.bank_layers=[1,"), {}, "override model.bank_layers=[1,"),
    ("unknown key", lambda f: T("model.nope=1"), {}, "unknown key model.nope"),
    ("unknown section", lambda f: T("nope.x=1"), {}, "unknown key nope"),
    ("key under a value", lambda f: T("train.seed.x=1"), {}, "train.seed"),
    ("n_layers not an int", lambda f: T("model.n_layers=abc"), {}, "model.n_layers"),
    ("n_layers zero", lambda f: T("model.n_layers=0"), {}, "model.n_layers"),
    ("d_model negative", lambda f: T("model.d_model=-4"), {}, "model.d_model"),
    ("heads not a multiple of kv heads", lambda f: T("model.n_heads=3"), {}, "model.n_heads"),
    ("odd head_dim", lambda f: T("model.head_dim=15"), {}, "model.head_dim"),
    ("bank_layers unknown rule", lambda f: T("model.bank_layers=middle"), {}, "unknown level 'middle'"),
    ("bank_layers strings", lambda f: T("model.bank_layers=[a,b]"), {}, "integers"),
    ("bank_layers out of range", lambda f: T("model.bank_layers=[9]"), {}, "bank_layers"),
    ("value_source", lambda f: T("model.value_source=x9"), {}, "model.value_source"),
    ("value_mode", lambda f: T("model.value_mode=both"), {}, "model.value_mode"),
    ("value_coeff", lambda f: T("model.value_coeff=sometimes"), {}, "model.value_coeff"),
    ("value_residual", lambda f: T("model.value_residual=maybe"), {}, "model.value_residual"),
    ("bank_init", lambda f: T("model.bank_init=ones"), {}, "model.bank_init"),
    ("bank_sharing", lambda f: T("model.bank_sharing=global"), {}, "model.bank_sharing"),
    ("window_pattern", lambda f: T("model.window_pattern=SX"), {}, "model.window_pattern"),
    ("mlp", lambda f: T("model.mlp=gelu"), {}, "model.mlp"),
    ("residual_init", lambda f: T("model.residual_init=ones"), {}, "model.residual_init"),
    ("logit_softcap", lambda f: T("model.logit_softcap=-1"), {}, "model.logit_softcap"),
    ("optimizer", lambda f: T("train.optimizer=sgd"), {}, "train.optimizer"),
    ("negative lr", lambda f: T("train.lr_matrix=-1"), {}, "train.lr_matrix"),
    ("batch size zero", lambda f: T("train.batch_size=0"), {}, "train.batch_size"),
    ("two budgets", lambda f: T("train.max_tokens=1000"), {}, "exactly one of train.max_steps"),
    ("no budget", lambda f: T("train.max_steps=null"), {}, "exactly one of train.max_steps"),
    ("schedule", lambda f: T("train.schedule=linear"), {}, "train.schedule"),
    ("negative seed", lambda f: T("train.seed=-1"), {}, "train.seed"),
    ("precision", lambda f: T("train.precision=fp8"), {}, "train.precision"),
    ("decay_start above 1", lambda f: T("train.decay_start=2"), {}, "train.decay_start"),
    ("betas not a pair", lambda f: T("train.betas=[0.9]"), {}, "train.betas"),
    ("strategy", lambda f: T("train.strategy=bogus"), {}, "train.strategy 'bogus'"),
    ("num_nodes zero", lambda f: T("train.num_nodes=0"), {}, "train.num_nodes"),
    ("max_unique_tokens", lambda f: T("data.max_unique_tokens=lots"), {}, "data.max_unique_tokens"),
    ("doc_split", lambda f: T("data.doc_split=sentence"), {}, "data.doc_split"),
    ("vocab below a byte-level BPE", lambda f: T("model.vocab_size=100"), {}, "model.vocab_size 100"),
    ("compile without a C++ compiler", lambda f: T("train.compile=true"), {"CXX": "/nonexistent/c++"}, "train.compile"),
    # --- data sources: every kind of unreadable file, named with its line or record
    ("missing data file", lambda f: T(f"data.source={f['dir'] / 'none.jsonl'}"), {}, "data.source: no file matches"),
    ("missing val file", lambda f: T(f"data.val_source={f['dir'] / 'none.jsonl'}"), {}, "data.val_source: no file matches"),
    ("binary file", lambda f: T(f"data.source={f['binary.jsonl']}"), {}, "binary.jsonl is not readable as JSON lines (line 1"),
    ("invalid JSON line", lambda f: T(f"data.source={f['bad_line.jsonl']}"), {}, "bad_line.jsonl is not readable as JSON lines (line 2"),
    ("JSON line not an object", lambda f: T(f"data.source={f['array_line.jsonl']}"), {}, "array_line.jsonl is not readable as JSON lines (line 2"),
    ("null text", lambda f: T(f"data.source={f['null_text.jsonl']}"), {}, "record 1 has no 'text' (null)"),
    ("number text", lambda f: T(f"data.source={f['number_text.jsonl']}"), {}, "field 'text' holds int64"),
    ("no text field", lambda f: T(f"data.source={f['no_text.jsonl']}"), {}, "data.text_field"),
    ("other text field missing", lambda f: T(f"data.source={f['null_text.jsonl']}", "data.text_field=body"), {}, "no column 'body'"),
    ("empty file", lambda f: T(f"data.source={f['empty.jsonl']}"), {}, "empty.jsonl' holds no records"),
    ("no document falls in validation", lambda f: T(f"data.source={f['one_doc.jsonl']}"), {},
     "data.val_fraction: no document of"),
    ("only empty text", lambda f: T(f"data.source={f['blank_text.jsonl']}"), {}, "train split is empty text"),
    ("only empty validation text", lambda f: T(f"data.val_source={f['blank_text.jsonl']}"), {},
     "data.val_source: every document of the val split is empty text"),
    ("not UTF-8", lambda f: T(f"data.source={f['latin1.txt']}"), {}, "latin1.txt is not readable as UTF-8 text"),
    ("truncated .txt.xz", lambda f: T(f"data.source={f['truncated.txt.xz']}"), {}, "truncated.txt.xz is truncated"),
    ("truncated .jsonl.xz", lambda f: T(f"data.source={f['truncated.jsonl.xz']}"), {}, "truncated.jsonl.xz is truncated"),
    ("bad val file", lambda f: T(f"data.val_source={f['bad_line.jsonl']}"), {}, "data.val_source: "),
    ("missing tokenizer", lambda f: T(f"data.tokenizer={f['dir'] / 'none.json'}"), {}, "data.tokenizer: file not found"),
    ("corrupt tokenizer", lambda f: T(f"data.tokenizer={f['tokenizer.json']}"), {}, "data.tokenizer: "),
    ("prepare: missing file", lambda f: ["prepare", "-p", "micro", "-s", f"data.source={f['dir'] / 'no.txt'}"], {}, "no file matches"),
    ("prepare: bad file", lambda f: ["prepare", "-p", "micro", "-s", f"data.source={f['bad_line.jsonl']}"], {}, "line 2"),
    # --- tracking
    ("unreachable MLflow server", lambda f: ["train", "-p", "micro"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
     "is not reachable"),
    # --- describe
    ("describe: unknown variant", lambda f: ["describe", "-p", "micro", "-v", "nosuch"], {}, "unknown variant"),
    ("describe: bad override", lambda f: ["describe", "-p", "micro", "-s", "model.n_layers=x"], {}, "model.n_layers"),
    ("describe: unknown preset", lambda f: ["describe", "-p", "huge"], {}, "unknown scale 'huge'"),
    # --- generate
    ("generate: missing checkpoint", lambda f: ["generate", "-c", str(f["dir"] / "no.ckpt")], {}, "--checkpoint: no file at"),
    ("generate: not a checkpoint", lambda f: ["generate", "-c", str(f["junk.ckpt"])], {}, "not a readable checkpoint"),
    ("generate: no weights", lambda f: ["generate", "-c", str(f["no_weights.ckpt"])], {}, "holds no model weights"),
    ("generate: broken tokenizer", lambda f: ["generate", "-c", str(f["bad_tokenizer.ckpt"])], {}, "--checkpoint: "),
    ("generate: unknown device", lambda f: ["generate", "-c", str(f["junk.ckpt"]), "--device", "tpu"], {}, "--device 'tpu'"),
    ("generate: no CUDA", lambda f: ["generate", "-c", str(f["junk.ckpt"]), "--device", "cuda"], {}, "no CUDA device"),
    # --- sweep
    ("sweep: unknown study", lambda f: ["sweep", "nosuch"], {}, "nosuch"),
    ("sweep: missing file", lambda f: ["sweep", str(f["dir"] / "nope.yaml")], {}, "nope.yaml"),
    ("sweep: not YAML", lambda f: ["sweep", str(f["not_yaml.yaml"])], {}, "not_yaml.yaml"),
    ("sweep: not a mapping", lambda f: ["sweep", str(f["list.yaml"])], {}, "list.yaml"),
    ("sweep: unknown key", lambda f: ["sweep", str(f["sweep_unknown_key.yaml"])], {}, "colour"),
    ("sweep: bad level override", lambda f: ["sweep", str(f["sweep_bad_override.yaml"])], {}, "model.nope"),
    ("sweep: bad level value", lambda f: ["sweep", str(f["sweep_bad_value.yaml"])], {}, "model.n_layers"),
    ("sweep: baseline not a level", lambda f: ["sweep", str(f["sweep_bad_baseline.yaml"])], {}, "missing"),
    ("sweep: no seeds", lambda f: ["sweep", str(f["sweep_no_seeds.yaml"])], {}, "seeds"),
    ("sweep: unknown sampler", lambda f: ["sweep", str(f["sweep_bad_sampler.yaml"])], {}, "sampler"),
    ("sweep: unknown metric", lambda f: ["sweep", str(f["sweep_bad_metric.yaml"])], {}, "metric"),
    ("sweep: zero budget", lambda f: ["sweep", str(f["sweep_bad_budget.yaml"])], {}, "budget"),
    ("sweep: missing data", lambda f: ["sweep", str(f["sweep_missing_data.yaml"])], {}, "no file matches"),
    ("sweep: --seeds text", lambda f: ["sweep", "bank_layers", "--seeds", "a,b"], {}, "--seeds 'a,b'"),
    ("sweep: --workers 0", lambda f: ["sweep", "bank_layers", "--workers", "0"], {}, "--workers must be >= 1"),
    ("sweep: --steps 0", lambda f: ["sweep", "bank_layers", "--steps", "0"], {}, "--steps must be >= 1 (got 0)"),
    ("sweep: --steps negative", lambda f: ["sweep", "bank_layers", "--steps", "-5"], {}, "--steps must be >= 1"),
    ("sweep: --heartbeat 0", lambda f: ["sweep", "bank_layers", "--heartbeat", "0"], {}, "--heartbeat must be >= 1"),
    ("sweep: --scale unknown", lambda f: ["sweep", "bank_layers", "--scale", "huge"], {}, "huge"),
    ("sweep: bad override", lambda f: ["sweep", "bank_layers", "-s", "model.nope=1"], {}, "model.nope"),
    ("sweep: strategy", lambda f: ["sweep", "bank_layers", "-s", "train.strategy=bogus"], {}, "train.strategy 'bogus'"),
    ("sweep: study name leaves the runs dir", lambda f: ["sweep", "bank_layers", "--study", "../../escape"], {},
     "--study '../../escape'"),
    ("probe: text name leaves the runs dir", lambda f: ["probe", "-c", str(f["junk.ckpt"]), "-d", "a/../b=stdlib"], {},
     "a text name holds"),
    ("sweep: storage scheme", lambda f: ["sweep", "bank_layers", "--storage", "bogus://x"], {}, "bogus://x"),
    # --- figures
    ("figures: no store", lambda f: ["figures"], {}, "no MLflow store"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, files, tmp_path, monkeypatch):
    _, argv, env, needle = case
    runs = tmp_path / "runs"
    monkeypatch.setenv("BOV_RUNS_DIR", str(runs))
    monkeypatch.setenv("BOV_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BOV_CACHE_DIR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, argv(files))
    out = res.output.strip()
    assert res.exit_code == 2, f"rc {res.exit_code}: {out[-1500:]}\n{res.exception!r}"
    assert out.startswith("error: ") and "\n" not in out, out[-1500:]
    assert needle in out, out
    left = [p for p in runs.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if runs.exists() else []
    assert left == [], left  # no MLflow or Optuna store, no tokenizer, stream or dataset cache entry


@pytest.mark.parametrize("var", ["BOV_RUNS_DIR", "BOV_CACHE_DIR"])
def test_a_state_dir_that_cannot_be_made_is_one_line(var, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = {**os.environ, "BOV_RUNS_DIR": str(tmp_path / "runs"), var: str(blocker / "state"), "BOV_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([*BOV, "prepare", "-p", "micro"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-1500:]
    assert out.stderr.strip() == f"error: {var}: cannot use {blocker / 'state'}{'' if var == 'BOV_RUNS_DIR' else '/tokenizers'} " \
                                 "for run state (NotADirectoryError: Not a directory)"


DATA_CASES = [  # known only once the text is tokenized: refused after the (valid, reusable) caches, before any run
    ("sequence longer than the validation text", T("model.seq_len=1000000"), "model.seq_len 1000000: the validation split"),
    ("more unique tokens than the text holds", T("data.max_unique_tokens=999999999999"),
     "data.max_unique_tokens=999999999999 asks for"),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_input_checked_against_the_data_fails_before_any_run(case, tmp_path, monkeypatch):
    _, argv, needle = case
    runs = tmp_path / "runs"
    monkeypatch.setenv("BOV_RUNS_DIR", str(runs))
    monkeypatch.setenv("BOV_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(app, argv)
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: ") and needle in last, res.output[-1500:]
    assert not (runs / "mlflow.db").exists() and not [p for p in (runs / "train").rglob("*") if p.is_file()]  # no run


USAGE = [  # the command line itself (options, arguments, commands), as the installed `bov` reports it
    (["train", "--bogus"], "No such option: --bogus (see `bov train --help`)"),
    (["train", "-p", "micro", "extra"], "unexpected extra argument(s) (extra)"),
    (["sweep", "--workers", "x"], "Invalid value for '--workers'"),
    (["bench-train", "--steps", "0"], "Invalid value for '--steps'"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
]


@pytest.mark.parametrize("argv,needle", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_a_mistyped_command_line_is_one_line_exit_2(argv, needle, tmp_path):
    env = dict(os.environ, BOV_RUNS_DIR=str(tmp_path / "runs"))
    done = subprocess.run([*BOV, *argv], env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("error: ") and "\n" not in err and needle in err, done.stderr
    assert done.stdout == "" and not (tmp_path / "runs").exists()
