"""Review findings of session 10: a published spec.json whose model is not a mapping, the Slurm launcher's
output bound at import time, a Kubernetes sweep's parent run started before its manifests were made."""

from __future__ import annotations

import io
import json
import sys

import pytest

from job.errors import UserError


@pytest.mark.parametrize("model", [["m"], "m", 3])
def test_a_published_spec_whose_model_is_not_a_mapping_is_refused_naming_the_file(tmp_path, model):
    from job.generate import load_trained

    (tmp_path / "spec.json").write_text(json.dumps({"model": model, "data": {"train": ["d.jsonl"]}}))
    with pytest.raises(UserError) as refused:
        load_trained(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'spec.json'}: model must be a mapping")


def test_follow_writes_to_the_standard_output_of_the_moment(tmp_path, monkeypatch):
    """A caller that swaps sys.stdout after `launch.slurm` was imported (the in-process CLI, a wrapper
    capturing output) gets the job's lines there."""
    from types import SimpleNamespace

    from launch.slurm import follow

    (tmp_path / "9.out").write_text("step 1/1\n")
    job = SimpleNamespace(
        job_id="9", paths=SimpleNamespace(stdout=tmp_path / "9.out", stderr=tmp_path / "9.err")
    )
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stdout", captured)
    code = follow(job, sleep=lambda s: None, state_of=lambda _: "COMPLETED", clock=lambda: 0.0)
    assert code == 0 and "step 1/1" in captured.getvalue() and "ended COMPLETED" in captured.getvalue()


def test_a_k8s_sweep_whose_manifests_cannot_be_made_starts_no_parent_run(tmp_path, monkeypatch, capsys):
    from helpers import REPO

    from launch.cli import launch_main
    from launch.sweep import Submission

    started = []
    monkeypatch.setattr(Submission, "start_parent_run", lambda self, uri: started.append(uri) or "parent-1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example")
    (tmp_path / "sweep.yaml").write_text("adapter.r: [4, 8]\n")
    argv = ["k8s", str(REPO / "examples" / "demo.yaml"), "--set", "output.uri=s3://bucket/runs/{name}"]
    argv += ["--sweep", str(tmp_path / "sweep.yaml"), "--apply", "--env", "FTJOB__train__max_steps=3"]
    with pytest.raises(UserError, match="--env FTJOB__train__max_steps: a spec override"):
        launch_main(argv)
    assert started == []
