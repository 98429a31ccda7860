"""Where the MLflow store is and how it is reached: the local store of runs without a tracking server,
the client's HTTP settings, and store URIs shown without their credentials.

Light on purpose (no mlflow import): the tracker uses it, and so does `ftjob compare` in launch/, which
never imports the tracker.
"""

from __future__ import annotations

import os
from pathlib import Path

from job.errors import UserError
from job.spec import URL_CREDENTIALS

LOCAL_STORE_DIR = "mlruns"
# MLflow's client retries a failed request for minutes by default; the spool retries instead, so
# an outage costs a failed request now and then, not minutes of training. The user's values win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def use_http_defaults() -> None:
    """HTTP_DEFAULTS into the environment, where MLflow's client reads them, unless the user set them."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def default_tracking_uri() -> str:
    """The local sqlite store under ./mlruns (created), where runs go when MLFLOW_TRACKING_URI is unset."""
    store = Path(LOCAL_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def tracking_uri_to_read() -> str:
    """The store that readers of runs (`ftjob compare`, `ftjob report RUN_ID`) read: MLFLOW_TRACKING_URI,
    else the local store, which must exist (UserError)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(LOCAL_STORE_DIR, "mlflow.db").resolve()
    if not store.exists():
        raise UserError(f"no MLflow store here: MLFLOW_TRACKING_URI is unset and {store} does not exist")
    return f"sqlite:///{store}"


def redact_url(text: str) -> str:
    """scheme://user:password@host/... -> scheme://***@host/... anywhere in text."""
    return URL_CREDENTIALS.sub(lambda found: found[0].partition("://")[0] + "://***@", text)
