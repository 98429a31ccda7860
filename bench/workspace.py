"""What the benchmarks share: the bench model, random alpaca data, and one Accelerator per process."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(400)]
_accelerator = None


def alpaca_rows(count: int, seed: int = 0, instruction_words=(20, 80), output_words: int = 40) -> list[dict]:
    """Rows of random words: an instruction of a random length in the range, an output of fixed length."""
    rng = random.Random(seed)
    return [
        {
            "instruction": " ".join(rng.choices(WORDS, k=rng.randint(*instruction_words))),
            "output": " ".join(rng.choices(WORDS, k=output_words)),
        }
        for _ in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_model(root: Path, rows: list[dict], hidden_size: int = 256, layers: int = 4) -> Path:
    """The bench model (by default hidden 256, 4 layers, vocab 1024), its tokenizer trained on the rows."""
    from job.data.formats import alpaca_prompt
    from job.model.tiny import build_tiny_model

    corpus = [alpaca_prompt(r["instruction"]) + r["output"] for r in rows]
    return build_tiny_model(
        root / "model", corpus, hidden_size=hidden_size, layers=layers, heads=8, vocab_size=1024
    )


def workspace(
    root: Path, count: int = 2000, instruction_words=(20, 80), output_words: int = 40, **model_size
) -> tuple[Path, Path]:
    """(model directory, train.jsonl) under root; model_size: bench_model's hidden_size, layers."""
    rows = alpaca_rows(count, 0, instruction_words, output_words)
    return bench_model(root, rows[:500], **model_size), write_jsonl(root / "train.jsonl", rows)


def train(spec, restart: bool = False):
    """job.train.train with this process's Accelerator."""
    global _accelerator
    from job.accelerator import make_accelerator
    from job.train import train as train_job

    _accelerator = _accelerator or make_accelerator(spec.train)
    return train_job(spec, _accelerator, restart=restart)
