"""MLflow tracking against a real `mlflow server`: the record a run leaves, outages, restarts, secrets."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import make_spec, train_in_process
from tracking_helpers import (
    TARGET,
    TRAIN_KEYS,
    key_of,
    link,
    log_steps,
    messages,
    server_down,
    spool_records,
    steps,
    tracked,
    tracker_spec,
    wait_for_run,
)

from job.errors import Preempted
from job.output.layout import MANIFEST
from job.output.manifest import manifest_entry
from job.spec import TrackingSpec
from job.tracking import tracker as tracker_module
from job.tracking.spool import (
    RECORDS,
    RUN_KEY_TAG,
    STATE,
    Spool,
    SpoolState,
    deliver,
)
from job.tracking.tracker import (
    RunRecord,
    Tracker,
    tracking_target,
)

# ---------------------------------------------------------------------------------------------
# Outages


def test_server_outage_mid_run_loses_and_duplicates_nothing(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    """The server is stopped after step 4 and started again (same port, same store) after step 10."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setattr(tracker_module, "RETRY_SECONDS", (0.2, 0.5))
    reachable_at = {}
    log_metrics = Tracker.log_metrics

    def log_then_disturb(self, metrics, step):
        log_metrics(self, metrics, step)
        if "train/loss" not in metrics:
            return
        if step == 4:
            wait_for_run(self)  # the outage starts mid-run
            server.stop()
        elif step == 10:
            server.start()
        elif step == 11:
            time.sleep(0.6)  # past any backoff: step 12 tries again even if step 11 hit a stale connection
        elif step == 16:
            reachable_at[step] = self.reachable

    monkeypatch.setattr(Tracker, "log_metrics", log_then_disturb)
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        train={"max_steps": 16, "log_every": 1, "eval_every": 4},
        tracking={"experiment": "outage", "system_metrics": False},
    )
    with caplog.at_level(logging.INFO, logger="job"):
        result = train_in_process(spec, restart=True)

    assert reachable_at == {16: True}  # delivered during the run, on a log call, not only at the end
    assert len(messages(caplog, logging.WARNING, "is unreachable")) == 1
    assert len(messages(caplog, logging.INFO, "is back")) == 1
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "is unreachable" not in r.getMessage()
    ]
    for key in (*TRAIN_KEYS, "data/rows_read", "train/peak_memory_gib"):
        assert steps(client, result.run_id, key) == list(range(1, 17)), key
    assert steps(client, result.run_id, "eval/loss") == [4, 8, 12, 16]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert not list(spool_dir.iterdir())


def test_a_step_never_waits_on_the_server(server, client, tiny_model_dir, data_files, spool_dir, monkeypatch):
    """Logging appends to the spool; a thread delivers. With the server frozen (a delivery then waits up
    to MLFLOW_HTTP_REQUEST_TIMEOUT, 10 s), logging still returns at once, and nothing is lost."""
    import threading

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tracker = tracked(tracker_spec(tiny_model_dir, data_files, "frozen"))
    with tracker.run({}):
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        deadline = time.monotonic() + 60
        while not tracker.run_id or steps(client, tracker.run_id, "train/loss") != [
            1
        ]:  # run made by the thread
            assert time.monotonic() < deadline, "step 1 was never delivered"
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGSTOP)
        try:
            logging_steps = threading.Thread(
                target=lambda: [tracker.log_metrics({"train/loss": 0.5}, step=s) for s in (2, 3, 4)]
            )
            logging_steps.start()
            logging_steps.join(timeout=5)
            assert not logging_steps.is_alive(), "a log call waited on the frozen server"
            assert [r["step"] for r, _ in tracker.spool.pending() if r["kind"] == "metrics"][-3:] == [2, 3, 4]
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
    assert steps(client, tracker.run_id, "train/loss") == [1, 2, 3, 4]


@pytest.fixture
def client_made(monkeypatch):
    """An event that MLflow's client waits for before it is made: the delivery thread is held back."""
    import threading

    import mlflow

    made = threading.Event()
    real_client = mlflow.MlflowClient

    def slow_client(uri):
        made.wait(timeout=60)
        return real_client(uri)

    monkeypatch.setattr(mlflow, "MlflowClient", slow_client)
    return made


