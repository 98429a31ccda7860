"""The end-to-end bench's workload: a Llama/Qwen-shaped model with random weights and a length-skewed
instruction data set, both built locally, and the machine's matmul peak to measure MFU against.

Every system reads the same rows, rendered once to plain text (an alpaca prompt and its response), so
that each tokenizes exactly the same stream: BOS + text + EOS, the text under max_seq_len.

    .venv/bin/python -m bench.workload calibrate MODEL_DIR --device cpu --precisions bf16,fp32
        (one JSON line: parameter counts, model FLOPs per token, matmul FLOP/s per precision)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

MAX_SEQ_LEN = 512
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}  # ftjob's defaults

# Model shapes. small is the CPU bench (~10M parameters); 0.5b is Qwen2.5-0.5B's shape, 1b Llama-3.2-1B's
# and 3b Llama-3.2-3B's, vocabularies included (the LM head is a large part of a step at these sizes; the
# local tokenizer uses only its first ids), stored in bf16 as released models are. tiny, for tests, takes
# the large sizes' code paths: Qwen2, a vocabulary larger than the tokenizer's, tied, bf16 on disk.
SIZES = {
    "tiny": {"arch": "qwen2", "hidden": 64, "intermediate": 172, "layers": 2, "heads": 4, "kv_heads": 2,
             "vocab": 1024, "tokenizer_vocab": 512, "tied": True, "dtype": "bfloat16"},
    "small": {"arch": "llama", "hidden": 256, "intermediate": 688, "layers": 12, "heads": 4, "kv_heads": 2,
              "vocab": None, "tokenizer_vocab": 2048, "tied": False, "dtype": "float32"},
    "0.5b": {"arch": "qwen2", "hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2,
             "vocab": 151936, "tokenizer_vocab": 8192, "tied": True, "dtype": "bfloat16"},
    "1b": {"arch": "llama", "hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8,
           "vocab": 128256, "tokenizer_vocab": 8192, "tied": True, "dtype": "bfloat16"},
    "3b": {"arch": "llama", "hidden": 3072, "intermediate": 8192, "layers": 28, "heads": 24, "kv_heads": 8,
           "vocab": 128256, "tokenizer_vocab": 8192, "tied": True, "dtype": "bfloat16"},
}  # fmt: skip

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def lexicon(rng: random.Random, size: int = 4000) -> list[str]:
    """Pronounceable pseudo-words of 1-3 syllables: the tokenizer learns real subwords from them."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(size)]


def instruction_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Length-skewed instruction rows: Pareto-distributed lengths (most a few words, a few of hundreds),
    words drawn with Zipf frequencies."""
    rng = random.Random(seed)
    words = lexicon(rng)
    weights = [1 / (rank + 1) for rank in range(len(words))]

    def text(mean_words: float, cap: int) -> str:
        return " ".join(rng.choices(words, weights, k=min(int(rng.paretovariate(1.3) * mean_words), cap) + 1))

    return [{"instruction": text(14, 240), "output": text(12, 120)} for _ in range(count)]


def render(row: dict[str, str]) -> str:
    from job.data.formats import alpaca_prompt

    return alpaca_prompt(row["instruction"]) + row["output"]


def build_workspace(root: Path, size: str, rows: int, seed: int = 0) -> dict:
    """model/ (config, random weights, tokenizer) and train.jsonl ({"text": ...} rows) under root.
    Returns their paths and the token count every system must see (BOS + text + EOS per row)."""
    texts = [render(row) for row in instruction_rows(rows, seed)]
    model_dir = build_model(root / "model", size, texts, seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]  # + EOS
    if max(lengths) > MAX_SEQ_LEN:
        raise SystemExit(
            f"a row has {max(lengths)} tokens, over {MAX_SEQ_LEN}: systems would cut it differently"
        )
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"model": str(model_dir), "data": str(data), "rows": rows, "tokens": sum(lengths)}


def build_model(directory: Path, size: str, corpus: list[str], seed: int = 0) -> Path:
    """A randomly initialized model of SIZES[size] and a BPE tokenizer trained on corpus."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from job.model.tiny import build_tokenizer

    shape = SIZES[size]
    tokenizer = build_tokenizer(corpus, shape["tokenizer_vocab"])
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[shape["arch"]]
    config = config_class(
        vocab_size=shape["vocab"] or len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=shape["tied"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, shape["dtype"]))
    directory.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def matmul_flops(device: str, dtype, seconds: float = 1.0) -> float:
    """The best FLOP/s of a square matmul at dtype on device over about `seconds`: what this machine's
    matmuls reach now (on a shared machine, under its current load)."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best, deadline = float("inf"), time.perf_counter() + seconds
    torch.matmul(a, b)  # first-call costs off the clock
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def calibrate(model_dir: Path, device: str, precisions: list[str]) -> dict:
    """Parameter counts of the model with the bench's LoRA, model FLOPs per token as ftjob counts them,
    and the matmul peak at each precision."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.metrics import flops_per_token
    from job.model.adapter import count_parameters

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA, task_type="CAUSAL_LM")
    )
    trainable, total = count_parameters(model)
    del model
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return {
        "parameters": total,
        "trainable_parameters": trainable,
        "flops_per_token": flops_per_token(total, trainable),
        "matmul_flops": {p: matmul_flops(device, dtypes[p]) for p in precisions},
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["calibrate"])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32")
    args = parser.parse_args()
    print("RESULT " + json.dumps(calibrate(args.model_dir, args.device, args.precisions.split(","))))


if __name__ == "__main__":
    main()
