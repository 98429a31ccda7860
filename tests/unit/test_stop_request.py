"""job.signals.StopRequest in this process: handlers put back after the loop, and when the grace period ends
with 75."""

from __future__ import annotations

import signal
from types import SimpleNamespace


def test_handlers_are_restored_after_the_loop():
    from job.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(grace_seconds=5):
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_grace_period_ends_with_75_only_when_a_requeue_can_make_progress():
    from job.signals import StopRequest

    stop = StopRequest(grace_seconds=5)
    code, message = stop.grace_over()
    assert code == 75 and "before training began" in message  # nothing new to save

    stop.training_begins(SimpleNamespace(committed_step=None))
    code, message = stop.grace_over()
    assert code == 1 and "this run committed no checkpoint" in message
    assert "train.stop_grace_seconds" in message and "train.checkpoint_every" in message

    stop.training_begins(SimpleNamespace(committed_step=4))
    code, message = stop.grace_over()
    assert code == 75 and "resumes from the checkpoint at step 4" in message
