"""ftjob's training step on one GPU: tokens/s, step times, MFU, peak memory and a profiler split of
ftjob's own loop (job.train.train on a spec), as it is and with each candidate change (VARIANTS), on
Llama-shaped models with random weights (bench/workload.py: 1b, 3b); then one end-to-end bench run.

Each run trains `--warmup` + `--steps` optimizer steps of packed rows (micro batch x 512 tokens, bf16
autocast over a bf16 base, LoRA r16 all-linear as bench/systems.py sets it) in a fresh process, so that
memory peaks do not mix. Measured over the steps after the warmup:
  tokens/s          real tokens over the steps' wall time (the device synchronized at both ends)
  ftjob's tokens/s  ftjob's own train/tokens_per_second: each step's time on the device (CUDA events),
                    which leaves out the host's work between steps
  step median/p90   ftjob's per-step times
  MFU               model FLOPs a token (job/metrics.py: 4N + 2N') x tokens/s over the GPU's datasheet
                    peak (job/metrics.py: gpu_peak_flops), and over the matmul peak measured here
  peak memory       torch's peak allocated and reserved over the whole process (on a CPU: peak RSS)
  warmup s          the warmup steps' wall time, first step's start to last's end (the device
                    synchronized at both ends): the compile variant's compile time is in it
The first run also profiles `--profile-steps` steps after its measured ones: the share of their time
the GPU is busy, kernels a step, and the time by kernel class (on a CPU the same over its leaf ops).

    python -m bench.gpu_step --out DIR           # GPU: 1b and 3b, then `python -m bench` on 1b
    .venv/bin/python -m bench.gpu_step --device cpu   # the tiny model on the CPU: every path, in minutes
    [--size 1b,3b] [--variants as-is,fused-lora,...] [--steps 20] [--warmup 3] [--profile-steps 3]
    [--micro-batch 16] [--rows 4000] [--budget-s 270] [--end-to-end-s 200] [--no-end-to-end]

Prints a markdown section for bench/RESULTS.md; with --out, writes it there as gpu_step.md, with
gpu_step.json, the profile's kernels (gpu_step_profile.txt) and the end-to-end run's bench_e2e.json and
bench_e2e.log, each rewritten as the runs go (a run cut off at its time limit leaves what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.__main__ import child_environment, ftjob_revision, run_environment
from bench.systems import ftjob_spec
from bench.workload import MAX_SEQ_LEN, SIZES, build_workspace, matmul_flops

VERSIONS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


def use_fused_lora(device_type: str) -> None:
    import job.model.prepare as prepare

    prepare.FUSED_LORA_WINS = prepare.FUSED_LORA_WINS | {device_type}


def keep_peft_input_cast(device_type: str) -> None:
    import job.model.prepare as prepare

    prepare.keep_input_dtype_under_autocast = lambda model: 0


@dataclass(frozen=True)
class Variant:
    what: str
    spec: dict = field(default_factory=dict)  # sections merged into the run's spec
    patch: Callable[[str], None] | None = None  # applied in the run's process, given the device type


QUANTIZED = {"model": {"quantization": "4bit"}}
# In the order they run: if the time budget runs out, the last are skipped.
VARIANTS = {
    "as-is": Variant("ftjob as it is"),
    "fused-lora": Variant(
        "the fused LoRA layer (job/model/fused_lora.py) on this device too (FUSED_LORA_WINS: CPUs alone)",
        patch=use_fused_lora,
    ),
    "qlora": Variant("the base quantized to 4 bits (NF4, bitsandbytes)", QUANTIZED),
    "qlora-gc": Variant(
        "QLoRA with gradient checkpointing", QUANTIZED | {"train": {"gradient_checkpointing": True}}
    ),
    "no-prefetch": Variant(
        "micro-batches made on the training thread between steps (data.prefetch 0; as-is: 2 steps ahead)",
        {"data": {"prefetch": 0}},
    ),
    "compile": Variant(
        "train.compile: each decoder layer compiled (job/model/compile.py), its compile in the warmup steps",
        {"train": {"compile": True}},
    ),
    "peft-input-cast": Variant(
        "peft's float32 copy of each adapter layer's input kept (no keep_input_dtype_under_autocast)",
        patch=keep_peft_input_cast,
    ),
}
DEFAULT_VARIANTS = {"3b": ("as-is", "fused-lora")}  # the other sizes: all
TARGET_MFU = {"1b": 0.30, "3b": 0.38}  # LoRA's, over the datasheet peak
# QLoRA's: a peak this much below LoRA's, at this share of its tokens/s or more
QLORA_TARGET_SAVED_GIB, QLORA_TARGET_SPEED = 1.0, 0.85

DEFAULTS = {
    "cuda": {"size": "1b,3b", "steps": 20, "warmup": 3, "profile_steps": 3, "micro_batch": 16, "rows": 4000},
    "cpu": {"size": "tiny", "steps": 3, "warmup": 1, "profile_steps": 2, "micro_batch": 2, "rows": 200},
}
END_TO_END = {  # the end-to-end bench's workload: the 1b of the H200 runs in bench/RESULTS.md
    "cuda": ["--size", "1b", "--rows", "4000", "--micro-batch", "16"],
    "cpu": ["--size", "tiny", "--rows", "100", "--micro-batch", "4"],
}

# The kernel classes of the profile split: the first whose pattern is in the kernel's name (on a CPU, the
# op's), case aside.
KERNEL_CLASSES = [
    ("4-bit (bitsandbytes)", r"4bit|dequant|quantize|bnb"),
    ("attention", r"flash|fmha|attention"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|aten::(addmm|mm|bmm)$"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("norm, softmax, loss", r"norm|softmax|logsumexp|cross_entropy|nll"),
    ("copy, cast, fill, index", r"copy|cast|memcpy|memset|fill|index|gather|scatter|aten::cat$"),
    ("reduction", r"reduce|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|silu|dropout|where|exp|pow|rsqrt|neg"),
]


# ---------------------------------------------------------------------------------------------
# A run, in its own process


class StepProbe:
    """Wraps ftjob's OptimizerStep for one run: the wall time of the warmup steps and of the measured
    steps (the device synchronized at both ends, so the host's work between steps counts) and a
    profile of the steps after them."""

    def __init__(self, device: str, warmup: int, steps: int, profile_steps: int):
        self.cuda = device == "cuda"
        self.measured_from, self.measured_to = warmup, warmup + steps  # after these many steps
        self.profiled_to = self.measured_to + profile_steps
        self.calls, self.started, self.began = 0, 0.0, 0.0
        self.warmup_seconds, self.wall_seconds = None, None
        self.profiler, self.profile_error = None, None

    def __enter__(self) -> StepProbe:
        from job.step import OptimizerStep

        self.original, probe = OptimizerStep.__call__, self

        def probed(step, window):
            if probe.calls == 0:
                probe.started = probe.synchronized_time()
            metrics = probe.original(step, window)
            probe.stepped()
            return metrics

        OptimizerStep.__call__ = probed
        return self

    def __exit__(self, *exc) -> None:
        from job.step import OptimizerStep

        OptimizerStep.__call__ = self.original

    def synchronized_time(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stepped(self) -> None:
        self.calls += 1
        if self.calls == self.measured_from:
            self.began = self.synchronized_time()
            self.warmup_seconds = self.began - self.started
        if self.calls == self.measured_to:
            self.wall_seconds = self.synchronized_time() - self.began
            if self.profiled_to > self.measured_to:
                self.profiled(self.start_profiler)
        if self.calls == self.profiled_to and self.profiler is not None:
            self.synchronized_time()
            self.profiled(self.profiler.stop)

    def start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        # Only the device's activity on a GPU: recording the host's ops would slow the host, and the
        # GPU's busy share with it.
        self.profiler = profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU])
        self.profiler.start()

    def profiled(self, action: Callable[[], object]) -> None:
        """action on the profiler; one that fails (CUPTI, say) costs the profile split, not the run."""
        try:
            action()
        except Exception as error:
            self.profiler, self.profile_error = None, repr(error)

    def device_work(self) -> list[tuple[str, float, float]]:
        """(name, start µs, end µs) of the profiled work on the device: CUDA's kernels, copies and
        fills; on a CPU, the ops that call no other op but to allocate or view tensors."""
        from torch.autograd import DeviceType

        if self.cuda:
            events = [e for e in self.profiler.events() if e.device_type == DeviceType.CUDA]
        else:
            events = [
                e
                for e in self.profiler.events()
                if e.device_type == DeviceType.CPU
                and all(
                    re.search(r"empty|view|as_strided|expand|resolve_conj", child.name)
                    for child in e.cpu_children
                )
            ]
        return [(e.name, e.time_range.start, e.time_range.end) for e in events]


def run_one(task: dict) -> dict:
    """ftjob's train() on the task's spec, with its variant's change, in this fresh process: the
    measured steps' tokens and times, the peaks and the profile split."""
    from job.startup import leave_out_bitsandbytes, use_the_cpus_given

    use_the_cpus_given()  # as `ftjob run` starts
    if not task["spec"]["model"].get("quantization"):
        leave_out_bitsandbytes()
    import torch

    from job.accelerator import make_accelerator
    from job.metrics import peak_rss_bytes
    from job.spec import validate_spec
    from job.train import train

    variant = VARIANTS[task["variant"]]
    if variant.patch:
        variant.patch(task["device"])
    spec = validate_spec(task["spec"])
    warmup, steps = task["warmup"], task["steps"]
    with StepProbe(task["device"], warmup, steps, task["profile_steps"]) as probe:
        history = train(spec, make_accelerator(spec.train)).history
    measured = [entry for entry in history if warmup < entry["step"] <= warmup + steps]
    cuda = task["device"] == "cuda"
    result = {
        "steps": [
            {"tokens": e["train/tokens"], "seconds": e["train/tokens"] / e["train/tokens_per_second"]}
            for e in measured
        ],
        "warmup_seconds": probe.warmup_seconds,
        "wall_seconds": probe.wall_seconds,
        "final_loss": history[-1]["train/loss"],
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "profile": None,
    }
    if probe.profiler is not None:
        probe.profiled(lambda: write_profile(probe.device_work(), task, result))
    if probe.profile_error:
        result["profile"] = {"error": probe.profile_error}
    return result


def write_profile(work: list[tuple[str, float, float]], task: dict, result: dict) -> None:
    result["profile"] = kernel_split(work, task["profile_steps"])
    Path(task["profile_file"]).write_text(kernel_listing(work, task["profile_steps"]))


def kernel_class(name: str) -> str:
    return next((c for c, pattern in KERNEL_CLASSES if re.search(pattern, name, re.IGNORECASE)), "other")


def is_kernel(name: str) -> bool:
    return not name.startswith(("Memcpy", "Memset"))


def busy_microseconds(work: list[tuple[str, float, float]]) -> float:
    """The time at least one piece of work runs (overlapping streams counted once)."""
    busy, reached = 0.0, float("-inf")
    for _, start, end in sorted(work, key=lambda w: w[1]):
        if end > reached:
            busy += end - max(start, reached)
            reached = end
    return busy


def by_name(work: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """name: [total µs, count]."""
    totals: dict[str, list[float]] = {}
    for name, start, end in work:
        total = totals.setdefault(name, [0.0, 0])
        total[0] += end - start
        total[1] += 1
    return totals


def kernel_split(work: list[tuple[str, float, float]], steps: int) -> dict:
    """The profiled steps' device work: the share of their span the device is busy, kernels a step,
    and the time by kernel class and by kernel."""
    if not work:
        return {"error": "the profiler recorded no device work"}
    span = max(end for _, _, end in work) - min(start for _, start, _ in work)
    total = sum(end - start for _, start, end in work)
    classes: dict[str, list[float]] = {}
    for name, (time_us, count) in by_name(work).items():
        entry = classes.setdefault(kernel_class(name), [0.0, 0])
        entry[0] += time_us
        entry[1] += count
    top = sorted(by_name(work).items(), key=lambda item: -item[1][0])[:8]
    return {
        "busy": busy_microseconds(work) / span,
        "step_ms": span / steps / 1000,
        "kernels_per_step": sum(is_kernel(name) for name, _, _ in work) / steps,
        "classes": [
            {"class": name, "share": time_us / total, "per_step": count / steps}
            for name, (time_us, count) in sorted(classes.items(), key=lambda item: -item[1][0])
        ],
        "top": [
            {"name": name, "class": kernel_class(name), "share": time_us / total, "per_step": count / steps}
            for name, (time_us, count) in top
        ],
    }


def kernel_listing(work: list[tuple[str, float, float]], steps: int) -> str:
    """Every kernel of the profiled steps by total time: µs a step, calls a step, class, name."""
    lines = ["us/step  calls/step  class  name"]
    for name, (time_us, count) in sorted(by_name(work).items(), key=lambda item: -item[1][0]):
        lines.append(f"{time_us / steps:9.1f}  {count / steps:6.1f}  {kernel_class(name)}  {name}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The runs, from the parent process


def run_to_end(command: list[str], log: Path, env: dict[str, str], timeout: float) -> int | None:
    """Run command in its own process group with its output in log; its exit code, or None when it
    was killed (with everything it started) after `timeout` seconds."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def run_spec(workspace: dict, variant: str, settings: dict, output: Path) -> dict:
    """The run's spec: the end-to-end bench's (bench/systems.py) for warmup + steps (+ profiled steps)
    optimizer steps, logged and checkpointed only at the end, without tracking, with the variant's sections."""
    job = {**workspace, **settings, "round": 1, "gradient_checkpointing": False}
    spec = ftjob_spec(job, output, experiment="gpu-step")
    total_steps = settings["warmup"] + settings["steps"] + settings["profile_steps"]
    spec["train"] = {k: v for k, v in spec["train"].items() if k != "epochs"}
    spec["train"] |= {"max_steps": total_steps, "log_every": total_steps, "checkpoint_every": 0}
    spec["tracking"] = {"enabled": False}
    for section, values in VARIANTS[variant].spec.items():
        spec[section] = {**spec[section], **values}
    return spec


def size_workload(size: str, settings: dict, workdir: Path) -> dict:
    """The size's model and data (bench/workload.py), the model built on the bench's device (a 3B
    model's random init takes minutes on a CPU), and its parameters and model FLOPs a token."""
    import torch

    from job.metrics import flops_per_token
    from job.model.adapter import apply_adapter, count_parameters
    from job.model.loading import model_on_meta
    from job.spec import validate_spec

    with torch.device(settings["device"]):
        workspace = build_workspace(workdir, size, settings["rows"])
    gc.collect()
    if settings["device"] == "cuda":
        torch.cuda.empty_cache()  # the runs' processes get the whole GPU
    spec = validate_spec(run_spec(workspace, "as-is", {**settings, "profile_steps": 0}, workdir / "unused"))
    on_meta = model_on_meta(Path(workspace["model"]), spec.model, torch.device("cpu"))
    trainable, total = count_parameters(apply_adapter(on_meta, spec.adapter, False, False))
    return {
        **workspace,
        "parameters": total,
        "trainable_parameters": trainable,
        "flops_per_token": flops_per_token(total, trainable),
    }


def measure(size: str, variant: str, workload: dict, settings: dict, workdir: Path, timeout: float) -> dict:
    """One run in a fresh process, summarized; a failed one with the end of its output."""
    run_dir = workdir / f"{size}-{variant}"
    run_dir.mkdir(parents=True)
    profile_steps = settings["profile_steps"]
    task = {
        "size": size,
        "variant": variant,
        "device": settings["device"],
        "spec": run_spec(workload, variant, settings, run_dir / "out"),
        "warmup": settings["warmup"],
        "steps": settings["steps"],
        "profile_steps": profile_steps,
        "profile_file": str(settings["profile_file"]),
    }
    (run_dir / "task.json").write_text(json.dumps(task))
    env = run_environment(settings["device"])
    env |= {"FTJOB_SPOOL_DIR": str(run_dir / "spool"), "FTJOB_CACHE": str(run_dir / "cache")}
    command = [sys.executable, "-m", "bench.gpu_step", "--one", str(run_dir / "task.json")]
    started = time.monotonic()
    code = run_to_end(command, run_dir / "output.log", env, timeout)
    run = {
        "size": size,
        "variant": variant,
        "run_s": time.monotonic() - started,
        "profiled": profile_steps > 0,
    }
    output = (run_dir / "output.log").read_text()
    if code != 0:
        why = f"killed after {timeout:.0f} s" if code is None else f"exit {code}"
        print(f"{size} {variant}: FAILED ({why})\n{output[-4000:]}", file=sys.stderr)
        return run | {"error": why, "output_tail": output[-3000:]}
    result = json.loads(output.rsplit("RESULT ", 1)[1].splitlines()[0])
    if len(result["steps"]) < settings["steps"]:
        return run | {"error": f"{len(result['steps'])} measured steps, {settings['steps']} asked"}
    return run | summary(result, workload, settings["peaks"])


def summary(result: dict, workload: dict, peaks: dict) -> dict:
    tokens = sum(step["tokens"] for step in result["steps"])
    step_ms = sorted(1000 * step["seconds"] for step in result["steps"])
    tokens_per_s = tokens / result["wall_seconds"]
    flops = workload["flops_per_token"] * tokens_per_s

    def gib(value: int | None) -> float | None:
        return None if value is None else value / 2**30

    return {
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "ftjob_tokens_per_s": tokens / (sum(step_ms) / 1000),
        "step_median_ms": statistics.median(step_ms),
        "step_p90_ms": step_ms[-(-9 * len(step_ms) // 10) - 1],  # nearest rank
        "mfu_datasheet": flops / peaks["datasheet"] if peaks["datasheet"] else None,
        "mfu_matmul": flops / peaks["matmul"],
        "peak_allocated_gib": gib(result["peak_allocated"]),
        "peak_reserved_gib": gib(result["peak_reserved"]),
        "final_loss": result["final_loss"],
        "warmup_s": result["warmup_seconds"],
        "profile": result["profile"],
    }


def end_to_end(device: str, precision: str, out: Path, timeout: float) -> dict:
    """`python -m bench` once, on END_TO_END's workload: ftjob, ftjob-qlora where bitsandbytes is
    installed, and TRL where it is; not recorded (its table joins this one)."""
    if importlib.util.find_spec("mlflow") is None:
        return {"skipped": "mlflow is not installed (the bench's ftjob runs track to a local MLflow store)"}
    systems = ["ftjob"]
    if device == "cuda":
        systems += [
            name
            for name, module in (("ftjob-qlora", "bitsandbytes"), ("trl", "trl"))
            if importlib.util.find_spec(module)
        ]
    arguments = ["--device", device, *END_TO_END[device], "--precisions", precision]
    arguments += ["--systems", ",".join(systems), "--no-record", "--json", str(out / "bench_e2e.json")]
    log = out / "bench_e2e.log"
    code = run_to_end([sys.executable, "-m", "bench", *arguments], log, child_environment(), timeout)
    output = log.read_text()
    run = {"command": "python -m bench " + shlex.join(arguments[:-2]), "exit": code}
    run["table"] = "\n".join(line for line in output.splitlines() if line.startswith("|"))
    if code != 0:
        print(f"end to end: FAILED (exit {code})\n{output[-4000:]}", file=sys.stderr)
        run["output_tail"] = output[-3000:]
    return run


def bench(args: argparse.Namespace, out: Path, command: str) -> dict:
    import torch

    from job.accelerator import cpu_supports_bf16
    from job.metrics import gpu_peak_flops

    started = time.monotonic()
    cuda = args.device == "cuda"
    precision = "bf16" if cuda or cpu_supports_bf16() else "fp32"
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peaks = {
        "datasheet": gpu_peak_flops(device_name) if cuda else None,
        "matmul": matmul_flops(args.device, torch.bfloat16 if precision == "bf16" else torch.float32),
    }
    settings = {
        "device": args.device,
        "precision": precision,
        "micro_batch": args.micro_batch,
        "rows": args.rows,
        "warmup": args.warmup,
        "steps": args.steps,
        "profile_file": out / "gpu_step_profile.txt",
    }
    versions = {name: importlib.metadata.version(name) for name in VERSIONS if importlib.util.find_spec(name)}
    report = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "ftjob": ftjob_revision(),
        "device": device_name,
        "versions": versions,
        "settings": {key: value for key, value in settings.items() if key != "profile_file"}
        | {"profile_steps": args.profile_steps},
        "peaks": peaks,
        "sizes": {},
        "runs": [],
        "end_to_end": None,
    }
    settings["peaks"] = peaks
    with tempfile.TemporaryDirectory(prefix="ftjob-gpu-step-") as tmp:
        for size, variant in planned_runs(args.size, args.variants):
            left = args.budget_s - (time.monotonic() - started)
            if left <= 0:
                report["runs"].append({"size": size, "variant": variant, "error": "skipped: past --budget-s"})
                continue
            if size not in report["sizes"]:
                report["sizes"][size] = size_workload(size, settings, Path(tmp) / size)
            first = not report["runs"]
            run_settings = settings | {"profile_steps": args.profile_steps if first else 0}
            run = measure(size, variant, report["sizes"][size], run_settings, Path(tmp), left + 60)
            report["runs"].append(run)
            print(
                f"{size} {variant}: {run['run_s']:.0f} s, {number(run.get('tokens_per_s'), ',.0f')} tokens/s",
                file=sys.stderr,
            )
            save(report, out)
    if not args.no_end_to_end:
        report["end_to_end"] = end_to_end(args.device, precision, out, args.end_to_end_s)
    save(report, out)
    return report


def planned_runs(sizes: list[str], variants: list[str] | None) -> list[tuple[str, str]]:
    """(size, variant) in the order they run: variant by variant (VARIANTS' order), so that the ones
    that matter most are done if the time budget runs out."""
    return [
        (size, variant)
        for variant in VARIANTS
        for size in sizes
        if variant in (variants or DEFAULT_VARIANTS.get(size, VARIANTS))
    ]


# ---------------------------------------------------------------------------------------------
# The report


def number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    settings, peaks, cuda = report["settings"], report["peaks"], report["device"] != "cpu"
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    sizes = "; ".join(
        f"{size}: {w['parameters'] / 1e6:.1f}M parameters ({w['trainable_parameters'] / 1e6:.2f}M trainable), "
        f"{w['flops_per_token'] / 1e9:.2f} GFLOP a token"
        for size, w in report["sizes"].items()
    )
    datasheet = f"datasheet {peaks['datasheet'] / 1e12:.0f} TFLOP/s, " if peaks["datasheet"] else ""
    memory = "torch's peak allocated and reserved" if cuda else "the process's peak RSS"
    lines = [
        f"## ftjob's training step by variant (`bench/gpu_step.py`), {report['date']}, on {report['device']}",
        "",
        f"Command: `{report['command']}` ({report['ftjob']})",
        f"Machine: {report['device']}; {versions}.",
        f"Workload: {sizes}; random weights, packed rows, micro batch {settings['micro_batch']} x {MAX_SEQ_LEN}, "
        f"{settings['precision']}, LoRA r16 all-linear; {settings['warmup']} warmup steps, then "
        f"{settings['steps']} measured; each run in a fresh process. Peaks: {datasheet}measured "
        f"{settings['precision']} matmul {peaks['matmul'] / 1e12:.3g} TFLOP/s.",
        "",
        "| size | variant | tokens/s | ÷ as is | ftjob's tokens/s | step median ms | step p90 ms | "
        "MFU datasheet | MFU matmul | peak GiB | ÷ as is | reserved GiB | final loss | warmup s | run s |",
        "|" + " --- |" * 15,
    ]
    as_is = {
        run["size"]: run for run in report["runs"] if run["variant"] == "as-is" and "tokens_per_s" in run
    }
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['size']} | {run['variant']} | {run['error']} |" + " |" * 12)
            continue
        base = as_is.get(run["size"])

        def ratio(key: str, run: dict = run, base: dict | None = base) -> str:
            return f"{run[key] / base[key]:.2f}x" if base and run[key] and base[key] else "n/a"

        cells = [run["size"], run["variant"], f"{run['tokens_per_s']:,.0f}", ratio("tokens_per_s")]
        cells += [
            f"{run['ftjob_tokens_per_s']:,.0f}",
            f"{run['step_median_ms']:.1f}",
            f"{run['step_p90_ms']:.1f}",
        ]
        cells += [number(run["mfu_datasheet"], ".1%"), number(run["mfu_matmul"], ".1%")]
        cells += [f"{run['peak_allocated_gib']:.2f}", ratio("peak_allocated_gib")]
        cells += [number(run["peak_reserved_gib"], ".2f"), f"{run['final_loss']:.4f}"]
        cells += [f"{run['warmup_s']:.1f}", f"{run['run_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "tokens/s: real tokens of the measured steps over their wall time (the device synchronized at both "
        "ends); ftjob's tokens/s: the same tokens over the sum of ftjob's own step times "
        "(train/tokens_per_second: on CUDA the device's time from each step's start to its end, without "
        "the host's work between steps). MFU: model FLOPs a token (4N + 2N') x tokens/s over the peak. "
        f"peak GiB: {memory} over the whole process. ÷ as is: over the same size's as-is run. Final "
        "loss: at the run's last step (the profiled run's comes after its profiled steps too).",
        "",
        "Variants: "
        + "; ".join(
            f"{name}: {VARIANTS[name].what}" for name in dict.fromkeys(r["variant"] for r in report["runs"])
        )
        + ".",
        "",
        *target_lines(report),
        *profile_lines(report),
        *end_to_end_lines(report["end_to_end"]),
    ]
    return "\n".join(lines) + "\n"


def target_lines(report: dict) -> list[str]:
    """The issue's targets against this run's numbers."""
    runs = {(run["size"], run["variant"]): run for run in report["runs"] if "tokens_per_s" in run}
    lines = []
    for size, target in TARGET_MFU.items():
        lora = [run for (s, v), run in runs.items() if s == size and not VARIANTS[v].spec.get("model")]
        if not lora or report["peaks"]["datasheet"] is None:
            continue
        best = max(lora, key=lambda run: run["mfu_datasheet"])
        as_is = runs.get((size, "as-is"))
        lines.append(
            f"- {size} LoRA, MFU over the datasheet peak at least {target:.0%}: as is "
            f"{number(as_is and as_is['mfu_datasheet'], '.1%')}, best {best['variant']} {best['mfu_datasheet']:.1%}: "
            + ("met" if best["mfu_datasheet"] >= target else "not met")
        )
    for (size, variant), qlora in runs.items():
        lora = runs.get((size, "as-is"))
        if variant != "qlora" or lora is None:
            continue
        saved = lora["peak_allocated_gib"] - qlora["peak_allocated_gib"]
        speed = qlora["tokens_per_s"] / lora["tokens_per_s"]
        met = saved >= QLORA_TARGET_SAVED_GIB and speed >= QLORA_TARGET_SPEED
        lines.append(
            f"- {size} QLoRA against LoRA (as is), peak at least {QLORA_TARGET_SAVED_GIB:g} GiB lower at "
            f"{QLORA_TARGET_SPEED}x its tokens/s or more: {qlora['peak_allocated_gib']:.2f} GiB against "
            f"{lora['peak_allocated_gib']:.2f} ({saved:.2f} lower), {speed:.2f}x: "
            + ("met" if met else "not met")
        )
    return ["Targets:", *lines, ""] if lines else []


def profile_lines(report: dict) -> list[str]:
    run = next((run for run in report["runs"] if run.get("profiled") and "tokens_per_s" in run), None)
    if run is None or run["profile"] is None:
        return []
    split, steps = run["profile"], report["settings"]["profile_steps"]
    title = f"Profile of {run['size']} {run['variant']}, {steps} steps after the measured ones"
    if "error" in split:
        return [f"{title}: {split['error']}.", ""]
    device = "GPU" if report["device"] != "cpu" else "CPU (its leaf ops: a smoke run of the code path)"
    lines = [
        f"{title} (torch.profiler, the device's activity only): {device} busy {split['busy']:.1%} of "
        f"{split['step_ms']:.1f} ms a step, {split['kernels_per_step']:.0f} kernels a step.",
        "",
        "| kernel class | share of kernel time | kernels a step |",
        "| --- | --- | --- |",
        *(f"| {c['class']} | {c['share']:.1%} | {c['per_step']:.0f} |" for c in split["classes"]),
        "",
        "Top kernels: "
        + "; ".join(
            f"{k['name'][:80]} ({k['class']}) {k['share']:.1%}, {k['per_step']:.0f} a step"
            for k in split["top"]
        )
        + ".",
        "",
    ]
    return lines


def end_to_end_lines(run: dict | None) -> list[str]:
    if run is None:
        return []
    if "skipped" in run:
        return [f"End to end: skipped, {run['skipped']}.", ""]
    outcome = (
        ""
        if run["exit"] == 0
        else f" (failed: {'killed at its time limit' if run['exit'] is None else 'exit ' + str(run['exit'])})"
    )
    return [f"End to end: `{run['command']}`{outcome}:", "", run["table"] or "(no table)", ""]


def save(report: dict, out: Path) -> None:
    (out / "gpu_step.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_step.md").write_text(markdown(report))


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=list(DEFAULTS), default="cuda")
    parser.add_argument(
        "--size", help="comma-separated, of " + ", ".join(SIZES) + " (cuda: 1b,3b; cpu: tiny)"
    )
    parser.add_argument(
        "--variants", help="comma-separated, of " + ", ".join(VARIANTS) + " (all; on 3b as-is,fused-lora)"
    )
    for key, what in (
        ("steps", "measured optimizer steps a run"),
        ("warmup", "steps before them, not measured (at least 1)"),
        ("profile_steps", "steps profiled after the first run's measured ones (0: none)"),
        ("micro_batch", "packed rows of 512 tokens a step"),
        (
            "rows",
            "rows of data, an epoch of them more than a run's steps (an epoch's end makes a short step)",
        ),
    ):
        defaults = f"cuda {DEFAULTS['cuda'][key]}, cpu {DEFAULTS['cpu'][key]}"
        parser.add_argument("--" + key.replace("_", "-"), type=int, help=f"{what} ({defaults})")
    parser.add_argument(
        "--budget-s", type=float, default=270, help="no run starts after this many seconds (270)"
    )
    parser.add_argument(
        "--end-to-end-s", type=float, default=200, help="the end-to-end run's time limit (200)"
    )
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end bench run")
    parser.add_argument("--out", type=Path, help="write gpu_step.json, gpu_step.md and the others here")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a run's process: its task.json
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.size = args.size.split(",")
    args.variants = args.variants.split(",") if args.variants else None
    for name, values, allowed in (
        ("--size", args.size, SIZES),
        ("--variants", args.variants or [], VARIANTS),
    ):
        if unknown := set(values) - set(allowed):
            parser.error(f"{name}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps: at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one.read_text()))))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    command = "python -m bench.gpu_step " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="ftjob-gpu-step-out-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        report = bench(args, out, command)
    print(markdown(report))


if __name__ == "__main__":
    main()
