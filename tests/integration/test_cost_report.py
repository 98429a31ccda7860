"""What the job cost (job/report.py): one run stopped at a step in this process (StopAfterSteps, as a stop
signal's path) and resumed; its report.json, its MLflow run's report/* metrics and `ftjob report`."""

from __future__ import annotations

import json
import time

import pytest
from helpers import StopAfterSteps, ftjob, train_in_process

from job.errors import Preempted
from job.output.report import as_metrics, read_report
from job.wallclock import PHASES

STOP_AT, PRICE = 12, 2.5  # the resume spec checkpoints every 5 steps: the stop's checkpoint is its own


@pytest.fixture(scope="module")
def reported(spec_path, workdir):
    """The resume spec with MLflow and a price, stopped after step 12 and resumed to its end: the report
    as the stop left it, the run's result, and the seconds both attempts took as this test saw them."""
    output = workdir / "reported"
    spec = json.loads(spec_path.read_text()) | {
        "output": {"uri": str(output)},
        "tracking": {"experiment": "report", "system_metrics": False},
        "report": {"price_per_device_hour": PRICE},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("HF_HUB_OFFLINE", "1")
        began = time.time()
        with pytest.raises(Preempted):
            train_in_process(spec, stop=StopAfterSteps(STOP_AT))
        at_stop = read_report(str(output))
        result = train_in_process(spec)
        seconds = time.time() - began
    return output, at_stop, result, seconds


def test_a_stopped_and_resumed_run_reports_one_preemption_and_its_cost(reported):
    output, at_stop, _, seconds = reported
    assert (at_stop.status, at_stop.step, at_stop.attempts) == ("stopped", STOP_AT, 1)
    assert (at_stop.preemption.stops, at_stop.preemption.resumes) == (1, 0)

    report = read_report(str(output))
    assert (report.status, report.step, report.attempts, report.processes) == ("finished", 30, 2, 1)
    preemption = report.preemption
    assert (preemption.stops, preemption.resumes, preemption.steps_retrained) == (1, 1, 0)
    [resume] = preemption.restarts
    assert (resume.stopped_at_step, resume.resumed_from_step, resume.stopped_by_signal) == (
        STOP_AT,
        STOP_AT,
        True,
    )
    assert resume.steps_retrained == 0 and resume.seconds_lost > 0
    assert resume.stopped_at == at_stop.updated_at and preemption.seconds_lost == resume.seconds_lost

    phases = report.phases.model_dump()
    assert set(phases) == set(PHASES)
    assert sum(phases.values()) == pytest.approx(report.wall_seconds, rel=1e-9)
    assert all(phases[name] > 0 for name in ("startup", "data", "steps", "checkpoint", "publish"))
    # each attempt counts from its process's start: this process began before either attempt did
    assert report.wall_seconds >= seconds
    assert report.cost.device_hours == pytest.approx(report.wall_seconds / 3600)

    assert report.tokens_trained > at_stop.tokens_trained > 0
    assert report.tokens_per_second == pytest.approx(report.tokens_trained / phases["steps"])
    assert report.cost.total == pytest.approx(report.cost.device_hours * PRICE)
    assert report.cost.per_million_tokens == pytest.approx(report.cost.total / report.tokens_trained * 1e6)
    assert report.flops.formula == "4N+2N'" and report.flops.mfu is None
    assert report.flops.peak_source == "n/a: no known peak for cpu"
    assert 0 < report.packing_efficiency <= 1  # the resume spec packs
    assert report.peak_memory.host_gib > 0 and report.peak_memory.device_gib is None


def test_the_mlflow_run_has_the_report_metrics_at_the_last_step(reported, workdir):
    from mlflow import MlflowClient

    output, _, result, _ = reported
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    logged = client.get_run(result.run_id).data.metrics
    expected = as_metrics(read_report(str(output)))
    assert {name: logged.get(name) for name in expected} == pytest.approx(expected)
    assert [m.step for m in client.get_metric_history(result.run_id, "report/stops")] == [30]


def test_ftjob_report_prints_the_table_from_the_output_and_from_mlflow(reported, workdir):
    output, _, result, _ = reported
    table = ftjob("report", str(output))
    assert table.returncode == 0, table.stderr
    assert f"{output}: finished at step 30 of 30, 2 attempt(s), 1 process(es) on cpu" in table.stdout
    assert "1 stop(s), 1 resume(s): 0 step(s) trained again" in table.stdout
    assert "stopped by a signal at step 12, resumed from step 12" in table.stdout
    assert "n/a: no known peak for cpu" in table.stdout and f"at {PRICE:g} a device-hour" in table.stdout

    as_json = ftjob("report", str(output), "--json")
    assert json.loads(as_json.stdout) == json.loads((output / "report.json").read_text())

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"}
    from_mlflow = ftjob("report", result.run_id, env=env)
    assert from_mlflow.returncode == 0, from_mlflow.stderr
    tokens = next(line for line in table.stdout.splitlines() if line.startswith("tokens trained"))
    assert f"MLflow run {result.run_id}: finished" in from_mlflow.stdout and tokens in from_mlflow.stdout


def test_ftjob_report_of_an_output_without_a_report_is_exit_2(workdir):
    missing = ftjob("report", str(workdir / "nothing-here"))
    assert missing.returncode == 2 and "no report.json in" in missing.stderr


def test_an_earlier_report_whose_numbers_cannot_add_up_is_a_warning_and_a_fresh_history(
    reported, tmp_path, caplog
):
    """A report.json that passes the checks but whose sums with this attempt's overflow them (made up,
    as no run gets there): the attempt's report starts afresh instead of ending the run."""
    import helpers

    from job.report import RunReport

    output, at_stop, _, _ = reported
    made_up = at_stop.model_copy(update={"tokens_trained": 10**18})
    (tmp_path / "report.json").write_text(made_up.model_dump_json())
    report = RunReport(
        str(tmp_path), helpers._accelerator, (10, 100), 30, price=None, resumed_from=12, precision="no"
    )
    assert report.earlier == made_up  # it passed the checks as it was read back
    report.tokens, report.measured = 5, (5, 1.0, None)
    with caplog.at_level("WARNING", logger="job"):
        saved = report.save(13, "training")
    assert (saved.attempts, saved.tokens_trained, saved.preemption.resumes) == (1, 5, 0)
    assert "numbers do not add up" in caplog.text and "starts afresh" in caplog.text
    assert read_report(str(tmp_path)) == saved


def test_ftjob_report_of_a_run_whose_report_metrics_are_not_numbers_is_exit_2(workdir, monkeypatch):
    """MLflow's metrics are input too: a NaN, or a device tag that would move the terminal, is not printed."""
    from mlflow import MlflowClient

    from job.errors import UserError
    from job.report_table import run_metrics, show_report

    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run = client.create_run(
        client.create_experiment("report-input"), tags={"device": "GPU\x1b[2J"}
    ).info.run_id
    client.log_metric(run, "report/tokens_trained", 10.0)
    assert run_metrics(run)[2] == "an unknown device"
    client.log_metric(run, "report/cost", float("nan"))
    with pytest.raises(UserError) as refused:
        show_report(run, as_json=False)
    assert "report/cost not as ftjob logs them" in str(refused.value)
