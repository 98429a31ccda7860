"""Tokenizer and base model: everything between a model directory and a model on its device (the adapter
is job/model/adapter.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from job.errors import UserError
from job.model.source import resolve_model_dir
from job.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, device: torch.device, full_finetune: bool = False) -> torch.dtype:
    """auto: bfloat16 on a GPU that has it (float32 for full fine-tuning, whose optimizer needs it); else float32."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and not full_finetune:
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_dir: Path, model_spec: ModelSpec, chat_template: str | None = None):
    """The model's tokenizer; with data.chat_template it carries that template, so that what is
    published with the adapter renders prompts exactly as training did."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model_spec.trust_remote_code)
    except Exception as e:
        raise UserError(f"model.source: cannot load a tokenizer from {model_spec.source}: {e}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.source: the tokenizer of {model_spec.source} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no loss, so any id will do
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def model_dir_and_tokenizer(model_spec: ModelSpec, chat_template: str | None = None) -> tuple[Path, Any]:
    """model.source as a local directory (fetched or cached as needed) and its tokenizer."""
    model_dir = resolve_model_dir(model_spec)
    return model_dir, load_tokenizer(model_dir, model_spec, chat_template)


def quantization_config(model_spec: ModelSpec, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if model_spec.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if model_spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(model_dir: Path, model_spec: ModelSpec, device: torch.device, full_finetune: bool = False):
    """The base model, safetensors only, on `device` (quantized models are placed at load time)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_spec.dtype, device, full_finetune)
    quantization = quantization_config(model_spec, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=model_spec.trust_remote_code,
            attn_implementation=model_spec.attn_implementation,
            quantization_config=quantization,
            device_map={"": device} if quantization else None,
        )
    except (OSError, ValueError, ImportError, SafetensorError) as e:  # SafetensorError: a damaged file
        raise UserError(f"model.source: cannot load {model_spec.source}: {e}") from None
    except RuntimeError as e:  # also CUDA's out-of-memory and others, which are not the user's to fix
        if "mismatched_sizes" not in str(e) and "size mismatch" not in str(e):
            raise
        raise UserError(
            f"model.source: the weights in {model_spec.source} do not fit its config.json (tensor shapes "
            "differ): is config.json from another model?"
        ) from None
    if quantization and device.type == "cpu":
        keep_4bit_weights_trainable_on_cpu(model)
    return model


def model_on_meta(model_dir: Path, model_spec: ModelSpec, device: torch.device, full_finetune: bool = False):
    """The model's modules as load_model makes them (dtype, attention), with no weights: on the meta
    device, for every rank to shard before rank 0 sends each its shards (job/model/sharding.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = model_spec.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config,
                dtype=resolve_dtype(model_spec.dtype, device, full_finetune),
                trust_remote_code=trust,
                attn_implementation=model_spec.attn_implementation,
            )
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"model.source: cannot load {model_spec.source}: {e}") from None


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit that runs once in eval mode (our eval loss) repacks its
    weights for an inference kernel, for good: later training steps then backpropagate through a kernel
    with no autograd support, and logits shift (bf16 scales). Training and eval must see one format.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the model's weights are stored in (its config's), float32 when it says none."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32
