"""report.json under output.uri: what the job cost, over all its attempts (job/report.py builds it).

Rank 0 writes it whole (one fsspec write of the JSON) while it holds output.uri's lease: at each
checkpoint, at a stop, and after publishing. It holds numbers and the device's name only, never a spec
value (the price excepted, a number). A resumed run reads it back to carry the preemption history on:
read back, it is input, validated as strictly as the spec (types, ranges, sizes, unknown keys), and one
that is not as ftjob writes it is never used (problem() says why; the job then starts the history
afresh, `ftjob report` is exit 2).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from job.output.layout import OutputLayout
from job.storage import filesystem

REPORT_FORMAT = 1
MAX_REPORT_BYTES = 1 << 20
MAX_RESTARTS_KEPT = 100  # the newest restarts' details; the counts cover all of them
FLOP_FORMULAS = ("4N+2N'", "6N")

Count = Annotated[int, Field(ge=0, le=10**18)]
Seconds = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Number = Annotated[float, Field(ge=0, le=1e30, allow_inf_nan=False)]
UnixTime = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PRINTABLE = r"^[\x20-\x7e]*$"  # a device name or a note: printed as it is, so no control characters
Text = Annotated[str, Field(max_length=200, pattern=PRINTABLE)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Flops(_Record):
    formula: Literal[FLOP_FORMULAS]  # type: ignore[valid-type]
    parameters: Count
    trainable_parameters: Count
    per_token: Number
    peak_per_device: Number | None  # FLOP/s; None where no peak is known
    peak_source: Text  # "datasheet" or why there is no MFU
    mfu: Number | None


class Phases(_Record):
    startup: Seconds
    data: Seconds
    steps: Seconds
    checkpoint: Seconds
    eval: Seconds
    publish: Seconds
    other: Seconds


class PeakMemory(_Record):
    host_gib: Number
    device_gib: Number | None


class Restart(_Record):
    stopped_at_step: Count
    stopped_at: UnixTime
    stopped_by_signal: (
        bool  # False: the attempt ended otherwise (a crash, a kill); its last report is from a checkpoint
    )
    resumed_from_step: Count
    steps_retrained: Count
    seconds_lost: Seconds


class Preemption(_Record):
    stops: Count
    resumes: Count
    steps_retrained: Count
    seconds_lost: Seconds
    restarts: list[Restart] = Field(max_length=MAX_RESTARTS_KEPT)


class Cost(_Record):
    device_hours: Number
    price_per_device_hour: Number | None
    total: Number | None
    per_million_tokens: Number | None


class Report(_Record):
    format: Literal[REPORT_FORMAT]  # type: ignore[valid-type]
    status: Literal["training", "stopped", "finished"]
    updated_at: UnixTime
    device: Text
    processes: Annotated[int, Field(ge=1, le=10**6)]
    attempts: Annotated[int, Field(ge=1, le=10**6)]
    step: Count
    total_steps: Count
    tokens_trained: Count
    tokens_per_second: Number | None
    flops: Flops
    wall_seconds: Seconds
    phases: Phases
    peak_memory: PeakMemory
    packing_efficiency: Fraction | None
    preemption: Preemption
    cost: Cost


def write_report(output_uri: str, report: Report) -> None:
    fs, path = filesystem(OutputLayout(output_uri).report)
    fs.pipe_file(path, (report.model_dump_json(indent=2) + "\n").encode())


def read_report(output_uri: str) -> Report:
    """report.json, validated. FileNotFoundError when there is none; ValueError (why) for one that is not
    as ftjob writes it; a storage failure as the store raises it."""
    fs, path = filesystem(OutputLayout(output_uri).report)
    with fs.open(path, "rb") as f:
        text = f.read(MAX_REPORT_BYTES + 1)
    if len(text) > MAX_REPORT_BYTES:
        raise ValueError(f"over {MAX_REPORT_BYTES} bytes")
    try:
        record = json.loads(text)
    except RecursionError:  # JSON nested deeper than the parser goes
        raise ValueError("nested too deeply") from None
    try:
        return Report.model_validate(record)
    except ValidationError as e:
        raise ValueError(problem(e)) from None


def problem(error: ValidationError) -> str:
    """The first problems of a validation, each with its key (never the value read: it is not echoed)."""
    errors = error.errors(include_input=False)
    shown = [f"{'.'.join(str(part) for part in e['loc']) or 'the whole'}: {e['msg']}" for e in errors[:3]]
    return "; ".join(shown) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")


METRIC_PREFIX = "report/"


def as_metrics(report: Report) -> dict[str, float]:
    """The report's numbers as MLflow metrics, report/<name>; what is unknown (None) is left out."""
    values = {
        "tokens_trained": report.tokens_trained,
        "tokens_per_second": report.tokens_per_second,
        "parameters": report.flops.parameters,
        "trainable_parameters": report.flops.trainable_parameters,
        "flops_per_token": report.flops.per_token,
        "peak_flops_per_device": report.flops.peak_per_device,
        "mfu": report.flops.mfu,
        "wall_seconds": report.wall_seconds,
        **{f"{phase}_seconds": seconds for phase, seconds in report.phases},
        "peak_host_memory_gib": report.peak_memory.host_gib,
        "peak_device_memory_gib": report.peak_memory.device_gib,
        "packing_efficiency": report.packing_efficiency,
        "stops": report.preemption.stops,
        "resumes": report.preemption.resumes,
        "steps_retrained": report.preemption.steps_retrained,
        "seconds_lost": report.preemption.seconds_lost,
        "attempts": report.attempts,
        "processes": report.processes,
        "device_hours": report.cost.device_hours,
        "price_per_device_hour": report.cost.price_per_device_hour,
        "cost": report.cost.total,
        "cost_per_million_tokens": report.cost.per_million_tokens,
    }
    return {METRIC_PREFIX + name: float(value) for name, value in values.items() if value is not None}