def test_training_starts_before_the_mlflow_client_is_made(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, client_made
):
    """MLflow's import and client take 1 to 2.5 s: the delivery thread makes them, not the first step."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tracker = tracked(tracker_spec(tiny_model_dir, data_files, "client-later"))
    with tracker.run({}):
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        assert tracker.client is None and tracker.run_id is None  # training went on meanwhile
        client_made.set()
    assert steps(client, tracker.run_id, "train/loss") == [1]


# ---------------------------------------------------------------------------------------------
# Restarts continue the run (the id travels in the checkpoint: Tracker.resume_id)


def test_restart_continues_the_same_run_at_the_next_step(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, client_made
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    spec = tracker_spec(tiny_model_dir, data_files, "restart")
    first = tracked(spec)
    with pytest.raises(Preempted), first.run({}):
        client_made.set()
        log_steps(first, range(1, 5))
        wait_for_run(first)
        checkpointed = first.resume_id  # the checkpoint at step 4 keeps it
        log_steps(first, range(5, 7))  # steps 5 and 6 are trained again after the restart
        raise Preempted
    assert checkpointed == first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"

    client_made.clear()
    second = tracked(spec, resume_run_id=checkpointed)
    with second.run({}):
        log_steps(second, range(5, 9))
        rechecked = second.resume_id  # its checkpoint before the thread found the run
        client_made.set()
        log_steps(second, range(9, 11))
    assert rechecked == checkpointed  # not the second job's own spool key: a third job finds the run too
    assert second.run_id == first.run_id
    assert steps(client, first.run_id, "train/loss") == list(range(1, 11))
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("restart").experiment_id])) == 1


def test_restart_while_unreachable_is_delivered_later_without_duplicates(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    spec = tracker_spec(tiny_model_dir, data_files, "restart-offline")
    first = tracked(spec)
    with pytest.raises(Preempted), first.run({}):
        log_steps(first, range(1, 7))
        raise Preempted

    with server_down(server):
        second = tracked(spec, resume_run_id=first.run_id)  # checkpoint at step 4
        with second.run({}):
            log_steps(second, range(5, 11))
    assert steps(client, first.run_id, "train/loss") == list(range(1, 7))

    with tracked(tracker_spec(tiny_model_dir, data_files, "restart-offline-next")).run({}):
        pass
    assert steps(client, first.run_id, "train/loss") == list(range(1, 11))
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_restart_of_a_run_never_created_adopts_its_spool(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch
):
    """Unreachable from the start: the checkpoint keeps the spool key; the restart delivers the first
    attempt's records, then its own, to one run."""
    spec = tracker_spec(tiny_model_dir, data_files, "never-created")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    first = tracked(spec)
    with server_down(server), pytest.raises(Preempted), first.run({}):
        log_steps(first, range(1, 4))
        raise Preempted
    assert first.run_id is None

    second = tracked(spec, resume_run_id=first.resume_id)
    with second.run({}):
        log_steps(second, range(3, 7))
    [run] = client.search_runs([client.get_experiment_by_name("never-created").experiment_id])
    assert second.run_id == run.info.run_id
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, 7))
    assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# The spool, directly


def test_delivering_again_after_lost_acknowledgements_duplicates_nothing(client, spool_dir):
    spool = Spool.create(spool_dir, TARGET)
    for record in spool_records(spool.key, "lost-acks"):
        spool.append(record)
    assert deliver(spool, client) == 6
    run_id = spool.state.run_id

    spool.state = SpoolState()  # as if the process died after MLflow's answers and before state.json
    spool.acknowledge(0)
    assert deliver(spool, client) == 6
    assert spool.state.run_id == run_id  # found by its ftjob.run_key tag, not created twice
    assert len(client.search_runs([client.get_experiment_by_name("lost-acks").experiment_id])) == 1
    assert steps(client, run_id, "train/loss") == [1, 2, 3]
    spool.release()
    assert not spool.directory.exists()


