"""bov eval (windowed bits per byte), the lm-eval adapter and bov probe, against hand computations."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bov.cli import app
from bov.config import load_config
from bov.sources import stdlib_files
from bov.scoring import parse_data_arg, score, text_name, windows
from bov.infer import generate_text, load_checkpoint
from bov.train import run_training
from conftest import make

HELD_OUT = 24  # the last stdlib files: micro trains on the first 200 (data.max_docs), so it never saw these


# ----------------------------------------------------------------------------- windows, by hand


@pytest.mark.parametrize("n,context,stride", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 3), (100, 8, 1), (57, 16, 16)])
def test_windows_score_every_prediction_once_with_the_stated_context(n, context, stride):
    seen = []
    for begin, end, scored in windows(n, context, stride):
        assert end - begin <= context and 1 <= scored <= end - begin
        for target in range(end - scored + 1, end + 1):  # predicted from ids[begin:target]
            seen.append(target)
            assert target - begin >= min(target, context - stride + 1)  # at least C - S tokens before it
    assert seen == list(range(1, n))


def test_stride_outside_the_context_is_refused():
    with pytest.raises(ValueError, match="--stride 9"):
        windows(100, 8, 9)


def test_windowed_score_equals_a_hand_computation_from_the_logits():
    model, _ = make("bov")
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (300,), generator=g).numpy()
    token_bytes = np.random.default_rng(0).integers(0, 5, 512)
    C, S = model.rope.max_len, 24
    got = score(model, ids, token_bytes, C, S, batch_size=3)
    nats, nbytes, begin, done = 0.0, 0, 0, 0
    with torch.no_grad():
        while done < len(ids) - 1:  # the standard sliding-window recipe, one window at a time
            end = min(begin + C, len(ids) - 1)
            logp = F.log_softmax(model(torch.tensor(ids[None, begin:end]))[0].double(), -1)
            for t in range(done + 1, end + 1):
                nats -= logp[t - 1 - begin, ids[t]].item()
                nbytes += int(token_bytes[ids[t]])
            done, begin = end, begin + S
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == nbytes
    # the model's loss is fp32 per token; the hand sum is in double: equal to fp32 precision
    assert got["nats"] == pytest.approx(nats, rel=1e-7)
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-7)
    assert got["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-7)


def test_text_names_are_metric_safe():
    assert text_name("../shared/data/wikipedia-en/validation.jsonl.xz") == "validation"
    assert text_name("stdlib") == "stdlib" and text_name("org/some-data") == "some-data"
    assert parse_data_arg("wiki=../x/*.jsonl") == ("wiki", "../x/*.jsonl")
    assert parse_data_arg("./a=b.txt") == ("a_b", "./a=b.txt")  # a path, not NAME=SOURCE


# ----------------------------------------------------------------------------- a trained micro checkpoint


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """micro BoV, 200 steps on stdlib, validated on held-out stdlib files (their first 4,000 characters) given
    as a local JSONL."""
    root = tmp_path_factory.mktemp("eval")
    held = _write_jsonl(root / "held.jsonl", [p.read_text(errors="replace")[:4000] for p in stdlib_files()[-HELD_OUT:]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOV_RUNS_DIR", str(root / "runs"))
        mp.setenv("BOV_PROGRESS", "0")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config("micro", "bov", {"train.max_steps": 200, "train.val_every": 200, "train.val_tokens": 10**7,
                                           "data.val_source": str(held)})
        s = run_training(cfg, log=lambda m: None, run_dir=root / "runs" / "run")
    assert s["status"] == "FINISHED"
    return {"root": root, "ckpt": root / "runs" / "run" / "last.ckpt", "held": held, "summary": s, "cfg": cfg}


@pytest.fixture
def in_runs(trained, monkeypatch):
    monkeypatch.setenv("BOV_RUNS_DIR", str(trained["root"] / "runs"))
    monkeypatch.setenv("BOV_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return trained


def test_eval_with_disjoint_windows_reproduces_validation_bpb_and_logs_to_the_run(in_runs):
    import mlflow

    t = in_runs
    T = t["cfg"].model.seq_len
    loaded = load_checkpoint(t["ckpt"])
    from bov.data import token_byte_lengths
    from bov.scoring import load_text

    stream = load_text(str(t["held"]), "held", loaded.tokenizer, loaded.bos_id, token_byte_lengths(loaded.tokenizer))
    covered = ((len(stream.ids) - 1) // T) * T + 1  # what training's validation windows cover
    res = CliRunner().invoke(app, ["eval", "-c", str(t["ckpt"]), "-d", f"held={t['held']}", "--max-tokens",
                                   str(covered), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert len(rows) == 1 and rows[0]["text"] == "held" and rows[0]["tokens"] == covered - 1
    assert rows[0]["bpb"] == pytest.approx(t["summary"]["val_bpb"], rel=1e-6)
    assert rows[0]["bpb"] < rows[0]["unigram_bpb"]  # held-out text: better than a unigram fitted on it
    run = mlflow.MlflowClient(f"sqlite:///{t['root'] / 'runs' / 'mlflow.db'}").get_run(t["summary"]["run_id"])
    assert run.data.metrics["eval/held/bpb"] == pytest.approx(rows[0]["bpb"])
    assert run.data.metrics["eval/held/tokens"] == covered - 1
    part = str(64 * 40 + 1)
    runs = [CliRunner().invoke(app, ["eval", "-c", str(t["ckpt"]), "-d", f"held={t['held']}", "--max-tokens", part,
                                     "--stride", stride, "--no-log", "--json"]) for stride in ("64", "16")]
    disjoint, overlapping = (json.loads(r.stdout[r.stdout.index("["):])[0] for r in runs)
    assert overlapping["stride"] == 16 and overlapping["bpb"] < disjoint["bpb"]  # more context per token


def test_eval_bad_input_is_one_line_before_any_compute(in_runs, tmp_path):
    runner = CliRunner()
    ckpt = str(in_runs["ckpt"])
    cases = [
        (["eval", "-d", "stdlib"], "give --checkpoint PATH or --study NAME"),
        (["eval", "-c", ckpt], "give --data"),
        (["eval", "-c", str(tmp_path / "no.ckpt"), "-d", "stdlib"], "--checkpoint: no file at"),
        (["eval", "-c", ckpt, "-d", str(tmp_path / "none*.jsonl")], "no file matches"),
        (["eval", "-c", ckpt, "-d", "a=stdlib", "-d", "a=stdlib"], "two texts are named 'a'"),
        (["eval", "-c", ckpt, "-d", "stdlib", "--stride", "999"], "--stride 999"),
        (["eval", "-c", ckpt, "--tasks", "no_such_task_anywhere"], "unknown task 'no_such_task_anywhere'"),
        (["eval", "-c", ckpt, "--tasks", "x", "--include-path", str(tmp_path / "nodir")], "--include-path"),
        (["eval", "--study", "no-such-study", "-d", "stdlib"], "--study no-such-study"),
        (["probe", "-c", ckpt, "-d", str(tmp_path / "none.jsonl")], "no file matches"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and res.output.strip().count("\n") == 0, (args, res.output)


# ----------------------------------------------------------------------------- lm-eval


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_adapter_loglikelihoods_equal_the_models_own_summed_log_probabilities(trained):
    from bov.lmeval import BovLM

    loaded = load_checkpoint(trained["ckpt"])
    pairs = [("def main(", "):\n    return 0"), ("import os\nimport ", "sys"), ("", "class A:\n    pass"),
             ("x = [1, 2, 3]\nprint(", "len(x))"), ("for i in range(10):\n    ", "print(i)")]
    one = BovLM(loaded=loaded, batch_size=1).loglikelihood(_instances("loglikelihood", pairs))
    many = BovLM(loaded=loaded, batch_size=4).loglikelihood(_instances("loglikelihood", pairs))
    lm = BovLM(loaded=loaded, batch_size=1)
    with torch.no_grad():
        for (ctx, cont), (got, greedy), (got4, _) in zip(pairs, one, many):
            if ctx:
                c, k = lm._encode_pair(ctx, cont)
                ids = [loaded.bos_id, *c, *k]
            else:
                k = lm.tok_encode(cont)
                ids = [loaded.bos_id, *k]
            logits = loaded.model(torch.tensor([ids[:-1]]))[0]
            n = len(k)
            lp = F.log_softmax(logits[len(ids) - 1 - n :].double(), -1)
            want = lp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum().item()
            assert got == want  # one request per pass: the same computation, bit for bit
            assert got4 == pytest.approx(want, rel=1e-6)  # batched with padding: equal up to float reassociation
            assert greedy == bool((lp.argmax(-1) == torch.tensor(ids[-n:])).all())
    # a continuation longer than the context: disjoint windows over the request, the last n predictions summed
    long_text = stdlib_files()[-2].read_text()[:2000]
    (got, _), = lm.loglikelihood(_instances("loglikelihood", [("# a\n", long_text)]))
    c, k = lm._encode_pair("# a\n", long_text)
    ids, C = [loaded.bos_id, *c, *k], loaded.model.rope.max_len
    assert len(k) > C
    want = 0.0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, C):
            end = min(begin + C, len(ids) - 1)
            lp = F.log_softmax(loaded.model(torch.tensor([ids[begin:end]]))[0].double(), -1)
            want += sum(lp[t - 1 - begin, ids[t]].item() for t in range(begin + 1, end + 1) if t >= len(ids) - len(k))
    assert got == pytest.approx(want, rel=1e-12)


def test_adapter_rolling_and_greedy_generation_match_bov(trained):
    from bov.lmeval import BovLM

    loaded = load_checkpoint(trained["ckpt"])
    lm = BovLM(loaded=loaded, batch_size=2)
    text = stdlib_files()[-1].read_text()[:3000]
    ids = np.asarray([loaded.bos_id, *lm.tok_encode(text)])
    rolled = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))[0]
    T = loaded.model.rope.max_len
    assert rolled == pytest.approx(-score(loaded.model, ids, np.zeros(512, dtype=np.int64), T, T)["nats"], rel=1e-9)
    prompt = "def parse(self, "
    gen = lm.generate_until(_instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]))[0]
    assert gen == generate_text(loaded, prompt, 12)
    stop = gen[len(gen) // 2 :][:2]
    if stop.strip():
        cut = lm.generate_until(_instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]))[0]
        assert cut == gen.split(stop)[0]


def _next_line_task(root: Path, n: int = 100) -> Path:
    """An easy local task from held-out text: which continuation is the real next line, and which the same
    words shuffled."""
    rng = random.Random(0)
    items = []
    for path in stdlib_files()[-HELD_OUT:]:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if len(ln.split()) >= 4]
        for a, b in zip(lines, lines[1:]):
            words = b.split()
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            choices = [b, " ".join(shuffled)]
            label = rng.randrange(2)
            items.append({"context": a + "\n", "choices": choices if label == 0 else choices[::-1], "label": label})
    rng.shuffle(items)
    data = root / "next_line.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items[:n]))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "next_line.yaml").write_text(
        "task: bov_next_line\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{context}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n")
    return tasks


@pytest.mark.slow  # subprocesses: in `make test-slow`, out of the 10-minute default run
def test_a_trained_model_beats_chance_on_a_local_task_through_bov_eval_and_lm_eval(in_runs):
    import mlflow

    t = in_runs
    tasks = _next_line_task(t["root"])
    env_cache = str(t["root"] / "hf")
    res = CliRunner(env={"HF_DATASETS_CACHE": env_cache}).invoke(
        app, ["eval", "-c", str(t["ckpt"]), "--tasks", "bov_next_line", "--include-path", str(tasks), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    acc = next(r["value"] for r in rows if r["task"] == "bov_next_line" and r["metric"] == "acc")
    assert acc >= 0.75  # chance is 0.5; 200 steps of micro reach about 0.9 on such items
    run = mlflow.MlflowClient(f"sqlite:///{t['root'] / 'runs' / 'mlflow.db'}").get_run(t["summary"]["run_id"])
    assert run.data.metrics["task/bov_next_line/acc"] == acc
    # lm-eval's own command line, from a directory it has never seen, finds the model class by name
    out = t["root"] / "lm_eval_out"
    env = {**os.environ, "HF_DATASETS_CACHE": env_cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run([str(lm_eval), "--model", "bov", "--model_args", f"checkpoint={t['ckpt']}", "--device", "cpu",
                           "--tasks", "bov_next_line", "--include_path", str(tasks), "--output_path", str(out)],
                          capture_output=True, text=True, cwd=t["root"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    assert result["results"]["bov_next_line"]["acc,none"] == pytest.approx(acc)


# ----------------------------------------------------------------------------- probes, by hand


def test_probe_statistics_match_hand_computations():
    from bov.probe import attention_probs, entropy, mean_pairwise_cosine

    B, T, H, dh = 2, 7, 2, 4
    zeros = torch.zeros(B, T, H, dh)  # q = 0: every visible key scores the same, attention is uniform
    p = attention_probs(zeros, torch.randn(B, T, 1, dh), None)
    ent = entropy(p)
    assert torch.allclose(ent, torch.log(torch.arange(1, T + 1).float()).expand(B, H, T), atol=1e-6)
    assert torch.allclose(p[..., 0], 1 / torch.arange(1, T + 1).float().expand(B, H, T))
    windowed = attention_probs(zeros, torch.randn(B, T, 1, dh), 3)
    assert torch.allclose(entropy(windowed)[..., -1], torch.tensor(math.log(3)))
    same = torch.randn(1, 1, 5).expand(3, 6, 5)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    x = torch.randn(2, 6, 5)
    u = F.normalize(x.double(), dim=-1)
    hand = np.mean([(u[b] @ u[b].T).sum().item() - 6 for b in range(2)]) / 30
    assert mean_pairwise_cosine(x) == pytest.approx(hand)


def test_probe_of_an_untrained_model_sees_banks_at_their_start_and_the_coefficients_it_was_given():
    from bov.probe import probe

    model, cfg = make("bov")
    model.eval()
    ids = torch.randint(1, 512, (400,)).numpy()
    out = probe(model, ids, seed=0, max_windows=4)
    L = cfg.model.n_layers
    assert out["layers"] == L and out["tokens"] == 4 * cfg.model.seq_len
    from bov.tracking import PROBES

    assert set(out["per_layer"]) == set(PROBES)  # every measurement has its name (and label) in one place
    for name in ("attention_entropy", "first_token_mass", "residual_cosine", "value_cosine", "value_norm"):
        assert len(out["per_layer"][name]) == L and all(math.isfinite(v) for v in out["per_layer"][name])
    bank_layers = [p.layer for p in model.plan if p.bank is not None]
    assert [l for l, b in enumerate(out["per_layer"]["coeff_b"]) if b is not None] == bank_layers
    assert set(out["bank_drift"]) == {str(l) for l in bank_layers}
    for buckets in out["bank_drift"].values():
        assert sum(c["rows"] for c in buckets.values()) == cfg.model.vocab_size
        assert all(c["cosine"] == pytest.approx(1.0, abs=1e-6) for c in buckets.values())  # untrained: at start
    T = cfg.model.seq_len
    assert max(out["per_layer"]["attention_entropy"]) <= np.mean(np.log(np.arange(1, T + 1))) + 1e-6


def test_probe_cli_draws_a_figure_per_probe_and_attaches_its_artifact(in_runs, tmp_path):
    import mlflow

    from bov import tracking as T

    t = in_runs
    res = CliRunner().invoke(app, ["probe", "-c", str(t["ckpt"]), "-d", f"held={t['held']}", "--max-tokens", "4000",
                                   "--windows", "4", "--out", str(tmp_path / "probe")])
    assert res.exit_code == 0, res.output
    for name in ("attention_entropy", "first_token_mass", "residual_cosine", "value_cosine", "value_norm", "coeff_b",
                 "bank_drift"):
        assert (tmp_path / "probe" / f"probe_{name}.png").stat().st_size > 0
    mlflow.set_tracking_uri(f"sqlite:///{t['root'] / 'runs' / 'mlflow.db'}")
    logged = T.read_probe(mlflow.get_tracking_uri(), t["summary"]["run_id"])
    assert logged["variant"] == "bov" and logged["layers"] == t["cfg"].model.n_layers


@pytest.mark.slow  # two lm-eval imports, one in a subprocess: in `make test-slow`
def test_prepare_tasks_caches_their_datasets_for_an_offline_eval(tmp_path, monkeypatch):
    """`bov prepare --tasks` builds every task once, so its dataset lands in bov's cache; a later process with
    HF_DATASETS_OFFLINE=1 finds it there. The Hub is out of reach here: a local JSON task stands in for `core`."""
    monkeypatch.setenv("BOV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    tasks = _next_line_task(tmp_path, n=40)
    res = CliRunner().invoke(app, ["prepare", "--tasks", "bov_next_line", "--include-path", str(tasks)])
    assert res.exit_code == 0, res.output
    assert "bov_next_line: 40 documents" in res.output and f"under {tmp_path / 'cache' / 'datasets'}" in res.output
    assert any((tmp_path / "cache" / "datasets").rglob("*.arrow"))  # the prepared split, in bov's cache
    offline = subprocess.run([sys.executable, "-m", "bov.cli", "prepare", "--tasks", "bov_next_line", "--include-path",
                              str(tasks)], env={**os.environ, "HF_DATASETS_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=600)
    assert offline.returncode == 0 and "bov_next_line: 40 documents" in offline.stdout, offline.stderr[-2000:]
    bad = CliRunner().invoke(app, ["prepare", "--tasks", "no_such_task_anywhere"])
    assert bad.exit_code == 2 and "unknown task 'no_such_task_anywhere'" in bad.output
