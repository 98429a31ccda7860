"""MLflow tracking of one run, on rank 0 only.

With MLFLOW_TRACKING_URI unset, runs go to a local sqlite store under ./mlruns
(`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` opens it). A tracking server that
fails never stops training: one warning, and the run goes on untracked.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from job import __version__
from job.spec import Spec, flatten, public_dict

log = logging.getLogger(__name__)
LOCAL_STORE_DIR = "mlruns"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


def default_tracking_uri() -> str:
    store = Path(LOCAL_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def spec_params(spec: Spec) -> dict[str, str]:
    """The flattened public spec as MLflow params (dotted keys, secrets removed)."""
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(public_dict(spec)).items()}


class Tracker:
    """Logs params and metrics to MLflow; does nothing when disabled or after the server failed."""

    def __init__(self, spec: Spec, active: bool):
        self.spec = spec
        self.active = active and spec.tracking.enabled
        self.run_id: str | None = None
        self.uri: str | None = None

    @contextmanager
    def run(self, extra_tags: dict[str, str]) -> Iterator[Tracker]:
        """An MLflow run around the block: FINISHED when it completes, FAILED when it raises."""
        if self.active:
            self._guard(self._start, extra_tags)
        try:
            yield self
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish("FINISHED")

    def _start(self, extra_tags: dict[str, str]) -> None:
        import mlflow

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.spec.tracking.experiment)
        tags = {
            "ftjob.version": __version__,
            "host": socket.gethostname(),
            **extra_tags,
            **self.spec.tracking.tags,
        }
        run = mlflow.start_run(run_name=self.spec.tracking.run_name or self.spec.name, tags=tags)
        self.run_id = run.info.run_id
        mlflow.log_params(spec_params(self.spec))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            import mlflow

            self._guard(mlflow.log_metrics, metrics, step=step)

    def finish(self, status: str) -> None:
        if self.active:
            import mlflow

            self._guard(mlflow.end_run, status=status)

    def _guard(self, call, *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as e:  # the tracking server is not worth a lost training run
            log.warning(
                "MLflow tracking failed (%s: %s); training goes on without tracking", type(e).__name__, e
            )
            self.active = False
