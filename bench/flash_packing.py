"""GPU check: flash-attention-2 on packed micro-batches of several rows keeps examples apart.

Needs a CUDA GPU. With flash-attn installed, transformers' flash path runs its kernels; without it (no
wheel for the GPU machine's torch), the same transformers code path runs over PyTorch's own
FlashAttention kernels (`torch.nn.attention.varlen.varlen_attn` for packed rows, the flash backend of
scaled_dot_product_attention for dense rows), and the JSON says which. Packs examples into a [4, L]
micro-batch and compares its summed loss with the examples one by one (sdpa, unpacked): flattened into
one row (job.data.batching.flatten_packed), and as [4, L] rows with the collator's offsets
(cu_seq_lens_q ...); also reports the [4, L] loss with neither, which lets examples attend to each other. Also checks ftjob's own packed attention (job/model/packed_attention.py, PyTorch's varlen
kernel on CUDA) on the [4, L] micro-batch against sdpa's block-diagonal mask: loss, gradients, and the
time of a forward and backward. Prints one JSON line.

    .venv/bin/python -m bench.flash_packing
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.workspace import alpaca_rows, bench_model


def use_torch_flash_kernels() -> None:
    """Route transformers' flash-attention path to PyTorch's FlashAttention kernels."""
    import inspect

    import transformers.modeling_flash_attention_utils as flash_utils
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn

    def repeat_kv(q, k, v):  # grouped-query heads, [.., H, D] layout
        groups = q.shape[-2] // k.shape[-2]
        return k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)

    def dense(q, k, v, softmax_scale=None, causal=True, **_):  # [B, L, H, D]
        k, v = repeat_kv(q, k, v)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=softmax_scale
            )
        return out.transpose(1, 2)

    def varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True, **_
    ):  # [T, H, D]
        k, v = repeat_kv(q, k, v)
        mask = (
            {"is_causal": causal}
            if "is_causal" in varlen_parameters
            else {"window_size": (-1, 0 if causal else -1)}
        )
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        return varlen_attn(
            q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), scale=softmax_scale, **mask
        )

    varlen_parameters = inspect.signature(varlen_attn).parameters
    # transformers reads the kernels' signatures to choose which arguments to pass (all 5.x versions)
    flash_utils._lazy_imports = lambda *a, **k: (dense, varlen, None, None, None)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.data.batching import PACKED_OFFSETS, flatten_packed, pack_row, pad_batch, stack_packed
    from job.data.formats import Formatter
    from job.data.tokens import tokenize
    from job.loss import loss_sum

    if not torch.cuda.is_available():
        sys.exit("bench.flash_packing needs a CUDA GPU: the flash kernels run on CUDA only")
    rows = alpaca_rows(16, seed=0, instruction_words=(5, 40), output_words=12)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model(Path(tmp), rows * 4)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        device = "cuda"
        load = {"dtype": torch.bfloat16, "device_map": {"": device}}
        sdpa = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **load)
        if importlib.util.find_spec("flash_attn"):
            kernels = "flash_attn"
            flash = AutoModelForCausalLM.from_pretrained(
                model_dir, attn_implementation="flash_attention_2", **load
            )
        else:
            kernels = "torch varlen_attn + sdpa flash backend"
            use_torch_flash_kernels()
            flash = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **load)
            flash.config._attn_implementation = "flash_attention_2"
    formatter = Formatter("alpaca", {}, "all", tokenizer)
    examples = [tokenize(formatter(r), tokenizer) for r in rows]
    pad = tokenizer.pad_token_id
    packed = stack_packed([pack_row(examples[i : i + 4], 1024, pad) for i in range(0, 16, 4)])

    def on_gpu(batch):
        return {k: v.to(device) for k, v in batch.items()}

    with torch.no_grad():
        one_by_one = sum(float(loss_sum(sdpa, on_gpu(pad_batch([e], pad)))) for e in examples)
        bare = {key: value for key, value in packed.items() if key not in PACKED_OFFSETS}
        flat = float(loss_sum(flash, on_gpu(flatten_packed(bare))))
        offsets = float(loss_sum(flash, on_gpu(packed)))
        unflattened = float(loss_sum(flash, on_gpu(bare)))
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "kernels": kernels,
                "one_by_one_sdpa": one_by_one,
                "flash_flattened": flat,
                "flash_offsets": offsets,
                "flash_unflattened": unflattened,
                "flattened_rel_diff": abs(flat - one_by_one) / one_by_one,
                "offsets_rel_diff": abs(offsets - one_by_one) / one_by_one,
                "unflattened_rel_diff": abs(unflattened - one_by_one) / one_by_one,
                **packed_attention_check(sdpa, on_gpu(packed), one_by_one),
            }
        )
    )


def packed_attention_check(sdpa, batch: dict, one_by_one: float) -> dict:
    """ftjob's packed attention (job/model/packed_attention.py: the varlen kernel on CUDA in half precision)
    against sdpa under transformers' block-diagonal mask on the same [B, L] packed micro-batch: summed
    loss, every gradient, and the time of a forward and backward."""
    import copy

    from job.loss import loss_sum
    from job.model.packed_attention import use_packed_attention

    packed_model = copy.deepcopy(sdpa).train()
    assert use_packed_attention(packed_model)
    results = {}
    for name, model in (("sdpa_block_mask", sdpa.train()), ("ftjob_packed", packed_model)):
        model.zero_grad()
        loss = loss_sum(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results[name] = (loss.item(), grads, step_ms(model, batch))
    (mask_loss, mask_grads, mask_ms), (loss, grads, ms) = results.values()
    return {
        "packed_attention_loss": loss,
        "sdpa_block_mask_loss": mask_loss,
        "packed_attention_rel_diff": abs(loss - one_by_one) / one_by_one,
        "packed_attention_grad_rel_diff": float((grads - mask_grads).norm() / mask_grads.norm()),
        "sdpa_block_mask_step_ms": mask_ms,
        "packed_attention_step_ms": ms,
    }


def step_ms(model, batch: dict, repeats: int = 10) -> float:
    """Median milliseconds of a forward and backward."""
    from job.loss import loss_sum

    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss_sum(model, batch).backward()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[2:])


if __name__ == "__main__":
    main()
