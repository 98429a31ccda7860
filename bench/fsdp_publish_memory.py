"""Rank 0's host memory as a sharded full model is published (train.distributed fsdp, adapter.method
full): gathered whole on rank 0 (job/model/sharding.py: gathered_weights, as ftjob used to) against
written a safetensors file at a time (job/output/publish.py: write_model_files, as job/accelerator.py:
trained does), in files of an eighth of the model.

Each variant runs in 2 fresh gloo processes on the CPU that load and shard bench/fsdp_memory.py's model
(random weights) with ftjob's own functions, as job/model/prepare.py: sharded_model does. Just before
publishing, rank 0 resets its peak RSS (VmHWM, through /proc/self/clear_refs); the rise of that peak
over its RSS then is reported as a share of the model's bytes, for each C allocator setting in the
workers' environment. The published weights are checked to equal the model's.

    .venv/bin/python -m bench.fsdp_publish_memory [--layers 2] [--allocators glibc-default,...] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.fsdp_memory import build, spec
from bench.memory import proc_status_mb
from job.model.prepare import FSDP_LARGEST_KEPT
from job.startup import ALLOCATOR_SETTINGS, TRIM_THRESHOLD

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 2
FILES_PER_MODEL = 8
PUBLISHES = ("gathered", "files")
# name -> the workers' allocator environment (on top of one with no allocator setting of its own)
ALLOCATORS = {
    "glibc-default": {},
    "mmap-threshold-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    # what ftjob sets itself under fsdp on CPUs (job/model/prepare.py: adapted), here from the start
    "ftjob-cpu-fsdp": {
        "MALLOC_MMAP_THRESHOLD_": str(FSDP_LARGEST_KEPT),
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(publish: str, allocator: str, model: Path, data: Path, root: Path) -> dict:
    """One publish in fresh worker processes: rank 0's result (worker)."""
    result = root / f"{publish}-{allocator}.json"
    clean = {k: v for k, v in os.environ.items() if k not in (*ALLOCATOR_SETTINGS, "GLIBC_TUNABLES")}
    env = {**clean, **ALLOCATORS[allocator], "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(PROCESSES)}  # fmt: skip
    command = [sys.executable, "-m", "bench.fsdp_publish_memory", "--worker", publish,
               "--model", str(model), "--data", str(data), "--result", str(result)]  # fmt: skip
    log = root / f"{publish}-{allocator}.log"
    with open(log, "w") as out:
        workers = [
            subprocess.Popen(command, env={**env, "RANK": str(rank)}, stdout=out, stderr=subprocess.STDOUT)
            for rank in range(PROCESSES)
        ]
        if codes := [code for worker in workers if (code := worker.wait())]:
            sys.exit(f"{publish} under {allocator}: a worker exited {codes[0]}:\n{log.read_text()[-4000:]}")
    return {"allocator": allocator, **json.loads(result.read_text())}


def worker(publish: str, model_dir: Path, data: Path, result: Path) -> None:
    """One rank: the model loaded and sharded as ftjob does, then published; rank 0 writes to `result`
    how far its peak RSS rose while publishing."""
    import torch.distributed as dist

    from job.model.sharding import gathered_weights, resharded
    from job.output.publish import write_model_files

    dist.init_process_group("gloo")
    main = dist.get_rank() == 0
    model = sharded_full_model(model_dir, data, result.parent)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # whole sizes
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = proc_status_mb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="ftjob-bench-publish-") as tmp:
        folder = Path(tmp) if main else None
        if publish == "gathered":
            published = gathered_weights(model)
        else:
            write_model_files(resharded(model), folder, model_bytes // FILES_PER_MODEL)
        rise = proc_status_mb("VmHWM") - before
        if main:
            files = sorted(folder.glob("*.safetensors"))
            check_same_weights(published if publish == "gathered" else weight_files(folder), model_dir)
            result.write_text(json.dumps({
                "publish": publish, "model_mib": model_bytes / 2**20, "rise_mib": rise,
                "rise_of_model": rise * 2**20 / model_bytes, "files": len(files) if files else None,
            }))  # fmt: skip
    dist.destroy_process_group()


def sharded_full_model(model_dir: Path, data: Path, scratch: Path):
    """Every rank: bench/fsdp_memory.py's full fine-tune loaded as job/model/prepare.py: sharded_model
    loads it, without the allocator setting ftjob makes there (the bench's environment's stands)."""
    import torch
    import torch.distributed as dist

    from job.model.loading import model_on_meta
    from job.model.prepare import rank_0_weights
    from job.model.sharding import process_mesh, receive_from_rank0, shard_model
    from job.spec import validate_spec

    device = torch.device("cpu")
    job = validate_spec(spec(model_dir, data, "fsdp", 1, scratch / "unused"))
    source = rank_0_weights(model_dir, job, device) if dist.get_rank() == 0 else {}
    meta = model_on_meta(model_dir, job.model, device, full_finetune=True)
    model = shard_model(meta, job.train.fsdp, process_mesh(device), param_dtype=None)
    receive_from_rank0(model, source, device)
    return model


def weight_files(folder: Path) -> dict:
    """The tensors of every safetensors file in a folder, by name."""
    from safetensors.torch import load_file

    return {name: t for path in sorted(folder.glob("*.safetensors")) for name, t in load_file(path).items()}


def check_same_weights(published: dict, model_dir: Path) -> None:
    """The published tensors are the model's (no step trained: the weights it was loaded from)."""
    import torch

    expected = weight_files(model_dir)
    if published.keys() != expected.keys():
        sys.exit(f"published {sorted(published.keys() ^ expected.keys())} differently from the model")
    if differing := [name for name, t in expected.items() if not torch.equal(published[name], t)]:
        sys.exit(f"published weights differ from the model's: {differing}")


def table(results: list[dict]) -> str:
    by_run = {(r["allocator"], r["publish"]): r for r in results}
    lines = [
        "| allocator (workers' environment) | model MiB | gathered whole: rise MiB | ÷ model | "
        f"files of 1/{FILES_PER_MODEL}: rise MiB | ÷ model | files |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for allocator in dict.fromkeys(r["allocator"] for r in results):
        gathered, files = by_run.get((allocator, "gathered")), by_run.get((allocator, "files"))
        some = gathered or files
        cells = [f"{allocator} {' '.join(f'{k}={v}' for k, v in ALLOCATORS[allocator].items())}".strip(),
                 f"{some['model_mib']:.1f}"]  # fmt: skip
        for run in (gathered, files):
            cells += [f"{run['rise_mib']:.1f}", f"{run['rise_of_model']:.2f}"] if run else ["n/a", "n/a"]
        cells.append(str(files["files"]) if files else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fsdp_publish_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--layers", type=int, default=2, help="of bench/fsdp_memory.py's model (2: ~47 MiB)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="of " + ", ".join(ALLOCATORS))
    parser.add_argument("--json", action="store_true", help="the results as JSON, not a table")
    parser.add_argument("--worker", choices=PUBLISHES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.data, args.result)
    with tempfile.TemporaryDirectory(prefix="ftjob-bench-publish-") as tmp:
        model, data = build(Path(tmp), args.layers)
        results = [
            measure(publish, allocator, model, data, Path(tmp))
            for allocator in args.allocators.split(",")
            for publish in PUBLISHES
        ]
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
