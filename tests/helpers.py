"""What tests share besides fixtures: test data, the CLI in this process or a subprocess, in-process training."""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import (
    AbstractContextManager,
    chdir,
    nullcontext,
    redirect_stderr,
    redirect_stdout,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from unittest import mock

import pytest

from job.signals import StopRequest

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


def tiny_corpus() -> list[str]:
    """The text the tiny model's tokenizer is trained on."""
    from job.data.formats import alpaca_prompt

    return [alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in ALPACA_ROWS] * 20


def mark_tier(items: list, folder: Path, marker: pytest.MarkDecorator) -> None:
    """Mark the items collected from folder: a conftest's collection hook sees every item of the session."""
    for item in items:
        if item.path.parent == folder:
            item.add_marker(marker)


def may_set_up_the_machine() -> bool:
    """Whether a fixture may install Debian packages or start daemons for its tests: as root, unless the
    user said FTJOB_TEST_INSTALL=no."""
    return os.geteuid() == 0 and os.environ.get("FTJOB_TEST_INSTALL", "yes") != "no"


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ftjob(
    *args: str, cwd: Path | None = None, env: dict | None = None, stdin: str | None = None, timeout: int = 600
):
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


@dataclass
class Ran:
    """What run_ftjob's CompletedProcess gives: the exit code, stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def ftjob(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    stdin: str | None = None,
    timeout: float | None = None,
) -> Ran:
    """`ftjob ARGS` through job.cli.main in this process: the exit code, stdout and stderr that run_ftjob
    would give, without an interpreter start. Put back afterwards: os.environ, the working directory,
    sys.stdin, the `job` logger and the stop signals' handlers. `timeout` (SIGALRM) is for validate and
    launch only: run and preview time rows with the same timer."""
    from job.cli import main
    from job.signals import STOP_SIGNALS

    saved_environ, saved_cwd, saved_stdin = os.environ.copy(), os.getcwd(), sys.stdin
    logger = logging.getLogger("job")
    saved_logging = (logger.handlers[:], logger.level)
    saved_handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    if "s3fs" in sys.modules:  # as in a new process: no filesystem made for another endpoint or credentials
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()
    try:
        with (
            chdir(cwd or saved_cwd),
            redirect_stdout(stdout),
            redirect_stderr(stderr),
            _alarm_after(timeout),
            # in a process that has not imported transformers yet, a run would hide bitsandbytes for the
            # rest of the session, and the 4- and 8-bit tests after it would fail
            mock.patch("job.startup.leave_out_bitsandbytes"),
        ):
            sys.stdin = io.StringIO(stdin or "")
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else 2
    finally:
        sys.stdin = saved_stdin
        os.environ.clear()
        os.environ.update(saved_environ)
        logger.handlers, logger.level = saved_logging
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)
    return Ran(code, stdout.getvalue(), stderr.getvalue())


def _alarm_after(seconds: float | None) -> AbstractContextManager[None]:
    if seconds is None:
        return nullcontext()
    from job.signals import time_limit

    return time_limit(seconds, TimeoutError(f"ftjob did not return within {seconds} s"))


# float32 on every CPU, where `auto` means bf16 on those with AMX: the tests compare numbers tightly,
# and in-process runs share one accelerator, whose mixed precision cannot change within a process
NO_AUTOCAST = "no"


def numbered_rows() -> list[dict]:
    """60 alpaca rows, each output numbered: no two rows alike, so a row read twice or skipped shows."""
    return [dict(r, output=f"{r['output']} {i}") for i, r in enumerate(ALPACA_ROWS * 15)]


RESUME_STEPS = 30  # the resume spec's steps: the `spec_path` fixture

# make_spec's presets, less the model
PRESETS = {
    "minimal": {"data": {"train": ["d.jsonl"]}, "train": {"max_steps": 1}},
    "lora": {
        "name": "t",
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"max_seq_len": 64, "shuffle_buffer": 8},
        "train": {"max_steps": 8, "micro_batch_size": 4, "learning_rate": 5e-3, "eval_every": 4, "log_every": 2, "mixed_precision": NO_AUTOCAST},
        "tracking": {"experiment": "tests"},
    },
    "stop": {
        "name": "r",
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"packing": True, "max_seq_len": 48},
        "train": {"max_steps": RESUME_STEPS, "micro_batch_size": 2, "checkpoint_every": 5, "log_every": 1, "seed": 3, "mixed_precision": NO_AUTOCAST},
        "tracking": {"enabled": False},
    },
}  # fmt: skip


def make_spec(
    preset: Literal["minimal", "lora", "stop"] = "minimal",
    *,
    model: str | Path | dict = "unused",
    files: Path | tuple[Path, Path] | None = None,
    **sections,
) -> dict:
    """A spec as a dict (JSON-ready). `preset`: minimal (data d.jsonl, one step: nothing trains on it),
    lora (8 steps of LoRA r8 over the tiny model, eval, MLflow experiment "tests") or stop (RESUME_STEPS
    steps of packed LoRA with dropout, a checkpoint every 5, tracking off: the resume spec, whose RNG must
    resume too). `model`: model.source, or the whole model section (a dict). `files`: a folder, where the
    preset's rows are written and named (stop: train.jsonl of 60 numbered rows; the others: train.jsonl
    of 32 rows and eval.jsonl of 4), or (train, eval) paths as the data_files fixture gives them.
    `sections`: a dict is merged into its section one level deep (a key set to None stays None, which the
    spec reads as unset); any other value replaces the key; None drops the section."""
    spec = {"model": model if isinstance(model, dict) else {"source": str(model)}, **PRESETS[preset]}
    if files is not None:
        spec["data"] |= _data_files(preset, files)
    for section, values in sections.items():
        if values is None:
            spec.pop(section, None)
        elif isinstance(values, dict):
            spec[section] = {**spec.get(section, {}), **values}
        else:
            spec[section] = values
    return copy.deepcopy(spec)  # the caller may change what it gets: not the presets, nor its arguments


def _data_files(preset: str, files: Path | tuple[Path, Path]) -> dict:
    if isinstance(files, tuple):
        train, evaluation = files
        return {"train": [str(train)], "eval": [str(evaluation)]}
    if preset == "stop":
        return {"train": [str(write_jsonl(files / "train.jsonl", numbered_rows()))]}
    train = write_jsonl(files / "train.jsonl", ALPACA_ROWS * 8)
    return {"train": [str(train)], "eval": [str(write_jsonl(files / "eval.jsonl", ALPACA_ROWS))]}


def write_spec(path: Path, spec: dict) -> Path:
    """spec written as JSON at path; returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return path


