"""torch.compile against eager on the end-to-end bench's model: compile time and step time, side by side.

Trains the `python -m bench` workload's model (random weights, LoRA r16 all-linear with dropout 0.05,
float32, AdamW) on [micro batch, 512] random tokens, one full-row causal sequence per row, in four
forms, each in a fresh process from the same weights: peft's layers eager; the same model under
torch.compile (inductor), whose first step includes the compilation (with an empty cache, as in a fresh
container); ftjob's CPU layers eager (LoRA dropout by gaps, fused LoRA linears, fused RMSNorm); and
ftjob's layers as train.compile prepares them (torch's dropout, each decoder layer compiled:
job/model/compile.py), whose first step includes the compilation too. Reports the first step and the
mean of the steps after it, and how many frames torch.compile compiled in each form (0 for the eager
ones).

    .venv/bin/python -m bench.compile [--size small] [--steps 5] [--micro-batch 4] [--backend inductor]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import child_environment
from bench.workload import LORA, MAX_SEQ_LEN, SIZES, build_workspace
from job.startup import leave_out_bitsandbytes

FTJOB_COMPILED = "ftjob regional compile"
FORMS = ("peft eager", "peft compiled", "ftjob layers eager", FTJOB_COMPILED)


def lora_model(model_dir: str, form: str, backend: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.model.compile import compile_layers
    from job.model.prepare import faster_layers

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    model.train()
    if form.startswith("ftjob"):
        faster_layers(model, "cpu", compiled=form == FTJOB_COMPILED)
    if form == FTJOB_COMPILED:
        compile_layers(model, backend)
    return model


def measure(model_dir: str, form: str, steps: int, micro_batch: int, vocab: int, backend: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    model = lora_model(model_dir, form, backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    forward = torch.compile(model, backend=backend) if form == "peft compiled" else model
    ids = torch.randint(0, vocab, (micro_batch, MAX_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    compiled = counters["frames"]["ok"]  # frames dynamo compiled: 0 would mean eager ran
    return {
        "form": form,
        "first_step_s": times[0],
        "step_s": sum(times[1:]) / steps,
        "compiled_frames": compiled,
    }


def measure_in_fresh_process(form: str, args: argparse.Namespace, model_dir: str, vocab: int) -> dict:
    """measure() in a process of its own: no form inherits another's caches or heap."""
    command = [sys.executable, "-m", "bench.compile", "--form", form, "--model", model_dir]
    command += ["--vocab", str(vocab), "--steps", str(args.steps), "--micro-batch", str(args.micro_batch)]
    command += ["--backend", args.backend]
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    if done.returncode:
        sys.exit(f"{form} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=5, help="steps measured after the first")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=200, help="rows the tokenizer is trained on")
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile's backend (the tests' aot_eager traces forward and backward but makes no kernels)",
    )
    parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)  # one form, in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    leave_out_bitsandbytes()  # as an unquantized ftjob run does
    if args.form:
        result = measure(args.model, args.form, args.steps, args.micro_batch, args.vocab, args.backend)
        print("RESULT", json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as root:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{root}/inductor"  # compiled cold, as in a fresh container
        workspace = build_workspace(Path(root), args.size, args.rows)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(workspace["model"]))
        results = [measure_in_fresh_process(f, args, workspace["model"], vocab) for f in FORMS]
    eager = results[0]["step_s"]
    print(
        f"{args.size} model, micro batch {args.micro_batch} x {MAX_SEQ_LEN} tokens, float32, {args.steps} steps, "
        f"backend {args.backend}"
    )
    print("| form | first step s | step s (mean of the rest) | step ÷ peft eager |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['form']} | {r['first_step_s']:.2f} | {r['step_s']:.3f} | {r['step_s'] / eager:.2f}x |")
    compiled = ", ".join(f"{r['form']} {r['compiled_frames']}" for r in results)
    print(f"frames compiled by torch.compile: {compiled}")


if __name__ == "__main__":
    main()
