"""torch.compile against eager on the end-to-end bench's model: compile time and step time, side by side.

One process trains the `python -m bench` workload's model (random weights, LoRA r16 all-linear with
dropout 0.05, float32, AdamW) on [micro batch, 512] random tokens, one full-row causal sequence per
row, in three forms, each from the same weights: peft's layers eager; the same model under
torch.compile (inductor), whose first step includes the compilation (with an empty cache, as in a fresh
container); and ftjob's CPU layers eager
(LoRA dropout by gaps, fused LoRA linears, fused RMSNorm). Reports the first step and the mean of the
steps after it.

    .venv/bin/python -m bench.compile [--size small] [--steps 5] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.workload import LORA, MAX_SEQ_LEN, SIZES, build_workspace
from job.startup import leave_out_bitsandbytes

FORMS = ("peft eager", "peft compiled", "ftjob layers eager")


def lora_model(model_dir: str, form: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.dropout import use_cpu_dropout
    from job.fused_lora import fuse_lora_linears
    from job.fused_norm import fuse_rms_norms

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    model.train()
    if form == "ftjob layers eager":
        use_cpu_dropout(model)
        fuse_lora_linears(model)
        fuse_rms_norms(model)
    return model


def measure(model_dir: str, form: str, steps: int, micro_batch: int, vocab: int) -> dict:
    import torch

    model = lora_model(model_dir, form)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    forward = torch.compile(model) if form == "peft compiled" else model
    ids = torch.randint(0, vocab, (micro_batch, MAX_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"form": form, "first_step_s": times[0], "step_s": sum(times[1:]) / steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=5, help="steps measured after the first")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=200, help="rows the tokenizer is trained on")
    args = parser.parse_args(argv)
    leave_out_bitsandbytes()  # as an unquantized ftjob run does
    with tempfile.TemporaryDirectory() as root:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{root}/inductor"  # compiled cold, as in a fresh container
        workspace = build_workspace(Path(root), args.size, args.rows)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(workspace["model"]))
        results = [measure(workspace["model"], f, args.steps, args.micro_batch, vocab) for f in FORMS]
    eager = results[0]["step_s"]
    print(
        f"{args.size} model, micro batch {args.micro_batch} x {MAX_SEQ_LEN} tokens, float32, {args.steps} steps"
    )
    print("| form | first step s | step s (mean of the rest) | step ÷ peft eager |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['form']} | {r['first_step_s']:.2f} | {r['step_s']:.3f} | {r['step_s'] / eager:.2f}x |")


if __name__ == "__main__":
    main()
