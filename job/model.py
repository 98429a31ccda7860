"""Tokenizer, base model and adapter: everything between a model directory and a trainable module."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from job.errors import UserError
from job.model_source import resolve_model_dir
from job.spec import AdapterSpec, ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_libraries() -> None:
    """Keep the job's log readable: no per-load progress bars or library chatter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning
    )


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


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit that runs once in eval mode (our eval loss) repacks its
    weights for an inference kernel, for good: later training steps then backpropagate through a kernel
    with no autograd support, and logits shift (bf16 scales). Training and eval must see one format.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_adapter(model, adapter: AdapterSpec, quantized: bool, gradient_checkpointing: bool):
    """Wrap the base model for training: LoRA/DoRA through peft, or every weight trainable for `full`."""
    if adapter.method == "full":
        model.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # peft's preparation casts a quantized model's other weights (embeddings, norms) to float32 for
    # float16's narrow range. bfloat16 has float32's range, so a bfloat16 model keeps them as stored:
    # half their memory (0.5 GiB for a 1B Llama's 128k-token embedding) and LoRA's own residual stream.
    if quantized and model.dtype != torch.bfloat16:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_dora=adapter.method == "dora",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target_modules that match nothing
        raise UserError(f"adapter.target_modules: {e}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, logged."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return trainable, total


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the model's weights are stored in (its config's), float32 when it says none."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32


def merge_adapter(model_dir: Path, adapter_dir: Path, model_spec: ModelSpec):
    """The base model as it was trained, with the adapter merged into its weights, in the dtype the
    base is stored in, on the CPU (a quantized base is quantized on the GPU when there is one, as in
    training).

    A quantized base is loaded quantized, exactly as for training, then dequantized: merging into
    the original full-precision weights would give a model that was never trained (the adapter
    learned to correct the quantized ones)."""
    from peft import PeftModel

    dtype = stored_dtype(model_dir)
    name = next(n for n, d in DTYPES.items() if d == dtype)
    # quantized where it was trained: bitsandbytes' CUDA and CPU kernels need not round alike
    quantized_on_gpu = model_spec.quantization and torch.cuda.is_available()
    device = torch.device("cuda" if quantized_on_gpu else "cpu")
    base = load_model(model_dir, model_spec.model_copy(update={"dtype": name}), device)
    if model_spec.quantization:
        base = base.dequantize(dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.to(device="cpu", dtype=dtype)
