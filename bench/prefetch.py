"""The data thread (data.prefetch) against micro-batches made on the training thread, end to end.

Trains the end-to-end bench's workload and spec (bench/systems.py ftjob_spec: the model and rows of
`python -m bench`, packed rows of 512 tokens, LoRA r16, float32, one epoch) with `ftjob run` in a fresh process per run, data.prefetch
2 and 0 alternating over the rounds, and reads each run's report.json: the wall time, the seconds the
loop waited for data (the report's `data` phase: with prefetch, waiting for the data thread), the
steps' seconds and tokens/s.

    .venv/bin/python -m bench.prefetch [--device cpu] [--size small] [--rows 1200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import ftjob_revision, run_environment
from bench.systems import ftjob_spec
from bench.workload import MAX_SEQ_LEN, build_workspace

DEPTHS = (2, 0)


def run(workspace: dict, depth: int, device: str, micro_batch: int, output: Path) -> dict:
    job = {"device": device, "precision": "fp32", "micro_batch": micro_batch, "gradient_checkpointing": False}
    spec = ftjob_spec(job | workspace, output, "prefetch")  # the end-to-end bench's ftjob run
    spec["data"]["prefetch"] = depth
    spec["train"] |= {"log_every": 1000, "eval_every": 0}
    spec["tracking"] = {"enabled": False}
    spec_file = output.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    env = run_environment(device)
    subprocess.run(
        [sys.executable, "-m", "job", "run", str(spec_file)], env=env, check=True, capture_output=True
    )
    report = json.loads((output / "report.json").read_text())
    phases = dict(report["phases"])
    return {
        "wall_s": report["wall_seconds"],
        "data_s": phases["data"],
        "steps_s": phases["steps"],
        "tokens_per_second": report["tokens_per_second"],
        "tokens": report["tokens_trained"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", default="small")
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftjob-bench-prefetch-") as tmp:
        root = Path(tmp)
        workspace = build_workspace(root / "workspace", args.size, args.rows)
        runs: dict[int, list[dict]] = {depth: [] for depth in DEPTHS}
        for round_ in range(args.rounds):
            for depth in DEPTHS:
                result = run(workspace, depth, args.device, args.micro_batch, root / f"p{depth}-{round_}")
                runs[depth].append(result)
                print(f"round {round_ + 1}, prefetch {depth}: {json.dumps(result)}", file=sys.stderr)
    print(f"ftjob {ftjob_revision()}; {args.size} model, {workspace['rows']} rows, {args.device}, micro batch "
          f"{args.micro_batch} x {MAX_SEQ_LEN}, {args.rounds} rounds; median of the rounds\n")  # fmt: skip
    print("| data.prefetch | wall s | waiting for data s | steps s | tokens/s | wall ÷ prefetch 0 |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = statistics.median(r["wall_s"] for r in runs[0])
    for depth in DEPTHS:
        median = {key: statistics.median(r[key] for r in runs[depth]) for key in runs[depth][0]}
        print(
            f"| {depth} | {median['wall_s']:.1f} | {median['data_s']:.2f} | {median['steps_s']:.1f} | "
            f"{median['tokens_per_second']:.0f} | {median['wall_s'] / base:.3f}x |"
        )


if __name__ == "__main__":
    main()
