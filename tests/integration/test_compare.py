"""`ftjob compare` on a real MLflow store (the local sqlite store a job writes under ./mlruns)."""

from __future__ import annotations

import json
import logging

import pytest

from job.cli import main

START = 1_790_000_000_000  # ms


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three runs of a sweep in 'sweep' (eval/loss), one run in 'pretrain' (train/loss only)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("compare")
    (root / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    sweep = client.create_experiment("sweep")
    runs = {  # name: (learning rate, eval/loss at steps 10 and 20, status, minutes)
        "lr-1e-4": ("0.0001", [2.0, 1.5], "FINISHED", 2),
        "lr-2e-4": ("0.0002", [1.8, 1.2], "FINISHED", 3),
        "lr-3e-4": ("0.0003", [1.0, 1.6], "FAILED", 61),
    }
    for i, (name, (lr, eval_losses, status, minutes)) in enumerate(runs.items()):
        run_id = client.create_run(sweep, start_time=START + i, run_name=name).info.run_id
        client.log_param(run_id, "train.learning_rate", lr)
        client.log_param(run_id, "model.source", "tiny")
        for step in range(1, 21):
            client.log_metric(run_id, "train/loss", 3.0 - step * float(lr) * 1000, step=step)
        for step, value in zip((10, 20), eval_losses, strict=True):
            client.log_metric(run_id, "eval/loss", value, step=step)
        client.set_terminated(run_id, status, end_time=START + i + minutes * 60_000)
    pretrain = client.create_experiment("pretrain")
    run_id = client.create_run(pretrain, start_time=START + 100, run_name="only").info.run_id
    for step in range(1, 4):
        client.log_metric(run_id, "train/loss", 2.0 / step, step=step)
    client.set_terminated(run_id, "FINISHED", end_time=START + 100 + 5_000)
    return root


@pytest.fixture(autouse=True)
def job_logging_restored(monkeypatch):
    """main() points the job logger at this test's captured stderr; undo that afterwards."""
    logger = logging.getLogger("job")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)


@pytest.fixture
def in_store(store, monkeypatch):
    """Run from the directory that holds ./mlruns, MLFLOW_TRACKING_URI unset: the local store."""
    monkeypatch.chdir(store)
    return store


def test_table_shows_differing_params_and_sorts_by_final_eval_loss(in_store, capsys):
    assert main(["compare", "--experiment", "sweep"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "experiment sweep: 3 run(s), sorted by final eval/loss"
    header, rows = lines[1].split(), lines[2:]
    assert "train.learning_rate" in header and "model.source" not in header  # only what differs
    assert [row.split()[0] for row in rows] == ["lr-2e-4", "lr-1e-4", "lr-3e-4"]
    assert rows[0].split()[2:] == ["FINISHED", "3m00s", "0.0002", "1.2", "1.2", "(20)"]
    assert rows[2].split()[2:] == ["FAILED", "1h01m00s", "0.0003", "1.6", "1", "(10)"]


def test_json_lists_the_same_rows(in_store, capsys):
    assert main(["compare", "--experiment", "sweep", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_name"] for r in rows] == ["lr-2e-4", "lr-1e-4", "lr-3e-4"]
    assert rows[2] | {"run_id": "x", "start_time": "x"} == {
        "run_id": "x",
        "run_name": "lr-3e-4",
        "status": "FAILED",
        "start_time": "x",
        "duration_seconds": 3660.0,
        "params": {"train.learning_rate": "0.0003"},
        "metric": "eval/loss",
        "final": 1.6,
        "best": 1.0,
        "best_step": 10,
    }


def test_other_metric_higher_is_better_and_fallback_to_train_loss(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    assert main(["compare", "--experiment", "sweep", "--metric", "train/loss", "--json"]) == 0
    assert [r["run_name"] for r in json.loads(capsys.readouterr().out)] == ["lr-3e-4", "lr-2e-4", "lr-1e-4"]

    # no --experiment: the experiment of the newest run, which has no eval/loss
    assert main(["compare", "--json"]) == 0
    [only] = json.loads(capsys.readouterr().out)
    assert (only["run_name"], only["metric"], only["final"], only["best"]) == (
        "only",
        "train/loss",
        2 / 3,
        2 / 3,
    )

    from launch.compare import lower_is_better

    assert lower_is_better("eval/perplexity") and not lower_is_better("train/tokens_per_second")
    assert all(
        lower_is_better(f"report/{name}")
        for name in (
            "cost",
            "cost_per_million_tokens",
            "seconds_lost",
            "device_hours",
            "steps_retrained",
            "stops",
        )
    )


def test_plot_writes_a_png_of_the_curves(in_store, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "plots" / "loss.png"
    assert main(["compare", "--experiment", "sweep", "--plot", str(path)]) == 0
    assert f"plot written to {path}" in capsys.readouterr().out
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    with Image.open(path) as image:
        image.verify()
        assert image.size == (1200, 450)  # two panels (train/loss, eval/loss) at 100 dpi


def test_unknown_experiment_exits_2_naming_the_known_ones(in_store, capsys):
    assert main(["compare", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'nope'" in err and "sweep" in err and "Traceback" not in err


def test_no_store_exits_2(isolated, capsys):
    assert main(["compare"]) == 2
    assert "MLFLOW_TRACKING_URI is unset" in capsys.readouterr().err
    assert not (isolated / "mlruns").exists()  # compare reads; it creates no store
