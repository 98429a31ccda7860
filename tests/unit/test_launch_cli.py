"""Launchers own their commands: `ftjob launch` and `ftjob compare` live in launch/cli.py, which ftjob finds
through its entry points, and job never imports launch."""

from __future__ import annotations

import ast
import os
from contextlib import contextmanager
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import REPO

from job import cli
from job.errors import UserError
from job.spec import load_spec
from launch import k8s, slurm
from launch.cli import LAUNCHERS, launch_main
from launch.sweep import PARENT_ENV, Submission

DEMO_SPEC = str(REPO / "examples" / "demo.yaml")
ON_OBJECT_STORAGE = "output.uri=s3://bucket/runs/{name}"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


def test_job_never_imports_launch():
    importers = {
        str(path.relative_to(REPO)): sorted(
            name for name in imported_modules(path) if name.split(".")[0] == "launch"
        )
        for path in REPO.glob("job/**/*.py")
    }
    assert {path: names for path, names in importers.items() if names} == {}


def test_ftjob_finds_launch_and_compare_through_its_entry_points():
    found = {name: entry.value for name, entry in cli.commands_elsewhere().items()}
    assert found == {"launch": "launch.cli:launch_main", "compare": "launch.cli:compare_main"}


def greet(argv: list[str]) -> int:
    """say hello (a test command)

    What the rest of the docstring says is not ftjob's help line."""
    if argv == ["--fail"]:
        raise UserError("greet: told to fail")
    print("hello", argv)
    return 7


def elsewhere(monkeypatch, **values: str) -> None:
    """ftjob's commands elsewhere are these: name -> entry point value."""
    entries = {name: EntryPoint(name, value, cli.COMMANDS_GROUP) for name, value in values.items()}
    monkeypatch.setattr(cli, "commands_elsewhere", lambda: entries)


def test_a_command_elsewhere_takes_the_rest_of_the_arguments_and_ftjob_reports_its_errors(
    monkeypatch, capsys
):
    elsewhere(monkeypatch, greet=f"{__name__}:greet")
    assert cli.main(["greet", "--help", "-x"]) == 7
    assert capsys.readouterr().out == "hello ['--help', '-x']\n"
    assert cli.main(["greet", "--fail"]) == 2
    assert capsys.readouterr().err == "ftjob: error: greet: told to fail\n"


def test_ftjob_help_lists_a_command_elsewhere_by_its_docstrings_first_line(monkeypatch, capsys):
    elsewhere(monkeypatch, greet=f"{__name__}:greet")
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    help_lines = capsys.readouterr().out
    assert "greet               say hello (a test command)\n" in help_lines
    assert "not ftjob's help line" not in help_lines


def test_a_command_elsewhere_is_not_imported_for_jobs_own_commands(monkeypatch, capsys):
    elsewhere(monkeypatch, broken="no_such_module_of_ftjob:main")
    assert cli.main(["schema", "--markdown"]) == 0
    with pytest.raises(ModuleNotFoundError):
        cli.main(["broken"])


@pytest.mark.parametrize(("name", "own_option"), [("k8s", "--image"), ("slurm", "--partition")])
def test_each_launchers_help_has_the_shared_and_its_own_options(name, own_option, capsys):
    with pytest.raises(SystemExit) as exited:
        launch_main([name, "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"usage: ftjob launch {name}" in help_text
    assert " ".join(LAUNCHERS[name].DESCRIPTION.split()) in help_text
    assert all(option in help_text for option in ("--set", "--nodes", "--sweep", own_option))


def test_launch_main_submits_through_the_launchers_table(capsys):
    assert launch_main(["k8s", DEMO_SPEC, "--set", ON_OBJECT_STORAGE]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]


def write_sweep(tmp_path: Path) -> str:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("adapter.r: [4, 8]\n")
    return str(sweep)


def test_the_launchers_get_every_point_of_a_sweep_validated(tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(k8s, "submit", lambda args, submission: submitted.append(submission) or 0)
    argv = ["k8s", DEMO_SPEC, "--set", ON_OBJECT_STORAGE, "--sweep", write_sweep(tmp_path)]
    assert launch_main(argv) == 0
    [submission] = submitted
    assert submission.is_sweep and submission.points == [{"adapter.r": 4}, {"adapter.r": 8}]
    assert [spec.adapter.r for spec in submission.specs] == [4, 8]


def a_sweep(tmp_path: Path) -> Submission:
    return Submission.of(load_spec(DEMO_SPEC, [ON_OBJECT_STORAGE]), write_sweep(tmp_path))


class FakeMlflowClient:
    """MLflow's client as Submission.start_parent_run uses it: every call answers an experiment and a run."""

    def __init__(self, tracking_uri: str):
        pass

    def __getattr__(self, method: str):
        return lambda *args, **kwargs: SimpleNamespace(
            experiment_id="1", info=SimpleNamespace(run_id="parent-1")
        )


def test_the_parent_run_line_names_the_store_without_its_password(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.setattr(mlflow, "MlflowClient", FakeMlflowClient)
    assert a_sweep(tmp_path).start_parent_run("https://user:pw@mlflow.example/") == "parent-1"
    assert capsys.readouterr().out == (
        "MLflow parent run parent-1 in https://***@mlflow.example/: ftjob compare --parent parent-1\n"
    )


def test_k8s_starts_a_parent_run_only_where_the_pods_log_to(tmp_path, monkeypatch, capsys):
    submission = a_sweep(tmp_path)
    monkeypatch.setattr(Submission, "start_parent_run", lambda self, uri: f"parent in {uri}")
    assert submission.wants_parent_run
    assert k8s.parent_run(submission) is None
    assert capsys.readouterr().err == "no MLflow parent run: MLFLOW_TRACKING_URI is unset here\n"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert k8s.parent_run(submission) == "parent in http://mlflow:5000"


class FakeExecutor:
    """submitit's executor as the Slurm launcher submits through it; what it was given, recorded."""

    folder = Path("ftjob-logs")

    def __init__(self):
        self.submitted = []
        self.batches = 0

    @contextmanager
    def batch(self):
        self.batches += 1
        yield

    def submit(self, task):
        self.submitted.append(task)
        return SimpleNamespace(
            job_id=f"10{len(self.submitted)}", paths=SimpleNamespace(stdout="o", stderr="e")
        )


def test_a_slurm_sweep_is_one_job_array_whose_tasks_know_the_parent_run(tmp_path, monkeypatch, capsys):
    executor = FakeExecutor()
    stores = []
    monkeypatch.setattr(slurm, "executor_for", lambda *args, **kwargs: executor)
    monkeypatch.setattr(Submission, "start_parent_run", lambda self, uri: stores.append(uri) or "parent-1")
    monkeypatch.setenv(PARENT_ENV, "left over")
    assert launch_main(["slurm", DEMO_SPEC, "--sweep", write_sweep(tmp_path)]) == 0
    assert stores == [f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"]  # MLFLOW_TRACKING_URI is unset
    assert os.environ[PARENT_ENV] == "parent-1"  # sbatch exports it to every task
    assert executor.batches == 1
    assert [task.spec["adapter"]["r"] for task in executor.submitted] == [4, 8]
    assert capsys.readouterr().out.splitlines() == [
        "submitted Slurm job 101 (reverse-demo-p00); log: o (errors: e)",
        "submitted Slurm job 102 (reverse-demo-p01); log: o (errors: e)",
    ]
