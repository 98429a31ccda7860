"""A lost peer is its own exit code: two nodes on 127.0.0.1 (`ftjob run --nnodes 2`). Node 1 killed whole
(SIGKILL to its processes, as a node that dies): node 0 exits 76 at its next collective, no traceback,
nothing left running; both rerun and the job resumes. Node 1 frozen (SIGSTOP: no connection is reset, as
a node cut from the network): node 0 exits 76 once train.peer_timeout_seconds pass without its heartbeat."""

from __future__ import annotations

import json
import signal
import time

import psutil
from helpers import ALPACA_ROWS, free_port, make_spec, read_until, start_run, write_jsonl, write_spec

from job.peers import BEAT_SECONDS


def node(spec_path, output, rank: int, port: int):
    placement = ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
    return start_run(spec_path, str(output), "--nproc-per-node", "1", *placement, "--master-port", str(port))


def gang_spec(tiny_model_dir, isolated, **train):
    data = {"train": [str(write_jsonl(isolated / "d.jsonl", ALPACA_ROWS * 16))], "shuffle_buffer": 0}
    train = {"max_steps": 12, "micro_batch_size": 2, "log_every": 1, "checkpoint_every": 2, **train}
    spec = make_spec(name="gang", model=tiny_model_dir, data=data, train=train, tracking={"enabled": False})
    return write_spec(isolated / "spec.json", spec)


def processes(launcher) -> list[psutil.Process]:
    return [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]


def test_a_node_that_dies_ends_the_other_with_76_and_a_rerun_resumes(tiny_model_dir, isolated):
    spec_path, output = gang_spec(tiny_model_dir, isolated), isolated / "out"
    port = free_port()
    first, second = node(spec_path, output, 0, port), node(spec_path, output, 1, port)
    read_until(first, "step 3/12")
    survivors = processes(first)

    for process in processes(second):
        process.send_signal(signal.SIGKILL)  # node 1 is gone, every process of it at once
    second.wait()
    started = time.monotonic()
    code = first.wait(timeout=120)
    noticed = time.monotonic() - started
    log = first.stdout.read()
    assert code == 76, log[-3000:]
    assert "another process of this job is gone" in log and "Traceback" not in log
    assert noticed < 60, noticed
    assert not [p for p in survivors if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    port = free_port()
    first, second = node(spec_path, output, 0, port), node(spec_path, output, 1, port)
    assert first.wait(timeout=300) == 0 and second.wait(timeout=60) == 0
    assert "resuming from the checkpoint at step" in first.stdout.read()
    assert json.loads((output / "adapter" / "metrics.json").read_text())["history"][-1]["step"] == 12


def test_a_frozen_node_ends_the_other_with_76_after_the_peer_timeout(tiny_model_dir, isolated):
    spec_path, output = gang_spec(tiny_model_dir, isolated, peer_timeout_seconds=6), isolated / "out"
    port = free_port()
    first, second = node(spec_path, output, 0, port), node(spec_path, output, 1, port)
    read_until(first, "step 3/12")
    frozen = processes(second)
    for process in frozen:
        process.suspend()  # SIGSTOP: its sockets stay open, nothing is reset
    try:
        started = time.monotonic()
        code = first.wait(timeout=120)
        noticed = time.monotonic() - started
        log = first.stdout.read()
    finally:
        for process in [*frozen, *processes(first)] if first.poll() is None else frozen:
            process.kill()
    assert code == 76, log[-3000:]
    assert "rank 1 has sent no heartbeat for" in log and "Traceback" not in log
    # its last heartbeat may have been seen up to a beat before it froze
    assert 6 - BEAT_SECONDS <= noticed < 30, noticed
