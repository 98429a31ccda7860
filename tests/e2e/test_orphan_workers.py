"""Workers die with their launcher: `ftjob run --nproc-per-node 2` whose launcher alone is SIGKILLed (the
OOM killer, `timeout -s KILL`, a scheduler killing the main pid) leaves no worker running: they stop as on
SIGTERM, commit a checkpoint, release the lease, and the rerun resumes."""

from __future__ import annotations

import json
import os
import signal

import psutil
from helpers import ALPACA_ROWS, make_spec, read_until, run_ftjob, start_run, write_jsonl, write_spec


def test_workers_whose_launcher_is_killed_checkpoint_release_the_lease_and_exit(tiny_model_dir, isolated):
    data = {"train": [str(write_jsonl(isolated / "d.jsonl", ALPACA_ROWS * 16))], "shuffle_buffer": 0}
    train = {"max_steps": 80, "micro_batch_size": 2, "log_every": 1, "checkpoint_every": 100}
    spec = make_spec(
        name="orphans", model=tiny_model_dir, data=data, train=train, tracking={"enabled": False}
    )
    write_spec(isolated / "spec.json", spec)
    output = isolated / "out"
    launcher = start_run(isolated / "spec.json", str(output), "--nproc-per-node", "2")
    started = "".join(read_until(launcher, "step 3/80"))
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len([w for w in workers if "job" in " ".join(w.cmdline())]) == 2

    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers still running after their launcher was killed: {alive}"
    log = launcher.stdout.read()  # every worker has closed the pipe
    assert "the launcher (pid" in log and "is gone: stopping as on SIGTERM" in log
    assert "checkpoint committed" in log
    cpus = len(os.sched_getaffinity(0))  # two workers share this node's CPUs (job/cluster.py cpu_threads)
    assert f"({max(1, cpus // 2)} threads)" in started  # on the "training ..." line
    lease = json.loads((output / "lease.json").read_text())
    assert lease["released"] is True
    committed = sorted(p.parent.name for p in (output / "checkpoints").glob("*/COMMITTED"))
    assert committed, "no checkpoint was committed by the stop"

    rerun = run_ftjob(
        "run", "spec.json", "--set", f"output.uri={output}", "--nproc-per-node", "2", cwd=isolated
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from the checkpoint at step" in rerun.stdout + rerun.stderr
    metrics = json.loads((output / "adapter" / "metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 80
