"""What tests share besides fixtures: test data, the CLI in a subprocess, in-process training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}

ALPACA_ROWS = [
    {"instruction": "Reverse the words: red green blue", "output": "blue green red"},
    {"instruction": "Reverse the words: one two", "output": "two one"},
    {"instruction": "Add one", "input": "41", "output": "42"},
    {"instruction": "Say hi", "output": "hi"},
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ftjob(*args: str, cwd: Path, env: dict | None = None, stdin: str | None = None, timeout: int = 600):
    """Run the real CLI in a subprocess (as a batch job would), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        cwd=cwd,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# float32 on every CPU, where `auto` means bf16 on those with AMX: the tests compare numbers tightly,
# and in-process runs share one accelerator, whose mixed precision cannot change within a process
NO_AUTOCAST = "no"


def spec_dict(model_dir, data_files, **sections) -> dict:
    """A small LoRA spec over a local model and (train, eval) files; sections update it."""
    train, evaluation = data_files
    spec = {
        "name": "t",
        "model": {"source": str(model_dir)},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [str(train)], "eval": [str(evaluation)], "max_seq_len": 64, "shuffle_buffer": 8},
        "train": {
            "max_steps": 8,
            "micro_batch_size": 4,
            "learning_rate": 5e-3,
            "eval_every": 4,
            "log_every": 2,
            "mixed_precision": NO_AUTOCAST,
        },
        "tracking": {"experiment": "tests"},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    return spec


_accelerator = None


def train_in_process(spec: dict, restart: bool = False):
    """job.train.train on one Accelerator for the whole test process, made as the CLI makes it."""
    global _accelerator
    from job.accelerator import make_accelerator
    from job.spec import validate_spec
    from job.train import train

    spec = validate_spec(spec)
    _accelerator = _accelerator or make_accelerator(spec.train)
    return train(spec, _accelerator, restart=restart)


def causal_attention(q, k, v, scale):
    """[B, L, H, D] (or [L, H, D]) attention with a causal mask, grouped keys repeated: what a flash
    kernel computes, in plain torch."""
    import torch

    q, k, v = (x.transpose(-3, -2) for x in (q, k, v))  # heads before positions
    k, v = (x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(-3, -2)


def pipeline_for(spec, tokenizer, rank: int = 0, world_size: int = 1):
    """The DataPipeline train() builds for a spec, on one rank of world_size."""
    from job.data.pipeline import DataPipeline

    return DataPipeline(spec.data, tokenizer, spec.train.seed, spec.train.epochs, rank, world_size)


def write_stop_spec(
    directory: Path, model_dir: Path, name: str, steps: int, checkpoint_every: int, seed: int, **sections
) -> Path:
    """A small packed LoRA run with dropout (the RNG must resume too), for stop-and-resume tests;
    `sections` update the spec's sections (e.g. train={"lease_seconds": 6})."""
    rows = [dict(r, output=f"{r['output']} {i}") for i, r in enumerate(ALPACA_ROWS * 15)]
    spec = {
        "name": name,
        "model": {"source": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": [str(write_jsonl(directory / "train.jsonl", rows))], "packing": True, "max_seq_len": 48},
        "train": {"max_steps": steps, "micro_batch_size": 2, "checkpoint_every": checkpoint_every, "log_every": 1, "seed": seed, "mixed_precision": NO_AUTOCAST},
        "tracking": {"enabled": False},
    }  # fmt: skip
    for section, values in sections.items():
        spec[section].update(values)
    path = directory / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def start_run(spec_path: Path, output: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`ftjob run SPEC --set output.uri=OUTPUT ARGS` in a session of its own (as a scheduler starts a
    job), stdout and stderr together on a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "job", "run", str(spec_path), "--set", f"output.uri={output}", *args],
        cwd=spec_path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )


def read_until(process: subprocess.Popen, marker: str) -> list[str]:
    """Read the job's output until a line contains marker."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines)}")


def tiny_causal_lm(arch: str = "llama", **config):
    """A randomly initialized two-layer Llama, Qwen2 (biases on q, k, v) or Mistral with grouped key/value
    heads, in memory, seeded; config overrides the small defaults."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    settings = {
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attn_implementation": "sdpa", **config,
    }  # fmt: skip
    torch.manual_seed(0)
    return model_class(config_class(**settings))


def count_applies(monkeypatch, function) -> list[int]:
    """One entry per call of function.apply (a torch.autograd.Function) from now on in this test."""
    calls, apply = [], function.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(function, "apply", counted)
    return calls
