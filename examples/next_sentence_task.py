"""Write a local lm-eval task from held-out text: which of two continuations is the real next sentence, and
which the same words shuffled (chance 0.5). Runs without network; the task runs with

    python examples/next_sentence_task.py ../shared/data/wikipedia-en/validation.jsonl.xz runs/tasks/wiki_next
    bov eval -c <ckpt> --tasks wiki_next_sentence --include-path runs/tasks/wiki_next
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from bov.config import DataConfig
from bov.sources import load_documents


def items(source: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for text in load_documents(source, DataConfig(source=source))["text"]:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 6 <= len(s.split()) <= 40]
        for a, b in zip(sentences, sentences[1:]):
            words = b.split()
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            label = rng.randrange(2)
            choices = [" " + b, " " + " ".join(shuffled)]
            out.append({"context": a, "choices": choices if label == 0 else choices[::-1], "label": label})
            break  # one pair per document: items spread over the text
        if len(out) >= n:
            break
    return out


def main(source: str, out_dir: str, n: int = 500, name: str = "wiki_next_sentence") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items(source, n)))
    (out / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    print(f"{out / name}.yaml: {sum(1 for _ in data.open())} items")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
