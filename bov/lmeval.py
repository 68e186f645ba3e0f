"""Downstream tasks through lm-evaluation-harness: the `bov` model class and DCLM's CORE average.

`lm_eval --model bov --model_args checkpoint=runs/train/.../last.ckpt --tasks ...` works once bov is
installed (bov's `.pth` hook registers the class when lm-eval loads its models), and `bov eval --tasks`
runs the same class in process. Requests are scored as training reads text: `BOS + context +
continuation`, the context cut from the left to the model's context; loglikelihoods come from one
forward pass per request, batched by length; `loglikelihood_rolling` is `bov.scoring.score` with disjoint
windows; `generate_until` decodes greedily through `bov.infer`'s KV cache (so it equals `bov generate`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from bov.infer import generate, load_checkpoint

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # bov's own task configs (the `core` group)

# DCLM's CORE (its eval bundle, as nanochat runs it): task -> (lm-eval task, shots, random baseline).
# bov/tasks/core.yaml runs the 19 that lm-eval ships in CORE's form (hellaswag once, at 10 shots; no
# jeopardy, no squad), so `core` here averages 19 centered accuracies, DCLM's 22.
CORE_TASKS = {
    "hellaswag": ("hellaswag", 10, 0.25),
    "arc_easy": ("arc_easy", 10, 0.25),
    "arc_challenge": ("arc_challenge", 10, 0.25),
    "copa": ("copa", 0, 0.50),
    "commonsense_qa": ("commonsense_qa", 10, 0.20),
    "piqa": ("piqa", 10, 0.50),
    "openbook_qa": ("openbookqa", 0, 0.25),
    "lambada_openai": ("lambada_openai", 0, 0.0),
    "winograd": ("wsc273", 0, 0.50),
    "winogrande": ("winogrande", 0, 0.50),
    "boolq": ("boolq", 10, 0.62),
    "agi_eval_lsat_ar": ("agieval_lsat_ar", 3, 0.25),
    "coqa": ("coqa", 0, 0.0),
    "bigbench_dyck_languages": ("bigbench_dyck_languages_generate_until", 10, 0.0),
    "bigbench_operators": ("bigbench_operators_generate_until", 10, 0.0),
    "bigbench_repeat_copy_logic": ("bigbench_repeat_copy_logic_generate_until", 10, 0.0),
    "bigbench_cs_algorithms": ("bigbench_cs_algorithms_generate_until", 10, 0.0),
    "bigbench_qa_wikidata": ("bigbench_qa_wikidata_generate_until", 10, 0.0),
    "bigbench_language_identification": ("bigbench_language_identification_multiple_choice", 10, 0.25),
}
ACCURACY_KEYS = ("acc,none", "exact_match,none", "em,none", "acc_norm,none")


def centered(acc: float, baseline: float) -> float:
    """DCLM's centered accuracy: 0 at chance, 1 at perfect."""
    return (acc - baseline) / (1.0 - baseline)


def core_score(results: dict) -> dict[str, float]:
    """Centered accuracy per CORE task found in lm-eval's `results`, and their mean (`core`)."""
    out = {}
    for name, (task, _, base) in CORE_TASKS.items():
        r = results.get(name) or results.get(task)
        if not r:
            continue
        acc = next((r[k] for k in ACCURACY_KEYS if isinstance(r.get(k), (int, float))), None)
        if acc is not None:
            out[name] = centered(float(acc), base)
    if out:
        out["core"] = sum(out.values()) / len(out)
    return out


