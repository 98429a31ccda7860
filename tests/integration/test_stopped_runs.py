"""Runs stopped in this process at a step (StopAfterSteps: a stop signal's path, checkpoint and exit 75,
without a process) and resumed: the resumed run equals the uninterrupted one; a damaged checkpoint, a
changed spec and --restart. The signals themselves, and kills, are tested on processes in tests/e2e."""

from __future__ import annotations

import json

import pytest
from helpers import (
    RESUME_STEPS,
    StopAfterSteps,
    assert_same_run,
    ftjob,
    losses,
    make_spec,
    train_in_process,
)

from job.data import stream as stream_module
from job.data.pipeline import DataPipeline
from job.errors import Preempted, UserError
from job.output.manifest import manifest_entry


def at(spec_path, output) -> dict:
    """The spec at spec_path with output.uri `output`, for train_in_process."""
    return json.loads(spec_path.read_text()) | {"output": {"uri": str(output)}}


def stop_after(steps: int, spec: dict, **kwargs) -> Preempted:
    """Train spec in this process until a stop after `steps` steps; the Preempted it ends with (exit 75)."""
    with pytest.raises(Preempted) as stopped:
        train_in_process(spec, stop=StopAfterSteps(steps), **kwargs)
    assert stopped.value.exit_code == 75
    return stopped.value