def test_a_record_mlflow_refuses_is_skipped_and_holds_nothing_back(client, spool_dir, caplog):
    spool = Spool.create(spool_dir, TARGET)
    records = spool_records(spool.key, "refused")
    changed = {"kind": "params", "params": {"a": "2"}, "time": records[1]["time"]}  # params never change
    for record in [*records[:2], changed, *records[2:]]:
        spool.append(record)
    with caplog.at_level(logging.WARNING, logger="job"):
        assert deliver(spool, client) == 7
    assert len(messages(caplog, logging.WARNING, "refused a params record")) == 1
    assert client.get_run(spool.state.run_id).data.params == {"a": "1"}
    assert steps(client, spool.state.run_id, "train/loss") == [1, 2, 3]
    spool.release()


def test_inactive_tracker_writes_nothing(tiny_model_dir, data_files, isolated):
    tracker = Tracker(tracker_spec(tiny_model_dir, data_files, "x").tracking, None)  # a rank other than 0
    with tracker.run({}):
        tracker.log_metrics({"train/loss": 1.0}, 1)
    assert tracker.run_id is None and tracker.resume_id is None
    assert not (isolated / "mlruns").exists() and not (isolated / ".ftjob-spool").exists()


# ---------------------------------------------------------------------------------------------
# Damaged and planted spools: quarantined, never in the way of this run or of the spools after them


def leftover(spool_dir: Path, key: str, experiment: str) -> Path:
    """A spool under key that an earlier job tracking to MLFLOW_TRACKING_URI left undelivered."""
    spool = Spool.create(spool_dir, tracking_target(os.environ["MLFLOW_TRACKING_URI"]))
    for record in spool_records(key, experiment):
        spool.append(record)
    spool.release()
    return spool.directory.rename(spool_dir / key)


def insert_line(path: Path, index: int, line: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:index], line + b"\n", *lines[index:]]))


def run_three_steps(spec) -> Tracker:
    tracker = tracked(spec)
    with tracker.run({}):
        log_steps(tracker, range(1, 4))
    return tracker


DAMAGE = {
    "garbage-line": lambda spool: insert_line(spool / RECORDS, 2, b"\x00\xff not json"),
    "record-without-its-fields": lambda spool: insert_line(spool / RECORDS, 2, b'{"kind": "metrics"}'),
    "unknown-kind": lambda spool: insert_line(spool / RECORDS, 2, b'{"kind": "shell", "time": 1}'),
    "state-not-json": lambda spool: (spool / STATE).write_text('{"run_id": nu'),
    "state-offset-negative": lambda spool: (spool / STATE).write_text('{"offset": -5}'),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_leftover_is_quarantined_and_the_next_one_still_delivered(
    damage, server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    damaged = leftover(spool_dir, key_of("a"), f"{damage}-damaged")
    DAMAGE[damage](damaged)
    leftover(spool_dir, key_of("b"), f"{damage}-good")
    with caplog.at_level(logging.WARNING, logger="job"):
        current = run_three_steps(tracker_spec(tiny_model_dir, data_files, f"{damage}-current"))

    assert client.get_run(current.run_id).info.status == "FINISHED"
    assert steps(client, current.run_id, "train/loss") == [1, 2, 3]
    [good] = client.search_runs([client.get_experiment_by_name(f"{damage}-good").experiment_id])
    assert good.info.status == "FINISHED" and steps(client, good.info.run_id, "train/loss") == [1, 2, 3]
    assert client.get_experiment_by_name(f"{damage}-damaged") is None  # nothing of it delivered
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.removeprefix(f"{damaged.name}.bad-").isdigit()  # the time, in milliseconds
    [warning] = messages(caplog, logging.WARNING, str(damaged))
    assert str(quarantined) in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, f"{damage}-later"))
    assert not messages(caplog, logging.WARNING, "spool")  # later runs leave the quarantined one alone
    assert list(spool_dir.iterdir()) == [quarantined]


