"""GPU check: flash-attention-2 on packed micro-batches of several rows keeps examples apart.

Needs a CUDA GPU and flash-attn. Packs examples into a [4, L] micro-batch, flattens it as training
does (job.data.batching.flatten_packed) and compares its summed loss with the examples one by one
(sdpa, unpacked); also reports the unflattened [4, L] loss, which let examples attend to each other
before the fix. Prints one JSON line.

    .venv/bin/python -m bench.flash_packing
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from bench.workspace import alpaca_rows, bench_model


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.data.batching import flatten_packed, pack_row, pad_batch, stack_packed
    from job.data.formats import Formatter
    from job.data.tokens import tokenize
    from job.train import loss_sum

    rows = alpaca_rows(16, seed=0, instruction_words=(5, 40), output_words=12)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model(Path(tmp), rows * 4)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        load = {"dtype": torch.bfloat16, "device_map": {"": "cuda"}}
        flash = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="flash_attention_2", **load
        )
        sdpa = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **load)
    formatter = Formatter("alpaca", {}, "all", tokenizer)
    examples = [tokenize(formatter(r), tokenizer) for r in rows]
    pad = tokenizer.pad_token_id
    packed = stack_packed([pack_row(examples[i : i + 4], 1024, pad) for i in range(0, 16, 4)])

    def on_gpu(batch):
        return {k: v.cuda() for k, v in batch.items()}

    with torch.no_grad():
        one_by_one = sum(float(loss_sum(sdpa, on_gpu(pad_batch([e], pad)))) for e in examples)
        flat = float(loss_sum(flash, on_gpu(flatten_packed(packed))))
        unflattened = float(loss_sum(flash, on_gpu(packed)))
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "one_by_one_sdpa": one_by_one,
                "flash_flattened": flat,
                "flash_unflattened": unflattened,
                "flattened_rel_diff": abs(flat - one_by_one) / one_by_one,
                "unflattened_rel_diff": abs(unflattened - one_by_one) / one_by_one,
            }
        )
    )


if __name__ == "__main__":
    main()
