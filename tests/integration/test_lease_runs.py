"""Fencing between jobs on one output.uri (issue 12, point 7): <output.uri>/lease.json names the one job
that may write there; a second job is refused, an expired lease is taken over with the next generation,
a job that lost its lease stops and deletes nothing, each generation writes checkpoint folders of its
own, a damaged lease is a clear error on every rank, and retention failures are only warnings."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from helpers import (
    ALPACA_ROWS,
    COLLECTIVE_TIMEOUT,
    LEASE_SECONDS,
    files_under,
    free_port,
    lease_record,
    make_spec,
    messages,
    read_lease,
    train_in_process,
    write_jsonl,
    write_lease,
)

from job.errors import JobError, UserError


def small_spec(tiny_model_dir, data_files, **train) -> dict:
    """Four steps, a checkpoint every two, a short lease, no MLflow; output in ./runs/t."""
    settings = {"max_steps": 4, "checkpoint_every": 2, "lease_seconds": LEASE_SECONDS, **train}
    return make_spec(
        "lora", model=tiny_model_dir, files=data_files, train=settings, tracking={"enabled": False}
    )


def test_an_expired_lease_is_taken_over_with_the_next_generation(
    tiny_model_dir, data_files, isolated, caplog
):
    output = isolated / "runs" / "t"
    gone = time.time() - 100  # a lease of 1 s: taken once this job has seen it unrenewed for 1 s
    write_lease(
        output, lease_record(host="node-3", pid=77, generation=4, renewed_at=gone, expires_at=gone + 1)
    )
    with caplog.at_level("INFO", logger="job"):
        train_in_process(small_spec(tiny_model_dir, data_files))
    assert "as generation 5 from host node-3, pid 77 (expired" in messages(caplog)
    newest = output / "checkpoints" / "step-000004-g5"
    assert json.loads((newest / "run.json").read_text())["lease_generation"] == 5
    writer = f"lease generation 5, host {socket.gethostname()}, pid {os.getpid()}"
    assert (newest / "COMMITTED").read_text() == f"step 4, {writer}\n"
    lease = read_lease(output)
    assert lease["generation"] == 5 and lease["pid"] == os.getpid() and lease["released"]


def test_a_job_that_fails_releases_its_lease(tiny_model_dir, data_files, isolated):
    output = isolated / "runs" / "t"
    train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    (output / "adapter" / "MANIFEST.json").unlink()  # not published: the next run resumes
    with pytest.raises(UserError, match="train.seed: 42 -> 7"):
        train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2, seed=7))
    lease = read_lease(output)
    assert lease["generation"] == 2 and lease["released"] and lease["expires_at"] <= time.time()


@pytest.mark.parametrize("before", ["commit", "publish"])
def test_a_job_that_loses_its_lease_commits_and_publishes_nothing_more(
    tiny_model_dir, data_files, isolated, monkeypatch, before
):
    """The lease is taken over at the last moment: after a checkpoint's files are uploaded and before
    its COMMITTED marker, or after training and before publishing."""
    from job.output import checkpoint
    from job.output.lease import LeaseLost

    output = isolated / "runs" / "t"
    rival = lease_record(generation=2)
    upload_dir, wait = checkpoint.upload_dir, checkpoint.Checkpointer.wait

    def upload_then_taken_over(local_dir, uri, last=""):
        upload_dir(local_dir, uri, last)
        if last == "COMMITTED":  # the checkpoint's files are up; its marker would come next
            write_lease(output, rival)

    def taken_over_then_wait(self):
        write_lease(output, rival)
        wait(self)

    if before == "commit":
        monkeypatch.setattr(checkpoint, "upload_dir", upload_then_taken_over)
        spec = small_spec(tiny_model_dir, data_files)
    else:
        monkeypatch.setattr(checkpoint.Checkpointer, "wait", taken_over_then_wait)
        spec = small_spec(tiny_model_dir, data_files, checkpoint_every=0)
    with pytest.raises(LeaseLost, match="to another job \\(host node-7, pid 4242, generation 2\\)") as lost:
        train_in_process(spec)
    assert lost.value.exit_code == 1
    if before == "commit":
        assert files_under(output / "checkpoints") == [
            "step-000002-g1/MANIFEST.json", "step-000002-g1/optimizer.pt", "step-000002-g1/rank-00000.json",
            "step-000002-g1/run.json", "step-000002-g1/trainable.safetensors",
        ]  # fmt: skip
    assert not (output / "adapter").exists() and read_lease(output) == rival


def test_a_rerun_of_the_same_scheduler_job_waits_for_the_lease_its_predecessor_left(
    tiny_model_dir, data_files, isolated, caplog, monkeypatch
):
    """A predecessor killed before it could release the lease (OOM, SIGKILL, a lost node): its
    successor in the same scheduler job waits for the lease to expire rather than fail."""
    monkeypatch.setenv("FTJOB_RESTART_ID", "k8s-job-uid")
    expires = time.time() + 4
    write_lease(
        isolated / "runs" / "t", lease_record(job="k8s-job-uid", host="pod-0", pid=1, expires_at=expires)
    )
    with caplog.at_level("INFO", logger="job"):
        train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    assert time.time() >= expires
    assert "host pod-0, pid 1, scheduler job k8s-job-uid (this same scheduler job)" in messages(caplog)
    assert "waiting until it expires" in messages(caplog)
    assert "as generation 2 from host pod-0, pid 1, scheduler job k8s-job-uid (expired" in messages(caplog)


def test_a_lease_renewed_while_its_successor_waits_belongs_to_a_live_job(
    tiny_model_dir, data_files, isolated, monkeypatch
):
    """The same scheduler job's lease, but renewed: its holder runs on (a zombie). Exit 2, naming it."""
    monkeypatch.setenv("FTJOB_RESTART_ID", "slurm-5")
    output = isolated / "runs" / "t"
    zombie = lease_record(job="slurm-5", host="node-2", pid=31, expires_at=time.time() + 4)
    write_lease(output, zombie)

    def renew():
        time.sleep(1.5)
        write_lease(output, {**zombie, "renewed_at": time.time(), "expires_at": time.time() + 4})

    threading.Thread(target=renew, daemon=True).start()
    with pytest.raises(UserError) as refused:
        train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    assert refused.value.exit_code == 2
    assert "held by another job: host node-2, pid 31, scheduler job slurm-5" in str(refused.value)
    assert not (output / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Expiry as seen on this host's clock: the holder's host's clock may be minutes off


def test_a_job_that_fails_between_claiming_the_lease_and_confirming_it_releases_it(
    tiny_model_dir, data_files, isolated, tmp_path
):
    """The model loads between the claim and its confirmation: a model that fails to load leaves the
    lease released, so that the next job takes it at once."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    spec = small_spec(tiny_model_dir, data_files)
    spec["model"]["source"] = str(broken)
    with pytest.raises(UserError, match="model.source: cannot load"):
        train_in_process(spec)
    lease = read_lease(isolated / "runs" / "t")
    assert lease["generation"] == 1 and lease["released"] and lease["expires_at"] <= time.time()
    assert files_under(isolated / "runs" / "t") == ["lease.json"]


def test_a_retention_delete_that_fails_is_a_warning(
    tiny_model_dir, data_files, isolated, monkeypatch, caplog
):
    """The store refuses to delete the oldest checkpoint (a permission, an object lock): training and
    publishing go on; the checkpoint stays."""
    from fsspec.implementations.local import LocalFileSystem

    rm = LocalFileSystem.rm

    def refuse_step_2(self, path, recursive=False, maxdepth=None):
        if "step-000002" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return rm(self, path, recursive=recursive, maxdepth=maxdepth)

    monkeypatch.setattr(LocalFileSystem, "rm", refuse_step_2)
    spec = small_spec(tiny_model_dir, data_files, max_steps=6)
    spec["output"] = {"keep_checkpoints": 1}
    with caplog.at_level("INFO", logger="job"):
        result = train_in_process(spec)
    assert result.adapter_uri and (isolated / "runs" / "t" / "adapter" / "MANIFEST.json").is_file()
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "step 2" in r.getMessage()]
    assert len(warned) == 2 and "Permission denied" in warned[0].getMessage()  # after steps 4 and 6
    checkpoints = isolated / "runs" / "t" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002-g1", "step-000006-g1"]


# ---------------------------------------------------------------------------------------------
# A damaged or unreadable lease, on one rank and on two


def test_a_lease_the_store_cannot_serve_at_start_is_exit_2_or_1_as_for_any_storage_failure(s3, fault_proxy):
    """An endpoint that cannot be reached is the user's to fix (exit 2); an outage may pass (exit 1)."""
    from job.output.lease import Lease
    from job.storage import configure_storage

    once = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    configure_storage({"s3": {"endpoint_url": f"http://127.0.0.1:{free_port()}", **once}})
    with pytest.raises(UserError, match="lease.json: cannot reach the storage endpoint"):
        Lease(f"s3://{s3.bucket}/out", LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()

    configure_storage({"s3": {"endpoint_url": fault_proxy.url, **once}})
    fault_proxy.outage("503")
    with pytest.raises(JobError, match="lease.json: storage failed") as outage:
        Lease(f"s3://{s3.bucket}/out", LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert outage.value.exit_code == 1


# ---------------------------------------------------------------------------------------------
# Released leases, uploads in flight, retention


def test_a_run_that_fails_while_a_checkpoint_uploads_releases_the_lease_only_after_that_upload(
    tiny_model_dir, isolated, s3, fault_proxy
):
    """A bad row (policy fail) ends the run while step 1's checkpoint is still uploading (every request
    to the store is a third of a second late). train() ends, and the lease is released, only once that
    upload has ended: a released lease may already be another job's."""
    train_file = write_jsonl(isolated / "data" / "bad.jsonl", ALPACA_ROWS + ["{not json"] + ALPACA_ROWS * 5)
    evaluation = write_jsonl(isolated / "data" / "eval.jsonl", ALPACA_ROWS)
    spec = small_spec(tiny_model_dir, (train_file, evaluation), max_steps=20, checkpoint_every=1)
    spec["data"].update(bad_rows={"policy": "fail"}, shuffle_buffer=0)  # the bad row comes at step 2
    spec["output"] = {"uri": f"s3://{s3.bucket}/out"}
    spec["storage_options"] = {"s3": {"endpoint_url": fault_proxy.url}}
    fault_proxy.slow_seconds = 0.3
    fault_proxy.outage("slow")
    with pytest.raises(JobError, match="data.bad_rows.policy is 'fail'"):
        train_in_process(spec)
    assert [t for t in threading.enumerate() if t.name == "ftjob-checkpoint"] == []
    fault_proxy.heal()
    s3.invalidate_cache()
    assert [folder.rsplit("/", 1)[1] for folder in s3.ls(f"{s3.bucket}/out/checkpoints")] == [
        "step-000001-g1"
    ]
    assert s3.exists(f"{s3.bucket}/out/checkpoints/step-000001-g1/COMMITTED")
    lease = json.loads(s3.cat(f"{s3.bucket}/out/lease.json"))
    assert lease["released"] and lease["generation"] == 1


def test_a_retention_listing_that_fails_after_the_commit_is_a_warning(isolated, s3, fault_proxy, caplog):
    """The store fails from the moment COMMITTED is written: retention cannot list the checkpoints. The
    checkpoint is committed and the job goes on (it used to end with exit 1, saying the upload failed)."""
    from job.output.checkpoint import Checkpointer
    from job.output.lease import Lease
    from job.storage import configure_storage

    configure_storage(
        {"s3": {"endpoint_url": fault_proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}}
    )
    output = f"s3://{s3.bucket}/out"
    lease = Lease(output, 600, COLLECTIVE_TIMEOUT)
    lease.take()
    checkpointer = Checkpointer(output, 0, 1, keep=1, lease=lease)
    staging, segment = isolated / "staging", isolated / "segment"
    write_jsonl(staging / "run.json", [{"step": 2}])
    write_jsonl(segment / "000002.jsonl", [{"step": 2}])
    uri = checkpointer.step_uri(2)
    committed = f"{uri.removeprefix('s3://')}/COMMITTED"

    def fail_once_committed():  # the commit's answer comes half a second late: the outage is on by then
        deadline = time.monotonic() + 60
        while not s3.exists(committed) and time.monotonic() < deadline:
            s3.invalidate_cache()
            time.sleep(0.02)
        fault_proxy.outage("503")

    fault_proxy.slow_seconds = 0.5
    fault_proxy.outage("slow")
    threading.Thread(target=fail_once_committed, daemon=True).start()
    try:
        with caplog.at_level("WARNING", logger="job"):
            checkpointer._upload(staging, segment, uri, 2)
            checkpointer.wait()
    finally:
        fault_proxy.heal()
        lease.release()
    assert s3.exists(committed)
    assert "could not list the checkpoints in" in messages(caplog)


# ---------------------------------------------------------------------------------------------
# The lease's settings and its other writers


def test_merging_an_already_published_adapter_takes_the_lease(tiny_model_dir, data_files, isolated):
    """`ftjob run` of a published spec with output.merge writes merged/: only while no other job holds
    output.uri."""
    output = isolated / "runs" / "t"
    train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    write_lease(output, lease_record())
    spec = small_spec(tiny_model_dir, data_files, max_steps=2)
    spec["output"] = {"merge": True}
    with pytest.raises(UserError, match="held by another job: host node-7, pid 4242"):
        train_in_process(spec)
    assert not (output / "merged").exists() and read_lease(output)["pid"] == 4242
