"""Training throughput and peak memory of each adapter method, side by side on one bench model.

Each method trains in a fresh process (so peak RSS is its own) on the same data and model; the
table reports median tokens/s after warm-up and the ratio to LoRA, the baseline.

    .venv/bin/python -m bench.train_methods [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.memory import proc_status_mb
from bench.workspace import train, workspace

METHODS = {
    "lora": ({"method": "lora"}, {}),
    "dora": ({"method": "dora"}, {}),
    "qlora-4bit": ({"method": "lora"}, {"quantization": "4bit"}),
    "full": ({"method": "full"}, {}),
}
WARMUP_STEPS = 5


def run_one(method: str, model: Path, data: Path, steps: int, root: Path) -> dict:
    from job.spec import validate_spec

    adapter, model_changes = METHODS[method]
    spec = validate_spec(
        {
            "name": method,
            "model": {"source": str(model), **model_changes},
            "adapter": adapter,
            "data": {"train": [str(data)], "max_seq_len": 256},
            "train": {"max_steps": steps, "micro_batch_size": 8, "log_every": 1000},
            "tracking": {"enabled": False},
            "output": {"uri": str(root / "out" / method)},
        }
    )
    history = train(spec).history
    speeds = [h["train/tokens_per_second"] for h in history[WARMUP_STEPS:]]
    peak_mb = proc_status_mb("VmHWM")
    return {"tokens_per_second": statistics.median(speeds), "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        root = Path(args.root)
        result = run_one(args.one, root / "model", root / "train.jsonl", args.steps, root)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workspace(Path(tmp))
        results = {}
        for method in METHODS:
            command = [
                sys.executable,
                "-m",
                "bench.train_methods",
                "--one",
                method,
                "--root",
                tmp,
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.split("RESULT ", 1)[1])
    base = results["lora"]["tokens_per_second"]
    print("| method | tokens/s (median) | vs lora | peak RSS MiB |")
    print("| --- | --- | --- | --- |")
    for method, r in results.items():
        print(
            f"| {method} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / base:.2f}x | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
