"""End-to-end bench: one epoch of ftjob against TRL's SFTTrainer and the common padding recipe, on the
same machine, model and data, each system in its own fresh process (see bench/systems.py).

For each model size, precision and system it measures the wall time of the whole process, the time
to the end of the first optimizer step, real (non-padding) tokens/s, model FLOPs utilization against
the matmul FLOP/s this machine reaches in the same run, peak memory (RSS over the process tree; on a
GPU also torch's peak allocated) and the final train loss, and checks that every system trained on
the same number of tokens. Prints a table with ratios against ftjob, writes JSON with --json, and
appends the table to bench/RESULTS.md unless --no-record.

    .venv/bin/python -m bench                 # CPU: the ~10M model, bf16 (where the CPU has it) and fp32
    python -m bench --device cuda             # GPU: 0.5B (Qwen2.5 shape) and 1B (Llama 3.2 shape), bf16,
                                              # and ftjob-qlora too
    [--size tiny|small|0.5b|1b[,...]] [--rows 1200] [--precisions bf16,fp32] [--rounds 1]
    [--systems ftjob,ftjob-qlora,trl,padding] [--micro-batch 4] [--gradient-checkpointing]
    [--json FILE] [--no-record] [--note TEXT]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import tree_peak_mb
from bench.systems import create_tracking_store, ftjob_measures, ftjob_spec
from bench.workload import MAX_SEQ_LEN, SIZES, build_workspace

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("ftjob", "ftjob-qlora", "trl", "padding")
SAMPLE_SECONDS = 0.2
VERSIONS = ("torch", "transformers", "peft", "accelerate", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--size", help="comma-separated, of " + ", ".join(SIZES) + " (small; 0.5b,1b on cuda)"
    )
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument(
        "--precisions", help="comma-separated bf16, fp32 (both where the CPU has bf16; bf16 on cuda)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each system; the fastest is reported")
    parser.add_argument("--systems", help="comma-separated (ftjob,trl,padding; on cuda ftjob-qlora too)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="in every system (off by default, as in ftjob)"
    )
    parser.add_argument("--json", type=Path, help="write every round's measures here")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument(
        "--note", default="", help="a line recorded with the results (e.g. the machine's load)"
    )
    args = parser.parse_args(argv)
    args.size = (args.size or ("0.5b,1b" if args.device == "cuda" else "small")).split(",")
    args.precisions = (args.precisions or default_precisions(args.device)).split(",")
    args.systems = (args.systems or default_systems(args.device)).split(",")
    for name, values, allowed in (
        ("--size", args.size, SIZES),
        ("--precisions", args.precisions, ("bf16", "fp32")),
        ("--systems", args.systems, SYSTEMS),
    ):
        if unknown := set(values) - set(allowed):
            parser.error(f"{name}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")
    if "trl" in args.systems and importlib.util.find_spec("trl") is None:
        parser.error(
            "trl is not installed: pip install -e '.[bench]', or leave it out with --systems ftjob,padding"
        )
    return args


def default_systems(device: str) -> str:
    """ftjob-qlora on GPUs only: bitsandbytes' 4-bit kernels on CPUs are a fallback, not a fast path."""
    return ",".join(s for s in SYSTEMS if device == "cuda" or s != "ftjob-qlora")


def default_precisions(device: str) -> str:
    if device == "cuda":
        return "bf16"
    from job.accelerator import cpu_supports_bf16

    return "bf16,fp32" if cpu_supports_bf16() else "fp32"


class SystemFailed(Exception):
    """A system's process exited non-zero; the others still run and are reported."""


def run_measured(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float, str]:
    """Run command to its end, sampling the peak RSS of its process tree.
    Returns (started, ended) as epoch seconds, the peak in MiB, and its output (stdout and stderr).
    Raises SystemFailed with the end of its output if it fails."""
    log = cwd / "output.log"
    with open(log, "w") as out:
        started = time.time()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0.0
        while True:
            peak = max(peak, tree_peak_mb(process.pid))
            try:
                process.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
        ended = time.time()
    output = log.read_text()
    if process.returncode:
        raise SystemFailed(f"{shlex.join(command)} failed with exit {process.returncode}:\n{output[-4000:]}")
    return started, ended, peak, output