@pytest.fixture(scope="module")
def uninterrupted(spec_path, workdir) -> str:
    """The resume spec trained straight through in this process: the run each stopped and resumed one
    equals."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("HF_HUB_OFFLINE", "1")
        train_in_process(at(spec_path, workdir / "straight"))
    assert len(losses(workdir / "straight")) == RESUME_STEPS
    return "straight"


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


def test_a_resumed_run_reads_the_files_it_started_with(spec_path, workdir):
    """A glob that names one more file by the time the job is requeued: the resumed run goes on over
    the files it was reading (its cursor is a position in them), bitwise as if never stopped."""
    parts = workdir / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_bytes((workdir / "train.jsonl").read_bytes())
    spec = json.loads(spec_path.read_text())
    spec["data"]["train"] = [str(parts / "*.jsonl")]
    train_in_process(spec | {"output": {"uri": str(workdir / "glob-straight")}})

    stopped = spec | {"output": {"uri": str(workdir / "glob-stopped")}}
    stop_after(8, stopped)
    (parts / "b.jsonl").write_bytes((workdir / "train.jsonl").read_bytes())
    train_in_process(stopped)
    assert_same_run(workdir, "glob-straight", "glob-stopped")


def test_a_resumed_epoch_run_takes_its_step_count_from_the_checkpoint(spec_path, workdir, monkeypatch):
    """The counting pass reads all of the data before step 1; a requeued job must not pay for it
    again: the count travels in the checkpoint, and the schedule still ends on the last step."""
    spec = at(spec_path, workdir / "epoch-run")
    spec["train"].update(max_steps=None, epochs=1, checkpoint_every=3, scheduler="linear")
    stop_after(7, spec)  # after the checkpoint at step 6
    saved = [json.loads(p.read_text()) for p in (workdir / "epoch-run" / "checkpoints").glob("*/run.json")]
    planned = max(saved, key=lambda run: run["step"])["total_steps"]
    assert planned > 7

    def counting_pass(*args):
        raise AssertionError("the resumed run counted the data again")

    monkeypatch.setattr(DataPipeline, "count_micro_batches", counting_pass)
    history = train_in_process(spec).history
    assert history[-1]["step"] == planned and history[-1]["train/learning_rate"] == 0.0


@pytest.mark.parametrize(
    "damage", ["truncated run.json", "missing rank file", "flipped weight byte", "missing MANIFEST.json"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(spec_path, workdir, uninterrupted, damage):
    output = "damaged-" + damage.replace(" ", "-")
    stop_after(12, at(spec_path, workdir / output))  # checkpoints at steps 5, 10 and the stop's 12
    newest = sorted((workdir / output / "checkpoints").iterdir())[-1]
    assert newest.name.startswith("step-000012") and (newest / "MANIFEST.json").is_file()
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

    resumed = ftjob("run", str(spec_path), "--set", f"output.uri=./{output}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "the checkpoint at step 12 is damaged" in resumed.stderr
    assert "resuming from the checkpoint at step 10" in resumed.stderr
    assert_same_run(workdir, uninterrupted, output)


def test_when_every_checkpoint_is_damaged_the_job_says_so_and_exits_2(spec_path, workdir):
    stop_after(7, at(spec_path, workdir / "all-damaged"))  # checkpoints at steps 5 and 7
    for checkpoint in (workdir / "all-damaged" / "checkpoints").iterdir():
        (checkpoint / "run.json").write_text("{")
    resumed = ftjob("run", str(spec_path), "--set", "output.uri=./all-damaged", cwd=workdir)
    assert resumed.returncode == 2, resumed.stderr
    assert "every committed checkpoint in" in resumed.stderr and "--restart" in resumed.stderr


def test_retention_incomplete_checkpoints_finished_runs_and_spec_changes(spec_path, workdir):
    first = ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "output.uri=./o", cwd=workdir
    )
    assert first.returncode == 0, first.stderr
    checkpoints = workdir / "o" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000005-g1", "step-000010-g1"]  # keep 2

    again = ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "output.uri=./o", cwd=workdir
    )
    assert again.returncode == 0 and "already published; nothing to do" in again.stdout
    assert "step 1/" not in again.stdout

    # an upload that died before COMMITTED is neither trusted nor kept
    (workdir / "o" / "adapter" / "MANIFEST.json").unlink()
    (checkpoints / "step-000099").mkdir()
    (checkpoints / "step-000099" / "run.json").write_text("{half written")
    changed = ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "train.seed=4", "--set", "output.uri=./o",
        cwd=workdir,
    )  # fmt: skip
    assert changed.returncode == 2
    assert "train.seed: 3 -> 4" in changed.stderr and "--restart" in changed.stderr
    assert not (checkpoints / "step-000099").exists()

    restarted = ftjob(
        "run", str(spec_path), "--restart", "--set", "train.max_steps=12", "--set", "train.seed=4",
        "--set", "output.uri=./o", cwd=workdir,
    )  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stderr and "step 1/12" in restarted.stdout


def test_restart_deletes_published_outputs_and_happens_once_per_scheduler_job(
    spec_path, workdir, uninterrupted, monkeypatch
):
    """A requeued job runs its command again, --restart included: the second run of the same job
    resumes; a new job restarts."""
    other = ftjob("run", str(spec_path), "--set", "output.uri=./again", "--set", "train.seed=4", cwd=workdir)
    assert other.returncode == 0, other.stderr
    adapter, merged = workdir / "again" / "adapter", workdir / "again" / "merged"
    assert (adapter / "MANIFEST.json").is_file()
    merged.mkdir()
    (merged / "MANIFEST.json").write_text("{}")  # as output.merge leaves it

    job_7 = {"SLURM_JOB_ID": "7"}
    with monkeypatch.context() as scheduler_job:
        scheduler_job.setenv("SLURM_JOB_ID", "7")
        stop_after(8, at(spec_path, workdir / "again"), restart=True)
    assert not adapter.exists() and not merged.exists()  # the old outputs are gone, MANIFEST and all
    assert json.loads((workdir / "again" / "restart.json").read_text()) == {"restart_id": "slurm-7"}

    requeued = ftjob(
        "run", str(spec_path), "--restart", "--set", "output.uri=./again", cwd=workdir, env=job_7
    )
    assert requeued.returncode == 0, requeued.stderr
    assert (
        "already restarted" in requeued.stderr and "resuming from the checkpoint at step" in requeued.stderr
    )
    assert_same_run(workdir, uninterrupted, "again")

    new_job = ftjob(
        "run", str(spec_path), "--restart", "--set", "output.uri=./again", "--set", "train.max_steps=2",
        cwd=workdir, env={"SLURM_JOB_ID": "8"},
    )  # fmt: skip
    assert new_job.returncode == 0, new_job.stderr
    assert "resuming" not in new_job.stderr and "step 1/2" in new_job.stdout


def test_an_edited_checkpoint_cursor_is_exit_2_and_the_file_it_names_is_never_opened(
    tiny_model_dir, isolated, monkeypatch
):
    """The issue's case: a stopped run's newest rank file is edited to read another local file, its
    MANIFEST fixed so that the checkpoint still counts as whole; the resumed run refuses it before
    reading any data and publishes nothing."""
    spec = make_spec("stop", model=tiny_model_dir, files=isolated, output={"uri": str(isolated / "out")})
    train = spec["data"]["train"][0]
    other = isolated / "other.jsonl"
    other.write_bytes((isolated / "train.jsonl").read_bytes())  # same offsets: a cursor that would work
    stop_after(8, spec)
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
    with pytest.raises(UserError) as refused:
        train_in_process(spec)
    assert refused.value.exit_code == 2
    assert str(refused.value).startswith(f"the data cursor in {newest}/rank-00000.json: ")  # step, generation
    assert f"plan.sources[0] names {other}, a file data.train does not name" in str(refused.value)
    assert opened == [] and not (isolated / "out" / "adapter").exists()
    assert newest.is_dir()  # nothing written is lost: the run can go on with --restart, or after a fix


def test_the_data_thread_trains_the_same_run(workdir, spec_path, uninterrupted):
    """data.prefetch 2 (the data thread, as on GPUs), stopped at step 7, resumed on the training thread
    (prefetch 0, the uninterrupted run's: CPUs'): the same losses and adapter, bitwise."""
    spec = at(spec_path, workdir / "data-thread")
    spec["data"] = {**spec["data"], "prefetch": 2}
    stop_after(7, spec)
    spec["data"]["prefetch"] = 0
    train_in_process(spec)
    assert_same_run(workdir, uninterrupted, "data-thread")
