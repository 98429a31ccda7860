"""train.distributed fsdp against ddp on GPUs: a full fine-tune of bench/workload.py's Llama-3.2-1B shape
(random weights), each run a fresh `ftjob run --nproc-per-node N` with the same data and seed.

On one GPU: ddp and fsdp train to the same per-step losses (within TOLERANCE, relative), and their peak
memory. Where the node has N >= 2 GPUs: the same on N under NCCL, where fsdp's weights, gradients and
AdamW state per GPU are 1/N of ddp's. For each run: the losses, the busiest rank's peak memory as ftjob
logs it (`train/peak_memory_gib`, job/metrics.py: torch.cuda.max_memory_allocated, on CPUs peak RSS),
each GPU's peak memory in use as nvidia-smi reads it (the allocator's cache, the CUDA context and NCCL's
buffers too), tokens/s and wall time. A failed or hung run is reported and the others still run (exit 1).

    python -m bench.gpu_fsdp [--steps 10] [--processes N] [--json]   (N: the GPUs, by default all)
    python -m bench.gpu_fsdp --device cpu --size tiny                (the smoke run: 2 gloo processes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import psutil

from bench.__main__ import run_environment
from bench.fsdp_memory import parameter_count
from bench.fsdp_memory import spec as memory_spec
from bench.workload import MAX_SEQ_LEN, SIZES, build_workspace

SAMPLE_SECONDS = 0.25
ROWS = 200  # the data repeats over max_steps: enough rows of under MAX_SEQ_LEN tokens, for every size
MICRO_BATCH = 4
# How far a step's loss under fsdp may be from ddp's, relative, by what the step computes in: under bf16
# ddp autocasts each op from float32 weights, fsdp computes in bf16 weights throughout (a cast, not the
# same rounding); in float32 the two differ only in the order gradients are summed.
TOLERANCE = {"bf16": 1e-2, "no": 1e-4}
STATE_BYTES_PER_PARAMETER = 16  # a full fine-tune in float32: the weight, its gradient, AdamW's two moments


def spec(model: Path, data: Path, distributed: str, steps: int, precision: str, output: Path) -> dict:
    """bench/fsdp_memory.py's full fine-tune, on bench/workload.py's packed text rows, computing in
    `precision`. log_every = steps: the peak memory is logged once, at the last step, and the host waits
    for the device only there (each step's tokens/s is still timed on the device)."""
    job = memory_spec(model, data, distributed, steps, output)
    job["data"] |= {"format": "text", "max_seq_len": MAX_SEQ_LEN, "packing": True}
    job["train"] |= {"micro_batch_size": MICRO_BATCH, "mixed_precision": precision, "log_every": steps}
    return job


def gpu_memory_used_mib() -> list[int]:
    """Each GPU's memory in use now (nvidia-smi: every process's), in MiB; [] without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    result = subprocess.run(query, capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()] if result.returncode == 0 else []


def kill_tree(pid: int) -> None:
    """The process and its descendants (the launcher's workers run in sessions of their own)."""
    with suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            with suppress(psutil.NoSuchProcess):
                process.kill()


@dataclass
class Bench:
    """What every run shares: the workspace, the steps, what they compute in, where and how long."""

    model: Path
    data: Path
    steps: int
    precision: str  # train.mixed_precision
    device: str
    root: Path
    timeout: float  # seconds a run may take before it is killed

    def measure(self, distributed: str, processes: int) -> dict:
        """One fresh run: its per-step losses, peaks, tokens/s and wall time; or its error."""
        name = f"{distributed}-{processes}"
        run_dir = self.root / name
        run_dir.mkdir(parents=True)
        job = spec(self.model, self.data, distributed, self.steps, self.precision, run_dir / "out")
        (run_dir / "spec.json").write_text(json.dumps(job))
        command = [sys.executable, "-m", "job", "run", "spec.json", "--nproc-per-node", str(processes)]
        env = run_environment(self.device)
        log = run_dir / "output.log"
        gpu_peaks: list[int] = []
        with open(log, "w") as out:
            started = time.time()
            process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
            while process.poll() is None and time.time() - started < self.timeout:
                gpu_peaks = [max(pair) for pair in zip_longest(gpu_peaks, gpu_memory_used_mib(), fillvalue=0)]
                time.sleep(SAMPLE_SECONDS)
            if process.poll() is None:
                kill_tree(process.pid)
                process.wait()
            wall = time.time() - started
        output = log.read_text()
        if process.returncode:
            error = (
                f"killed after {self.timeout:.0f} s" if wall >= self.timeout else f"exit {process.returncode}"
            )
            return {"run": name, "processes": processes, "error": error, "log_tail": output[-3000:]}
        history = json.loads((run_dir / "out" / "adapter" / "metrics.json").read_text())["history"]
        shutil.rmtree(run_dir / "out")  # the published model: 5 GB for the 1B in float32
        speeds = [h["train/tokens_per_second"] for h in history[1:]]  # the first step warms up
        return {
            "run": name,
            "processes": processes,
            "losses": [h["train/loss"] for h in history],
            "peak_gib": max(h["train/peak_memory_gib"] for h in history if "train/peak_memory_gib" in h),
            "gpu_used_peak_mib": gpu_peaks[:processes] or None,
            # else through the model's whole logits (job/loss.py: output_head), which take more memory
            "loss_chunked": "the output layer chunk by chunk" in output,
            "tokens_per_s": statistics.median(speeds),
            "wall_s": wall,
        }


def loss_difference(fsdp: dict, ddp: dict) -> float | None:
    """The largest relative difference of a step's loss under fsdp from ddp's; None where one failed."""
    if "error" in fsdp or "error" in ddp:
        return None
    if len(fsdp["losses"]) != len(ddp["losses"]):
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(fsdp["losses"], ddp["losses"], strict=True))


def compare(results: list[dict]) -> None:
    """Each fsdp run against the ddp run on as many processes: its loss difference and memory ratio."""
    ddp = {r["processes"]: r for r in results if r["run"].startswith("ddp")}
    for run in results:
        baseline = ddp.get(run["processes"])
        if run["run"].startswith("fsdp") and baseline:
            run["loss_difference"] = loss_difference(run, baseline)
            if "error" not in run and "error" not in baseline:
                run["peak_of_ddp"] = run["peak_gib"] / baseline["peak_gib"]


def table(results: list[dict], parameters: int) -> str:
    lines = [
        "| run | loss: step 1, last | max rel. loss diff vs ddp | peak GiB, busiest rank | ÷ ddp | "
        "nvidia-smi peak MiB per GPU | state GiB per GPU | tokens/s (median) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} |" + " |" * 7)
            continue
        shards = r["processes"] if r["run"].startswith("fsdp") else 1
        state = parameters * STATE_BYTES_PER_PARAMETER / shards / 2**30
        difference = r.get("loss_difference")
        cells = [
            r["run"],
            f"{r['losses'][0]:.4f}, {r['losses'][-1]:.4f}",
            f"{difference:.2e}" if difference is not None else "",
            f"{r['peak_gib']:.2f}",
            f"{r['peak_of_ddp']:.2f}" if "peak_of_ddp" in r else "",
            " / ".join(map(str, r["gpu_used_peak_mib"])) if r["gpu_used_peak_mib"] else "n/a",
            f"{state:.3g}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures(results: list[dict], tolerance: float) -> list[str]:
    problems = [f"{r['run']} failed: {r['error']}" for r in results if "error" in r]
    for r in results:
        if (difference := r.get("loss_difference")) is not None and difference > tolerance:
            problems.append(f"{r['run']}: a step's loss is {difference:.2e} from ddp's, over {tolerance:g}")
    return problems


def device_name(device: str) -> str:
    import torch

    if device == "cpu":
        return f"cpu ({os.cpu_count()} cores), gloo"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_fsdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=list(SIZES), default="1b", help="bench/workload.py's shapes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--precision", choices=list(TOLERANCE), help="train.mixed_precision (cuda: bf16; cpu: no)"
    )
    parser.add_argument("--processes", type=int, help="of the multi-process runs (cuda: the GPUs; cpu: 2)")
    parser.add_argument("--run-timeout", type=float, default=240, help="seconds a run may take")
    parser.add_argument("--json", action="store_true", help="the results as JSON, not a table")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first step's tokens/s is left out as warm-up)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (--device cpu --size tiny runs the smoke test)")
    processes = args.processes or (torch.cuda.device_count() if args.device == "cuda" else 2)
    precision = args.precision or ("bf16" if args.device == "cuda" else "no")
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="ftjob-bench-gpu-fsdp-") as tmp:
        workspace = build_workspace(Path(tmp), args.size, ROWS)
        model, data = Path(workspace["model"]), Path(workspace["data"])
        parameters = parameter_count(model)
        print(
            f"workspace built in {time.time() - began:.0f} s: {parameters / 1e6:.1f}M parameters",
            file=sys.stderr,
        )
        bench = Bench(model, data, args.steps, precision, args.device, Path(tmp), args.run_timeout)
        results = []
        for count in [1, processes] if processes > 1 else [1]:
            for distributed in ("ddp", "fsdp"):
                result = bench.measure(distributed, count)
                results.append(result)
                shown = {key: value for key, value in result.items() if key != "log_tail"}
                print(f"  {json.dumps(shown)}", file=sys.stderr, flush=True)
                if "log_tail" in result:
                    print(result["log_tail"], file=sys.stderr, flush=True)
    compare(results)
    device = device_name(args.device)
    tolerance = TOLERANCE[precision]
    if args.json:
        print(json.dumps({"device": device, "size": args.size, "parameters": parameters, "steps": args.steps,
                          "precision": precision, "tolerance": tolerance, "results": results}, indent=2))  # fmt: skip
    else:
        peak = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS"
        print(f"{device}; {args.size}: {parameters / 1e6:.1f}M parameters, full fine-tune, {args.steps} steps of "
              f"micro batch {MICRO_BATCH} x {MAX_SEQ_LEN} packed tokens a process, computing in {precision}; "
              f"loss tolerance {tolerance:g} relative; {time.time() - began:.0f} s in all. Peak: {peak}, "
              f"as ftjob logs it. State: {STATE_BYTES_PER_PARAMETER} bytes a parameter, ÷ N under fsdp "
              "(ddp-N holds DDP's gradient buckets besides: 4 bytes a parameter)\n")  # fmt: skip
        print(table(results, parameters))
    if problems := failures(results, tolerance):
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()
