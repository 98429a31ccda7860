"""StopRequest: the first signal asks; the grace period or a second Ctrl-C ends the process at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import REPO, make_spec, read_until, write_spec

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
    assert code == 75 and "asked" in output
    assert "grace period of 1 s (train.stop_grace_seconds) over before training began" in output
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


# `ftjob run` whose checkpoint uploads hang before COMMITTED (rank 0's files), but for the checkpoint at
# step {commits} (0: none)
SLOW_COMMITS = """
import sys, time
import job.output.checkpoint
from job.cli import entry

upload = job.output.checkpoint.upload_dir

def slow_commit(local_dir, uri, last=""):
    if last and "/step-{commits:06d}-" not in uri:
        time.sleep(600)
    upload(local_dir, uri, last)

job.output.checkpoint.upload_dir = slow_commit
sys.exit(entry())
"""


def stop_a_run_whose_uploads_hang(tmp_path, model_dir, commits: int, signal_after: str) -> tuple[int, str]:
    """A run with checkpoint_every 2 and a grace of 2 s, SIGTERMed once `signal_after` is in its output:
    its exit code and output."""
    train = {"checkpoint_every": 2, "seed": 1, "stop_grace_seconds": 2}
    spec = write_spec(
        tmp_path / "spec.json", make_spec("stop", model=model_dir, files=tmp_path, name="grace", train=train)
    )
    command = [sys.executable, "-c", SLOW_COMMITS.format(commits=commits), "run", str(spec)]
    process = subprocess.Popen(
        [*command, "--set", "output.uri=./out"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        seen = read_until(process, signal_after)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=60), "".join(seen) + process.stdout.read()
    finally:
        process.kill()


def test_a_stop_checkpoint_that_misses_the_grace_period_exits_1_when_this_run_committed_nothing(
    tmp_path, tiny_model_dir
):
    """Exit 75 would requeue a job whose checkpoint never fits the grace period forever, without progress."""
    code, output = stop_a_run_whose_uploads_hang(tmp_path, tiny_model_dir, commits=0, signal_after="step 3/")
    assert code == 1, output
    assert (
        "grace period of 2 s (train.stop_grace_seconds) over before the stop checkpoint was committed"
        in output
    )
    assert "this run committed no checkpoint" in output and "Traceback" not in output


def test_a_stop_checkpoint_that_misses_the_grace_period_exits_75_when_this_run_committed_one(
    tmp_path, tiny_model_dir
):
    code, output = stop_a_run_whose_uploads_hang(
        tmp_path, tiny_model_dir, commits=2, signal_after="checkpoint step 2 committed"
    )
    assert code == 75, output
    assert "the requeued job resumes from the checkpoint at step 2, committed by this run" in output
    assert (tmp_path / "out" / "checkpoints" / "step-000002-g1" / "COMMITTED").is_file()
