"""`ftjob run --nproc-per-node N`: this node's worker processes, started by torch's elastic launcher.

This process, the workers' launcher, is what a scheduler sees. It forwards SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 to every
worker (which then stop together, commit a checkpoint and exit 75) and waits for them, and it exits
with the workers' code: 0 when all finish; otherwise a worker's own failure (1, 2, 3) before a stop
(75). A stop that comes before any worker has started ends the launcher with 75. torchrun, by contrast, reports 1 for
any failure and kills its workers 30 s after its own signal. Workers stop (as on SIGTERM) when this
process is gone, SIGKILLed even (FTJOB_LAUNCHER_PID, job/signals.py: stop_when_orphaned).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from job.cluster import Placement
from job.errors import EXIT_PEER_LOST, EXIT_REQUEUE, DataError, Preempted, UserError
from job.signals import LAUNCHER_PID, STOP_SIGNALS, StopRequest

RENDEZVOUS_TIMEOUT_SECONDS = 900  # how long the first node waits for the others to come up


def nproc_auto() -> int:
    """`--nproc-per-node auto`: the node's GPUs, or 1 on a CPU node."""
    import torch

    return torch.cuda.device_count() or 1


def exit_code(codes: Mapping[int, int]) -> int:
    """The job's exit code from the failed workers' (rank -> code; a negative code is a signal): a
    worker's own failure (2 or 3, bad input, before the 1s it may cause on other ranks; else the
    lowest rank's; else a worker killed by a signal that is not a stop, a crash or the OOM killer, as
    128 + signal), then a peer lost (76: what another's failure does to the rest), then a stop (75:
    workers killed while they exit after it are no failure), then a worker killed by a stop signal
    (128 + signal). A crash ranks above 76: a node whose worker crashed every time must not be
    restarted for nothing, as a lost peer is."""
    own = [code for code in codes.values() if code > 0 and code not in (EXIT_REQUEUE, EXIT_PEER_LOST)]
    for cause in (UserError.exit_code, DataError.exit_code):  # bad input, not what it made others do
        if cause in own:
            return cause
    crashed = [128 - code for code in codes.values() if code < 0 and -code not in STOP_SIGNALS]
    if own or crashed:
        return (own or crashed)[0]
    for consequence in (EXIT_PEER_LOST, EXIT_REQUEUE):
        if consequence in codes.values():
            return consequence
    return 128 - min(codes.values())


@contextmanager
def forwarding_stop_signals(stop: StopRequest) -> Iterator[None]:
    """While the workers run: a stop signal to the launcher reaches every worker. One that comes
    before any worker has started, or that `stop` (installed before) received, ends the launcher with
    75 (nothing trained, nothing to save)."""
    started = threading.Event()
    done = threading.Event()

    def watch() -> None:  # once a worker has been seen, a launcher without workers is past them
        while not done.wait(0.2):
            if psutil.Process().children():
                started.set()
                return

    def forward(signum: int, frame) -> None:
        workers = psutil.Process().children()
        if not workers and not started.is_set():
            raise Preempted(
                f"{signal.Signals(signum).name} before the workers started; exit 75 to be requeued"
            )
        for child in workers:
            with suppress(psutil.NoSuchProcess):  # a worker that has just exited
                child.send_signal(signum)

    threading.Thread(target=watch, name="ftjob-workers-started", daemon=True).start()
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        if stop.requested:  # after the handlers above: no signal falls between the two
            raise Preempted(f"{stop.signal_name} before the workers started; exit 75 to be requeued")
        yield
    finally:
        done.set()
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_workers(
    spec_json: dict,
    worker_args: Sequence[str],
    nproc_per_node: int,
    placement: Placement,
    stop: StopRequest,
) -> int:
    """Start this node's workers, each `python -m job run` with the validated spec (FTJOB_SPEC) and
    worker_args, and return the job's exit code. `stop`: the StopRequest installed until now, whose
    grace period the workers get to stop in."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if placement.nnodes == 1:  # a free port on this host, as torchrun --standalone does
        rendezvous = {"rdzv_backend": "c10d", "rdzv_endpoint": "127.0.0.1:0", "run_id": uuid.uuid4().hex}
    else:
        rendezvous = {
            "rdzv_backend": "static",
            "rdzv_endpoint": f"{placement.master_addr}:{placement.master_port}",
            "rdzv_configs": {"rank": placement.node_rank, "timeout": RENDEZVOUS_TIMEOUT_SECONDS},
            "run_id": "ftjob",
        }
    config = LaunchConfig(
        min_nodes=placement.nnodes,
        max_nodes=placement.nnodes,
        nproc_per_node=nproc_per_node,
        max_restarts=0,  # a failed worker ends the job; the scheduler decides what comes next
        monitor_interval=0.1,
        signals_to_handle="SIGHUP,SIGQUIT",  # the stop signals are forwarded by us, not turned into kills
        shutdown_timeout=int(stop.grace_seconds) + 10,
        **rendezvous,
    )
    with tempfile.TemporaryDirectory(prefix="ftjob-launch-") as tmp, forwarding_stop_signals(stop):
        # Every worker reads the spec as checked here, overrides applied: not the FTJOB__ variables
        # again, and not from the environment (storage_options may hold secrets; a 0600 file instead).
        spec_file = Path(tmp) / "spec.json"
        spec_file.touch(mode=0o600)
        spec_file.write_text(json.dumps(spec_json))
        for name in [n for n in os.environ if n.startswith("FTJOB__")]:
            del os.environ[name]
        os.environ["FTJOB_SPEC"] = str(spec_file)
        os.environ[LAUNCHER_PID] = str(os.getpid())  # workers stop when this process is gone
        try:
            elastic_launch(config, sys.executable)("-m", "job", "run", *worker_args)
        except ChildFailedError as e:
            return exit_code({rank: failure.exitcode for rank, failure in sorted(e.failures.items())})
    return 0
