"""`ftjob launch slurm` and the sbatch script on a real single-node Slurm (slurm/testcluster.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import REPO, run_ftjob, write_stop_spec
from safetensors.torch import load_file

STEPS = 150  # long enough that a signal sent at step 8 lands before the end, on a fast machine too


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    tracking = {"enabled": True, "experiment": "slurm", "system_metrics": False}
    return write_stop_spec(
        workdir, tiny_model_dir, "sl", STEPS, checkpoint_every=5, seed=3, tracking=tracking
    )


def launch(spec_path, output: str, *args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "job", "launch", "slurm", str(spec_path), "--time", "10"]
    command += ["--set", f"output.uri={output}", "--folder", f"logs-{output}", *args]
    return subprocess.Popen(
        command, cwd=spec_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def job_id(process: subprocess.Popen) -> tuple[str, list[str]]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("submitted Slurm job "):
            return line.split()[3].rstrip(";"), lines
    raise AssertionError("".join(lines))


def wait_for_line(log, text: str, seconds: float) -> None:
    """Until the job's log (written by Slurm, appended across requeues) holds text."""
    deadline = time.monotonic() + seconds
    while text not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.5)


def adapter(workdir, output: str) -> dict:
    return load_file(workdir / output / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(slurm, spec_path, workdir, tracking_env):
    process = launch(spec_path, "straight", "--wait", env=tracking_env)
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out
    assert "ended COMPLETED" in out and f"step {STEPS}/{STEPS}" in out  # the job's log, streamed
    assert (workdir / "logs-straight").stat().st_mode & 0o777 == 0o700  # the pickle holds the spec
    return "straight"


@pytest.fixture(scope="module")
def tracking_env(workdir):
    import os

    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db", "PYTHONPATH": str(REPO)}


def test_the_time_limit_signal_checkpoints_requeues_and_resumes_exactly(
    slurm, spec_path, workdir, uninterrupted, tracking_env
):
    """Slurm's USR2 before the time limit (sent as Slurm does, to the job's step): the run checkpoints,
    exits 75, the job is requeued, resumes, and ends with the adapter of an uninterrupted run and one
    MLflow run."""
    process = launch(spec_path, "stopped", "--wait", env=tracking_env)
    job, lines = job_id(process)
    log = workdir / "logs-stopped" / f"{job}_0_log.out"
    wait_for_line(log, f"step 8/{STEPS}", 120)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 0, out
    assert "checkpointed (exit 75); requeueing job" in out
    assert "resuming from the checkpoint at step" in out
    assert f"ftjob launch: job {job} ended COMPLETED" in out
    restarts = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-D", "-o", "State"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "REQUEUED" in restarts and restarts[-1] == "COMPLETED"
    a, b = adapter(workdir, "straight"), adapter(workdir, "stopped")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("slurm")
    runs = client.search_runs([experiment.experiment_id], "tags.`ftjob.output_uri` LIKE '%stopped'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_a_bad_spec_is_exit_2_before_anything_is_submitted(slurm, spec_path, workdir):
    result = run_ftjob(
        "launch",
        "slurm",
        str(spec_path),
        "--set",
        "train.learning_rate=-1",
        "--folder",
        "logs-bad",
        cwd=workdir,
    )
    assert result.returncode == 2 and "train.learning_rate" in result.stderr
    assert not (workdir / "logs-bad").exists()


def test_a_failing_job_returns_its_exit_code(slurm, spec_path, workdir, tracking_env):
    process = launch(
        spec_path, "nodata", "--wait", "--set", f"data.train=[{workdir / 'none.jsonl'}]", env=tracking_env
    )
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 2, out  # the job's own exit 2 (no such file), through --wait
    assert "no such file" in out and "ended FAILED" in out


def test_the_sbatch_script_with_two_processes_requeues_after_usr1_and_resumes_exactly(
    slurm, spec_path, workdir
):
    """slurm/ftjob.sbatch as users submit it, two worker processes on the node: USR1 to the job's step
    (what `--signal=USR1@120` does before the time limit) -> checkpoint, exit 75, the script requeues,
    the job resumes and ends as a straight two-process run does."""
    import os

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FTJOB_CMD": f"{sys.executable} -m job",
        "FTJOB_NPROC_PER_NODE": "2",
    }
    spec = json.loads(spec_path.read_text())
    spec["tracking"] = {"enabled": False}
    two = workdir / "two.json"
    two.write_text(json.dumps(spec))
    straight = subprocess.run(
        [sys.executable, "-m", "job", "run", str(two), "--nproc-per-node", "2", "--set", "output.uri=./two-straight"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr

    (workdir / "logs").mkdir(exist_ok=True)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=2", str(REPO / "slurm" / "ftjob.sbatch"), str(two), "--set", "output.uri=./two-stopped"],
        cwd=workdir, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submitted.stdout.strip()
    log = workdir / "logs" / f"ftjob-{job}.out"
    wait_for_line(log, f"step 8/{STEPS}", 180)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    from launch.slurm import slurm_state

    deadline = time.monotonic() + 300
    while (state := slurm_state(job)) not in {"COMPLETED", "FAILED", "CANCELLED"}:
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(1)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "x 2 process(es)" in text and "requeueing job" in text
    assert "resuming from the checkpoint at step" in text
    a, b = adapter(workdir, "two-straight"), adapter(workdir, "two-stopped")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_sweep_is_one_job_array_of_children_of_one_parent_run(slurm, spec_path, workdir, tracking_env):
    (workdir / "sweep.yaml").write_text("grid:\n  train.learning_rate: [0.001, 0.002]\n")
    process = launch(
        spec_path, "sweep", "--wait", "--sweep", "sweep.yaml", "--set", "train.max_steps=4", env=tracking_env
    )
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out
    parent = out.split("MLflow parent run ", 1)[1].split()[0]
    jobs = [line.split()[3] for line in out.splitlines() if line.startswith("submitted Slurm job ")]
    assert len(jobs) == 2 and len({job.split("_")[0] for job in jobs}) == 1  # one array, two tasks
    for name in ("sl-p00", "sl-p01"):
        assert (workdir / "sweep" / name / "adapter" / "MANIFEST.json").is_file()

    compared = run_ftjob("compare", "--parent", parent, "--json", cwd=workdir, env=tracking_env)
    assert compared.returncode == 0, compared.stderr
    runs = json.loads(compared.stdout)
    assert sorted(r["params"]["train.learning_rate"] for r in runs) == ["0.001", "0.002"]


# --- without a cluster: the sbatch script, the task's requeue rules, sweeps ---------------------------


def without_slurm(folder) -> dict[str, str]:
    """An environment whose PATH has no srun or sbatch (an empty folder), whether Slurm is installed
    here or not."""
    empty = folder / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": str(empty)}


def dry_run(spec_path, *args: str):
    """`launch slurm --dry-run` where Slurm is not installed: the script prints anywhere."""
    return run_ftjob(
        "launch", "slurm", str(spec_path), "--dry-run", *args, cwd=spec_path.parent, env=without_slurm(spec_path.parent)
    )  # fmt: skip


def minimal_spec(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(
        json.dumps({"model": {"source": "m"}, "data": {"train": ["d.jsonl"]}, "train": {"max_steps": 1}})
    )
    return spec


def test_the_dry_run_prints_the_script_for_each_runtime(tmp_path):
    spec = minimal_spec(tmp_path)
    plain = dry_run(spec, "--partition", "gpu", "--nodes", "2", "--gpus-per-node", "4", "--sbatch", "mail-type=END", "--env", "MY_VAR=hidden-value")  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --mail-type=END", "#SBATCH --signal=USR2@120", "#SBATCH --requeue"):  # fmt: skip
        assert line in plain.stdout.splitlines(), line
    assert "hidden-value" not in plain.stdout and sys.executable in plain.stdout
    sif = dry_run(spec, "--container-image", "/images/ftjob.sif")
    folder = tmp_path / "ftjob-logs"
    assert (
        f"apptainer exec --nv --bind {folder} /images/ftjob.sif python3 -u -m submitit.core._submit"
        in sif.stdout
    )
    pyxis = dry_run(spec, "--container-image", "registry#ftjob:0.1")
    assert f"'--container-image=registry#ftjob:0.1' --container-mounts={folder}:{folder}" in pyxis.stdout
    (tmp_path / "sweep.yaml").write_text("adapter.r: [8, 16, 32]\n")
    array = dry_run(spec, "--sweep", "sweep.yaml", "--max-parallel", "2")
    assert "#SBATCH --array=0-2%2" in array.stdout.splitlines()
    refused = dry_run(spec, "--sweep", "sweep.yaml", "--container-image", "/images/ftjob.sif")
    assert refused.returncode == 2 and "--sweep with --container-image is not supported" in refused.stderr
    missing = dry_run(spec, "--env", "FTJOB_SURELY_UNSET")
    assert missing.returncode == 2 and "--env FTJOB_SURELY_UNSET: not set in this shell" in missing.stderr


def test_without_slurm_a_dry_run_prints_the_script_and_a_submission_is_exit_2(tmp_path):
    spec = minimal_spec(tmp_path)
    printed = dry_run(spec)
    assert printed.returncode == 0, printed.stderr
    assert "#SBATCH --requeue" in printed.stdout.splitlines()
    submitted = run_ftjob("launch", "slurm", str(spec), cwd=tmp_path, env=without_slurm(tmp_path))
    assert submitted.returncode == 2 and "Traceback" not in submitted.stderr
    assert "sbatch and srun not found on PATH" in submitted.stderr
    assert not (tmp_path / "ftjob-logs").exists()


def test_values_that_would_leave_their_line_of_the_script_are_refused(tmp_path, monkeypatch):
    """A newline would start a script line of its own (an #SBATCH option or a command); a backslash
    ends the quotes submitit puts around a value, since sbatch reads it as an escape there too."""
    from job.errors import UserError
    from launch.slurm import SlurmOptions, executor_for

    escaping_the_quotes = "x\\'\" --no-requeue"
    for option, value in [
        ("partition", "gpu\n#SBATCH --no-requeue"),
        ("mem", "64G\rtouch /tmp/owned"),
        ("sbatch", ["mail-type=END\n#SBATCH --open-mode=truncate"]),
        ("sbatch", [f"comment={escaping_the_quotes}"]),
        ("folder", "logs\n#SBATCH --export=NONE"),
    ]:
        with pytest.raises(UserError, match=f"^--{option} .*control characters and backslashes"):
            executor_for(SlurmOptions(**{option: value}), "x", dry_run=True)
    refused = dry_run(minimal_spec(tmp_path), "--partition", "gpu\n#SBATCH --no-requeue")
    assert refused.returncode == 2 and "--partition 'gpu\\n#SBATCH --no-requeue'" in refused.stderr
    monkeypatch.setenv("SBATCH_NO_REQUEUE", "1")  # sbatch takes it over the script's --requeue
    with pytest.raises(UserError, match="SBATCH_NO_REQUEUE set in this shell"):
        executor_for(SlurmOptions(), "x", dry_run=True)


def test_reserved_sbatch_options_are_refused_however_they_are_spelled():
    """submitit writes no_requeue as --no-requeue, and sbatch takes any unambiguous start of a long
    option (--no-req)."""
    from job.errors import UserError
    from launch.slurm import sbatch_pair

    for item in (
        "no_requeue",
        "open_mode=truncate",
        "NO-REQUEUE",
        "--Open-Mode=truncate",
        "no-req",
        "sig=USR1@9",
    ):
        with pytest.raises(UserError, match="set by ftjob launch itself"):
            sbatch_pair(item)
    for item in ("no requeue", "mail-type\n#SBATCH --no-requeue=x", "=END"):
        with pytest.raises(UserError, match="expected KEY=VALUE"):
            sbatch_pair(item)
    assert sbatch_pair("Mail_Type=END") == ("mail-type", "END")
    assert sbatch_pair("--exclusive") == ("exclusive", True)


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
    base = load_spec(str(minimal_spec(tmp_path)), ["train.learning_rate=0.001"])
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


def test_sweep_points_from_a_grid_and_points(tmp_path):
    from job.errors import UserError
    from job.spec import validate_spec
    from launch.sweep import load_points, point_specs

    (tmp_path / "grid.yaml").write_text("train.learning_rate: [1.0e-4, 2.0e-4]\nadapter.r: [8, 16]\n")
    assert load_points(str(tmp_path / "grid.yaml")) == [
        {"train.learning_rate": 1e-4, "adapter.r": 8},
        {"train.learning_rate": 1e-4, "adapter.r": 16},
        {"train.learning_rate": 2e-4, "adapter.r": 8},
        {"train.learning_rate": 2e-4, "adapter.r": 16},
    ]
    (tmp_path / "both.yaml").write_text(
        "grid: {adapter.r: [8, 16]}\npoints: [{data.max_seq_len: 64}, {train.seed: 1}]\n"
    )
    points = load_points(str(tmp_path / "both.yaml"))
    assert len(points) == 4 and points[0] == {"adapter.r": 8, "data.max_seq_len": 64}
    base = validate_spec(
        {
            "name": "b",
            "model": {"source": "m"},
            "data": {"train": ["d"]},
            "train": {"max_steps": 1},
            "output": {"uri": "s3://x/runs"},
        }
    )
    specs = point_specs(base, points)
    assert [s.name for s in specs] == ["b-p00", "b-p01", "b-p02", "b-p03"]
    assert specs[3].output_uri == "s3://x/runs/b-p03" and specs[3].train.seed == 1
    (tmp_path / "bad.yaml").write_text("adapter.r: [8, -1]\n")
    with pytest.raises(UserError, match=r"--sweep point 1 .*adapter.r"):
        point_specs(base, load_points(str(tmp_path / "bad.yaml")))
    (tmp_path / "empty.yaml").write_text("adapter.r: []\n")
    with pytest.raises(UserError, match="needs a non-empty list"):
        load_points(str(tmp_path / "empty.yaml"))


class FakeJob:
    """What follow() reads of a submitit job: its id, log paths and recorded exception."""

    def __init__(self, tmp_path, message: str = ""):
        from types import SimpleNamespace

        self.job_id = "9"
        self.paths = SimpleNamespace(stdout=tmp_path / "9.out", stderr=tmp_path / "9.err")
        self.message = message

    def exception(self):
        return RuntimeError(self.message)


def follow_states(tmp_path, states: list[str], message: str = "") -> tuple[int, str, float]:
    """follow() over a scripted sequence of sacct states (the last one repeats), on a fake clock."""
    import io

    from launch.slurm import follow

    clock = [0.0]
    sequence = iter(states)
    last = [states[0]]

    def state_of(_):
        last[0] = next(sequence, last[0])
        return last[0]

    out = io.StringIO()
    code = follow(
        FakeJob(tmp_path, message), out, poll_seconds=5, sleep=lambda s: clock.__setitem__(0, clock[0] + s),
        state_of=state_of, clock=lambda: clock[0],
    )  # fmt: skip
    return code, out.getvalue(), clock[0]


def test_follow_ends_on_every_end_and_only_then(tmp_path):
    assert follow_states(tmp_path, ["PENDING", "RUNNING", "COMPLETED"])[0] == 0
    code, out, _ = follow_states(tmp_path, ["RUNNING", "CANCELLED"])  # sacct says "CANCELLED by 0"
    assert code == 1 and "ended CANCELLED" in out
    code, _, _ = follow_states(
        tmp_path, ["RUNNING", "FAILED"], "ftjob exited with 75\n...ftjob exited with 3"
    )
    assert code == 3  # the newest run's code, not an earlier one's
    code, out, _ = follow_states(
        tmp_path, ["RUNNING", "PREEMPTED", "PREEMPTED", "PENDING", "RUNNING", "COMPLETED"]
    )
    assert code == 0  # preempted, then requeued by Slurm: followed on
    code, out, elapsed = follow_states(tmp_path, ["RUNNING", "PREEMPTED"], "ftjob exited with 75")
    assert code == 75 and "ended PREEMPTED" in out and elapsed >= 60  # not requeued within a minute
    code, out, elapsed = follow_states(tmp_path, ["UNKNOWN"])
    assert code == 1 and "sacct has said nothing" in out and 300 <= elapsed < 400


def test_reserved_sbatch_options_and_patterned_folders_are_refused(tmp_path):
    spec = minimal_spec(tmp_path)
    for option in ("no-requeue", "signal=B:USR2@60", "export=NONE", "array=0-3"):
        refused = dry_run(spec, "--sbatch", option)
        assert refused.returncode == 2 and "set by ftjob launch itself" in refused.stderr, option
    patterned = dry_run(spec, "--folder", "logs/%j")
    assert patterned.returncode == 2 and "without Slurm's %-patterns" in patterned.stderr
    assert not (tmp_path / "ftjob-logs").exists()  # a dry run creates nothing


def test_a_cancelled_job_ends_the_wait_and_a_refused_submission_is_exit_2(
    slurm, spec_path, workdir, tracking_env
):
    process = launch(spec_path, "cancelled", "--wait", env=tracking_env)
    job, lines = job_id(process)
    log = workdir / "logs-cancelled" / f"{job}_0_log.out"
    wait_for_line(log, "step 2/", 120)
    subprocess.run(["scancel", job], check=True)
    out = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 75 and "ended CANCELLED" in out  # scancel's SIGTERM: checkpointed, 75

    refused = run_ftjob(
        "launch", "slurm", str(spec_path), "--partition", "nope", "--folder", "logs-nope", cwd=workdir
    )
    assert refused.returncode == 2 and "sbatch refused the job" in refused.stderr
