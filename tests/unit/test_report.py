"""The job's report without a run: report.json read back as input, the resume and cost arithmetic, the
price from the environment, the wall clock and `ftjob report`'s table."""

from __future__ import annotations

import json
import logging
import time

import pytest

from job.errors import UserError
from job.output.report import MAX_REPORT_BYTES, MAX_RESTARTS_KEPT, Report, read_report, write_report
from job.report import (
    NO_PREEMPTION,
    PRICE_VARIABLE,
    cost_of,
    device_hour_price,
    earlier_report,
    preemption_after,
    resume_of,
)
from job.report_table import show_report
from job.spec import ReportSpec
from job.wallclock import WallClock, process_started_at

STOPPED_AT = 1_700_000_000.0


def a_report(**changes) -> dict:
    """A report.json as a run stopped at step 12 of 30 writes it, with changes (dotted keys)."""
    report = {
        "format": 1, "status": "stopped", "updated_at": STOPPED_AT, "device": "cpu", "processes": 1,
        "attempts": 1, "step": 12, "total_steps": 30, "tokens_trained": 12_000, "tokens_per_second": 1000.0,
        "flops": {"formula": "4N+2N'", "parameters": 1_000_000, "trainable_parameters": 10_000,
                  "per_token": 4.02e6, "peak_per_device": None, "peak_source": "n/a: no known peak for cpu",
                  "mfu": None},
        "wall_seconds": 60.0,
        "phases": {"startup": 20.0, "data": 3.0, "steps": 12.0, "checkpoint": 6.0, "eval": 9.0,
                   "publish": 0.0, "other": 10.0},
        "peak_memory": {"host_gib": 1.5, "device_gib": None},
        "packing_efficiency": 0.9,
        "preemption": {"stops": 1, "resumes": 0, "steps_retrained": 0, "seconds_lost": 0.0, "restarts": []},
        "cost": {"device_hours": 60.0 / 3600, "price_per_device_hour": 3.0, "total": 0.05,
                 "per_million_tokens": 0.05 / 12_000 * 1e6},
    }  # fmt: skip
    for key, value in changes.items():
        *parents, last = key.split(".")
        inner = report
        for parent in parents:
            inner = inner[parent]
        inner[last] = value
    return report


def test_a_report_as_ftjob_writes_it_reads_back_whole(tmp_path):
    write_report(str(tmp_path), Report.model_validate(a_report()))
    assert read_report(str(tmp_path)).model_dump() == a_report()
    assert earlier_report(str(tmp_path), resumed=True) == Report.model_validate(a_report())
    assert earlier_report(str(tmp_path), resumed=False) is None  # a fresh start or --restart: not carried on


RESTART = {"stopped_at_step": 1, "stopped_at": 1.0, "stopped_by_signal": True, "resumed_from_step": 1,
           "steps_retrained": 0, "seconds_lost": 1.0}  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "text", "named"),
    [
        ("an unknown key", json.dumps(a_report(hostile=1)), "hostile: Extra inputs are not permitted"),
        ("a number as text", json.dumps(a_report(tokens_trained="12000")), "tokens_trained: Input should be a valid integer"),
        ("a boolean as a count", json.dumps(a_report(**{"preemption.stops": True})), "preemption.stops"),
        ("negative seconds", json.dumps(a_report(**{"phases.steps": -1.0})), "phases.steps"),
        ("an infinite time", json.dumps(a_report(updated_at=1e400)), "updated_at"),
        ("a huge count", json.dumps(a_report(step=10**30)), "step"),
        ("a long device name", json.dumps(a_report(device="x" * 1000)), "device"),
        ("a device name that moves the terminal", json.dumps(a_report(device="GPU\x1b[2J")), "device"),
        ("too many restarts", json.dumps(a_report(**{"preemption.restarts": [RESTART] * (MAX_RESTARTS_KEPT + 1)})), "preemption.restarts"),
        ("another format", json.dumps(a_report(format=2)), "format"),
        ("a list", "[]", "the whole"),
        ("not JSON", "{", "Expecting property name"),
        ("nested too deeply", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("over a MiB", json.dumps(a_report(device=" " * MAX_REPORT_BYTES)), f"over {MAX_REPORT_BYTES} bytes"),
    ],
)  # fmt: skip
def test_a_damaged_or_hostile_report_is_ignored_with_a_warning(tmp_path, caplog, damage, text, named):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(ValueError) as refused:
        read_report(str(tmp_path))
    assert named in str(refused.value) and "x" * 100 not in str(refused.value)  # the value is not echoed
    with caplog.at_level(logging.WARNING, logger="job"):
        assert earlier_report(str(tmp_path), resumed=True) is None
    assert "report.json is not as ftjob writes it" in caplog.text and "starts afresh" in caplog.text


def test_ftjob_report_of_a_damaged_report_is_exit_2_naming_the_key(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(a_report(step=-1)))
    with pytest.raises(UserError) as refused:
        show_report(str(tmp_path), as_json=False)
    assert refused.value.exit_code == 2
    assert f"{tmp_path}/report.json is not as ftjob writes it: step:" in str(refused.value)