def test_a_damaged_spool_of_the_run_to_resume_is_quarantined_and_the_run_goes_on(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    damaged = leftover(spool_dir, key_of("c"), "resume-damaged")
    (damaged / STATE).write_text("{")
    resumed = tracked(tracker_spec(tiny_model_dir, data_files, "resume-damaged"), resume_run_id=damaged.name)
    with caplog.at_level(logging.WARNING, logger="job"), resumed.run({}):
        log_steps(resumed, range(4, 7))

    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert steps(client, resumed.run_id, "train/loss") == [4, 5, 6]
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{damaged.name}.bad-")
    assert messages(caplog, logging.WARNING, str(damaged))


PLANTED = {  # where a planted artifacts record points, given its spool folder and a secret file
    "absolute-path": lambda spool, secret: str(secret.parent),
    "dot-dot": lambda spool, secret: f"{spool}/files/../../../home/.aws",
    "link-to-a-file": lambda spool, secret: str(
        link(spool / "files" / "adapter" / "credentials", secret).parent
    ),
    "link-to-a-folder": lambda spool, secret: str(link(spool / "files" / "adapter", secret.parent)),
}


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_artifacts_record_uploads_nothing_from_outside_its_spool(
    planted, server, client, tiny_model_dir, data_files, spool_dir, isolated, monkeypatch, caplog
):
    """A record pointing at a credentials file, the way a planted one made a run upload it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    marker = f"PLANTED-SECRET-{planted}".encode()
    secret = isolated / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(marker)
    spool = leftover(spool_dir, key_of("d"), f"planted-{planted}")
    (spool / "files").mkdir()
    record = {"kind": "artifacts", "dir": PLANTED[planted](spool, secret), "path": "adapter", "time": 1}
    insert_line(spool / RECORDS, 2, json.dumps(record).encode())
    with caplog.at_level(logging.WARNING, logger="job"):
        current = run_three_steps(tracker_spec(tiny_model_dir, data_files, f"planted-{planted}-current"))

    stored = [p for p in (server.root / "artifacts").rglob("*") if p.is_file()]
    assert not [p for p in stored if marker in p.read_bytes()]
    assert client.get_experiment_by_name(f"planted-{planted}") is None
    assert steps(client, current.run_id, "train/loss") == [1, 2, 3]
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{spool.name}.bad-")
    [warning] = messages(caplog, logging.WARNING, str(spool))
    assert "artifacts" in warning and str(quarantined) in warning
    assert secret.read_bytes() == marker


def test_an_artifacts_record_that_would_write_outside_the_run_is_quarantined(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    spool = leftover(spool_dir, key_of("e"), "escape")
    (spool / "files" / "spec").mkdir(parents=True)
    (spool / "files" / "spec" / "spec.json").write_text("{}")
    record = {"kind": "artifacts", "dir": str(spool / "files" / "spec"), "path": "../../escape", "time": 1}
    insert_line(spool / RECORDS, 2, json.dumps(record).encode())
    leftover(spool_dir, key_of("f"), "escape-later")
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, "escape-current"))

    assert client.get_experiment_by_name("escape") is None
    assert client.search_runs([client.get_experiment_by_name("escape-later").experiment_id])
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{spool.name}.bad-")
    assert messages(caplog, logging.WARNING, str(spool))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_spools_of_another_user_or_behind_a_link_are_not_delivered(
    server, client, tiny_model_dir, data_files, spool_dir, isolated, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    other = leftover(spool_dir, key_of("1"), "other-user")
    for path in [other, *other.rglob("*")]:
        os.chown(path, 65534, 65534)
    linked = spool_dir / key_of("2")
    linked.symlink_to(leftover(isolated / "elsewhere", key_of("2"), "linked"))
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, "not-mine-current"))

    assert client.get_experiment_by_name("other-user") is None
    assert client.get_experiment_by_name("linked") is None
    assert other.stat().st_uid == 65534 and linked.is_symlink()  # left as they are
    assert messages(caplog, logging.WARNING, str(other))
    assert messages(caplog, logging.WARNING, str(linked))
    assert Spool.acquire(spool_dir, other.name, tracking_target(server.url)) is None  # nor adopted to resume


# ---------------------------------------------------------------------------------------------
# A checkpoint's run id, spool folders and where their records go are input, never trusted


def plant_run_id(checkpoint: Path, run_id) -> None:
    """Set run.json's run_id in a committed checkpoint, and its MANIFEST entry with it."""
    run = json.loads((checkpoint / "run.json").read_text())
    (checkpoint / "run.json").write_text(json.dumps({**run, "run_id": run_id}))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"]["run.json"] = manifest_entry(checkpoint / "run.json")
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_whose_run_id_is_a_path_deletes_nothing_and_starts_a_new_run(
    tiny_model_dir, data_files, isolated, caplog
):
    """A run_id that named a folder outside the spool: the run adopted it as its spool and, once the
    records were delivered, removed it."""
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 0},
        tracking={"experiment": "run-id-paths", "system_metrics": False},
    )
    runs = [train_in_process(spec).run_id]
    output = isolated / "runs" / "t"
    newest = sorted((output / "checkpoints").iterdir())[-1]
    victim = isolated / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    for run_id in ["../victim", str(victim)]:
        plant_run_id(newest, run_id)
        (output / "adapter" / MANIFEST).unlink()  # not published: the next run resumes from the checkpoint
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="job"):
            runs.append(train_in_process(spec).run_id)
        assert (victim / "notes.txt").read_text() == "keep me" and len(list(victim.iterdir())) == 1
        [warning] = messages(caplog, logging.WARNING, "not an MLflow run id")
        assert repr(run_id) in warning
    assert None not in runs and len(set(runs)) == 3  # each resume logged to a new run


