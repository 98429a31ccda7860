"""`ftjob launch slurm` without Slurm, in this process: the script a dry run prints, what is refused before
anything is submitted, sweeps and following a job (with a real Slurm: tests/e2e/test_slurm_cluster.py)."""

from __future__ import annotations

import sys

import pytest
from helpers import ftjob, make_spec, write_spec


def without_slurm(folder) -> dict[str, str]:
    """An environment whose PATH has no srun or sbatch (an empty folder), whether Slurm is installed
    here or not."""
    empty = folder / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": str(empty)}


def dry_run(spec_path, *args: str):
    """`launch slurm --dry-run` where Slurm is not installed: the script prints anywhere."""
    return ftjob(
        "launch", "slurm", str(spec_path), "--dry-run", *args, cwd=spec_path.parent, env=without_slurm(spec_path.parent)
    )  # fmt: skip


def test_the_dry_run_prints_the_script_for_each_runtime(tmp_path):
    spec = write_spec(tmp_path / "s.json", make_spec(model="m"))
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
    spec = write_spec(tmp_path / "s.json", make_spec(model="m"))
    printed = dry_run(spec)
    assert printed.returncode == 0, printed.stderr
    assert "#SBATCH --requeue" in printed.stdout.splitlines()
    submitted = ftjob("launch", "slurm", str(spec), cwd=tmp_path, env=without_slurm(tmp_path))
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
    refused = dry_run(
        write_spec(tmp_path / "s.json", make_spec(model="m")), "--partition", "gpu\n#SBATCH --no-requeue"
    )
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
    base = validate_spec(make_spec(name="b", model="m", output={"uri": "s3://x/runs"}))
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
    spec = write_spec(tmp_path / "s.json", make_spec(model="m"))
    for option in ("no-requeue", "signal=B:USR2@60", "export=NONE", "array=0-3"):
        refused = dry_run(spec, "--sbatch", option)
        assert refused.returncode == 2 and "set by ftjob launch itself" in refused.stderr, option
    patterned = dry_run(spec, "--folder", "logs/%j")
    assert patterned.returncode == 2 and "without Slurm's %-patterns" in patterned.stderr
    assert not (tmp_path / "ftjob-logs").exists()  # a dry run creates nothing