def test_a_resume_after_a_stop_trains_nothing_again_and_loses_the_time_to_its_first_step():
    stopped = Report.model_validate(a_report())
    resume = resume_of(stopped, resumed_from=12, first_step_at=STOPPED_AT + 95.0)
    assert (resume.stopped_by_signal, resume.steps_retrained, resume.seconds_lost) == (True, 0, 95.0)
    after = preemption_after(stopped.preemption, resume, stopped=False)
    assert (after.stops, after.resumes, after.steps_retrained, after.seconds_lost) == (1, 1, 0, 95.0)


def test_a_resume_after_a_crash_counts_the_steps_since_the_checkpoint_it_resumed():
    """The crashed attempt's last report is its checkpoint of step 15, which never committed: the run
    resumes from step 10 and trains steps 11 to 15 again."""
    crashed = Report.model_validate(a_report(status="training", step=15, **{"preemption.stops": 0}))
    resume = resume_of(crashed, resumed_from=10, first_step_at=STOPPED_AT + 30.0)
    assert (resume.stopped_by_signal, resume.steps_retrained) == (False, 5)
    after = preemption_after(crashed.preemption, resume, stopped=True)  # and this attempt is stopped
    assert (after.stops, after.resumes, after.steps_retrained, after.restarts) == (1, 1, 5, [resume])


def test_only_the_newest_restarts_are_kept_and_the_counts_cover_all():
    before = NO_PREEMPTION
    for i in range(MAX_RESTARTS_KEPT + 5):
        resume = resume_of(
            Report.model_validate(a_report(step=i)), resumed_from=i, first_step_at=STOPPED_AT + 1
        )
        before = preemption_after(before, resume, stopped=True)
    assert (
        before.resumes == before.stops == MAX_RESTARTS_KEPT + 5
        and before.seconds_lost == MAX_RESTARTS_KEPT + 5
    )
    assert [r.stopped_at_step for r in before.restarts] == list(range(5, MAX_RESTARTS_KEPT + 5))


def test_the_cost_is_device_hours_at_the_price_and_per_million_tokens():
    cost = cost_of(device_hours=4.0, price=2.5, tokens=2_000_000)
    assert (cost.total, cost.per_million_tokens) == (10.0, 5.0)
    assert cost_of(4.0, None, 2_000_000).total is None and cost_of(4.0, 2.5, 0).per_million_tokens is None


def test_the_price_comes_from_the_spec_else_the_environment():
    assert device_hour_price(ReportSpec(), {}) is None
    assert device_hour_price(ReportSpec(), {PRICE_VARIABLE: " 2.5 "}) == 2.5
    assert device_hour_price(ReportSpec(price_per_device_hour=1.0), {PRICE_VARIABLE: "2.5"}) == 1.0


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "1e9", "2,5"])
def test_a_price_in_the_environment_that_is_not_one_is_exit_2_naming_the_variable(value):
    with pytest.raises(UserError) as refused:
        device_hour_price(ReportSpec(price_per_device_hour=1.0), {PRICE_VARIABLE: value})
    assert refused.value.exit_code == 2 and str(refused.value).startswith(f"{PRICE_VARIABLE}=")


def test_the_wall_clock_counts_from_the_process_start_and_its_split_sums_to_it():
    assert process_started_at() <= time.time()
    clock = WallClock(started_at=time.time() - 10.0)
    clock.loop_begins()
    with clock.phase("steps"):
        time.sleep(0.01)
    split = clock.split()
    assert split["startup"] == pytest.approx(10.0, abs=0.5) and split["steps"] >= 0.01
    assert sum(split.values()) == pytest.approx(clock.elapsed(), abs=0.01)


TABLE = """\
{out}: stopped at step 12 of 30, 1 attempt(s), 1 process(es) on cpu
tokens trained       12,000
tokens/s             1,000 in training steps, 200 over the wall time
FLOPs per token      4N+2N' = 4.02e+06 (N = 1,000,000 parameters, N' = 10,000 trainable)
MFU                  n/a: no known peak for cpu
wall time            60.0 s
  start-up              20.0 s   33.3%
  data stalls            3.0 s    5.0%
  training steps        12.0 s   20.0%
  checkpoints            6.0 s   10.0%
  eval                   9.0 s   15.0%
  publish                0.0 s    0.0%
  other                 10.0 s   16.7%
peak memory          host 1.50 GiB, device n/a
packing efficiency   90.0%
preemption           1 stop(s), 0 resume(s): 0 step(s) trained again, 0.0 s lost
device-hours         0.01667 (1 process(es) x wall time)
cost                 0.05 at 3 a device-hour; 4.167 per million tokens trained"""


def test_ftjob_report_prints_a_table_of_what_it_cost(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(a_report()))
    assert show_report(str(tmp_path), as_json=False) == TABLE.format(out=tmp_path)


def test_the_table_states_mfu_with_the_peak_it_divides_by(tmp_path):
    gpu = a_report(
        **{
            "flops.peak_per_device": 989e12,
            "flops.mfu": 0.41,
            "flops.peak_source": "datasheet (dense bf16/fp16)",
        }
    )
    (tmp_path / "report.json").write_text(json.dumps(gpu))
    assert "MFU                  41.0% of 989 TFLOP/s a device (datasheet (dense bf16/fp16))" in show_report(
        str(tmp_path), False
    )
