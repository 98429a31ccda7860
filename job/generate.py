"""`ftjob generate`: load the base model and a published adapter, render the prompt as training did, generate."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from job.data.formats import Formatter
from job.errors import UserError
from job.model.loading import load_model, load_tokenizer
from job.model.source import resolve_model_dir
from job.output.publish import fetch_published
from job.spec import Spec, parse_spec_text, read_spec_text, validate_spec
from job.startup import quiet_libraries
from job.storage import configure_storage, is_local


def load_trained(
    adapter_dir: Path, trust_remote_code: bool = False, base_model: str | None = None
) -> tuple[object, object, Spec]:
    """(model, tokenizer, spec) from a published adapter/ directory (or full model for method 'full')
    whose MANIFEST was verified (fetch_published). The adapter's spec.json is data from storage, not
    an instruction: its trust_remote_code is never honoured (only the caller's). Its model.identity pins
    the base to the model the adapter was trained on (another model under its model.source is refused),
    unless `base_model` replaces the base it names."""
    where = str(adapter_dir / "spec.json")
    data = parse_spec_text(read_spec_text(where)[0], where)
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise UserError(
            f"{where}: model must be a mapping, got {type(model).__name__}; is the adapter damaged?"
        )
    data["model"] = {**model, "trust_remote_code": trust_remote_code}
    if base_model:
        data["model"].update(source=base_model, revision=None, identity=None)
    # Storage options are not taken from the file either (hidden values, or an endpoint of its choosing):
    # the base model is read with this environment's storage settings.
    data["storage_options"] = {}
    spec = validate_spec(data, where)
    configure_storage(None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(adapter_dir, spec.model)
    if spec.adapter.method == "full":
        return load_model(adapter_dir, spec.model, device, full_finetune=True), tokenizer, spec
    from peft import PeftModel

    base = load_model(resolve_model_dir(spec.model), spec.model, device)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer, spec


def stop_tokens(model, tokenizer, formatter: Formatter) -> tuple[list[int], list[str]]:
    """(token ids, strings) that end a generation: EOS, the model's generation_config EOS list, and the
    end-of-turn marker the chat template taught (an id when it is one token, else a stop string)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    marker = formatter.end_of_turn()
    strings = []
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1:
            ids.add(marker_ids[0])
        else:
            strings.append(marker)
    return sorted(ids), strings


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    add_bos: bool = True,
    stop: tuple[list[int], list[str]] | None = None,
) -> str:
    """Decode a continuation of prompt; add_bos=False for text that already starts with it (chat
    templates); `stop`: (ids, strings) that end it, EOS by default."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_bos).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    stop_ids, stop_strings = stop or ([tokenizer.eos_token_id], [])
    if stop_strings:  # transformers matches stop strings through the tokenizer
        sampling.update(stop_strings=stop_strings, tokenizer=tokenizer)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            **sampling,
        )
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for marker in stop_strings:  # a stop string that is not a special token stays in the text
        text = text.split(marker, 1)[0]
    return text


def generate(
    adapter_uri: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    trust_remote_code: bool = False,
    base_model: str | None = None,
) -> str:
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="ftjob-adapter-") as tmp:
        if is_local(adapter_uri):
            adapter_uri = os.path.expanduser(adapter_uri)
            if not Path(adapter_uri).is_dir():
                raise UserError(f"--adapter: no such directory: {adapter_uri}")
        try:
            adapter_dir = fetch_published(adapter_uri, Path(tmp))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"--adapter: cannot read {adapter_uri}: {type(e).__name__}: {e}") from None
        model, tokenizer, spec = load_trained(adapter_dir, trust_remote_code, base_model)
        model.eval()
        data = spec.data
        formatter = Formatter.of(data, tokenizer)
        text = formatter.render_prompt(prompt)
        return generate_text(
            model,
            tokenizer,
            text,
            max_new_tokens,
            temperature,
            add_bos=formatter.adds_bos,
            stop=stop_tokens(model, tokenizer, formatter),
        )
