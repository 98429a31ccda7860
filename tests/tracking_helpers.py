"""What the tracking tests share: a spool folder of their own, a tracker for a spec, what a run or a spool
holds."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from helpers import make_spec
from mlflow_server import MlflowServer

from job.data.plan import DataPlan
from job.spec import validate_spec
from job.tracking.spool import (
    Target,
)
from job.tracking.tracker import (
    Tracker,
    run_record,
)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def messages(caplog, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def tracked(spec, resume_run_id: str | None = None) -> Tracker:
    """The tracker of rank 0 for spec."""
    return Tracker(spec.tracking, run_record(spec, DataPlan.make(spec.data, 1)), resume_run_id)


def wait_for_run(tracker: Tracker) -> None:
    """Until the delivery thread has created (or found) the tracker's MLflow run."""
    deadline = time.monotonic() + 60
    while tracker.run_id is None:
        assert time.monotonic() < deadline, "the run was never created"
        time.sleep(0.05)


@contextmanager
def server_down(server: MlflowServer):
    """The server stopped for the block and started again after it (same URL, same store)."""
    server.stop()
    try:
        yield
    finally:
        server.start()


def tracker_spec(tiny_model_dir, data_files, experiment: str, **tracking_cfg):
    return validate_spec(
        make_spec(
            "lora",
            model=tiny_model_dir,
            files=data_files,
            tracking={"experiment": experiment, "system_metrics": False, **tracking_cfg},
        )
    )


def log_steps(tracker: Tracker, steps_to_log) -> None:
    for step in steps_to_log:
        tracker.log_metrics({"train/loss": 10.0 / step, "train/epoch": step / 10}, step)


TRAIN_KEYS = (
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/tokens_per_second",
    "train/epoch",
)


def spool_records(key: str, experiment: str) -> list[dict]:
    now = int(time.time() * 1000)
    return [
        {"kind": "open", "key": key, "resume_run_id": None, "experiment": experiment, "run_name": "r",
         "tags": {"ftjob.run_key": key}, "time": now},
        {"kind": "params", "params": {"a": "1"}, "time": now},
        *({"kind": "metrics", "step": s, "metrics": {"train/loss": 1.0 / s}, "time": now + s} for s in (1, 2, 3)),
        {"kind": "status", "status": "FINISHED", "time": now + 4},
    ]  # fmt: skip


TARGET = Target.of("sqlite:///elsewhere.db", shown="sqlite:///elsewhere.db")  # of spools used directly


def key_of(letter: str) -> str:
    """A spool key that sorts by its letter (keys are 32 hex digits)."""
    return letter * 32


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path
