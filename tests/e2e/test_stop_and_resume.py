"""Stop signals to ftjob as a process, and kills, and the runs that resume after them (in this process):
the resumed run equals the uninterrupted one. Stops at a step in this process, with what a resume then
meets (damaged checkpoints, changed files and specs, --restart): tests/integration/test_stopped_runs.py."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import RESUME_STEPS, assert_same_run, ftjob, read_until, start_run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_75_and_resumes_exactly(spec_path, workdir, uninterrupted, signum):
    """With the data thread (data.prefetch 2, as on GPUs; the uninterrupted run makes its micro-batches
    on the training thread): the checkpoint holds the cursor of what was trained on."""
    output = f"./stopped-{signum.name}"
    data_thread = ("--set", "data.prefetch=2")
    process = start_run(spec_path, output, *data_thread)
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

    resumed = ftjob("run", str(spec_path), "--set", f"output.uri={output}", *data_thread, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step" in resumed.stderr
    assert_same_run(workdir, uninterrupted, output)
    curve = [json.loads(line) for line in (workdir / output / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in curve] == list(range(1, RESUME_STEPS + 1)) and not (
        workdir / output / "metrics"
    ).exists()


def test_sigkill_after_a_checkpoint_resumes_exactly(spec_path, workdir, uninterrupted):
    process = start_run(spec_path, "./killed")
    read_until(process, "checkpoint step 10 committed")
    read_until(process, f"step 12/{RESUME_STEPS}")
    process.kill()
    process.wait(timeout=60)
    assert not (workdir / "killed" / "adapter").exists()
    stale = workdir / "killed" / "metrics" / "000099.jsonl"  # a segment whose checkpoint never committed
    stale.write_text(json.dumps({"step": 11, "train/loss": 99.0}) + "\n")

    resumed = ftjob("run", str(spec_path), "--set", "output.uri=./killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step 10" in resumed.stderr
    assert_same_run(workdir, uninterrupted, "killed")
    assert not stale.exists()


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
    requeued = ftjob("run", str(path), "--set", "output.uri=./early", cwd=workdir, env=env)
    assert requeued.returncode == 0, requeued.stderr
    assert "step 1/2" in requeued.stdout and "resuming" not in requeued.stderr
