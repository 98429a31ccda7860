"""Data pipeline benchmarks, each against its baseline in the same script.

1. Loader throughput (tokens/s of micro-batches produced, no model) from local disk and from S3
   (moto's server over HTTP), next to the training consumption rate of the bench model (LoRA).
2. Time to first batch and peak memory on a small and a large dataset (each case in a fresh process).
3. Packing vs padding on length-skewed data: packing efficiency and effective (real) tokens/s.

    .venv/bin/python -m bench.data_loader [--large-mb 1024] [--small-mb 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import proc_status_mb
from bench.moto_s3 import start_moto_bucket
from bench.workspace import WORDS, alpaca_rows, bench_model, train


def write_dataset(path: Path, megabytes: int, seed: int = 0, skewed: bool = False) -> int:
    """Alpaca JSONL of about `megabytes`; skewed lengths (mostly short, a few long) when asked."""
    rng = random.Random(seed)
    rows = 0
    with open(path, "w") as f:
        while f.tell() < megabytes * 1_000_000:
            n = int(rng.paretovariate(1.2) * 8) if skewed else rng.randint(20, 80)
            row = {
                "instruction": " ".join(rng.choices(WORDS, k=min(n, 400))),
                "output": " ".join(rng.choices(WORDS, k=20)),
            }
            f.write(json.dumps(row) + "\n")
            rows += 1
    return rows


def make_model(root: Path) -> Path:
    return bench_model(root, alpaca_rows(500, seed=1, instruction_words=(40, 40), output_words=20))


def spec_for(model: Path, data: str, packing: bool = False, max_steps: int = 10, **extra):
    from job.spec import validate_spec

    return validate_spec(
        {
            "model": {"source": str(model)},
            "data": {"train": [data], "max_seq_len": 256, "packing": packing},
            "train": {"max_steps": max_steps, "micro_batch_size": 8, "log_every": 1000},
            "tracking": {"enabled": False},
            **extra,
        }
    )


def loader_tokens_per_second(spec, batches: int) -> tuple[float, float]:
    """(tokens/s over `batches` micro-batches after the first, seconds to the first batch)."""
    from job.data.pipeline import DataPipeline
    from job.model.loading import load_tokenizer

    tokenizer = load_tokenizer(Path(spec.model.source), spec.model)
    started = time.perf_counter()
    stream = DataPipeline(spec.data, tokenizer, spec.train.seed, spec.train.epochs).train_batches(
        spec.train.micro_batch_size
    )
    next(stream)
    first = time.perf_counter() - started
    started, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(next(stream)["real_tokens"])
    return tokens / (time.perf_counter() - started), first


def training_tokens_per_second(spec) -> float:
    history = train(spec, restart=True).history
    return sorted(h["train/tokens_per_second"] for h in history[3:])[len(history[3:]) // 2]


def first_batch_case(model: str, data: str) -> None:
    """Run in a fresh process: time to first batch, and the pipeline's peak memory over 50 batches."""
    import job.data.pipeline  # noqa: F401 (the libraries' memory is the baseline, not the pipeline's)
    from job.model.loading import load_tokenizer

    spec = spec_for(Path(model), data)
    load_tokenizer(Path(model), spec.model)
    baseline = proc_status_mb("VmRSS")
    speed, first = loader_tokens_per_second(spec, 50)
    peak = proc_status_mb("VmHWM") - baseline
    print("RESULT " + json.dumps({"first_batch_s": first, "peak_rss_mb": peak, "tokens_per_s": speed}))


def upload(endpoint: str, path: Path, key: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).upload_file(str(path), "bench", key)
    return f"s3://bench/{key}"


def in_fresh_process(model: Path, data: str) -> dict:
    command = [sys.executable, "-m", "bench.data_loader", "--first-batch-case", str(model), data]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--large-mb", type=int, default=1024)
    parser.add_argument("--first-batch-case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_batch_case:
        first_batch_case(*args.first_batch_case)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root)
        small, large, skewed = root / "small.jsonl", root / "large.jsonl", root / "skewed.jsonl"
        write_dataset(small, args.small_mb)
        write_dataset(large, args.large_mb, seed=1)
        write_dataset(skewed, 5, seed=2, skewed=True)
        server, endpoint = start_moto_bucket()
        s3_small, s3_large = upload(endpoint, small, "small.jsonl"), upload(endpoint, large, "large.jsonl")

        print("## 1. Loader throughput vs training consumption (tokens/s)\n")
        print("| what | tokens/s | vs training |\n| --- | --- | --- |")
        training = training_tokens_per_second(
            spec_for(model, str(small), max_steps=15, output={"uri": str(root / "out-training")})
        )
        local, _ = loader_tokens_per_second(spec_for(model, str(small)), 200)
        remote, _ = loader_tokens_per_second(spec_for(model, s3_small), 200)
        print(f"| training (LoRA, bench model, CPU) | {training:.0f} | 1.0x |")
        print(f"| loader, local disk | {local:.0f} | {local / training:.0f}x |")
        print(f"| loader, S3 (moto over HTTP) | {remote:.0f} | {remote / training:.0f}x |")

        print("\n## 2. Time to first batch and the pipeline's peak memory (fresh process each, 50 batches)\n")
        print("| dataset | first batch s | peak RSS above libraries MiB |\n| --- | --- | --- |")
        for where, (a, b) in (("local", (str(small), str(large))), ("S3", (s3_small, s3_large))):
            r_small, r_large = in_fresh_process(model, a), in_fresh_process(model, b)
            for size, r in ((args.small_mb, r_small), (args.large_mb, r_large)):
                print(f"| {where} {size} MB | {r['first_batch_s']:.2f} | {r['peak_rss_mb']:.0f} |")
            print(
                f"| {where}: large / small | {r_large['first_batch_s'] / r_small['first_batch_s']:.2f}x | "
                f"{r_large['peak_rss_mb'] / max(r_small['peak_rss_mb'], 1):.2f}x |"
            )

        print("\n## 3. Packing vs padding on length-skewed data (training, bench model)\n")
        print("| mode | packing efficiency | effective tokens/s | vs padding |\n| --- | --- | --- | --- |")
        results = {}
        for packing in (False, True):
            spec = spec_for(
                model, str(skewed), packing=packing, max_steps=15, output={"uri": str(root / f"out{packing}")}
            )
            history = train(spec, restart=True).history
            speeds = sorted(h["train/tokens_per_second"] for h in history[3:])
            results[packing] = (speeds[len(speeds) // 2], history[-1].get("data/packing_efficiency"))
        base = results[False][0]
        for packing, (speed, efficiency) in results.items():
            label = "packing" if packing else "padding"
            shown = f"{efficiency:.1%}" if efficiency is not None else "n/a"
            print(f"| {label} | {shown} | {speed:.0f} | {speed / base:.2f}x |")
        server.stop()


if __name__ == "__main__":
    main()
