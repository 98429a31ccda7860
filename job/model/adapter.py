"""The adapter: the base model wrapped for training (LoRA, DoRA, or every weight for `full`), its
parameter counts, and the adapter merged back into the base."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from job.errors import UserError
from job.model.loading import DTYPES, load_model, stored_dtype
from job.spec import AdapterSpec, ModelSpec

log = logging.getLogger(__name__)


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


def keep_input_dtype_under_autocast(model) -> int:
    """Under autocast, the adapter layers compute on their input as it comes (a 16-bit hidden state).
    peft casts it up to the float32 adapter weights' dtype for them and runs dropout on that copy, and
    autocast casts it back down for each matmul: two copies of a [tokens, features] tensor per layer,
    and their gradients' two in backward. Autocast casts the adapter's weights per op; they and the
    optimizer's state stay float32. peft's own switch (cast_input_dtype_enabled, as
    peft.helpers.disable_input_dtype_casting sets it), set at each call: a forward without autocast (a
    probe) still needs the cast. Returns how many layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.register_forward_pre_hook(_cast_input_unless_autocast)
    return len(layers)


def _cast_input_unless_autocast(layer, args: tuple) -> None:
    if args and isinstance(args[0], torch.Tensor):
        layer.cast_input_dtype_enabled = not torch.is_autocast_enabled(args[0].device.type)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, logged; a 4-bit weight counts as the weight it quantizes."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    log.info("%d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return trainable, total


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Its elements; for bitsandbytes' 4-bit weight, the unquantized weight's (its storage packs two or
    more values into an element, so numel() undercounts and MFU would read low)."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


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
