"""Stops and kills of ftjob as a process, and the runs that resume after them: the resumed run equals the
uninterrupted one."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import (
    RESUME_STEPS,
    assert_same_run,
    read_until,
    run_ftjob,
    start_run,
    train_in_process,
    write_stop_spec,
)

from job.data import stream as stream_module
from job.data.pipeline import DataPipeline
from job.errors import UserError
from job.output.manifest import manifest_entry


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_75_and_resumes_exactly(spec_path, workdir, uninterrupted, signum):
    output = f"./stopped-{signum.name}"
    process = start_run(spec_path, output)
    read_until(process, f"step 8/{RESUME_STEPS}")
    process.send_signal(signum)
    out = process.stdout.read()
    assert process.wait(timeout=120) == 75, out
    assert "checkpoint committed" in out and "exit 75" in out
    steps = sorted(p.name for p in (workdir / output / "checkpoints").iterdir())
    assert steps[-1] >= "step-000008" and not (workdir / output / "adapter").exists()
    run = json.loads((workdir / output / "checkpoints" / steps[-1] / "run.json").read_text())
    assert "history" not in run and run["last_metrics"]["step"] == run["step"]  # the curve is not in it
    segments = sorted(p.name for p in (workdir / output / "metrics").iterdir())
    assert segments[-1] == f"{run['step']:06d}.jsonl"  # ...but in segments, one per checkpoint

    resumed = run_ftjob("run", str(spec_path), "--set", f"output.uri={output}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step" in resumed.stderr
    assert_same_run(workdir, uninterrupted, output)
    curve = [json.loads(line) for line in (workdir / output / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in curve] == list(range(1, RESUME_STEPS + 1)) and not (
        workdir / output / "metrics"
    ).exists()


def test_checkpoints_hold_no_training_text(workdir, uninterrupted):
    """What checkpoints copy into output.uri holds where the buffered and carried-over rows are in the
    files, never what they say (rows may carry personal data)."""
    rows = [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]
    texts = {r["instruction"] for r in rows} | {r["output"] for r in rows}
    checkpoints = workdir / uninterrupted / "checkpoints"
    files = [path for path in checkpoints.rglob("*") if path.is_file()]
    assert [(path.name, text) for path in files for text in texts if text.encode() in path.read_bytes()] == []
    cursors = [json.loads(path.read_text())["data"] for path in checkpoints.glob("*/rank-*.json")]
    assert cursors and any(cursor["rows"]["buffer"] for cursor in cursors)  # there were rows to hold


def test_sigkill_after_a_checkpoint_resumes_exactly(spec_path, workdir, uninterrupted):
    process = start_run(spec_path, "./killed")
    read_until(process, "checkpoint step 10 committed")
    read_until(process, f"step 12/{RESUME_STEPS}")
    process.kill()
    process.wait(timeout=60)
    assert not (workdir / "killed" / "adapter").exists()
    stale = workdir / "killed" / "metrics" / "000099.jsonl"  # a segment whose checkpoint never committed
    stale.write_text(json.dumps({"step": 11, "train/loss": 99.0}) + "\n")

    resumed = run_ftjob("run", str(spec_path), "--set", "output.uri=./killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step 10" in resumed.stderr
    assert_same_run(workdir, uninterrupted, "killed")
    assert not stale.exists()


def test_a_resumed_run_reads_the_files_it_started_with(spec_path, workdir):
    """A glob that names one more file by the time the job is requeued: the resumed run goes on over
    the files it was reading (its cursor is a position in them), bitwise as if never stopped."""
    parts = workdir / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_bytes((workdir / "train.jsonl").read_bytes())
    spec = json.loads(spec_path.read_text())
    spec["data"]["train"] = [str(parts / "*.jsonl")]
    glob_spec = workdir / "glob-spec.json"
    glob_spec.write_text(json.dumps(spec))
    straight = run_ftjob("run", str(glob_spec), "--set", "output.uri=./glob-straight", cwd=workdir)
    assert straight.returncode == 0, straight.stderr

    process = start_run(glob_spec, "./glob-stopped")
    read_until(process, f"step 8/{RESUME_STEPS}")
    process.terminate()
    assert process.wait(timeout=120) == 75
    (parts / "b.jsonl").write_bytes((workdir / "train.jsonl").read_bytes())
    resumed = run_ftjob("run", str(glob_spec), "--set", "output.uri=./glob-stopped", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(workdir, "glob-straight", "glob-stopped")


def test_a_resumed_epoch_run_takes_its_step_count_from_the_checkpoint(spec_path, workdir, monkeypatch):
    """The counting pass reads all of the data before step 1; a requeued job must not pay for it
    again: the count travels in the checkpoint, and the schedule still ends on the last step."""

    spec = json.loads(spec_path.read_text())
    spec["train"].update(max_steps=None, epochs=1, checkpoint_every=3, scheduler="linear")
    epoch_spec = workdir / "epoch-spec.json"
    epoch_spec.write_text(json.dumps(spec))
    process = start_run(epoch_spec, "./epoch-run")
    read_until(process, "checkpoint step 6 committed")
    process.terminate()
    assert process.wait(timeout=120) == 75
    saved = [json.loads(p.read_text()) for p in (workdir / "epoch-run" / "checkpoints").glob("*/run.json")]
    planned = max(saved, key=lambda run: run["step"])["total_steps"]
    assert planned > 6

    def counting_pass(*args):
        raise AssertionError("the resumed run counted the data again")

    monkeypatch.setattr(DataPipeline, "count_micro_batches", counting_pass)
    history = train_in_process({**spec, "output": {"uri": str(workdir / "epoch-run")}}).history
    assert history[-1]["step"] == planned and history[-1]["train/learning_rate"] == 0.0


@pytest.mark.parametrize(
    "damage", ["truncated run.json", "missing rank file", "flipped weight byte", "missing MANIFEST.json"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(spec_path, workdir, uninterrupted, damage):
    output = "./damaged-" + damage.replace(" ", "-")
    process = start_run(spec_path, output)
    read_until(process, "checkpoint step 10 committed")
    read_until(process, f"step 12/{RESUME_STEPS}")
    process.terminate()
    assert process.wait(timeout=120) == 75
    checkpoints = workdir / output / "checkpoints"
    newest = sorted(checkpoints.iterdir())[-1]
    stopped_at = int(newest.name.split("-")[1])  # the step the stop came after: 12 or a little later
    assert stopped_at > 10 and (newest / "MANIFEST.json").is_file()
    if damage == "truncated run.json":
        (newest / "run.json").write_text((newest / "run.json").read_text()[:20])
    elif damage == "missing rank file":
        (newest / "rank-00000.json").unlink()
    elif damage == "missing MANIFEST.json":
        (newest / "MANIFEST.json").unlink()
    else:
        weights = bytearray((newest / "trainable.safetensors").read_bytes())
        weights[-1] ^= 0xFF
        (newest / "trainable.safetensors").write_bytes(bytes(weights))

    resumed = run_ftjob("run", str(spec_path), "--set", f"output.uri={output}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"the checkpoint at step {stopped_at} is damaged" in resumed.stderr
    assert "resuming from the checkpoint at step 10" in resumed.stderr
    assert_same_run(workdir, uninterrupted, output)


def test_when_every_checkpoint_is_damaged_the_job_says_so_and_exits_2(spec_path, workdir):
    process = start_run(spec_path, "./all-damaged")
    read_until(process, "checkpoint step 5 committed")
    read_until(process, f"step 7/{RESUME_STEPS}")
    process.terminate()
    assert process.wait(timeout=120) == 75
    for checkpoint in (workdir / "all-damaged" / "checkpoints").iterdir():
        (checkpoint / "run.json").write_text("{")
    resumed = run_ftjob("run", str(spec_path), "--set", "output.uri=./all-damaged", cwd=workdir)
    assert resumed.returncode == 2, resumed.stderr
    assert "every committed checkpoint in" in resumed.stderr and "--restart" in resumed.stderr


def test_retention_incomplete_checkpoints_finished_runs_and_spec_changes(spec_path, workdir):
    first = run_ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "output.uri=./o", cwd=workdir
    )
    assert first.returncode == 0, first.stderr
    checkpoints = workdir / "o" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000005-g1", "step-000010-g1"]  # keep 2

    again = run_ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "output.uri=./o", cwd=workdir
    )
    assert again.returncode == 0 and "already published; nothing to do" in again.stdout
    assert "step 1/" not in again.stdout

    # an upload that died before COMMITTED is neither trusted nor kept
    (workdir / "o" / "adapter" / "MANIFEST.json").unlink()
    (checkpoints / "step-000099").mkdir()
    (checkpoints / "step-000099" / "run.json").write_text("{half written")
    changed = run_ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "train.seed=4", "--set", "output.uri=./o",
        cwd=workdir,
    )  # fmt: skip
    assert changed.returncode == 2
    assert "train.seed: 3 -> 4" in changed.stderr and "--restart" in changed.stderr
    assert not (checkpoints / "step-000099").exists()

    restarted = run_ftjob(
        "run", str(spec_path), "--restart", "--set", "train.max_steps=12", "--set", "train.seed=4",
        "--set", "output.uri=./o", cwd=workdir,
    )  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stderr and "step 1/12" in restarted.stdout


def test_restart_deletes_published_outputs_and_happens_once_per_scheduler_job(
    spec_path, workdir, uninterrupted
):
    """A requeued job runs its command again, --restart included: the second run of the same job
    resumes; a new job restarts."""
    other = run_ftjob(
        "run", str(spec_path), "--set", "output.uri=./again", "--set", "train.seed=4", cwd=workdir
    )
    assert other.returncode == 0, other.stderr
    adapter, merged = workdir / "again" / "adapter", workdir / "again" / "merged"
    assert (adapter / "MANIFEST.json").is_file()
    merged.mkdir()
    (merged / "MANIFEST.json").write_text("{}")  # as output.merge leaves it

    job_7 = {"SLURM_JOB_ID": "7"}
    restarted = start_run(spec_path, "./again", "--restart", env=job_7)
    read_until(restarted, f"step 8/{RESUME_STEPS}")
    restarted.send_signal(signal.SIGTERM)
    out = restarted.stdout.read()
    assert restarted.wait(timeout=120) == 75, out
    assert not adapter.exists() and not merged.exists()  # the old outputs are gone, MANIFEST and all
    assert json.loads((workdir / "again" / "restart.json").read_text()) == {"restart_id": "slurm-7"}

    requeued = run_ftjob(
        "run", str(spec_path), "--restart", "--set", "output.uri=./again", cwd=workdir, env=job_7
    )
    assert requeued.returncode == 0, requeued.stderr
    assert (
        "already restarted" in requeued.stderr and "resuming from the checkpoint at step" in requeued.stderr
    )
    assert_same_run(workdir, uninterrupted, "again")

    new_job = run_ftjob(
        "run", str(spec_path), "--restart", "--set", "output.uri=./again", "--set", "train.max_steps=2",
        cwd=workdir, env={"SLURM_JOB_ID": "8"},
    )  # fmt: skip
    assert new_job.returncode == 0, new_job.stderr
    assert "resuming" not in new_job.stderr and "step 1/2" in new_job.stdout


def test_a_stop_during_the_model_download_exits_75_and_the_next_run_starts_cleanly(
    tiny_model_dir, spec_path, workdir, s3, fault_proxy
):
    s3.put(str(tiny_model_dir) + "/", f"{s3.bucket}/models/tiny/", recursive=True)
    spec = json.loads(spec_path.read_text())
    spec["model"]["source"] = f"s3://{s3.bucket}/models/tiny/"
    spec["storage_options"] = {"s3": {"endpoint_url": fault_proxy.url}}
    spec["train"]["max_steps"] = 2
    path = workdir / "spec-s3-model.json"
    path.write_text(json.dumps(spec))
    env = {"FTJOB_CACHE": str(workdir / "download-cache")}

    fault_proxy.slow_seconds = 0.5
    fault_proxy.outage("slow")
    process = start_run(path, "./early", env=env)
    read_until(process, "downloading the model")
    process.send_signal(signal.SIGTERM)
    out = process.stdout.read()
    assert process.wait(timeout=120) == 75, out
    assert "before training began (nothing to resume yet); exit 75" in out and "Traceback" not in out
    assert not (workdir / "early" / "checkpoints").exists() and not (workdir / "early" / "adapter").exists()

    fault_proxy.heal()
    requeued = run_ftjob("run", str(path), "--set", "output.uri=./early", cwd=workdir, env=env)
    assert requeued.returncode == 0, requeued.stderr
    assert "step 1/2" in requeued.stdout and "resuming" not in requeued.stderr


def rank_file(**rng) -> dict:
    """A rank file as a checkpoint holds it (JSON), its RNG states updated with rng."""
    from job.rng import rng_states

    return json.loads(json.dumps({"rng": {**rng_states(), **rng}, "data": {"a cursor": "checked elsewhere"}}))


def test_an_edited_checkpoint_cursor_is_exit_2_and_the_file_it_names_is_never_opened(
    tiny_model_dir, isolated, monkeypatch
):
    """The issue's case: a stopped run's newest rank file is edited to read another local file, its
    MANIFEST fixed so that the checkpoint still counts as whole; the resumed run refuses it before
    reading any data and publishes nothing."""
    spec_path = write_stop_spec(isolated, tiny_model_dir, "trust", 30, checkpoint_every=5, seed=3)
    train = json.loads(spec_path.read_text())["data"]["train"][0]
    other = isolated / "other.jsonl"
    other.write_bytes((isolated / "train.jsonl").read_bytes())  # same offsets: a cursor that would work
    process = start_run(spec_path, str(isolated / "out"))
    read_until(process, "step 8/30")
    process.terminate()
    assert process.wait(timeout=120) == 75
    newest = sorted((isolated / "out" / "checkpoints").iterdir())[-1]
    rank_file = newest / "rank-00000.json"
    rank_file.write_text(rank_file.read_text().replace(json.dumps(train)[1:-1], str(other)))
    assert str(other) in rank_file.read_text()
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    manifest["files"]["rank-00000.json"] = manifest_entry(rank_file)
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))

    opened = []
    real_read_rows = stream_module.read_rows
    monkeypatch.setattr(
        stream_module, "read_rows", lambda url, *args: opened.append(url) or real_read_rows(url, *args)
    )
    spec = json.loads(spec_path.read_text())
    with pytest.raises(UserError) as refused:
        train_in_process({**spec, "output": {"uri": str(isolated / "out")}})
    assert refused.value.exit_code == 2
    assert str(refused.value).startswith(f"the data cursor in {newest}/rank-00000.json: ")  # step, generation
    assert f"plan.sources[0] names {other}, a file data.train does not name" in str(refused.value)
    assert opened == [] and not (isolated / "out" / "adapter").exists()
    assert newest.is_dir()  # nothing written is lost: the run can go on with --restart, or after a fix
