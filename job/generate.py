"""`ftjob generate`: load the base model and a published adapter, render the prompt as training did, generate."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from job.data.formats import Formatter
from job.errors import UserError
from job.export import verify_manifest
from job.model import load_model, load_tokenizer, quiet_libraries
from job.model_source import resolve_model_dir
from job.spec import Spec, validate_spec
from job.storage import download_dir, is_local


def load_trained(adapter_dir: Path) -> tuple[object, object, Spec]:
    """(model, tokenizer, spec) from a published adapter/ directory (or full model for method 'full')."""
    verify_manifest(adapter_dir)
    spec = validate_spec(json.loads((adapter_dir / "spec.json").read_text()), f"{adapter_dir}/spec.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(adapter_dir, spec.model)
    if spec.adapter.method == "full":
        return load_model(adapter_dir, spec.model, device, full_finetune=True), tokenizer, spec
    from peft import PeftModel

    base = load_model(
        resolve_model_dir(spec.model.source, spec.model.revision, spec.storage_options), spec.model, device
    )
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer, spec


def generate_text(
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, add_bos: bool = True
) -> str:
    """Decode a continuation of prompt; add_bos=False for text that already starts with it (chat templates)."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_bos).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def generate(adapter_uri: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="ftjob-adapter-") as tmp:
        adapter_dir = Path(adapter_uri).expanduser()
        if not is_local(adapter_uri):
            adapter_dir = Path(tmp)
            try:
                download_dir(adapter_uri, adapter_dir)
            except Exception as e:
                raise UserError(f"--adapter: cannot read {adapter_uri}: {type(e).__name__}: {e}") from None
        elif not adapter_dir.is_dir():
            raise UserError(f"--adapter: no such directory: {adapter_uri}")
        model, tokenizer, spec = load_trained(adapter_dir)
        model.eval()
        data = spec.data
        formatter = Formatter(data.format, data.fields, data.train_on, tokenizer, data.chat_template)
        text = formatter.render_prompt(prompt)
        return generate_text(model, tokenizer, text, max_new_tokens, temperature, add_bos=formatter.adds_bos)
