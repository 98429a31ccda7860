"""`ftjob compare`: the MLflow runs of one experiment side by side.

For each run: name, status, duration, the params that differ between the runs, and the final and
best value of one metric (default eval/loss, or train/loss when no run has eval/loss). Rows are
sorted by the final value, best first: lower is better for losses, perplexity, errors and memory,
higher for anything else. `--json` prints the same as a JSON list; `--plot FILE` draws the runs'
curves of train/loss and the chosen metric into a PNG.

The store is MLFLOW_TRACKING_URI, or, when it is unset, the local ./mlruns store that jobs write.
Without --experiment: the experiment of the most recently started run.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job.errors import UserError
from job.tracking.store import redact_url, tracking_uri_to_read, use_http_defaults

DEFAULT_METRIC = "eval/loss"
FALLBACK_METRIC = "train/loss"
LOWER_IS_BETTER = ("loss", "perplexity", "error", "memory", "cost", "seconds", "hours", "retrained", "stops")


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    status: str
    start_time: str  # ISO 8601, UTC
    duration_seconds: float
    params: dict[str, str]  # the params that differ between the compared runs
    metric: str
    final: float | None
    best: float | None
    best_step: int | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        summary = asdict(self)
        del summary["curves"]
        return summary


def lower_is_better(metric: str) -> bool:
    return any(word in metric.rsplit("/", 1)[-1] for word in LOWER_IS_BETTER)


def compare(
    experiment: str | None = None,
    metric: str | None = None,
    as_json: bool = False,
    plot: str | None = None,
    parent: str | None = None,
) -> list[RunSummary]:
    """Print the comparison (a table, or JSON) and optionally write the plot; returns the rows."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    use_http_defaults()
    uri = tracking_uri_to_read()
    client = MlflowClient(uri)
    try:
        if parent:  # a sweep: the parent run's children
            if not re.fullmatch(r"[A-Za-z0-9_-]+", parent):
                raise UserError(f"--parent {parent!r}: not an MLflow run id")
            found = client.get_experiment(client.get_run(parent).info.experiment_id)
            children = f"tags.`mlflow.parentRunId` = '{parent}'"
            runs = client.search_runs([found.experiment_id], children, max_results=10000)
        else:
            found = find_experiment(client, experiment)
            runs = client.search_runs([found.experiment_id], max_results=10000)
        metric = metric or choose_metric(runs)
        summaries = summarize(client, runs, metric)
    except MlflowException as e:
        raise UserError(f"MLflow at {redact_url(uri)}: {e.message}") from None
    if as_json:
        print(json.dumps([s.to_json() for s in summaries], indent=2))
    else:
        of_parent = f" of parent run {parent}" if parent else ""
        print(f"experiment {found.name}: {len(summaries)} run(s){of_parent}, sorted by final {metric}")
        print(format_table(summaries, metric))
    if plot:
        plot_curves(summaries, metric, Path(plot))
        if not as_json:
            print(f"plot written to {plot}")
    return summaries


def find_experiment(client, name: str | None):
    """The named experiment, or the one whose newest run started last."""
    if name is not None:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise UserError(f"no MLflow experiment named '{name}' (experiments: {known})")
        return experiment
    ids = [e.experiment_id for e in client.search_experiments()]
    newest = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not newest:
        raise UserError("no MLflow runs to compare in this store")
    return client.get_experiment(newest[0].info.experiment_id)


def choose_metric(runs) -> str:
    return DEFAULT_METRIC if any(DEFAULT_METRIC in r.data.metrics for r in runs) else FALLBACK_METRIC


def differing_params(runs) -> list[str]:
    keys = sorted({key for run in runs for key in run.data.params})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def summarize(client, runs, metric: str) -> list[RunSummary]:
    """One summary per run, best final value first; runs without the metric last."""
    keys = differing_params(runs)
    lower = lower_is_better(metric)
    summaries = []
    for run in runs:
        info = run.info
        curves = {m: curve(client, info.run_id, m) for m in dict.fromkeys([FALLBACK_METRIC, metric])}
        points = curves[metric]
        best = (min if lower else max)(points, key=lambda p: p[1]) if points else None
        end = info.end_time or int(time.time() * 1000)
        summaries.append(
            RunSummary(
                run_id=info.run_id,
                run_name=info.run_name or "",
                status=info.status,
                start_time=datetime.fromtimestamp(info.start_time / 1000, timezone.utc).isoformat(),
                duration_seconds=round((end - info.start_time) / 1000, 1),
                params={key: run.data.params.get(key, "") for key in keys},
                metric=metric,
                final=points[-1][1] if points else None,
                best=best[1] if best else None,
                best_step=best[0] if best else None,
                curves=curves,
            )
        )
    sign = 1 if lower else -1
    return sorted(summaries, key=lambda s: (s.final is None, sign * (s.final or 0.0)))


def curve(client, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) in step order, the last value of a step winning; NaNs left out."""
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    by_step = {m.step: m.value for m in points if not math.isnan(m.value)}
    return sorted(by_step.items())


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(summaries: list[RunSummary], metric: str) -> str:
    keys = list(summaries[0].params) if summaries else []
    header = ["run", "id", "status", "duration", *keys, f"final {metric}", f"best {metric} (step)"]
    rows = [
        [
            s.run_name,
            s.run_id[:8],
            s.status,
            format_duration(s.duration_seconds),
            *(s.params[k] for k in keys),
            format_value(s.final),
            "-" if s.best is None else f"{format_value(s.best)} ({s.best_step})",
        ]
        for s in summaries
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def plot_curves(summaries: list[RunSummary], metric: str, path: Path) -> None:
    """A PNG with one panel per metric (train/loss, and the chosen metric), one line per run."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    metrics = list(dict.fromkeys([FALLBACK_METRIC, metric]))
    figure = Figure(figsize=(6 * len(metrics), 4.5), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        for s in summaries:
            if s.curves.get(name):
                steps, values = zip(*s.curves[name], strict=True)
                axes.plot(
                    steps,
                    values,
                    marker="." if len(steps) < 30 else None,
                    label=f"{s.run_name} ({s.run_id[:8]})",
                )
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
