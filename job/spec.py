"""The job spec (v1): its schema, how it is read, overridden and validated.

A spec comes from a file, an fsspec URL, standard input or FTJOB_SPEC, then single keys are
overridden by FTJOB__SECTION__KEY variables and `--set section.key=value` (in that order).
Every problem is reported at once, each with its JSON path; nothing starts on error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from job.errors import UserError
from job.prompt_template import PromptTemplate, TemplateError, unknown_fields

# The fields of each data.format (data.fields maps them to the user's column names).
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
}
OPTIONAL_FIELDS = {"input"}
# The micro-batch of a spec that sets none (Spec.for_device): on GPUs as many rows as hold this many
# tokens (the H200 measurement of a 1B LoRA in bench/RESULTS.md: 16 x 512, 227 ms a step), on CPUs
# this many rows.
GPU_MICRO_BATCH_TOKENS = 8192
CPU_MICRO_BATCH = 4
GPU_PREFETCH = 2  # data.prefetch's default on GPUs (Spec.for_device)
# A model's identity (job/model/source.py): a Hub repo's commit, or a digest of a folder's files.
MODEL_IDENTITY = r"hub:[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)?@[0-9a-f]{40}|sha256:[0-9a-f]{64}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    source: str = Field(
        description="Local directory, Hugging Face Hub id, or object-store URL (s3://bucket/model/)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype. auto: bfloat16 on a GPU that supports it (float32 for adapter.method "
        "full), else float32.",
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None,
        description="Load the base model quantized with bitsandbytes (QLoRA). 4bit is NF4 + double quant.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off: it is code."
    )
    identity: str | None = Field(
        None,
        pattern=f"^(?:{MODEL_IDENTITY})$",
        description="The model trained on, as a run records it in the published spec.json: hub:<repo>@<commit>, "
        "or sha256: over the files it loads. Given, it pins model.source: another model there is refused.",
    )


class AdapterSpec(_Section):
    method: Literal["lora", "dora", "full"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "all-linear", description='"all-linear", or a list of module names (q_proj, v_proj, ...).'
    )


class BadRowsSpec(_Section):
    policy: Literal["skip", "fail"] = "skip"
    max_fraction: float = Field(0.01, ge=0, le=1)


class SourceSpec(_Section):
    path: str | list[str] = Field(description="fsspec URL or glob (or a list of them) of one data source.")
    weight: float = Field(
        1.0, gt=0, description="Relative share of training examples drawn from this source."
    )


class DataSpec(_Section):
    train: list[str | SourceSpec] = Field(
        min_length=1,
        description="fsspec URLs or globs (JSONL, JSON, Parquet, CSV, text; .gz/.bz2/.zst/.xz inferred), "
        'or sources with mixing weights: {"path": ..., "weight": ...}.',
    )
    eval: list[str] = Field(default_factory=list)
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of data.train for eval (a stable hash split)."
    )
    format: Literal["alpaca", "chat", "completion", "text"] = "alpaca"
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map of the format's field names to your column names; with data.prompt_template, "
        "also of the other fields it places.",
    )
    prompt_template: str | None = Field(
        None,
        description="alpaca and completion: the prompt written over the row's fields, e.g. "
        "'Instruction: {instruction}\\n[[Input: {input}\\n]]Response: ' ({field}: a field of the format or "
        "one data.fields names; [[...]]: only when its fields are non-empty; {{ and }}: braces). Default: "
        "alpaca's template, or the completion format's prompt field as it is.",
    )
    chat_template: str | None = Field(None, description="Jinja chat template; default: the tokenizer's.")
    max_seq_len: int = Field(2048, gt=0)
    packing: bool | None = Field(
        None,
        description="Pack several examples into each max_seq_len row. Default (null): on for GPUs, off for "
        "CPUs.",
    )
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="Examples longer than max_seq_len: keep their head, or drop them."
    )
    shuffle_buffer: int = Field(
        10000, ge=0, description="Rows held for a seeded shuffle; 0 keeps file order."
    )
    prefetch: int | None = Field(
        None,
        ge=0,
        le=64,
        description="How many steps' micro-batches wait ready, read, tokenized and packed on a data thread "
        "while the device trains (which makes the next meanwhile); 0: made on the training thread between "
        f"steps. Default (null): {GPU_PREFETCH} on GPUs; 0 on CPUs, where the thread takes cores from the "
        "step (bench/RESULTS.md).",
    )
    train_on: Literal["completion", "all"] = Field(
        "completion",
        description="completion: loss on responses (assistant turns) only; all: loss on prompts too.",
    )
    bad_rows: BadRowsSpec = Field(default_factory=BadRowsSpec)
    max_row_bytes: int = Field(
        8 << 20,
        gt=0,
        description="A row longer than this many bytes (a line of JSON Lines or text, a CSV record with "
        "all its lines, an item of a JSON array, a Parquet row) is a bad row, read past without being "
        "held in memory; so is every row of a Parquet row group over this many bytes per row on average, "
        "which is not decoded.",
    )

    def train_groups(self) -> list[tuple[list[str], float]]:
        """data.train entries as (patterns, weight)."""
        groups = []
        for entry in self.train:
            if isinstance(entry, str):
                groups.append(([entry], 1.0))
            else:
                groups.append(
                    ([entry.path] if isinstance(entry.path, str) else list(entry.path), entry.weight)
                )
        return groups

    @property
    def weighted(self) -> bool:
        """True when data.train mixes sources by weight (any entry given as a {path, weight} source)."""
        return any(isinstance(entry, SourceSpec) for entry in self.train)


class FsdpSpec(_Section):
    reshard_after_forward: bool = Field(
        True,
        description="Free each wrap unit's gathered parameters after its forward and gather them again for "
        "its backward: less memory, one more all-gather per unit and step. false keeps them until backward.",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep the parameter shards, their gradients and the optimizer state in host memory, the "
        "optimizer stepping on the CPU: bigger models on the same GPUs, slower steps. GPUs only.",
    )
    wrap_classes: list[str] | None = Field(
        None,
        min_length=1,
        description="Module class names sharded as units, each gathered whole for its forward and backward "
        "(e.g. LlamaDecoderLayer); default: the model's decoder layer classes (its _no_split_modules).",
    )


class TrainSpec(_Section):
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps. Exactly one of max_steps or epochs."
    )
    epochs: int | None = Field(
        None, gt=0, description="Passes over data.train. Exactly one of max_steps or epochs."
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description=f"Rows per micro-batch. Default (null): on GPUs as many as hold {GPU_MICRO_BATCH_TOKENS} "
        f"tokens (that // data.max_seq_len, at least 1); on CPUs {CPU_MICRO_BATCH}.",
    )
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip gradients to this norm; null: no clipping."
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto",
        description="auto: bf16 on a GPU that supports it, fp16 on other GPUs; on a CPU bf16 where it has "
        "bf16 matrix units (AMX), else none.",
    )
    gradient_checkpointing: bool = False
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (compiled once, its code reused by the others), after "
        "the adapter is applied and any sharding, for the training forwards (evals and generation run "
        "uncompiled). The first steps carry the compile time (the second compiles once more, with the sizes "
        "that changed symbolic). On a CPU not faster than ftjob's eager layers (bench/RESULTS.md).",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How several processes train one model. ddp: each holds the whole model, gradients are "
        "averaged. fsdp: parameters, gradients and optimizer state are sharded over the processes (torch's "
        "FSDP2), for models whose training state does not fit on one device.",
    )
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="Options of train.distributed fsdp.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    seed: int = 42
    checkpoint_every: int | Literal["epoch"] = Field(
        100,
        description="Checkpoint every N steps (0: only when stopped by a signal), or epoch: after the step "
        "that ends each epoch's data (an epoch whose last micro-batch ends a step: after the next step).",
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _steps_or_epoch(cls, value: Any) -> Any:
        if value == "epoch" or (type(value) is int and value >= 0):
            return value
        raise ValueError(f"a number of steps (0 or more) or 'epoch', not {value!r}")

    stop_grace_seconds: float = Field(
        90, gt=0, description="After a stop signal, exit within this time even if the checkpoint is not done."
    )
    collective_timeout_seconds: float = Field(
        1800,
        gt=0,
        description="With several processes: how long a rank waits for the others in a collective (each "
        "checkpoint waits for the previous upload to commit) before the job fails.",
    )
    peer_timeout_seconds: float = Field(
        60,
        ge=5,
        description="With several processes: a process of the job that has sent no heartbeat for this long "
        "(its node powered off, cut from the network, frozen) is a lost peer, and the others exit 76.",
    )
    lease_seconds: float = Field(
        120,
        ge=5,
        description="How long the job's hold on <output.uri>/lease.json lasts unless renewed (every third "
        "of it); another job takes output.uri over once it is released or has expired.",
    )
    eval_every: int = Field(
        100, ge=0, description="Eval loss every N steps (and at the end); 0: only at the end."
    )
    log_every: int = Field(10, gt=0)


class TrackingSpec(_Section):
    enabled: bool = True
    experiment: str = "ftjob"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    system_metrics: bool = Field(
        True,
        description="Log CPU, memory, disk, network (and GPU) use as system/* metrics; the sampling "
        "interval is MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds, default 10).",
    )
    register_as: str | None = Field(
        None, description="Register the final adapter as a new version of this MLflow model."
    )


class HarnessSpec(_Section):
    """eval.harness: lm-evaluation-harness tasks scored on the model as it trains."""

    tasks: list[str] = Field(
        min_length=1,
        description="lm-evaluation-harness tasks: names of lm-eval's own tasks and groups (e.g. hellaswag; "
        "their data comes from the Hugging Face Hub), or paths or fsspec URLs of task YAML files (.yaml, "
        ".yml; a file read from a URL cannot include files next to it). Each is scored as "
        "harness/<task>/<metric>.",
    )
    every: Literal["checkpoint", "end"] = Field(
        "end",
        description="When the tasks are scored: at each checkpoint (not the one a stop signal asks for) "
        "and at the end, or only at the end.",
    )
    limit: int | None = Field(
        None,
        gt=0,
        description="Score at most this many examples of each task (its first ones); null: all of them.",
    )
    batch_size: int = Field(
        8,
        gt=0,
        description="Requests scored per forward pass. Each batch's logits are whole in memory (batch x "
        "length x vocabulary), unlike training's.",
    )

    @field_validator("tasks")
    @classmethod
    def _each_task_once(cls, tasks: list[str]) -> list[str]:
        if any(not task.strip() for task in tasks):
            raise ValueError("a task is an empty string")
        twice = sorted({task for task in tasks if tasks.count(task) > 1})
        if twice:
            raise ValueError(f"named more than once: {', '.join(twice)}")
        return tasks


class EvalSpec(_Section):
    harness: HarnessSpec | None = Field(
        None,
        description="lm-evaluation-harness tasks scored on the model as it trains (the eval extra: pip "
        "install 'ftjob[eval]').",
    )
    samples: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Prompts generated greedily at each eval (train.eval_every, eval.harness's evals and the "
        "end), rendered as training renders a prompt, logged to MLflow as the table eval_samples.json "
        "(step, prompt, generation).",
    )
    sample_length: int = Field(
        64, gt=0, le=1024, description="Tokens generated at most for each of eval.samples."
    )


class OutputSpec(_Section):
    uri: str = Field("./runs/{name}", description="Any fsspec URL; {name} is replaced by the spec's name.")
    keep_checkpoints: int = Field(2, ge=1, description="Committed checkpoints kept; older ones are deleted.")
    merge: bool = Field(False, description="Also write merged/: the base model with the adapter merged in.")


class ReportSpec(_Section):
    """report: what the job cost, in <output.uri>/report.json, MLflow's report/* metrics and `ftjob report`."""

    price_per_device_hour: float | None = Field(
        None,
        ge=0,
        le=1e6,
        description="The price of one device (GPU, or CPU process) for an hour, in any currency: the report "
        "adds the cost and the cost per million trained tokens. Null: FTJOB_PRICE_PER_DEVICE_HOUR, else no "
        "cost.",
    )