def run_environment(device: str) -> dict[str, str]:
    """child_environment() for a training run on `device`: offline, and on a CPU no GPU visible."""
    env = {**child_environment(), "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def child_environment() -> dict[str, str]:
    """This environment, with the repository first on PYTHONPATH (what was there stays, after it)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_system(system: str, job: dict, workdir: Path) -> dict:
    """One fresh process of system training one epoch; its measures."""
    run_dir = workdir / f"{system}-{job['precision']}-{job['round']}"
    run_dir.mkdir(parents=True)
    env = run_environment(job["device"])
    if system.startswith("ftjob"):
        tracking_uri, experiment = tracking_store(workdir), run_dir.name
        env.update(
            MLFLOW_TRACKING_URI=tracking_uri,
            FTJOB_SPOOL_DIR=str(run_dir / "spool"),
            FTJOB_CACHE=str(run_dir / "cache"),
        )
        spec = run_dir / "spec.json"
        spec.write_text(json.dumps(ftjob_spec(job, run_dir / "out", experiment, system == "ftjob-qlora")))
        started, ended, peak_rss, _ = run_measured(
            [sys.executable, "-m", "job", "run", str(spec)], run_dir, env
        )
        measures = ftjob_measures(run_dir / "out", tracking_uri, experiment, job["device"])
    else:
        job = {**job, "output": str(run_dir / "out")}
        command = [sys.executable, "-m", "bench.systems", system, json.dumps(job)]
        started, ended, peak_rss, output = run_measured(command, run_dir, env)
        measures = json.loads(output.rsplit("RESULT ", 1)[1].splitlines()[0])
    steps, loop_s = measures["steps"], measures["last_step_end"] - measures["first_step_end"]
    return {
        "system": system,
        "precision": job["precision"],
        "round": job["round"],
        "wall_s": ended - started,
        "first_step_s": measures["first_step_end"] - started,
        "loop_s": loop_s,
        "steps": steps,
        "examples": measures["examples"],
        "real_tokens": measures["real_tokens"],
        # steps 2..N, whose time loop_s is; their tokens estimated as the average step's
        "tokens_per_s": measures["real_tokens"] * (steps - 1) / steps / loop_s if steps > 1 else None,
        "peak_rss_mib": peak_rss,
        "peak_gpu_mib": measures["peak_gpu_mib"],
        "final_loss": measures["final_loss"],
    }


def tracking_store(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def calibrate(model_dir: str, device: str, precisions: list[str], workdir: Path) -> dict:
    command = [sys.executable, "-m", "bench.workload", "calibrate", model_dir, "--device", device]
    command += ["--precisions", ",".join(precisions)]
    env = child_environment()
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemFailed(f"calibration failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def bench_size(size: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Every system at every precision on one model size: the workspace, calibration and all rounds."""
    workspace = build_workspace(workdir, size, args.rows)
    try:
        calibration = calibrate(workspace["model"], args.device, args.precisions, workdir)
    except SystemFailed as error:
        sys.exit(str(error))
    if any(system.startswith("ftjob") for system in args.systems):
        create_tracking_store(tracking_store(workdir))
    runs, failed = [], []
    for precision in args.precisions:
        for round_ in range(1, args.rounds + 1):
            for system in args.systems:
                job = {**workspace, "device": args.device, "precision": precision, "round": round_}
                job |= {
                    "micro_batch": args.micro_batch,
                    "gradient_checkpointing": args.gradient_checkpointing,
                }
                try:
                    result = run_system(system, job, workdir)
                except SystemFailed as error:
                    print(f"  {size} {precision} round {round_} {system}: FAILED\n{error}", file=sys.stderr)
                    failed.append(f"{size} {precision} round {round_} {system}")
                    continue
                runs.append({"size": size, **result})
                print(
                    f"  {size} {precision} round {round_} {system}: {result['wall_s']:.1f} s", file=sys.stderr
                )
    # The peak measured again after the runs, the higher one kept: on a shared machine one second of
    # matmuls can meet a busy moment, and a low peak would overstate every MFU.
    try:
        after = calibrate(workspace["model"], args.device, args.precisions, workdir)["matmul_flops"]
        calibration["matmul_flops"] = {p: max(f, after[p]) for p, f in calibration["matmul_flops"].items()}
    except SystemFailed as error:
        print(f"the peak measured before the runs stands: {error}", file=sys.stderr)
    for run in runs:
        speed, peak = run["tokens_per_s"], calibration["matmul_flops"][run["precision"]]
        run["mfu"] = calibration["flops_per_token"] * speed / peak if speed else None
    return {"size": size, "workspace": workspace, "calibration": calibration, "runs": runs, "failed": failed}


def best_runs(sizes: list[dict]) -> list[dict]:
    """The fastest round (by wall time) of each size, precision and system, in run order."""
    best: dict[tuple, dict] = {}
    for run in (run for size in sizes for run in size["runs"]):
        key = (run["size"], run["precision"], run["system"])
        if key not in best or run["wall_s"] < best[key]["wall_s"]:
            best[key] = run
    return list(best.values())


def token_mismatches(sizes: list[dict]) -> list[str]:
    return [
        f"{run['size']} {run['precision']} {run['system']}: {run['real_tokens']} tokens, "
        f"{size['workspace']['tokens']} expected"
        for size in sizes
        for run in size["runs"]
        if run["real_tokens"] != size["workspace"]["tokens"]
    ]


def table(runs: list[dict], gpu: bool) -> str:
    """Markdown table; ratios are each system's value over ftjob's (same size and precision)."""

    def number(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    def ratio(run: dict, key: str) -> str:
        base = ftjob.get((run["size"], run["precision"]), {}).get(key)
        return f"{run[key] / base:.2f}x" if base and run[key] else "n/a"

    ftjob = {(r["size"], r["precision"]): r for r in runs if r["system"] == "ftjob"}
    header = ["size", "precision", "system", "wall s", "÷ ftjob", "first step s", "steps", "real tokens"]
    header += ["tokens/s", "÷ ftjob", "MFU", "peak RSS MiB", "÷ ftjob"]
    header += ["peak GPU MiB", "÷ ftjob"] if gpu else []
    header += ["final loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in runs:
        cells = [r["size"], r["precision"], r["system"], f"{r['wall_s']:.1f}", ratio(r, "wall_s")]
        cells += [f"{r['first_step_s']:.1f}", str(r["steps"]), str(r["real_tokens"])]
        cells += [number(r["tokens_per_s"], ".0f"), ratio(r, "tokens_per_s"), number(r["mfu"], ".1%")]
        cells += [f"{r['peak_rss_mib']:.0f}", ratio(r, "peak_rss_mib")]
        cells += [number(r["peak_gpu_mib"], ".0f"), ratio(r, "peak_gpu_mib")] if gpu else []
        cells += [f"{r['final_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(device: str, sizes: list[dict]) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "cpu",
    )
    import psutil

    where = f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if device == "cuda":
        where = f"{sizes[0]['calibration']['device_name']}; host {where}"
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in VERSIONS if importlib.util.find_spec(name)
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{where}; {versions}; load average at the end {load}"


def ftjob_revision() -> str:
    """The commit ftjob runs from, and whether job/ differs from it (a bench of uncommitted code says so)."""
    try:
        commit, changes = (
            subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
            for args in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "job"])
        )
    except OSError:  # no git here
        commit, changes = "", ""
    if not commit:
        return "ftjob outside a git checkout"
    return f"ftjob {commit}" + (" with uncommitted changes in job/" if changes else "")


def record(report: dict, text: str) -> None:
    """Append the run to bench/RESULTS.md."""
    sizes = "; ".join(
        f"{s['size']}: {s['calibration']['parameters'] / 1e6:.1f}M parameters "
        f"({s['calibration']['trainable_parameters'] / 1e6:.2f}M trainable), {s['workspace']['rows']} rows, "
        f"{s['workspace']['tokens']} tokens; matmul peak (the higher of a measure before and after the runs) "
        + ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in s["calibration"]["matmul_flops"].items())
        for s in report["sizes"]
    )
    note = f"\n{report['note']}\n" if report["note"] else ""
    if report["failed"]:
        note += f"\nFailed, so not in the table: {', '.join(report['failed'])}.\n"
    entry = f"""
## End to end: ftjob vs TRL SFTTrainer vs padding (`bench/__main__.py`), {report["date"]}

Command: `{report["command"]}` ({report["ftjob"]})
Machine: {report["machine"]}.
Workload: {sizes}; LoRA r16 all-linear, one epoch, max_seq_len {MAX_SEQ_LEN}, micro batch {report["micro_batch"]};
gradient checkpointing {"on" if report["gradient_checkpointing"] else "off"}; each system in a fresh process,
fastest of {report["rounds"]} round(s) by wall time. ftjob-qlora: ftjob with the base model quantized to 4 bits.
{note}
{text}

Wall: process start to exit. First step: process start to the end of optimizer step 1. tokens/s: real
(non-padding) tokens of steps 2..N over their time. MFU: model FLOPs per token (ftjob's count) x tokens/s
over the matmul peak above (real tokens only, so padding's wasted work is not counted). Peak RSS: summed
over the process tree, sampled every {SAMPLE_SECONDS} s. ÷ ftjob: the system's value over ftjob's.
"""
    with open(REPO / "bench" / "RESULTS.md", "a") as f:
        f.write(entry)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    revision = ftjob_revision()  # before the runs: others may change the tree meanwhile
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    with tempfile.TemporaryDirectory(prefix="ftjob-bench-") as tmp:
        sizes = [bench_size(size, args, Path(tmp) / size) for size in args.size]
    runs = best_runs(sizes)
    text = table(runs, gpu=args.device == "cuda")
    print(text)
    report = {
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "ftjob": revision,
        "machine": machine(args.device, sizes),
        "note": args.note,
        "rounds": args.rounds,
        "micro_batch": args.micro_batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "sizes": sizes,
        "best": runs,
        "failed": [run for size in sizes for run in size["failed"]],
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if mismatches := token_mismatches(sizes):
        sys.exit("the systems did not train on the same tokens:\n" + "\n".join(mismatches))
    if not args.no_record:
        record(report, text)
    if report["failed"]:
        sys.exit("failed (their output is above; the table holds the others): " + ", ".join(report["failed"]))


if __name__ == "__main__":
    main()
