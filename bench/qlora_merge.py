"""GPU check: a QLoRA adapter merged into its base gives the logits of the model that was trained.

Trains the bench model (stored in bf16) with 4-bit QLoRA and `output.merge: true`, then compares the
logits of merged/ (loaded plainly, float32) with the trained model's on one prompt. On a CUDA machine
the 4-bit base is quantized and merged on the GPU, as a user's run does; on a CPU it runs the same
path slowly (the unit test covers it there). Prints one JSON line.

    .venv/bin/python -m bench.qlora_merge
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from bench.workspace import alpaca_rows, bench_model, train, write_jsonl

PROMPT = "### Instruction:\nw1 w2 w3 w4\n\n### Response:\n"


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def main() -> None:
    from transformers import AutoModelForCausalLM

    from job.spec import validate_spec

    rows = alpaca_rows(400, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = bench_model(root, rows)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)  # stored in bf16, as released models are
        spec = validate_spec(
            {
                "name": "qlora-merge",
                "model": {"source": str(model_dir), "quantization": "4bit"},
                "data": {"train": [str(write_jsonl(root / "train.jsonl", rows))], "max_seq_len": 256},
                "train": {"max_steps": 30, "micro_batch_size": 8, "learning_rate": 2e-3, "log_every": 1000},
                "tracking": {"enabled": False},
                "output": {"uri": str(root / "out"), "merge": True},
            }
        )
        result = train(spec)
        merged = AutoModelForCausalLM.from_pretrained(root / "out" / "merged", dtype=torch.float32).eval()
        trained, merged_logits = (
            logits_of(result.model.eval(), result.tokenizer),
            logits_of(merged, result.tokenizer),
        )
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "trained_on": str(next(result.model.parameters()).device),
                "max_abs_logit_diff": float((merged_logits - trained).abs().max()),
                "logit_scale": float(trained.abs().max()),
                "argmax_agreement": float((merged_logits.argmax(-1) == trained.argmax(-1)).float().mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