def failed_run(client, experiment: str, tags: dict[str, str]) -> str:
    """A FAILED run in experiment (made when missing), as another team's job may have left it."""
    found = client.get_experiment_by_name(experiment)
    run = client.create_run(found.experiment_id if found else client.create_experiment(experiment), tags=tags)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def deleted_run(client, experiment: str) -> str:
    run_id = failed_run(client, experiment, {RUN_KEY_TAG: key_of("9")})
    client.delete_run(run_id)
    return run_id


NOT_THIS_JOBS_RUNS = {  # a run of valid id that a checkpoint may name, given the job's experiment
    "in another experiment": lambda client, experiment: failed_run(
        client, f"{experiment}-other", {RUN_KEY_TAG: key_of("9")}
    ),
    "without ftjob's run key": lambda client, experiment: failed_run(client, experiment, {}),
    "deleted": deleted_run,
}


@pytest.mark.parametrize("case", NOT_THIS_JOBS_RUNS)
def test_a_checkpoint_naming_a_run_that_is_not_this_jobs_leaves_it_alone_and_starts_a_new_run(
    case, server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    """An edited run.json made the job log to, and set the status of, any run on the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    experiment = f"not-this-jobs-{case.replace(' ', '-')}"
    other = NOT_THIS_JOBS_RUNS[case](client, experiment)
    before = client.get_run(other)
    resumed = tracked(tracker_spec(tiny_model_dir, data_files, experiment), resume_run_id=other)
    with caplog.at_level(logging.WARNING, logger="job"), resumed.run({}):
        log_steps(resumed, range(1, 4))

    assert resumed.run_id not in (None, other)
    assert steps(client, resumed.run_id, "train/loss") == [1, 2, 3]
    after = client.get_run(other)
    assert after.info == before.info and after.data.metrics == {} and after.data.tags == before.data.tags
    [warning] = messages(caplog, logging.WARNING, other)
    assert f"not an ftjob run of experiment {experiment!r}" in warning


def test_a_spool_whose_state_names_a_run_that_is_not_its_jobs_starts_a_new_run(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    other = failed_run(client, "planted-state-other", {RUN_KEY_TAG: key_of("9")})
    left = leftover(spool_dir, key_of("e"), "planted-state")
    (left / STATE).write_text(json.dumps({"run_id": other, "offset": 0, "last_steps": {}}))
    run_three_steps(tracker_spec(tiny_model_dir, data_files, "planted-state-current"))

    [run] = client.search_runs([client.get_experiment_by_name("planted-state").experiment_id])
    assert run.info.run_id != other and steps(client, run.info.run_id, "train/loss") == [1, 2, 3]
    assert client.get_run(other).info.status == "FAILED" and client.get_run(other).data.metrics == {}


def test_a_delivered_leftover_whose_state_was_edited_to_name_another_run_is_quarantined(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    """The leftover's open record was delivered, then its state.json edited to name another run: its
    pending records go nowhere (quarantined), not to that run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    other = failed_run(client, "edited-state-other", {})
    left = leftover(spool_dir, key_of("f"), "edited-state")
    spool = Spool.acquire(spool_dir, key_of("f"), tracking_target(server.url))
    open_record, after_open = spool.pending()[0]
    assert open_record["kind"] == "open"
    spool.release()
    (left / STATE).write_text(json.dumps({"run_id": other, "offset": after_open, "last_steps": {}}))
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, "edited-state-current"))

    assert client.get_run(other).data.metrics == {} and client.get_run(other).data.params == {}
    assert not left.exists() and len(list(spool_dir.glob(f"{key_of('f')}.bad-*"))) == 1
    assert messages(caplog, logging.WARNING, f"run {other} is not an ftjob run of experiment 'edited-state'")


