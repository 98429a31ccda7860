"""Progress output: a bar on a terminal, plain lines in a batch job's log."""

from __future__ import annotations

import io

from job.progress import Progress, format_metrics

METRICS = {
    "train/loss": 1.23456,
    "train/learning_rate": 2e-4,
    "train/grad_norm": 0.5,
    "train/tokens_per_second": 999.6,
}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_metrics_names_step_loss_lr_speed_and_eta():
    line = format_metrics(10, 100, {**METRICS, "eval/loss": 2.0}, eta_seconds=75)
    assert (
        line == "step 10/100 loss 1.2346 lr 2.00e-04 grad_norm 0.500 tok/s 1000 eval_loss 2.0000 eta 0:01:15"
    )


def test_log_file_gets_a_line_every_log_every_steps_and_the_last():
    log = io.StringIO()
    progress = Progress(total_steps=7, log_every=3, enabled=True, stream=log)
    for step in range(1, 8):
        progress.update(step, METRICS)
    assert [line.split()[1] for line in log.getvalue().splitlines()] == ["3/7", "6/7", "7/7"]


def test_terminal_gets_a_bar_not_lines():
    terminal = FakeTerminal()
    progress = Progress(total_steps=4, log_every=1, enabled=True, stream=terminal)
    for step in range(1, 5):
        progress.update(step, METRICS)
    progress.close()
    output = terminal.getvalue()
    assert "4/4" in output and "loss=1.2346" in output
    assert "step 1/4" not in output


def test_other_ranks_stay_silent():
    log = io.StringIO()
    progress = Progress(total_steps=2, log_every=1, enabled=False, stream=log)
    progress.update(1, METRICS)
    progress.message("hello")
    assert log.getvalue() == ""
