"""Host memory of train.distributed fsdp against ddp: a full fine-tune of a ~100M-parameter Llama built
from a config (random weights) on this node's CPUs, each run a fresh `ftjob run --nproc-per-node N`. For
each run: the peak while the model loads (up to the loop's first line) and over the whole run, as the
sum of each process's own peak RSS (VmHWM) over the process tree, the launcher included (a sum of
peaks: at most what the node held at once; file pages of the model that several processes map count
once for each).
Also fsdp under other C allocator settings than ftjob's for it (job/model/prepare.py: freed blocks up to
4 MiB kept): up to 32 MiB kept, as under ddp, and glibc's defaults (a setting in the environment
stands, job/startup.py: keep_freed_memory).

    .venv/bin/python -m bench.fsdp_memory [--steps 8] [--layers 18] [--runs ddp-2,fsdp-2,...] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import tree_peak_mb
from bench.workspace import workspace

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SECONDS = 0.1
# name -> (train.distributed, processes, environment): the allocator settings ftjob leaves alone when set
RUNS = {
    "ddp-1": ("ddp", 1, {}),
    "ddp-2": ("ddp", 2, {}),
    "fsdp-1": ("fsdp", 1, {}),
    "fsdp-2": ("fsdp", 2, {}),
    "fsdp-2-kept-32m": (
        "fsdp",
        2,
        {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)},
    ),
    "fsdp-2-glibc-default": ("fsdp", 2, {"MALLOC_TRIM_THRESHOLD_": "131072"}),
}


def spec(model: Path, data: Path, distributed: str, steps: int, output: Path) -> dict:
    return {
        "model": {"source": str(model)},
        "adapter": {"method": "full"},
        "data": {"train": [str(data)], "max_seq_len": 128},
        "train": {"max_steps": steps, "micro_batch_size": 2, "distributed": distributed,
                  "mixed_precision": "no", "checkpoint_every": 0, "log_every": 1},
        "tracking": {"enabled": False},
        "output": {"uri": str(output)},
    }  # fmt: skip


def measure(name: str, model: Path, data: Path, steps: int, root: Path) -> dict:
    """One fresh run: its peaks in MiB while loading (until the loop's first line) and in all, its wall time."""
    distributed, processes, environment = RUNS[name]
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec(model, data, distributed, steps, run_dir / "out")))
    command = [sys.executable, "-m", "job", "run", "spec.json", "--nproc-per-node", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **environment}
    log = run_dir / "output.log"
    with open(log, "w") as out:
        started = time.time()
        process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
        load_peak = peak = 0.0
        while process.poll() is None:
            peak = max(peak, tree_peak_mb(process.pid))
            if not load_peak and "training " in log.read_text():  # the loop's first line: loaded
                load_peak = peak
            time.sleep(SAMPLE_SECONDS)
        wall = time.time() - started
    if process.returncode:
        sys.exit(f"{name} failed with exit {process.returncode}:\n{log.read_text()[-4000:]}")
    history = json.loads((run_dir / "out" / "adapter" / "metrics.json").read_text())["history"]
    speeds = [h["train/tokens_per_second"] for h in history[1:]]  # the first step warms up
    return {"run": name, "load_peak_mib": load_peak, "peak_mib": peak, "wall_s": wall,
            "tokens_per_s": statistics.median(speeds), "final_loss": history[-1]["train/loss"]}  # fmt: skip


def table(results: list[dict]) -> str:
    baseline = {r["run"]: r for r in results}
    lines = [
        "| run | processes | load peak MiB | peak MiB | peak ÷ ddp-2 | tokens/s (median) | wall s | final loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ddp = baseline.get("ddp-2")
        ratio = f"{r['peak_mib'] / ddp['peak_mib']:.2f}" if ddp else "n/a"
        lines.append(
            f"| {r['run']} | {RUNS[r['run']][1]} | {r['load_peak_mib']:.0f} | {r['peak_mib']:.0f} | {ratio} "
            f"| {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def parameter_count(model: Path) -> int:
    from safetensors.torch import load_file

    return sum(tensor.numel() for tensor in load_file(model / "model.safetensors").values())


def build(root: Path, layers: int) -> tuple[Path, Path]:
    """(model, train.jsonl): the bench model at hidden 768 and `layers` layers (18: ~97M parameters)."""
    return workspace(root, count=400, instruction_words=(20, 60), hidden_size=768, layers=layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fsdp_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of " + ", ".join(RUNS))
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ftjob-bench-fsdp-") as tmp:
        model, data = build(Path(tmp), args.layers)
        parameters = parameter_count(model)
        results = []
        for name in args.runs.split(","):
            results.append(measure(name, model, data, args.steps, Path(tmp)))
            print(f"  {name}: {results[-1]}", file=sys.stderr)
    text = table(results)
    print(text)
    if not args.no_record:
        command = "python -m bench.fsdp_memory " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(
                f"\n## FSDP against DDP: host memory of a full fine-tune (`bench/fsdp_memory.py`), "
                f"{datetime.date.today()}\n\nCommand: `{command.strip()}`. A Llama of {parameters / 1e6:.0f}M "
                f"parameters (hidden 768, {args.layers} layers, random weights), full fine-tune, float32, "
                f"{args.steps} steps of micro batch 2 x 128 tokens, CPU, gloo.\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