class Spec(_Section):
    name: str = Field("ftjob-run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='fsspec options per protocol, e.g. {"s3": {"endpoint_url": "http://minio:9000"}}. '
        "Credentials belong in the environment (AWS_*), not here.",
    )

    @property
    def output_uri(self) -> str:
        return self.output.uri.replace("{name}", self.name)

    def for_device(self, device_type: str) -> Spec:
        """The spec with the defaults that depend on the device filled in (those left null): on GPUs
        packing, micro-batches of GPU_MICRO_BATCH_TOKENS tokens (throughput grows with the tokens of a
        step) and the data thread; on CPUs none of them, and CPU_MICRO_BATCH rows."""
        gpu = device_type != "cpu"
        data, train = self.data, self.train
        if data.packing is None:
            data = data.model_copy(update={"packing": gpu})
        if data.prefetch is None:
            data = data.model_copy(update={"prefetch": GPU_PREFETCH if gpu else 0})
        if train.micro_batch_size is None:
            rows = max(1, GPU_MICRO_BATCH_TOKENS // data.max_seq_len) if gpu else CPU_MICRO_BATCH
            train = train.model_copy(update={"micro_batch_size": rows})
        return self.model_copy(update={"data": data, "train": train})


# ---------------------------------------------------------------------------------------------
# Reading


# A spec is a few kilobytes; these bound what a hostile or broken one can cost before it is refused
# (a 1 KB YAML alias bomb expands to a billion values).
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000
MAX_SPEC_DEPTH = 64


def read_spec_text(source: str | None) -> tuple[str, str]:
    """Return (text, where) for SPEC: a path, an fsspec URL, '-' for stdin, or FTJOB_SPEC when None."""
    if source is None:
        source = os.environ.get("FTJOB_SPEC")
        if not source:
            raise UserError("no spec given: pass SPEC (a path, URL or '-') or set FTJOB_SPEC")
        if source.lstrip().startswith("{"):
            return _bounded(source, "FTJOB_SPEC"), "FTJOB_SPEC"
    if source == "-":
        return _bounded(sys.stdin.read(MAX_SPEC_BYTES + 1), "<stdin>"), "<stdin>"
    try:
        if "://" in source:
            import fsspec

            with fsspec.open(source, "rt", encoding="utf-8") as f:
                return _bounded(f.read(MAX_SPEC_BYTES + 1), source), source
        with open(source, encoding="utf-8") as f:
            return _bounded(f.read(MAX_SPEC_BYTES + 1), source), source
    except FileNotFoundError:
        raise UserError(f"spec file not found: {source}") from None
    except IsADirectoryError:
        raise UserError(f"spec is a directory, not a file: {source}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read spec {source}: {e}") from None


def _bounded(text: str, where: str) -> str:
    if len(text) > MAX_SPEC_BYTES:
        raise UserError(f"{where}: larger than {MAX_SPEC_BYTES // 1024} KiB; is this a spec?")
    return text


def parse_spec_text(text: str, where: str) -> dict[str, Any]:
    """JSON or YAML to a mapping; syntax errors name the line and column.

    .json names are JSON and .yaml/.yml names YAML; without either, text that starts with '{' is JSON.
    """
    is_yaml_name = where.endswith((".yaml", ".yml"))
    if where.endswith(".json") or (not is_yaml_name and text.lstrip().startswith("{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise UserError(f"{where}: nested too deeply") from None
    else:
        data = load_yaml(text, where)
    if not isinstance(data, dict):
        raise UserError(f"{where}: the spec must be a mapping of sections, got {type(data).__name__}")
    return data


def _check_size(data: Any, where: str) -> None:
    """Refuse a spec whose values, with every YAML alias expanded, are too many or too deep, before
    anything walks it. Counted without recursion, and stopped at the limit, so a bomb costs little."""
    values = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        values += 1
        if values > MAX_SPEC_VALUES:
            raise UserError(
                f"{where}: more than {MAX_SPEC_VALUES} values once YAML aliases (*name) are expanded"
            )
        if depth > MAX_SPEC_DEPTH:
            raise UserError(f"{where}: nested more than {MAX_SPEC_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        position = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}{position}: invalid YAML: {problem}") from None


def parse_value(text: str, origin: str) -> Any:
    """An override's value: JSON where it parses (1e-4, true, null), YAML for [lists] and {maps}, else text.

    Plain words stay strings: YAML would turn `no` or `on` into booleans.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError:
        raise UserError(f"{origin}: nested too deeply") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
        except RecursionError:
            raise UserError(f"{origin}: nested too deeply") from None
    return text


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """FTJOB__TRAIN__LEARNING_RATE=1e-4 -> ('train.learning_rate', '1e-4')."""
    prefix = "FTJOB__"
    return [
        (name[len(prefix) :].lower().replace("__", "."), value)
        for name, value in sorted(environ.items())
        if name.startswith(prefix)
    ]


def apply_override(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    if not all(parts):
        raise UserError(f"{origin}: '{key}' is not a dotted key such as train.learning_rate")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{origin}: {'.'.join(parts[: i + 1])} is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def override_variable(key: str) -> str:
    """'train.learning_rate' -> 'FTJOB__TRAIN__LEARNING_RATE', the variable that overrides it."""
    return f"FTJOB__{key.upper().replace('.', '__')}"


def check_secret_env_overrides(environ: Mapping[str, str]) -> None:
    """Refuse every FTJOB__ variable of a key whose value is not secret (`ftjob run --env-overrides
    secrets`, as a Kubernetes pod runs): a Secret's keys become the pod's variables, and may carry
    secret values but not change the spec that `ftjob launch k8s` checked."""
    refused = [key for key, _ in env_overrides(environ) if not is_secret_key(key)]
    if refused:
        lines = "\n".join(
            f"  - {override_variable(key)}: remove it from the environment (a Secret); pass --set {key}=VALUE "
            "to ftjob launch instead"
            for key in refused
        )
        raise UserError(
            "--env-overrides secrets: the environment may set only secret values of the spec (storage_options "
            f"credentials, keys named like token, secret, password or key), not:\n{lines}"
        )


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """How a command takes a spec, as load_spec reads it: its source, then --set overrides."""
    parser.add_argument("spec", nargs="?", help="path, fsspec URL or '-' (stdin); default: $FTJOB_SPEC")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. train.max_steps=10",
    )


def load_spec(
    source: str | None,
    overrides: list[str] = (),
    environ: Mapping[str, str] | None = None,
    secret_env_only: bool = False,
) -> Spec:
    """Read, override and validate a spec. Raises UserError naming every problem. `secret_env_only`:
    refuse the FTJOB__ variables of keys whose values are not secret (check_secret_env_overrides)."""
    environ = os.environ if environ is None else environ
    if secret_env_only:
        check_secret_env_overrides(environ)
    text, where = read_spec_text(source)
    data = parse_spec_text(text, where)
    for key, value in env_overrides(environ):
        origin = override_variable(key)
        apply_override(data, key, parse_value(value, origin), origin)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        apply_override(data, key.strip(), parse_value(value, f"--set {key.strip()}"), f"--set {item}")
    return validate_spec(data, where)


def validate_spec(data: dict[str, Any], where: str = "spec") -> Spec:
    """A Spec from a mapping, or UserError listing every problem: field errors and cross-key rules."""
    _check_size(data, where)
    problems = []
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        problems = [_describe(error) for error in e.errors()]
    problems += cross_key_problems(data)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"{where}: {len(problems)} problem(s) in the spec:\n{lines}")
    return spec


def template_fields(data_spec: dict[str, Any]) -> list[str]:
    """The fields data.prompt_template places; none when it is unset or cannot be read."""
    text = data_spec.get("prompt_template")
    try:
        return PromptTemplate.parse(text).fields if isinstance(text, str) else []
    except TemplateError:
        return []


def prompt_template_problems(data_format: Any, text: Any, fields: Any) -> list[str]:
    """data.prompt_template: for the alpaca and completion formats, readable, naming only fields of the
    format or fields data.fields names."""
    if not isinstance(text, str):
        return []
    if data_format not in ("alpaca", "completion"):
        return [f"data.prompt_template: for the alpaca and completion formats, not '{data_format}'"]
    try:
        template = PromptTemplate.parse(text)
    except TemplateError as e:
        return [f"data.prompt_template: {e}"]
    known = [*FORMAT_FIELDS[data_format], *(fields if isinstance(fields, dict) else {})]
    unknown = unknown_fields(template, known)
    if unknown:
        return [
            f"data.prompt_template: {', '.join(unknown)} not a field of format '{data_format}' "
            f"({', '.join(FORMAT_FIELDS[data_format])}) or of data.fields; add them to data.fields "
            "(name: your column)"
        ]
    return []


def cross_key_problems(data: dict[str, Any]) -> list[str]:
    """Rules between keys, checked on the raw mapping so they are reported beside field errors."""

    def section(name: str) -> dict[str, Any]:
        value = data.get(name)
        return value if isinstance(value, dict) else {}

    train, adapter, model, data_spec = section("train"), section("adapter"), section("model"), section("data")
    problems = []
    if isinstance(data.get("train"), dict) and (train.get("max_steps") is None) == (
        train.get("epochs") is None
    ):
        problems.append("train: set exactly one of train.max_steps or train.epochs")
    data_format, fields = data_spec.get("format", "alpaca"), data_spec.get("fields")
    problems += prompt_template_problems(data_format, data_spec.get("prompt_template"), fields)
    if data_format in FORMAT_FIELDS and isinstance(fields, dict):
        unknown = sorted(set(fields) - set(FORMAT_FIELDS[data_format]) - set(template_fields(data_spec)))
        if unknown:
            problems.append(
                f"data.fields: {', '.join(map(str, unknown))} not a field of format '{data_format}' "
                f"(its fields: {', '.join(FORMAT_FIELDS[data_format])})"
            )
    if data_spec.get("eval") and data_spec.get("eval_fraction"):
        problems.append("data.eval_fraction: set data.eval or data.eval_fraction, not both")
    if train.get("epochs") is not None and any(isinstance(e, dict) for e in data_spec.get("train") or []):
        problems.append(
            "train.epochs: sources mixed by weight have no common epoch; set train.max_steps instead"
        )
    lease, collective = (
        train.get(key, TrainSpec.model_fields[key].default)
        for key in ("lease_seconds", "collective_timeout_seconds")
    )
    if type(lease) in (int, float) and type(collective) in (int, float) and lease >= collective:
        problems.append(
            f"train.lease_seconds: {lease} must be under train.collective_timeout_seconds ({collective}): "
            "rank 0 may wait that long for another run's lease to expire while the other ranks wait in a collective"
        )
    problems += [
        f"{where}: a URL with credentials in it (user:password@); they would be logged and published "
        "with the spec. Put them in the environment (AWS_*, HF_TOKEN, ...) or a Secret instead"
        for where, value in strings_in(data)
        if URL_CREDENTIALS.search(value)
    ]
    if train.get("distributed") == "fsdp":
        problems += fsdp_problems(train, model)
    full = adapter.get("method") == "full"
    if full and model.get("quantization"):
        problems.append("adapter.method: 'full' cannot train a quantized model; unset model.quantization")
    if full and section("output").get("merge"):
        problems.append(
            "output.merge: applies to adapters; adapter.method 'full' already saves the whole model"
        )
    return problems


def fsdp_problems(train: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """What train.distributed fsdp does not train."""
    problems = []
    if model.get("quantization") == "8bit":
        problems.append(
            "model.quantization: 8bit is not trained with train.distributed fsdp; use 4bit (QLoRA), or ddp"
        )
    if train.get("mixed_precision") == "fp16":
        problems.append(
            "train.mixed_precision: fp16 is not trained with train.distributed fsdp (its sharded gradients "
            "get no loss scaling); use bf16, or no"
        )
    return problems


def strings_in(value: Any, where: str = "") -> list[tuple[str, str]]:
    """(dotted path, string) of every string in a parsed spec, at any depth."""
    if isinstance(value, dict):
        return [
            found for k, v in value.items() for found in strings_in(v, f"{where}.{k}" if where else str(k))
        ]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in strings_in(v, f"{where}[{i}]")]
    return [(where, value)] if isinstance(value, str) else []


def _json_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that holds the key at loc (for 'did you mean')."""
    model: type[BaseModel] = Spec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = _json_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        known = list(model.model_fields) if model else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = (
            f"; did you mean '{hint[0]}'?" if hint else (f"; known keys: {', '.join(known)}" if known else "")
        )
        return f"{path}: unknown key{suggestion}"
    if kind == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {error['msg']} (got {echo(error.get('input'))})"


def echo(value: Any, limit: int = 80) -> str:
    """A value from the user's input as it may be shown in a message: redacted and cut short."""
    text = repr(redact(value))
    return text if len(text) <= limit else f"{text[:limit]}..."


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


SPEC_REFERENCE_INTRO = """\
# Spec reference

Every key of the spec (v1), from its JSON Schema: this file is the output of `ftjob schema --markdown`,
and a unit test keeps the two equal (change job/spec.py, then regenerate this file). Unknown keys are
errors; the rules between keys (one of `train.max_steps` or `train.epochs`, ...) are in
`cross_key_problems` in job/spec.py. How a spec is read and overridden: [contracts.md](contracts.md).
"""


def schema_markdown(schema: dict[str, Any] | None = None) -> str:
    """docs/spec.md: the spec's JSON Schema as one table of keys per section (`ftjob schema --markdown`)."""
    schema = json_schema() if schema is None else schema
    return "\n".join([SPEC_REFERENCE_INTRO, *_section_tables("", schema, schema["$defs"])])


Sections = list[tuple[str, dict[str, Any]]]  # (dotted path, the section's object schema)


def _section_tables(path: str, section: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    """The table of a section's keys, then the tables of the sections inside it, depth first."""
    inner: Sections = []
    rows = [
        _key_row(f"{path}.{key}" if path else key, value, key in section.get("required", ()), defs, inner)
        for key, value in section["properties"].items()
    ]
    heading = f"`{path}`" if path else "Top level"
    table = "| key | type | default | description |\n| --- | --- | --- | --- |\n" + "\n".join(rows)
    return [f"## {heading}\n\n{table}\n", *(t for at, s in inner for t in _section_tables(at, s, defs))]


def _key_row(path: str, value: dict[str, Any], required: bool, defs: dict[str, Any], inner: Sections) -> str:
    if "default" in value:
        default = f"`{json.dumps(value['default'])}`"
    else:  # no default in the schema: required, or made by a default factory (a section, [] or {})
        default = "required" if required else "its keys' defaults" if "$ref" in value else "empty"
    description = value.get("description", "").replace("<", "\\<")  # <output.uri> is not HTML
    cells = [f"`{path}`", _type_of(value, path, defs, inner), default, description]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _type_of(value: dict[str, Any], path: str, defs: dict[str, Any], inner: Sections) -> str:
    """A schema's type in words; a section it names is added to `inner` (at `path`) for its own table."""
    if "$ref" in value:
        inner.append((path, defs[value["$ref"].rsplit("/", 1)[1]]))
        return f"section `{path}`"
    if "anyOf" in value:
        return " or ".join(_type_of(option, path, defs, inner) for option in value["anyOf"])
    if "enum" in value:
        return "one of " + ", ".join(f"`{json.dumps(option)}`" for option in value["enum"])
    kind = value.get("type", "any")
    if kind == "array":
        items = _type_of(value["items"], f"{path}[]", defs, inner)
        kind = f"list of ({items})" if " or " in items else f"list of {items}"
    elif kind == "object":
        values = value.get("additionalProperties", True)
        kind = "mapping" if values is True else f"mapping to {_type_of(values, f'{path}.*', defs, inner)}"
    bounds = [form.format(value[key]) for key, form in _BOUNDS.items() if key in value]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


_BOUNDS = {
    "minimum": ">= {}",
    "exclusiveMinimum": "> {}",
    "maximum": "<= {}",
    "exclusiveMaximum": "< {}",
    "minItems": "{} or more items",
    "pattern": "matching `{}`",
}


# ---------------------------------------------------------------------------------------------
# Publishing: what goes to spec.json and MLflow params

# scheme://userinfo@host anywhere in a value (fsspec chains URLs: simplecache::https://u:p@host/...)
# userinfo up to the last "@" before the path: a password may hold "?" or "#" (invalid, but written)
URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]*@")
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|key$|key_id|session)", re.IGNORECASE)
# storage_options keys shown as they are (at any depth under a protocol); every other value is hidden:
# headers, connection strings, SAS tokens and keys of any spelling stay out of spec.json and MLflow.
SAFE_STORAGE_KEYS = {
    "endpoint_url", "region_name", "anon", "use_ssl", "verify", "requester_pays", "version_aware",
    "default_block_size", "default_cache_type", "default_fill_cache", "skip_instance_cache",
    "use_listings_cache", "listings_expiry_time", "max_concurrency", "client_kwargs", "config_kwargs",
    "connect_timeout", "read_timeout", "retries", "max_attempts", "mode", "signature_version",
    "max_pool_connections", "addressing_style", "s3", "project", "account_name",
}  # fmt: skip
# Values that are credentials whatever their key: a whole value that is a cloud key id or a GitHub,
# Slack, OpenAI or Hugging Face token or a JWT (a path that merely contains such letters is not), and
# anywhere in a value a bearer header or a signed URL's signature.
CREDENTIAL_VALUE = re.compile(
    r"^\s*((AKIA|ASIA)[0-9A-Z]{16}|(ghp|gho|ghs|ghu)_[A-Za-z0-9]{20,}|github_pat_\w{20,}|xox[abprs]-\S+"
    r"|sk-[A-Za-z0-9_-]{20,}|hf_[A-Za-z]{30,}|eyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]*)\s*$"
    r"|\bBearer\s+\S+|[?&](sig|X-Goog-Signature|X-Amz-Signature|X-Amz-Security-Token|token)=",
    re.IGNORECASE,
)
# A free-text tag value that looks like a random token (mixed case and digits, 32+ characters); not
# applied to the rest of the spec, where paths and ids look the same.
RANDOM_TOKEN = re.compile(r"^(?=.*[a-z])(?=.*[A-Z])(?=.*\d)[A-Za-z0-9+/=_-]{32,}$")
REDACTED = "***"


def redact(value: Any) -> Any:
    """Hide values whose keys look like secrets, and values that look like credentials, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and CREDENTIAL_VALUE.search(value):
        return REDACTED
    return value


def _allowed_storage_options(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _allowed_storage_options(v) if k in SAFE_STORAGE_KEYS else REDACTED for k, v in value.items()
        }
    return redact(value)


def is_secret_key(key: str) -> bool:
    """Whether public_dict hides whatever value the dotted key holds: a storage option off the
    allowlist, or elsewhere a key that looks like a secret, at any depth. Key names only: a value that
    looks like a credential could be put under any key."""
    section, *rest = key.split(".")
    if section == "storage_options":
        return any(part not in SAFE_STORAGE_KEYS for part in rest[1:])  # rest[0]: the protocol
    return any(_SECRET_KEY.search(part) for part in (section, *rest))


def public_dict(spec: Spec) -> dict[str, Any]:
    """The spec as published (spec.json, MLflow params, the ConfigMap check): defaults filled in,
    secrets hidden. The one redaction every sink uses; storage_options by allowlist."""
    data = spec.model_dump(mode="json")
    options = {protocol: _allowed_storage_options(o) for protocol, o in data.pop("storage_options").items()}
    public = {**redact(data), "storage_options": options}
    public["tracking"]["tags"] = public_tags(data["tracking"]["tags"])
    return public


def public_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """tracking.tags as logged: values under secret-looking keys, and values that look like
    credentials or random tokens, hidden."""
    return {
        key: REDACTED if _SECRET_KEY.search(key) or RANDOM_TOKEN.match(str(value)) else redact(str(value))
        for key, value in tags.items()
    }


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'learning_rate': 1e-4}} -> {'train.learning_rate': 1e-4}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
