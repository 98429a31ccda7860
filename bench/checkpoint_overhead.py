"""Checkpoint overhead: the same training run without checkpoints, at the default cadence, and at a
tight one, side by side in one process on the bench model; outputs to local disk and to S3 (moto).

    .venv/bin/python bench/checkpoint_overhead.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from moto_s3 import start_moto_bucket

WORDS = [f"w{i}" for i in range(400)]


def workspace(root: Path) -> tuple[Path, Path]:
    from job.data.formats import alpaca_prompt
    from job.tiny import build_tiny_model

    rng = random.Random(0)
    rows = [
        {
            "instruction": " ".join(rng.choices(WORDS, k=rng.randint(20, 60))),
            "output": " ".join(rng.choices(WORDS, k=20)),
        }
        for _ in range(3000)
    ]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [alpaca_prompt(r["instruction"]) + r["output"] for r in rows[:500]]
    return build_tiny_model(root / "model", corpus, hidden_size=256, layers=4, heads=8, vocab_size=1024), data


def timed_run(model: Path, data: Path, steps: int, every: int, output: str) -> float:
    from accelerate.state import AcceleratorState

    from job.spec import validate_spec
    from job.train import train

    spec = validate_spec(
        {
            "model": {"source": str(model)},
            "data": {"train": [str(data)], "max_seq_len": 256},
            "train": {
                "max_steps": steps,
                "micro_batch_size": 8,
                "checkpoint_every": every,
                "log_every": 10_000,
            },
            "tracking": {"enabled": False},
            "output": {"uri": output},
        }
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    started = time.perf_counter()
    train(spec, restart=True)
    return time.perf_counter() - started


def moto_bucket() -> str:
    start_moto_bucket()
    return "s3://bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, data = workspace(Path(tmp))
        targets = {"local disk": str(Path(tmp) / "out"), "S3 (moto over HTTP)": moto_bucket() + "/out"}
        timed_run(model, data, 5, 0, str(Path(tmp) / "warmup"))  # imports and first-call costs off the clock
        print(f"| output | checkpoint_every | seconds for {args.steps} steps | overhead vs none |")
        print("| --- | --- | --- | --- |")
        for where, uri in targets.items():
            base = timed_run(model, data, args.steps, 0, uri)
            print(f"| {where} | none | {base:.1f} | - |")
            for every in (100, 20):
                seconds = timed_run(model, data, args.steps, every, uri)
                print(f"| {where} | {every} | {seconds:.1f} | {100 * (seconds / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
