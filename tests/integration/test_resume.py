"""What a resume reads back from a checkpoint, in this process: other model weights, a rank file, weights
and optimizer states not as the run has them; checkpoints on a store with faults."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import put_other_weights, train_in_process
from safetensors.torch import load_file, save_file

from job.errors import UserError


def four_steps(spec_path, model_dir, output) -> dict:
    """The resume spec on model_dir, four steps with a checkpoint every two, into output."""
    spec = json.loads(spec_path.read_text())
    spec["model"]["source"] = str(model_dir)
    spec["train"].update(max_steps=4, checkpoint_every=2)
    spec["output"] = {"uri": str(output)}
    return spec


def interrupted_in_process(spec_path, model_dir, output) -> dict:
    """four_steps trained in this process to its last checkpoint but not published, as a run stopped
    before publishing leaves it."""
    spec = four_steps(spec_path, model_dir, output)
    train_in_process(spec)
    (output / "adapter" / "MANIFEST.json").unlink()
    return spec


@pytest.fixture(scope="module")
def interrupted(spec_path, tiny_model_dir, workdir) -> Path:
    """interrupted_in_process on the tiny model, once for the module: its output, which tests copy."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        interrupted_in_process(spec_path, tiny_model_dir, workdir / "interrupted")
    return workdir / "interrupted"


def copy_of(interrupted: Path, spec_path, tiny_model_dir, output: Path) -> dict:
    """The interrupted run's output copied to output; its spec there."""
    shutil.copytree(interrupted, output)
    return four_steps(spec_path, tiny_model_dir, output)


def test_resuming_on_other_weights_under_the_same_model_source_is_refused(
    tiny_model_dir, spec_path, isolated, caplog
):
    from job.model.source import model_identity

    model, output = shutil.copytree(tiny_model_dir, isolated / "model"), isolated / "out"
    spec = interrupted_in_process(spec_path, model, output)
    trained_on = model_identity(model).digest
    assert json.loads((output / "adapter" / "spec.json").read_text())["model"]["identity"] == trained_on
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())

    original = (model / "model.safetensors").read_bytes()
    put_other_weights(model)
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
    interrupted, tiny_model_dir, spec_path, isolated, monkeypatch
):
    from job.output.checkpoint import Checkpointer

    spec = copy_of(interrupted, spec_path, tiny_model_dir, isolated / "out")
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


def test_a_rank_file_not_as_ftjob_writes_it_stops_the_run_before_it_trains(
    interrupted, tiny_model_dir, spec_path, isolated
):
    from job.output.manifest import write_manifest

    output = isolated / "out"
    spec = copy_of(interrupted, spec_path, tiny_model_dir, output)
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


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt"])
def test_a_checkpoint_s_weights_or_states_not_as_the_run_has_them_stop_it_before_it_trains(
    interrupted, tiny_model_dir, spec_path, isolated, name
):
    """An edited file in a checkpoint whose MANIFEST.json says it is whole: exit 2 naming the file and the
    tensor, nothing trained, nothing deleted."""
    import torch

    from job.output.manifest import write_manifest

    output = isolated / "out"
    spec = copy_of(interrupted, spec_path, tiny_model_dir, output)
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
    spec = s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket)
    spec["train"]["checkpoint_every"] = 4
    clean = train_in_process(spec | {"name": "clean"})
    fault_proxy.fail_fraction = 0.3  # 503 SlowDown / ServiceUnavailable on 30% of requests
    faulty = train_in_process(spec | {"name": "faulty"})
    assert fault_proxy.faults_injected > 0
    assert [h["train/loss"] for h in faulty.history] == [h["train/loss"] for h in clean.history]
    weights = "adapter/adapter_model.safetensors"
    assert s3.cat(f"{s3.bucket}/runs/faulty/{weights}") == s3.cat(f"{s3.bucket}/runs/clean/{weights}")
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"{s3.bucket}/runs/faulty/checkpoints")) == [
        "step-000004-g1",
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
