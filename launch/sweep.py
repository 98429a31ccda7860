"""Sweeps: a YAML file of spec keys and the values to try, turned into one validated spec per point.

    grid:                       # every combination of these
      train.learning_rate: [1e-4, 2e-4]
      adapter.r: [8, 16]
    points:                     # and/or these points, each crossed with the grid
      - {data.max_seq_len: 512}
      - {data.max_seq_len: 1024, train.micro_batch_size: 2}

A file without `grid:` or `points:` is a grid. Point i is named `<name>-pNN` and, unless output.uri
has `{name}` in it already, writes under `<output.uri>/<point name>`; all points are children of one
MLflow parent run. A Submission is what every launcher gets: the spec, the points and their validated
specs (the spec alone without a sweep); it starts and announces the parent run when the launcher asks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import UserError
from job.spec import Spec, apply_override, load_yaml, validate_spec
from job.tracking.store import redact_url

PARENT_ENV = "FTJOB_PARENT_RUN_ID"
MAX_POINTS = 1000


def load_points(path: str) -> list[dict[str, Any]]:
    """The sweep's points, each {dotted key: value}; UserError naming the file for a malformed one."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--sweep {path}: cannot read: {e}") from None
    data = load_yaml(text, f"--sweep {path}")
    if not isinstance(data, dict) or not data:
        raise UserError(
            f"--sweep {path}: expected a mapping of spec keys to lists of values (or grid:/points:)"
        )
    structured = set(data) <= {"grid", "points"}
    grid = data.get("grid", {}) if structured else data
    points = data.get("points", [{}]) if structured else [{}]
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(
            f"--sweep {path}: grid: each key needs a non-empty list of values, e.g. adapter.r: [8, 16]"
        )
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points) or not points:
        raise UserError(f"--sweep {path}: points: a list of mappings, e.g. - {{train.learning_rate: 1e-4}}")
    if not grid and points == [{}]:
        raise UserError(f"--sweep {path}: no values to try")
    size = len(points) * math.prod(len(values) for values in grid.values())
    if size > MAX_POINTS:
        raise UserError(f"--sweep {path}: {size} points; at most {MAX_POINTS} in one sweep")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    return [{**combo, **point} for point in points for combo in combos]


def point_specs(base: Spec, points: list[dict[str, Any]]) -> list[Spec]:
    """One spec per point: the base with the point's values, its own name and output; each validated."""
    specs = []
    for i, point in enumerate(points):
        data = base.model_dump(mode="json")
        for key, value in point.items():
            apply_override(data, key, value, f"--sweep point {i}")
        data["name"] = f"{base.name}-p{i:02d}"
        if "{name}" not in data["output"]["uri"]:
            data["output"]["uri"] = f"{data['output']['uri'].rstrip('/')}/{data['name']}"
        specs.append(validate_spec(data, f"--sweep point {i} ({point})"))
    return specs


@dataclass
class Submission:
    """What one `ftjob launch` submits: the spec, the sweep's points (none without --sweep) and the
    validated specs to run, one per point (the spec alone without a sweep)."""

    spec: Spec
    points: list[dict[str, Any]]
    specs: list[Spec]

    @classmethod
    def of(cls, spec: Spec, sweep_file: str | None) -> Submission:
        points = load_points(sweep_file) if sweep_file else []
        return cls(spec, points, point_specs(spec, points) if points else [spec])

    @property
    def is_sweep(self) -> bool:
        return bool(self.points)

    @property
    def wants_parent_run(self) -> bool:
        """A tracked sweep: its points' runs become children of one MLflow parent run."""
        return self.is_sweep and self.spec.tracking.enabled

    def start_parent_run(self, tracking_uri: str) -> str:
        """The MLflow run the points' runs are children of, announced on stdout; it records the sweep
        and ends at once."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        name = self.spec.tracking.experiment
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(
            experiment_id,
            run_name=f"{self.spec.name}-sweep",
            tags={"ftjob.sweep.points": str(len(self.points))},
        )
        run_id = run.info.run_id
        for key in sorted({k for point in self.points for k in point}):
            client.log_param(run_id, f"sweep.{key}", str(sorted({str(p.get(key)) for p in self.points})))
        client.set_terminated(run_id)
        print(f"MLflow parent run {run_id} in {redact_url(tracking_uri)}: ftjob compare --parent {run_id}")
        return run_id
