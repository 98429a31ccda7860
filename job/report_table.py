"""`ftjob report OUTPUT_URI|RUN_ID`: what a job cost, as a table or JSON. From an output.uri, its
report.json (updated at each checkpoint, a stop and the end: a run still training has one); from an MLflow
run id, the run's report/* metrics (logged when the run ends; the store is MLFLOW_TRACKING_URI, else
./mlruns, as for `ftjob compare`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from job.errors import UserError
from job.output.report import METRIC_PREFIX, PRINTABLE, Report, Restart, as_metrics, read_report
from job.storage import storage_error
from job.tracking.store import redact_url, tracking_uri_to_read, use_http_defaults

MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what ftjob's runs get; a path of that name wins
PHASE_LABELS = {
    "startup": "start-up",
    "data": "data stalls",
    "steps": "training steps",
    "checkpoint": "checkpoints",
    "eval": "eval",
    "publish": "publish",
    "other": "other",
}


def show_report(target: str, as_json: bool) -> str:
    """The report of an output.uri or an MLflow run id, as a table or JSON (report.json's content, or
    the run's {"run_id", "status", "device", "metrics"})."""
    if MLFLOW_RUN_ID.fullmatch(target) and not Path(target).exists():
        metrics, status, device = run_metrics(target)
        if as_json:
            return json.dumps(
                {"run_id": target, "status": status, "device": device, "metrics": metrics}, indent=2
            )
        heading = f"MLflow run {target}: {status.lower()}"
        return report_table(metrics, heading, device, no_peak(device), [])
    report = output_report(target)
    if as_json:
        return report.model_dump_json(indent=2)
    heading = f"{target}: {report.status} at step {report.step} of {report.total_steps}"
    return report_table(
        as_metrics(report), heading, report.device, report.flops.peak_source, report.preemption.restarts
    )


def output_report(output_uri: str) -> Report:
    try:
        return read_report(output_uri)
    except FileNotFoundError:
        raise UserError(
            f"no report.json in {output_uri}: a run writes it at its first checkpoint (is it the run's output.uri?)"
        ) from None
    except ValueError as e:
        raise UserError(f"{output_uri}/report.json is not as ftjob writes it: {e}") from None
    except Exception as e:  # every storage backend raises its own types
        raise storage_error(e, f"cannot read {output_uri}/report.json") from None


def run_metrics(run_id: str) -> tuple[dict[str, float], str, str]:
    """The run's report/* metrics (their last values), its status and its device tag."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    use_http_defaults()
    uri = tracking_uri_to_read()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        raise UserError(f"MLflow at {redact_url(uri)}: {e.message}") from None
    metrics = {name: value for name, value in run.data.metrics.items() if name.startswith(METRIC_PREFIX)}
    if not metrics:
        raise UserError(
            f"MLflow run {run_id} has no {METRIC_PREFIX}* metrics: ftjob logs them as a run ends (while it "
            "trains, ftjob report OUTPUT_URI reads its report.json)"
        )
    unreadable = sorted(name for name, value in metrics.items() if not 0 <= value < 1e30)  # NaN fails too
    if unreadable:
        raise UserError(
            f"MLflow run {run_id}: {', '.join(unreadable)} not as ftjob logs them (a number from 0)"
        )
    device = run.data.tags.get("device", "")
    return (
        metrics,
        run.info.status,
        device if re.fullmatch(PRINTABLE, device[:200]) and device else "an unknown device",
    )


def no_peak(device: str) -> str:
    return f"n/a: no known peak for {device}"


def report_table(
    metrics: Mapping[str, float], heading: str, device: str, peak_note: str, restarts: list[Restart]
) -> str:
    """The report's numbers (report/* metrics) as lines for a person."""

    def value(name: str) -> float | None:
        return metrics.get(METRIC_PREFIX + name)

    def count(name: str) -> str:
        return "-" if value(name) is None else f"{value(name):,.0f}"

    processes = value("processes") or 1
    wall = value("wall_seconds") or 0.0
    lines = [
        f"{heading}, {count('attempts')} attempt(s), {processes:.0f} process(es) on {device}",
        row("tokens trained", count("tokens_trained")),
        row("tokens/s", throughput(value("tokens_per_second"), value("tokens_trained"), wall)),
        row(
            "FLOPs per token",
            flop_line(value("parameters"), value("trainable_parameters"), value("flops_per_token")),
        ),
        row("MFU", mfu_line(value("mfu"), value("peak_flops_per_device"), peak_note)),
        row("wall time", duration(wall)),
    ]
    for phase, label in PHASE_LABELS.items():
        seconds = value(f"{phase}_seconds") or 0.0
        share = f"{seconds / wall:6.1%}" if wall else ""
        lines.append(row(f"  {label}", f"{duration(seconds):>9}  {share}".rstrip()))
    host, device_memory = value("peak_host_memory_gib"), value("peak_device_memory_gib")
    lines.append(row("peak memory", f"host {gib(host)}, device {gib(device_memory)}"))
    packing = value("packing_efficiency")
    lines.append(row("packing efficiency", "n/a (no packing)" if packing is None else f"{packing:.1%}"))
    lines.append(row("preemption", preemption_line(value)))
    for number, restart in enumerate(restarts, 1):
        lines.append(row(f"  resume {number}", restart_line(restart)))
    lines.append(
        row("device-hours", f"{value('device_hours') or 0.0:.4g} ({processes:.0f} process(es) x wall time)")
    )
    lines.append(row("cost", cost_line(value)))
    return "\n".join(lines)


def row(label: str, text: str) -> str:
    return f"{label:<20} {text}"


def throughput(per_second: float | None, tokens: float | None, wall: float) -> str:
    if per_second is None:
        return "n/a (no training step)"
    overall = f", {tokens / wall:,.0f} over the wall time" if tokens is not None and wall else ""
    return f"{per_second:,.0f} in training steps{overall}"


def flop_line(parameters: float | None, trainable: float | None, per_token: float | None) -> str:
    if parameters is None or trainable is None or per_token is None:
        return "-"
    formula = "6N" if trainable == parameters else "4N+2N'"
    return f"{formula} = {per_token:.3g} (N = {parameters:,.0f} parameters, N' = {trainable:,.0f} trainable)"


def mfu_line(mfu: float | None, peak: float | None, peak_note: str) -> str:
    if mfu is None or peak is None:
        return peak_note
    return f"{mfu:.1%} of {peak / 1e12:,.0f} TFLOP/s a device ({peak_note})"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def preemption_line(value) -> str:
    stops, resumes = value("stops") or 0, value("resumes") or 0
    return (
        f"{stops:.0f} stop(s), {resumes:.0f} resume(s): {value('steps_retrained') or 0:.0f} step(s) "
        f"trained again, {duration(value('seconds_lost') or 0.0)} lost"
    )


def restart_line(restart: Restart) -> str:
    how = "stopped by a signal" if restart.stopped_by_signal else "ended without a stop (last report)"
    return (
        f"{how} at step {restart.stopped_at_step}, resumed from step {restart.resumed_from_step}: "
        f"{restart.steps_retrained} step(s) trained again, {duration(restart.seconds_lost)} lost"
    )


def cost_line(value) -> str:
    price = value("price_per_device_hour")
    if price is None:
        return "n/a: no price (report.price_per_device_hour or FTJOB_PRICE_PER_DEVICE_HOUR)"
    per_million = value("cost_per_million_tokens")
    tokens = "" if per_million is None else f"; {per_million:.4g} per million tokens trained"
    return f"{value('cost') or 0.0:.4g} at {price:g} a device-hour{tokens}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
