"""The Slurm task (submitit's FtjobTask) with a stand-in for ftjob: it runs the spec resolved at submission,
passes --restart to the first run only, and requeues after the time-limit signal up to its cap."""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import make_spec, write_spec


def test_the_job_runs_the_spec_resolved_here_not_the_login_shells_overrides(tmp_path, monkeypatch):
    """sbatch exports the login shell's environment to the job: FTJOB__ variables, folded into the
    spec by the launcher, must not apply again over --set and the sweep's values in the task's ftjob,
    nor can FTJOB_SPEC or a stale FTJOB_RESTART_ID reach it."""
    from dataclasses import replace

    from job.errors import UserError
    from job.spec import load_spec
    from launch.slurm import SlurmOptions, pass_environment, task_for
    from launch.sweep import point_specs

    monkeypatch.setenv("FTJOB__TRAIN__LEARNING_RATE", "0.5")
    monkeypatch.setenv("FTJOB__TRAIN__SEED", "7")
    monkeypatch.setenv("FTJOB_SPEC", '{"name": "another"}')
    monkeypatch.setenv("FTJOB_RESTART_ID", "stale")
    base = load_spec(
        str(write_spec(tmp_path / "s.json", make_spec(model="m"))), ["train.learning_rate=0.001"]
    )
    specs = [base, *point_specs(base, [{"train.learning_rate": 0.01}, {"train.learning_rate": 0.02}])]
    seen = tmp_path / "seen.json"
    resolve_as_ftjob_run = tmp_path / "resolve.py"  # what `ftjob run SPEC` reads, recorded
    resolve_as_ftjob_run.write_text(
        "import json, os, sys\n"
        "from job.spec import load_spec\n"
        "spec = load_spec(sys.argv[2])\n"
        "launcher = [n for n in os.environ if n.startswith('FTJOB__') or n in ('FTJOB_SPEC', 'FTJOB_RESTART_ID')]\n"
        f"json.dump([spec.train.learning_rate, spec.train.seed, launcher], open({str(seen)!r}, 'w'))\n"
    )
    for spec, learning_rate in zip(specs, [0.001, 0.01, 0.02], strict=True):
        task = replace(
            task_for(spec, SlurmOptions(), False), command=[sys.executable, str(resolve_as_ftjob_run)]
        )
        assert task() == 0
        assert json.loads(seen.read_text()) == [learning_rate, 7, []]
    with pytest.raises(UserError, match="--env FTJOB__TRAIN__LEARNING_RATE: kept from the job"):
        pass_environment(["FTJOB__TRAIN__LEARNING_RATE=0.5"], {})


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A stand-in `scontrol` on PATH that records its arguments; the task's Slurm variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_PROCID", "0")
    return tmp_path / "scontrol.log"


def stand_in_ftjob(tmp_path, code: int, signal_parent: bool = False) -> list[str]:
    """A stand-in for `python -m job`: records its arguments, maybe signals the task as Slurm would
    (USR2 before the time limit), exits with code."""
    script = tmp_path / "ftjob.py"
    script.write_text(
        "import os, signal, sys, json\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "signal.signal(signal.SIGUSR2, lambda *_: None)\n"  # ftjob takes it as a stop request
        f"{'os.kill(os.getppid(), signal.SIGUSR2); import time; time.sleep(0.5)' if signal_parent else ''}\n"
        f"sys.exit({code})\n"
    )
    return [sys.executable, str(script)]


def test_the_task_passes_restart_to_the_first_run_only(tmp_path, stand_ins, monkeypatch):
    from launch.slurm import FtjobTask

    task = FtjobTask({"name": "x"}, "auto", True, 10, stand_in_ftjob(tmp_path, 0))
    for restarts, expected in (("0", True), ("1", False)):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        assert task() == 0
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert argv[0] == "run" and argv[2:4] == ["--nproc-per-node", "auto"]
        assert ("--restart" in argv) is expected


def test_the_task_requeues_after_the_time_limit_signal_up_to_the_cap(tmp_path, stand_ins, monkeypatch):
    from launch.slurm import FtjobFailed, FtjobTask

    task = FtjobTask({"name": "x"}, "auto", False, 2, stand_in_ftjob(tmp_path, 75, signal_parent=True))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(SystemExit) as exited:
        task()
    assert exited.value.code == 75 and stand_ins.read_text() == "requeue 41\n"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the cap: ends as ftjob did, not requeued
    with pytest.raises(FtjobFailed, match="ftjob exited with 75"):
        task()
    assert stand_ins.read_text() == "requeue 41\n"
    plain = FtjobTask({"name": "x"}, "auto", False, 2, stand_in_ftjob(tmp_path, 75))  # 75 after SIGTERM
    with pytest.raises(FtjobFailed):
        plain()
    assert stand_ins.read_text() == "requeue 41\n"