_accelerator = None


def train_in_process(spec: dict, restart: bool = False, stop: StopRequest | None = None):
    """job.train.train on one Accelerator for the whole test process, made as the CLI makes it; `stop`
    as `ftjob run` passes it (StopAfterSteps: a stop signal at a given step)."""
    global _accelerator
    from job.accelerator import make_accelerator
    from job.spec import validate_spec
    from job.train import train

    spec = validate_spec(spec)
    _accelerator = _accelerator or make_accelerator(spec.train)
    return train(spec, _accelerator, restart=restart, stop=stop)


class StopAfterSteps(StopRequest):
    """A stop signal (SIGTERM) that arrives as an in-process run finishes its `steps`-th step (step `steps`
    of a run from scratch): the run checkpoints and raises Preempted (exit 75), as a signalled job does,
    without a process or a signal handler."""

    def __init__(self, steps: int):
        super().__init__(grace_seconds=60)
        self.steps, self.trained = steps, 0

    def agreed(self, accelerator) -> bool:
        if self.checkpointer is not None:  # training: the loop asks once per step
            self.trained += 1
            if self.trained == self.steps:
                self.signal, self.received_at = signal.SIGTERM, time.monotonic()
        return self.requested


def causal_attention(q, k, v, scale):
    """[B, L, H, D] (or [L, H, D]) attention with a causal mask, grouped keys repeated: what a flash
    kernel computes, in plain torch."""
    import torch

    q, k, v = (x.transpose(-3, -2) for x in (q, k, v))  # heads before positions
    k, v = (x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(-3, -2)


def pipeline_for(spec, tokenizer, rank: int = 0, world_size: int = 1):
    """The DataPipeline train() builds for a spec, on one rank of world_size (on a CPU)."""
    from job.data.pipeline import DataPipeline

    spec = spec.for_device("cpu")
    return DataPipeline(spec.data, tokenizer, spec.train.seed, spec.train.epochs, rank, world_size)


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "adapter" / "metrics.json").read_text())["history"]
    return [h["train/loss"] for h in history]


