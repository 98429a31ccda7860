"""StopRequest: the first signal asks; the grace period or a second Ctrl-C ends the process at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import REPO

SCRIPT = """
import logging, os, signal, sys, time
from job.signals import StopRequest
logging.basicConfig()
with StopRequest(grace_seconds={grace}) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal == signal.SIGTERM
    print("asked", flush=True)
    {then}
    time.sleep(30)
"""


def run(grace: float, then: str) -> tuple[int, float, str]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(grace=grace, then=then)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, time.monotonic() - started, result.stdout + result.stderr


def test_grace_period_bounds_the_time_from_signal_to_exit():
    code, seconds, output = run(grace=1, then="pass")
    assert code == 75 and "asked" in output and "grace period of 1 s over" in output
    assert seconds < 20  # far below the 30 s the process would otherwise sleep


def test_a_second_ctrl_c_exits_at_once():
    code, seconds, output = run(grace=60, then="time.sleep(2.5); os.kill(os.getpid(), signal.SIGINT)")
    assert code == 128 + signal.SIGINT and "SIGINT again: exiting now" in output
    assert seconds < 20


def test_the_same_stop_delivered_twice_is_one_stop_however_late_its_handler_runs():
    """scancel signals every process of the step and torchrun passes its own SIGTERM on: one stop, even
    when the copy's handler runs seconds later (its worker was in a collective operation)."""
    then = (
        "time.sleep(2.5); os.kill(os.getpid(), signal.SIGTERM); print('still here', flush=True); sys.exit(0)"
    )
    code, _, output = run(grace=60, then=then)
    assert (
        code == 0 and "still here" in output and "SIGTERM again: the same stop, already under way" in output
    )


def test_handlers_are_restored_after_the_loop():
    from job.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(grace_seconds=5):
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def run_snippet(code: str) -> subprocess.CompletedProcess:
    """Python code with StopRequest in a process of its own (it sets signal handlers and signals itself)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_a_late_repeat_of_a_stop_after_the_loop_still_exits_75():
    """A worker leaving with 75 can get the stop once more (scheduler and launcher both deliver it):
    that must not kill it with the signal's default action (-10 for SIGUSR1)."""
    code = (
        "import os, signal, time\n"
        "from job.signals import StopRequest\n"
        "with StopRequest(grace_seconds=60) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    stop.checkpoint_committed = True\n"
        "time.sleep(2.5)  # a repeat that is seconds late\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.5)\n"
        "raise SystemExit(75)  # the worker leaves as it would have\n"
    )
    done = run_snippet(code)
    assert done.returncode == 75 and "SIGUSR1 again: the same stop" in done.stderr, done.stderr


def test_a_stop_signal_after_the_run_is_done_changes_nothing():
    """ftjob run, once its adapter is published, ignores a stop on the way out (exit 0, not 138)."""
    code = (
        "import os, signal, time\n"
        "from job.signals import StopRequest\n"
        "with StopRequest(grace_seconds=60) as stop:\n"
        "    stop.ignore_from_now()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
    )
    done = run_snippet(code)
    assert done.returncode == 0, done.stderr
