"""Training throughput and peak memory of each adapter method, side by side on one bench model.

Each method trains in a fresh process (so peak RSS is its own) on the same data and model; the
table reports median tokens/s after warm-up and the ratio to LoRA at the first precision, the
baseline; peak RSS, and on a GPU peak GPU memory. `--precisions bf16,no` runs each method at each
`train.mixed_precision`; `--hidden`/`--layers` size the model (a GPU wants a larger one).

    .venv/bin/python -m bench.train_methods [--steps 30] [--precisions auto] [--hidden 256 --layers 4]
        [--micro-batch 8]
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


def run_one(
    method: str, precision: str, model: Path, data: Path, steps: int, micro_batch: int, root: Path
) -> dict:
    import torch

    from job.spec import validate_spec

    adapter, model_changes = METHODS[method]
    spec = validate_spec(
        {
            "name": f"{method}-{precision}",
            "model": {"source": str(model), **model_changes},
            "adapter": adapter,
            "data": {"train": [str(data)], "max_seq_len": 256},
            "train": {
                "max_steps": steps,
                "micro_batch_size": micro_batch,
                "log_every": 1000,
                "mixed_precision": precision,
            },
            "tracking": {"enabled": False},
            "output": {"uri": str(root / "out" / f"{method}-{precision}")},
        }
    )
    history = train(spec).history
    speeds = [h["train/tokens_per_second"] for h in history[WARMUP_STEPS:]]
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {
        "tokens_per_second": statistics.median(speeds),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "peak_gpu_mb": gpu_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precisions", default="auto", help="comma-separated train.mixed_precision values")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        root = Path(args.root)
        data = root / "train.jsonl"
        result = run_one(args.one, args.precision, root / "model", data, args.steps, args.micro_batch, root)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workspace(Path(tmp), hidden_size=args.hidden, layers=args.layers)
        results = {}
        for precision in args.precisions.split(","):
            for method in METHODS:
                command = [sys.executable, "-m", "bench.train_methods", "--one", method, "--root", tmp]
                command += [
                    "--steps",
                    str(args.steps),
                    "--precision",
                    precision,
                    "--micro-batch",
                    str(args.micro_batch),
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{method} at {precision} failed:\n{done.stderr[-3000:]}")
                results[method, precision] = json.loads(done.stdout.split("RESULT ", 1)[1])
    base = next(iter(results.values()))["tokens_per_second"]
    print("| method | precision | tokens/s (median) | vs first row | peak RSS MiB | peak GPU MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (method, precision), r in results.items():
        print(
            f"| {method} | {precision} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / base:.2f}x "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_gpu_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