@register_model("bov")
class BovLM(TemplateLM):
    """A bov checkpoint as an lm-eval model. model_args: checkpoint=PATH[,device=cpu|cuda][,batch_size=N]."""

    def __init__(self, checkpoint: str | None = None, device: str | None = None, batch_size: int | str = 8,
                 loaded=None, **_ignored):
        super().__init__()
        if loaded is None:
            if not checkpoint:
                raise ValueError("--model_args: checkpoint=PATH is required (a .ckpt written by bov train)")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_checkpoint(checkpoint, device=device)
        self.loaded, self.model = loaded, loaded.model
        self.tok = loaded.tokenizer
        self.device_ = self.model.wte.weight.device
        self.context = self.model.rope.max_len
        self.batch = 8 if str(batch_size).startswith("auto") else int(batch_size)

    # -- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.loaded.bos_id  # documents are separated by BOS in training

    @property
    def max_length(self) -> int:
        return self.context

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # -- scoring
    def _full(self, context: list[int], continuation: list[int]) -> list[int]:
        ids = context if context and context[0] == self.eot_token_id else [self.eot_token_id, *context]
        return ids + continuation

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """BOS + context + continuation, cut from the left to context + 1 tokens; the number scored."""
        return self._full(context, continuation)[-(self.context + 1):], len(continuation)

    @torch.no_grad()
    def _long(self, ids: list[int], n: int) -> tuple[float, bool]:
        """A continuation longer than the model's context: disjoint windows over the whole request, as
        `bov.scoring.score` reads a text, summing the predictions of the last n tokens."""
        from bov.scoring import windows

        total, greedy, first = 0.0, True, len(ids) - n
        t_ids = torch.tensor(ids, device=self.device_)
        for begin, end, k in windows(len(ids), self.context, self.context):
            if end < first:
                continue  # wholly inside the context: windows are disjoint, so it changes nothing after it
            logits = self.model(t_ids[None, begin:end])[0]
            for t in range(max(end - k + 1, first), end + 1):  # the target at position t
                lp = F.log_softmax(logits[t - 1 - begin].double(), -1)
                total += lp[ids[t]].item()
                greedy &= int(lp.argmax()) == ids[t]
        return total, greedy

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = [self._window(ctx, cont) for _, ctx, cont in requests]
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.context:
                out[i] = self._long(self._full(ctx, cont), len(cont))
        order = sorted((i for i in range(len(requests)) if out[i] is None), key=lambda i: -len(prepared[i][0]))
        for s in range(0, len(order), self.batch):
            idx = order[s : s + self.batch]
            width = max(len(prepared[i][0]) for i in idx) - 1
            x = torch.full((len(idx), width), self.eot_token_id, dtype=torch.long)
            for r, i in enumerate(idx):  # right-padded: a causal model's real positions never see the padding
                ids = prepared[i][0]
                x[r, : len(ids) - 1] = torch.tensor(ids[:-1])
            logits = self.model(x.to(self.device_))
            for r, i in enumerate(idx):
                ids, n = prepared[i]
                t = len(ids) - 1
                target = torch.tensor(ids[-n:], device=self.device_)
                lp = F.log_softmax(logits[r, t - n : t].double(), dim=-1)  # only the scored positions
                total = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        import numpy as np

        from bov.scoring import score

        out = []
        for req in requests:
            (text,) = req.args
            ids = np.asarray([self.eot_token_id, *self.tok_encode(text)], dtype=np.int64)
            zeros = np.zeros(self.model.cfg.vocab_size, dtype=np.int64)
            total = -score(self.model, ids, zeros, self.context, self.context, self.batch, self.device_)["nats"]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 64))
            ids = [self.eot_token_id, *self.tok_encode(context)]
            ids = ids[-max(1, self.context - max_new):]
            new = generate(self.model, torch.tensor([ids], device=self.device_), max_new, temperature=0.0,
                           stop_id=self.eot_token_id)[0].tolist()
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, {"until": until}), text)
        return out


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's task index over its own tasks, bov/tasks (`core`) and include_path; an unknown task name
    fails here, before any model is loaded."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task {unknown[0]!r} (not in lm-eval nor in {', '.join(paths)})")
    return manager


def use_datasets_cache() -> Path:
    """Task datasets are cached with bov's other state, unless the user points HF_DATASETS_CACHE elsewhere."""
    import os

    import datasets

    from bov.paths import cache_dir

    datasets.config.HF_DATASETS_CACHE = Path(os.environ.get("HF_DATASETS_CACHE") or cache_dir("datasets"))
    return datasets.config.HF_DATASETS_CACHE


def cache_tasks(tasks: list[str], manager) -> tuple[dict[str, int], Path]:
    """Every dataset the tasks (and the tasks of their groups) read, downloaded once into the datasets cache, so
    that `bov eval --tasks` runs later without network (HF_DATASETS_OFFLINE=1): task -> documents, and the cache."""
    where = use_datasets_cache()
    leaves = manager.load(tasks)["tasks"]  # every leaf task of the groups, flat; building one loads its dataset
    found = {name: len(list(task.eval_docs)) for name, task in leaves.items()}
    return found, where


def run_tasks(loaded, tasks: list[str], manager, num_fewshot: int | None = None, limit: float | None = None,
              batch_size: int = 8, log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on a loaded checkpoint."""
    from lm_eval import simple_evaluate

    use_datasets_cache()
    return simple_evaluate(model=BovLM(loaded=loaded, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
                           limit=limit, task_manager=manager, log_samples=log_samples)
