"""Checkpoints, signals and exact resume, with real processes killed by real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import (
    REPO,
    free_port,
    read_until,
    run_ftjob,
    start_run,
    train_in_process,
    write_stop_spec,
)
from safetensors.torch import load_file, save_file

STEPS = 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    return write_stop_spec(
        workdir, tiny_model_dir, "r", STEPS, checkpoint_every=5, seed=3, data={"shuffle_buffer": 16}
    )


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "adapter" / "metrics.json").read_text())["history"]
    return [h["train/loss"] for h in history]


def assert_same_run(workdir, uninterrupted: str, resumed: str) -> None:
    assert losses(workdir / resumed) == losses(workdir / uninterrupted)
    a = load_file(workdir / uninterrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(workdir / resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bitwise


@pytest.fixture(scope="module")
def uninterrupted(spec_path, workdir):
    result = run_ftjob("run", str(spec_path), "--set", "output.uri=./straight", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert len(losses(workdir / "straight")) == STEPS
    return "straight"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_75_and_resumes_exactly(spec_path, workdir, uninterrupted, signum):
    output = f"./stopped-{signum.name}"
    process = start_run(spec_path, output)
    read_until(process, f"step 8/{STEPS}")
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
    assert [h["step"] for h in curve] == list(range(1, STEPS + 1)) and not (
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
    read_until(process, f"step 12/{STEPS}")
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
    read_until(process, f"step 8/{STEPS}")
    process.terminate()
    assert process.wait(timeout=120) == 75
    (parts / "b.jsonl").write_bytes((workdir / "train.jsonl").read_bytes())
    resumed = run_ftjob("run", str(glob_spec), "--set", "output.uri=./glob-stopped", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(workdir, "glob-straight", "glob-stopped")


def test_a_resumed_epoch_run_takes_its_step_count_from_the_checkpoint(spec_path, workdir, monkeypatch):
    """The counting pass reads all of the data before step 1; a requeued job must not pay for it
    again: the count travels in the checkpoint, and the schedule still ends on the last step."""
    from job.data.pipeline import DataPipeline

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
    read_until(process, f"step 12/{STEPS}")
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
    read_until(process, f"step 7/{STEPS}")
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
    read_until(restarted, f"step 8/{STEPS}")
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


def test_resuming_refuses_changes_to_what_is_trained_and_allows_the_rest(isolated):
    from job.output.checkpoint import fingerprint, fingerprint_changes
    from job.spec import validate_spec

    (isolated / "m").mkdir()
    (isolated / "m" / "model.safetensors").write_bytes(b"weights")
    base = {"model": {"source": "m"}, "data": {"train": ["d.jsonl"]}, "train": {"max_steps": 10}}
    saved = fingerprint(validate_spec(base), world_size=2)
    identity = saved["model.identity"]
    assert identity.startswith("sha256:")

    def changes(section: str, **values) -> list[str]:
        spec = {**base, section: {**base.get(section, {}), **values}}
        return fingerprint_changes(saved, fingerprint(validate_spec(spec), world_size=2))

    assert changes("train", learning_rate=1e-5) == ["train.learning_rate: 0.0002 -> 1e-05"]
    assert changes("train", weight_decay=0.1) == ["train.weight_decay: 0.0 -> 0.1"]
    assert changes("data", train_on="all") == ["data.train_on: 'completion' -> 'all'"]
    assert changes("data", chat_template="{{ x }}") == ["data.chat_template: None -> '{{ x }}'"]
    assert changes("data", truncation="drop") == ["data.truncation: 'truncate' -> 'drop'"]
    assert changes("data", eval_fraction=0.3) == ["data.eval_fraction: 0.0 -> 0.3"]  # not data.eval's
    older = {k: v for k, v in saved.items() if k != "fingerprint_version"}
    assert "another version of ftjob" in fingerprint_changes(older, saved)[0]
    assert fingerprint_changes(saved, fingerprint(validate_spec(base), world_size=1)) == [
        "world_size: 2 -> 1"
    ]
    assert fingerprint_changes({**saved, "model.identity": "sha256:0ther"}, saved) == [
        f"other model files under model.source (model.identity 'sha256:0ther' -> {identity!r}): point "
        "model.source at the model the run started on"
    ]
    for section, values in [
        ("train", {"checkpoint_every": 7, "eval_every": 3, "log_every": 1, "stop_grace_seconds": 5}),
        ("output", {"uri": "s3://elsewhere/run", "keep_checkpoints": 5}),
        ("tracking", {"experiment": "other"}),
        ("data", {"eval": ["e.jsonl"]}),
    ]:
        assert changes(section, **values) == [], section


def interrupted_in_process(spec_path, model_dir, output) -> dict:
    """The resume spec on model_dir, trained in this process to its last checkpoint but not published, as
    a run stopped before publishing leaves it."""
    spec = json.loads(spec_path.read_text())
    spec["model"]["source"] = str(model_dir)
    spec["train"].update(max_steps=4, checkpoint_every=2)
    spec["output"] = {"uri": str(output)}
    train_in_process(spec)
    (output / "adapter" / "MANIFEST.json").unlink()
    return spec


def test_resuming_on_other_weights_under_the_same_model_source_is_refused(
    tiny_model_dir, spec_path, isolated, caplog
):
    from job.errors import UserError
    from job.model.source import model_identity

    model, output = shutil.copytree(tiny_model_dir, isolated / "model"), isolated / "out"
    spec = interrupted_in_process(spec_path, model, output)
    trained_on = model_identity(model).digest
    assert json.loads((output / "adapter" / "spec.json").read_text())["model"]["identity"] == trained_on
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())

    original = (model / "model.safetensors").read_bytes()
    weights = load_file(model / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, model / "model.safetensors", {"format": "pt"})
    with pytest.raises(UserError) as refused:
        train_in_process(spec)
    message = str(refused.value)
    assert (
        f"model files changed under model.source: model.safetensors (model.identity {trained_on!r} -> "
        in message
    )
    assert model_identity(model).digest in message and "--restart" in message
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == checkpoints  # nothing lost

    (model / "model.safetensors").write_bytes(original)
    with caplog.at_level("INFO", logger="job"):
        train_in_process(spec)
    assert "resuming from the checkpoint at step 4" in caplog.text
    assert (output / "adapter" / "MANIFEST.json").is_file()


def test_the_local_copy_of_a_checkpoint_is_removed_when_setup_fails_after_loading_it(
    tiny_model_dir, spec_path, isolated, monkeypatch
):
    from job.output.checkpoint import Checkpointer

    spec = interrupted_in_process(spec_path, tiny_model_dir, isolated / "out")
    temporary = isolated / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))

    def fails(checkpointer, saved):
        assert saved["dir"].parent == temporary  # the copy is there...
        raise RuntimeError("injected right after load_latest")

    monkeypatch.setattr(Checkpointer, "rank_state", fails)
    with pytest.raises(RuntimeError, match="injected"):
        train_in_process(spec)
    assert list(temporary.glob("ftjob-resume-*")) == []  # ...and gone


CHECKPOINT = "s3://b/run/checkpoints/step-000004-g1"  # where the rank files below say they are from


def rank_file(**rng) -> dict:
    """A rank file as a checkpoint holds it (JSON), its RNG states updated with rng."""
    from job.rng import rng_states

    return json.loads(json.dumps({"rng": {**rng_states(), **rng}, "data": {"a cursor": "checked elsewhere"}}))


def read_rank_file(tmp_path, state) -> dict:
    from job.output.checkpoint import Checkpointer

    (tmp_path / "rank-00000.json").write_text(json.dumps(state))
    checkpointer = Checkpointer(str(tmp_path / "out"), rank=0, world_size=1, keep=2, lease=None)
    return checkpointer.rank_state({"dir": tmp_path, "uri": CHECKPOINT, "step": 4})


def torch_state(**bytes_at) -> list[int]:
    import torch

    state = torch.get_rng_state().tolist()
    for index, value in bytes_at.items():
        state[int(index.removeprefix("at"))] = value
    return state


@pytest.mark.parametrize(
    "state,key",
    [
        ([], "(top level)"),
        ({"data": {}}, "rng: Field required"),
        ({k: v for k, v in rank_file().items() if k != "data"}, "data: Field required"),
        ({**rank_file(), "notes": 1}, "notes: Extra inputs are not permitted"),
        (rank_file(python=[3, [0, 1, 2], None]), "rng.python"),
        (rank_file(numpy=["PCG64", [0] * 624, 0, 0, 0.0]), "rng.numpy[0]"),
        (rank_file(numpy=["MT19937", [0] * 623, 0, 0, 0.0]), "rng.numpy[1]"),
        (rank_file(numpy=["MT19937", [-1] + [0] * 623, 0, 0, 0.0]), "rng.numpy[1][0]"),
        (rank_file(numpy=["MT19937", [0] * 624, 5000, 0, 0.0]), "rng.numpy[2]"),  # NumPy would read past
        (rank_file(torch=torch_state()[:100]), "rng.torch: Value error, not the state of torch's cpu generator"),
        (rank_file(torch=[0] * len(torch_state())), "Invalid mt19937 state"),
        (rank_file(torch=torch_state(at7=300)), "rng.torch[7]"),
        (rank_file(torch="bytes"), "rng.torch"),
        (rank_file(cuda=[1.5]), "rng.cuda[0]"),
    ],
    ids=[
        "not-an-object", "no-rng", "no-data", "extra-key", "python-short", "numpy-kind", "numpy-short",
        "numpy-negative", "numpy-position", "torch-size", "torch-invalid", "torch-byte", "torch-type", "cuda-type",
    ],
)  # fmt: skip
def test_a_rank_file_not_as_ftjob_writes_it_is_refused_naming_the_file_and_key(tmp_path, state, key):
    from job.errors import UserError

    with pytest.raises(UserError) as refused:
        read_rank_file(tmp_path, state)
    message = str(refused.value)
    assert message.startswith(f"{CHECKPOINT}/rank-00000.json: ") and key in message and "--restart" in message


FOLDER = "step-000004-g1"


def run_record(**changes) -> dict:
    """run.json as ftjob writes it for the checkpoint in FOLDER, with changes."""
    from job.output.checkpoint import CHECKPOINT_FORMAT, FINGERPRINT_VERSION

    record = {
        "step": 4, "run_id": None, "fingerprint": {"train.seed": 3, "fingerprint_version": FINGERPRINT_VERSION},
        "total_steps": 8, "last_metrics": {"step": 4, "train/loss": 1.5}, "checkpoint_format": CHECKPOINT_FORMAT,
        "lease_generation": 1,
    }  # fmt: skip
    return {**record, **changes}


def committed_checkpoint(output: Path, run, curve: str = '{"step": 4, "train/loss": 1.5}\n') -> None:
    """A committed checkpoint in FOLDER, its metric curve's segment and a later one (left by a checkpoint
    that never committed, which a resume deletes)."""
    from job.output.publish import write_manifest
    from job.rng import rng_states

    folder = output / "checkpoints" / FOLDER
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "rank-00000.json").write_text(json.dumps({"rng": rng_states(), "data": {}}))
    write_manifest(folder)
    (folder / "COMMITTED").write_text("step 4\n")
    (output / "metrics").mkdir()
    (output / "metrics" / "000004.jsonl").write_text(curve)
    (output / "metrics" / "000006.jsonl").write_text('{"step": 5}\n')


def load_latest(output: Path) -> dict | None:
    from job.output.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(output), rank=0, world_size=1, keep=2, lease=None)
    return checkpointer.load_latest(run_record()["fingerprint"])


def test_a_checkpoint_as_ftjob_writes_it_is_loaded_and_its_rng_states_applied(tmp_path):
    import torch

    from job.output.checkpoint import Checkpointer
    from job.rng import set_rng_states

    committed_checkpoint(tmp_path, run_record())
    saved = load_latest(tmp_path)
    assert saved["step"] == 4 and saved["history"] == [{"step": 4, "train/loss": 1.5}]
    assert saved["uri"] == str(tmp_path / "checkpoints" / FOLDER)  # what the rank file's messages name
    assert not (tmp_path / "metrics" / "000006.jsonl").exists()  # a leftover of an uncommitted checkpoint

    rank_state = Checkpointer(str(tmp_path), 0, 1, keep=2, lease=None).rank_state(saved)
    set_rng_states(rank_state["rng"])
    drawn = torch.rand(3)
    set_rng_states(rank_state["rng"])
    assert torch.equal(torch.rand(3), drawn)


@pytest.mark.parametrize(
    "run,problem",
    [
        ([], "(top level)"),
        (run_record(fingerprint="f"), "fingerprint: Input should be a valid dictionary"),
        (run_record(step="4"), "step: Input should be a valid integer (got '4')"),
        (run_record(step=0), "step: Input should be greater than or equal to 1"),
        (run_record(step=7), f"step is 7, where the checkpoint's folder {FOLDER} says 4"),
        (run_record(total_steps=None), "total_steps"),
        (run_record(last_metrics=[4]), "last_metrics"),
        (run_record(last_metrics={"step": 4, "train/loss": "low"}), "last_metrics.train/loss"),
        (run_record(last_metrics={"step": 3}), f"last_metrics.step is 3, where the checkpoint's folder {FOLDER} says 4"),
        (run_record(lease_generation=-1), "lease_generation: Input should be greater than or equal to 0"),
        (run_record(lease_generation=2), f"lease_generation is 2, where the checkpoint's folder {FOLDER} says 1"),
        (run_record(checkpoint_format=3), "checkpoint_format is 3, not 2"),
        ({k: v for k, v in run_record().items() if k != "run_id"}, "run_id: Field required"),
        (run_record(notes="hi"), "notes: Extra inputs are not permitted"),
    ],
    ids=[
        "not-an-object", "fingerprint", "step-type", "step-zero", "step-not-the-folder-s", "total-steps",
        "last-metrics-type", "metric-type", "last-metrics-step", "generation-negative",
        "generation-not-the-folder-s", "format", "no-run-id", "extra-key",
    ],
)  # fmt: skip
def test_a_run_json_not_as_ftjob_writes_it_is_refused_before_anything_is_deleted(tmp_path, run, problem):
    from job.errors import UserError

    committed_checkpoint(tmp_path, run)
    with pytest.raises(UserError) as refused:
        load_latest(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path}/checkpoints/{FOLDER}/run.json: ") and problem in message
    assert "--restart" in message
    assert (tmp_path / "metrics" / "000006.jsonl").exists()  # nothing deleted


@pytest.mark.parametrize(
    "curve,problem",
    [
        ('{"step": 4\n', "a line is not a step's metrics (JSONDecodeError"),
        ("[4]\n", "a line is not a step's metrics (TypeError"),
        ('{"train/loss": 1.5}\n', "a line is not a step's metrics (KeyError"),
        ('{"step": 3, "train/loss": "low"}\n{"step": 4}\n', "[0].train/loss: Input should be a valid number"),
        ('{"step": 4.0}\n', "[0].step: Input should be a valid integer"),
    ],
    ids=["not-json", "not-an-object", "no-step", "metric-type", "step-type"],
)
def test_a_metric_curve_not_as_ftjob_writes_it_is_refused_before_anything_is_deleted(
    tmp_path, curve, problem
):
    from job.errors import UserError

    committed_checkpoint(tmp_path, run_record(), curve)
    with pytest.raises(UserError) as refused:
        load_latest(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path}/metrics (the metric curve up to step 4): ") and problem in message
    assert (tmp_path / "metrics" / "000006.jsonl").exists()


def test_a_rank_file_not_as_ftjob_writes_it_stops_the_run_before_it_trains(
    tiny_model_dir, spec_path, isolated
):
    from job.errors import UserError
    from job.output.publish import write_manifest

    output = isolated / "out"
    spec = interrupted_in_process(spec_path, tiny_model_dir, output)
    checkpoint = sorted((output / "checkpoints").iterdir())[-1]
    state = json.loads((checkpoint / "rank-00000.json").read_text())
    state["rng"]["numpy"][2] = 10**6  # a position NumPy would read its keys at, far past their end
    (checkpoint / "rank-00000.json").write_text(json.dumps(state))
    write_manifest(checkpoint)  # as whoever edited it would: the checkpoint is whole, not damaged
    files = sorted(p.relative_to(output) for p in output.rglob("*") if p.name != "lease.json")

    with pytest.raises(UserError) as refused:
        train_in_process(spec)
    assert str(refused.value).startswith(
        f"{checkpoint}/rank-00000.json: not as ftjob writes it: rng.numpy[2]"
    )
    assert sorted(p.relative_to(output) for p in output.rglob("*") if p.name != "lease.json") == files


# ---------------------------------------------------------------------------------------------
# A checkpoint's weights and optimizer states: input, checked against what they are loaded into


def tiny_run(scaler=None):
    """A model with a frozen parameter, its AdamW and schedule as train.py makes them, after one step."""
    import types

    import torch

    from job.schedule import make_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    scheduler = make_scheduler(optimizer, "linear", 1, 10)
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m, scaler=scaler)
    take_a_step(model, optimizer, scheduler)
    return model, optimizer, scheduler, accelerator


def take_a_step(model, optimizer, scheduler) -> None:
    import torch

    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def snapshot(model, optimizer, scheduler) -> list:
    import copy

    return copy.deepcopy([model.state_dict(), optimizer.state_dict(), scheduler.state_dict()])


def same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def refused_restore(tmp_path, edit_weights=None, edit_states=None, edit_folder=None, scaler=None) -> str:
    """The message with which restore() refuses the checkpoint of tiny_run's first step, edited so;
    asserts that nothing of it was applied (the run had taken a second step meanwhile)."""
    import torch

    from job.errors import UserError
    from job.output.checkpoint import STATES, WEIGHTS, Checkpointer, write_trained_state

    model, optimizer, scheduler, accelerator = tiny_run(scaler)
    write_trained_state(tmp_path, model, optimizer, scheduler, scaler)
    if edit_weights:
        weights = load_file(tmp_path / WEIGHTS)
        edit_weights(weights)
        save_file(weights, tmp_path / WEIGHTS)
    if edit_states:
        states = torch.load(tmp_path / STATES, weights_only=True)
        edit_states(states)
        torch.save(states, tmp_path / STATES)
    if edit_folder:
        edit_folder(tmp_path)
    take_a_step(model, optimizer, scheduler)
    before = snapshot(model, optimizer, scheduler)

    checkpointer = Checkpointer(str(tmp_path / "out"), rank=0, world_size=1, keep=2, lease=None)
    with pytest.raises(UserError) as refused:
        checkpointer.restore({"dir": tmp_path, "uri": CHECKPOINT}, model, optimizer, scheduler, accelerator)
    assert same(snapshot(model, optimizer, scheduler), before)
    assert refused.value.exit_code == 2 and "--restart" in str(refused.value)
    return str(refused.value)


def weights_edit(name: str, value=None):
    """An edit of trainable.safetensors: the tensor `name` removed, or set to value."""

    def edit(weights: dict) -> None:
        if value is None:
            del weights[name]
        else:
            weights[name] = value

    return edit


def tensor(shape, dtype="float32"):
    import torch

    return torch.zeros(shape, dtype=getattr(torch, dtype))


@pytest.mark.parametrize(
    "edit,problem",
    [
        (weights_edit("0.bias"), "0.bias: missing"),
        (weights_edit("1.bias", tensor([2])), "'1.bias': not in this run"),  # frozen: the model does not train it
        (weights_edit("0.weight", tensor([4, 4])), "0.weight: found float32 tensor of shape [4, 4], where this run has float32 tensor of shape [3, 4]"),
        (weights_edit("0.weight", tensor([3, 4], "float16")), "0.weight: found float16 tensor of shape [3, 4], where this run has float32"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)  # fmt: skip
def test_trainable_weights_not_as_the_model_has_them_are_refused_before_anything_is_applied(
    tmp_path, edit, problem
):
    message = refused_restore(tmp_path, edit_weights=edit)
    assert message.startswith(f"{CHECKPOINT}/trainable.safetensors: not as this run writes it: {problem}")


def param_groups(states: dict) -> list:
    return states["optimizer"]["param_groups"]


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda s: s["optimizer"]["state"][0].update(exp_avg=tensor([2])), "optimizer.state.0.exp_avg: found float32 tensor of shape [2], where this run has float32 tensor of shape [3, 4]"),
        (lambda s: s["optimizer"]["state"][1].pop("exp_avg_sq"), "optimizer.state.1.exp_avg_sq: missing"),
        (lambda s: s["optimizer"]["state"][0].update(step=tensor([1], "int64")), "optimizer.state.0.step: found int64 tensor of shape [1]"),
        (lambda s: s["optimizer"]["state"].update({7: {}}), "optimizer.state.7: not in this run"),
        (lambda s: param_groups(s).append(param_groups(s)[0]), "optimizer.param_groups: 2 items, where this run has 1"),
        (lambda s: param_groups(s)[0].update(params=[2, 1, 0]), "optimizer.param_groups[0].params: [2, 1, 0], where this run has [0, 1, 2]"),
        (lambda s: param_groups(s)[0].update(weight_decay=5.0), "optimizer.param_groups[0].weight_decay: 5.0, where this run has 0.01"),
        (lambda s: param_groups(s)[0].update(betas=[0.9, 0.999]), "optimizer.param_groups[0].betas: found list, where this run has tuple"),
        (lambda s: s["scheduler"].update(last_epoch="1"), "scheduler.last_epoch: found str, where this run has int"),
        (lambda s: s["scheduler"].pop("base_lrs"), "scheduler.base_lrs: missing"),
        (lambda s: s.pop("scheduler"), "scheduler: missing"),
        (lambda s: s.update(optimizer=[s["optimizer"]]), "optimizer: found list, where this run has dict"),
    ],
    ids=["moment-shape", "moment-missing", "step-kind", "not-a-parameter", "group-count", "group-params",
         "group-setting", "group-setting-type", "schedule-type", "schedule-key", "no-schedule", "not-a-dict"],
)  # fmt: skip
def test_optimizer_states_not_as_this_run_has_them_are_refused_before_anything_is_applied(
    tmp_path, edit, problem
):
    message = refused_restore(tmp_path, edit_states=edit)
    assert message.startswith(f"{CHECKPOINT}/optimizer.pt: not as this run writes it: {problem}")


def test_a_grad_scaler_state_not_as_this_run_has_it_is_refused(tmp_path):
    import torch

    def edit(states: dict) -> None:
        states["scaler"]["_growth_tracker"] = 0.5

    message = refused_restore(tmp_path, edit_states=edit, scaler=torch.amp.GradScaler("cpu"))
    assert message.startswith(
        f"{CHECKPOINT}/optimizer.pt: not as this run writes it: scaler._growth_tracker: found float, where this run has int"
    )


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("trainable.safetensors", b"not a safetensors file", "not a safetensors file (SafetensorError)"),
        ("optimizer.pt", b"not a pickle", "not a file torch.load reads with weights_only (UnpicklingError)"),
        ("optimizer.pt", None, "missing"),  # the checkpoint's MANIFEST.json does not list it
    ],
    ids=["weights", "states", "no-states"],
)
def test_a_weights_or_states_file_that_cannot_be_read_is_refused(tmp_path, name, content, problem):
    def replace(folder: Path) -> None:
        (folder / name).unlink()
        if content is not None:
            (folder / name).write_bytes(content)

    assert refused_restore(tmp_path, edit_folder=replace).startswith(f"{CHECKPOINT}/{name}: {problem}")


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt"])
def test_a_checkpoint_s_weights_or_states_not_as_the_run_has_them_stop_it_before_it_trains(
    tiny_model_dir, spec_path, isolated, name
):
    """An edited file in a checkpoint whose MANIFEST.json says it is whole: exit 2 naming the file and the
    tensor, nothing trained, nothing deleted."""
    import torch

    from job.errors import UserError
    from job.output.publish import write_manifest

    output = isolated / "out"
    spec = interrupted_in_process(spec_path, tiny_model_dir, output)
    checkpoint = sorted((output / "checkpoints").iterdir())[-1]
    if name == "trainable.safetensors":
        weights = load_file(checkpoint / name)
        key = next(iter(weights))
        weights[key] = weights[key][:1]
        save_file(weights, checkpoint / name)
    else:
        states = torch.load(checkpoint / name, weights_only=True)
        key = "optimizer.state.0.exp_avg"
        states["optimizer"]["state"][0]["exp_avg"] = states["optimizer"]["state"][0]["exp_avg"][:1]
        torch.save(states, checkpoint / name)
    write_manifest(checkpoint)  # as whoever edited it would: the checkpoint is whole, not damaged
    files = sorted(p.relative_to(output) for p in output.rglob("*") if p.name != "lease.json")

    with pytest.raises(UserError) as refused:
        train_in_process(spec)
    assert refused.value.exit_code == 2
    assert str(refused.value).startswith(f"{checkpoint}/{name}: not as this run writes it: {key}: found ")
    assert sorted(p.relative_to(output) for p in output.rglob("*") if p.name != "lease.json") == files


def test_publishing_on_rank_0_sits_behind_no_collective(slow_s3_spec, workdir, s3, fault_proxy):
    """A publish that takes longer than the process group's timeout does not fail the other rank: they
    are done by then (a big full fine-tune's upload takes minutes; NCCL's default timeout is 10)."""
    output = f"s3://{s3.bucket}/slow-publish"
    settings = ["--set", "train.max_steps=4", "--set", "train.checkpoint_every=0", "--set",
                "train.collective_timeout_seconds=6", "--set", "train.lease_seconds=5"]  # fmt: skip
    rank0, rank1 = ranks(slow_s3_spec, output, workdir, *settings)
    read_until(rank0, "step 2/4")
    fault_proxy.slow_seconds = 1.5  # the adapter's ~10 requests now take ~15 s
    fault_proxy.outage("slow")
    out = rank0.stdout.read()
    assert rank0.wait(timeout=300) == 0, out
    assert rank1.wait(timeout=60) == 0, (workdir / "rank-1.log").read_text()
    fault_proxy.heal()
    s3.invalidate_cache()
    assert s3.exists(f"{s3.bucket}/slow-publish/adapter/MANIFEST.json")


def torchrun(spec_path, output: str, *extra: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m", "job", "run"]
    return subprocess.Popen(
        [*command, str(spec_path), "--set", f"output.uri={output}", *extra],
        cwd=spec_path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )


def ranks(
    spec_path, output: str, log_dir: Path, *extra: str, env: dict | None = None
) -> list[subprocess.Popen]:
    """Two ranks started the way srun or a Kubernetes Indexed Job starts tasks: one process each, with
    torch's environment variables, no launcher in between; each exit code is what the scheduler sees.
    Rank 0's output is piped, rank 1's goes to log_dir/rank-1.log."""
    base = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}  # fmt: skip
    command = [sys.executable, "-m", "job", "run", str(spec_path), "--set", f"output.uri={output}", *extra]
    processes = []
    for rank in (0, 1):
        out = subprocess.PIPE if rank == 0 else open(log_dir / f"rank-{rank}.log", "w")  # noqa: SIM115
        processes.append(
            subprocess.Popen(
                command,
                cwd=spec_path.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
        )
    return processes


@pytest.fixture(scope="module")
def ddp_uninterrupted(spec_path, workdir):
    straight = torchrun(spec_path, "./ddp-straight")
    out = straight.stdout.read()
    assert straight.wait(timeout=300) == 0, out
    return "ddp-straight"


@pytest.fixture
def slow_s3_spec(spec_path, workdir, s3, fault_proxy) -> Path:
    """The resume spec with checkpoints and output on S3 behind the fault proxy (healthy until a test
    slows it down)."""
    spec = json.loads(spec_path.read_text())
    spec["storage_options"] = {"s3": {"endpoint_url": fault_proxy.url}}
    path = workdir / f"spec-{s3.bucket}.json"
    path.write_text(json.dumps(spec))
    return path


def slow_uploads(proxy) -> None:
    """Every request to the store from now on is answered a second late: a checkpoint takes ~10 s."""
    proxy.slow_seconds = 1.0
    proxy.outage("slow")


def fetch_adapter(s3, uri: str, local: Path) -> None:
    s3.invalidate_cache()
    s3.get(f"{uri.removeprefix('s3://')}/adapter/", str(local / "adapter") + "/", recursive=True)


def committed_steps_on(s3, uri: str) -> list[str]:
    s3.invalidate_cache()
    root = f"{uri.removeprefix('s3://')}/checkpoints"
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(root) if s3.exists(f"{p}/COMMITTED"))


def test_sigterm_to_every_worker_of_torchrun_with_slow_uploads_commits_and_resumes_exactly(
    slow_s3_spec, workdir, s3, fault_proxy, ddp_uninterrupted
):
    """The scancel case: every process gets SIGTERM while rank 0's upload takes seconds. Before the
    fix, rank 1 exited 75 at once, torchrun then SIGTERMed rank 0 mid-upload and no COMMITTED was
    written. (torchrun itself still reports 1 for workers' 75.)"""
    import psutil

    output = f"s3://{s3.bucket}/ddp-all"
    stopped = torchrun(slow_s3_spec, output)
    read_until(stopped, f"step 8/{STEPS}")
    workers = psutil.Process(stopped.pid).children()
    assert len(workers) == 2
    slow_uploads(fault_proxy)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    out = stopped.stdout.read()
    stopped.wait(timeout=300)
    assert out.count("checkpoint committed") == 2 and out.count("exit 75 to be requeued") == 2, out
    steps = committed_steps_on(s3, output)
    assert steps and steps[-1] >= "step-000008", steps

    fault_proxy.heal()
    resumed = torchrun(slow_s3_spec, output)
    out = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, out
    assert "resuming from the checkpoint at step" in out
    fetch_adapter(s3, output, workdir / "ddp-all")
    assert_same_run(workdir, ddp_uninterrupted, "ddp-all")


def test_sigterm_to_one_rank_with_slow_uploads_exits_75_on_every_rank_after_the_commit(
    slow_s3_spec, workdir, s3, fault_proxy, ddp_uninterrupted
):
    """The signal reaches one rank only (a node's agent, a Kubernetes eviction of one pod): both ranks
    stop after the same step, and no rank exits before the stop checkpoint is committed."""
    output = f"s3://{s3.bucket}/ddp-one"
    rank0, rank1 = ranks(slow_s3_spec, output, workdir)
    read_until(rank0, f"step 8/{STEPS}")
    slow_uploads(fault_proxy)
    rank1.send_signal(signal.SIGTERM)
    assert rank1.wait(timeout=300) == 75
    committed_when_rank1_exited = committed_steps_on(s3, output)
    out = rank0.stdout.read()
    assert rank0.wait(timeout=300) == 75, out
    fault_proxy.heal()
    assert committed_when_rank1_exited and committed_when_rank1_exited[-1] >= "step-000008"
    assert committed_steps_on(s3, output)[-1] == committed_when_rank1_exited[-1]
    assert "checkpoint committed" in (workdir / "rank-1.log").read_text()

    rank0, rank1 = ranks(slow_s3_spec, output, workdir)
    out = rank0.stdout.read()
    assert rank0.wait(timeout=300) == 0 and rank1.wait(timeout=60) == 0, out
    assert "resuming from the checkpoint at step" in out
    fetch_adapter(s3, output, workdir / "ddp-one")
    assert_same_run(workdir, ddp_uninterrupted, "ddp-one")


def s3_spec(tiny_model_dir, workdir, proxy, bucket: str, **retries) -> dict:
    """The resume spec with checkpoints and output on S3 through the fault proxy."""
    spec = json.loads((workdir / "spec.json").read_text())
    options = {"endpoint_url": proxy.url, **({"config_kwargs": {"retries": retries}} if retries else {})}
    spec["output"] = {"uri": f"s3://{bucket}/runs/{{name}}"}
    spec["storage_options"] = {"s3": options}
    spec["train"].update(max_steps=8, checkpoint_every=2)
    return spec


def test_transient_storage_faults_leave_the_run_unchanged(
    tiny_model_dir, spec_path, workdir, s3, fault_proxy
):
    clean = train_in_process(s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket) | {"name": "clean"})
    fault_proxy.fail_fraction = 0.3  # 503 SlowDown / ServiceUnavailable on 30% of requests
    faulty = train_in_process(s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket) | {"name": "faulty"})
    assert fault_proxy.faults_injected > 0
    assert [h["train/loss"] for h in faulty.history] == [h["train/loss"] for h in clean.history]
    weights = "adapter/adapter_model.safetensors"
    assert s3.cat(f"{s3.bucket}/runs/faulty/{weights}") == s3.cat(f"{s3.bucket}/runs/clean/{weights}")
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"{s3.bucket}/runs/faulty/checkpoints")) == [
        "step-000006-g1",
        "step-000008-g1",
    ]