def assert_same_run(workdir, uninterrupted: str, resumed: str) -> None:
    """The adapters (bitwise) and loss curves of two runs under workdir are the same."""
    from safetensors.torch import load_file

    assert losses(workdir / resumed) == losses(workdir / uninterrupted)
    a = load_file(workdir / uninterrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(workdir / resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bitwise


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


# The lease tests' pieces: a lease another job wrote, and what a job left behind.
LEASE_SECONDS = 6
COLLECTIVE_TIMEOUT = 1800  # train.collective_timeout_seconds, the longest a job waits for a lease


def lease_record(**fields) -> dict:
    """A lease.json another job wrote, renewed now and live for a minute unless fields say otherwise."""
    now = time.time()
    return {"owner": "f" * 32, "host": "node-7", "pid": 4242, "job": None, "generation": 1,
            "renewed_at": now, "expires_at": now + 60, "released": False, **fields}  # fmt: skip


def write_lease(output: Path, record: dict | str) -> None:
    """As another job writes it (a record, or damaged text): whole at once (a rename), so the job under
    test never reads half of it."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "lease.json.tmp").write_text(record if isinstance(record, str) else json.dumps(record))
    os.replace(output / "lease.json.tmp", output / "lease.json")


def read_lease(output: Path) -> dict:
    return json.loads((output / "lease.json").read_text())


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


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


def values(pairs) -> list:
    """The rows' values of what read_rows gives (row, position pairs)."""
    return [row.value for row, _ in pairs]


def one_epoch_spec(train: list[str], **data):
    """A validated spec over `train` for one pass over the data (train.epochs=1), so that
    train_batches ends; the model is never loaded."""
    from job.spec import validate_spec

    return validate_spec(make_spec(data={"train": train, **data}, train={"epochs": 1, "max_steps": None}))


def completion_text(tokenizer, example) -> str:
    """The loss-bearing text of an example (train_on 'completion': its completion), EOS left out."""
    from job.data.tokens import IGNORE_INDEX

    ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert ids[-1] == tokenizer.eos_token_id
    return tokenizer.decode(ids[:-1])


def put_other_weights(model: Path) -> None:
    """Other weights under the same model.source, as a re-upload of the model would leave."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, model / "model.safetensors", {"format": "pt"})


def attend_by_segments(query, key, value, offsets, scale=None, causal: bool = True, enable_gqa: bool = False):
    """[tokens, heads, dim] inputs whose segments lie end to end at `offsets`, as the variable-length
    kernels take them (flash-attn's, PyTorch's varlen_attn): one sdpa call per segment, on the CPU."""
    import torch
    import torch.nn.functional as F

    parts = [
        F.scaled_dot_product_attention(
            *(x[start:end].transpose(0, 1)[None] for x in (query, key, value)),
            is_causal=causal, scale=scale, enable_gqa=enable_gqa,
        )[0].transpose(0, 1)
        for start, end in itertools.pairwise(offsets.tolist())
    ]  # fmt: skip
    return torch.cat(parts)
