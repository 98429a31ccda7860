"""Checkpoint overhead: the same training run without checkpoints, at the default cadence, and at a
tight one, side by side in one process on the bench model; outputs to local disk and to S3 (moto).

    .venv/bin/python -m bench.checkpoint_overhead [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.moto_s3 import start_moto_bucket
from bench.workspace import train, workspace


def timed_run(model: Path, data: Path, steps: int, every: int, output: str) -> float:
    from job.spec import validate_spec

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
        model, data = workspace(Path(tmp), count=3000, instruction_words=(20, 60), output_words=20)
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