def test_an_upload_that_keeps_failing_ends_the_job_and_keeps_the_last_commit(
    tiny_model_dir, spec_path, workdir, s3, fault_proxy, caplog
):
    import threading
    import time

    from job.errors import JobError

    spec = s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket, total_max_attempts=2)
    first_commit = f"{s3.bucket}/runs/r/checkpoints/step-000002-g1/COMMITTED"

    def cut_the_line_after_the_first_commit():
        deadline = time.monotonic() + 120
        while not s3.exists(first_commit) and time.monotonic() < deadline:
            time.sleep(0.02)
        fault_proxy.outage("503")

    threading.Thread(target=cut_the_line_after_the_first_commit, daemon=True).start()
    with pytest.raises(JobError) as failure:
        train_in_process(spec)
    assert failure.value.exit_code == 1
    # the next checkpoint's upload, or the read of output.uri's lease before it, meets the outage
    assert any(
        what in str(failure.value)
        for what in ("cannot upload", "checkpoint upload", "lease.json: storage failed")
    )

    fault_proxy.heal()
    s3.invalidate_cache()
    committed = [p for p in s3.ls(f"{s3.bucket}/runs/r/checkpoints") if s3.exists(f"{p}/COMMITTED")]
    assert committed  # the committed checkpoint survived the outage...
    with caplog.at_level("INFO", logger="job"):
        resumed = train_in_process(spec)  # ...and a new attempt resumes from it and finishes
    assert len(resumed.history) == 8
    assert any("resuming from the checkpoint at step" in r.getMessage() for r in caplog.records)