def half_made(path: Path, age_seconds: float) -> Path:
    """A spool folder as Spool.create leaves it when killed before renaming it into place."""
    path.mkdir(parents=True)
    TARGET.write(path / "spool.json")
    (path / "lock").touch()
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_a_spool_folder_left_half_made_by_a_crash_is_removed_and_nothing_else(
    server, tiny_model_dir, data_files, spool_dir, isolated, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    crashed = half_made(spool_dir / f".new-{key_of('1')}", age_seconds=2 * 3600)
    being_made = half_made(spool_dir / f".new-{key_of('2')}", age_seconds=0)  # by a process running now
    misnamed = half_made(spool_dir / ".new-notes", age_seconds=2 * 3600)
    outside = half_made(isolated / "outside", age_seconds=2 * 3600)
    linked = link(spool_dir / f".new-{key_of('3')}", outside)
    run_three_steps(tracker_spec(tiny_model_dir, data_files, "half-made"))

    assert not crashed.exists()
    assert being_made.is_dir() and misnamed.is_dir() and linked.is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["lock", "spool.json"]


def test_a_leftover_goes_only_to_the_tracking_uri_it_was_logged_for(spool_dir, isolated, monkeypatch, caplog):
    """Two teams' jobs, two stores, one spool folder: a job delivers no leftover of the other's store."""
    from mlflow import MlflowClient

    store = {team: f"sqlite:///{isolated / team / 'mlflow.db'}" for team in ("a", "b")}
    for team in store:
        (isolated / team).mkdir()

    def unreachable(spool, client):
        raise ConnectionError("the server is down")

    def job(team: str, experiment: str) -> Tracker:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store[team])
        record = RunRecord(experiment, {"team": team}, {}, {}, [])
        tracker = Tracker(TrackingSpec(experiment=experiment, system_metrics=False), record)
        with tracker.run({}):
            log_steps(tracker, range(1, 4))
        return tracker

    with monkeypatch.context() as outage:  # team a's server is down: its job leaves its records behind
        outage.setattr(tracker_module, "deliver", unreachable)
        left = job("a", "a-offline").spool.directory
    records = (left / RECORDS).read_bytes()

    with caplog.at_level(logging.WARNING, logger="job"):
        job("b", "b-current")
    assert MlflowClient(store["b"]).get_experiment_by_name("a-offline") is None
    assert [p.name for p in spool_dir.iterdir()] == [left.name] and (left / RECORDS).read_bytes() == records
    assert messages(caplog, logging.WARNING, f"{left} holds records for {store['a']}")

    job("a", "a-current")
    client = MlflowClient(store["a"])
    [run] = client.search_runs([client.get_experiment_by_name("a-offline").experiment_id])
    assert steps(client, run.info.run_id, "train/loss") == [1, 2, 3]
    assert not list(spool_dir.iterdir())
