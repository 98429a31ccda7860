"""job/output/layout.py names every path under output.uri; restart.py reads its record through it."""

from __future__ import annotations

import json

import pytest

from job.cluster import restart_id, scheduler_tags
from job.output.layout import OutputLayout, StepFolder, parse_step_folder, rank_file, step_folder
from job.output.restart import record_restart, restart_pending


def test_every_path_under_output_uri():
    layout = OutputLayout("s3://bucket/runs/r")
    folder = step_folder(12, 3)
    assert folder == StepFolder(12, 3, "step-000012-g3")
    assert layout.lease == "s3://bucket/runs/r/lease.json"
    assert layout.restart_record == "s3://bucket/runs/r/restart.json"
    assert layout.checkpoints == "s3://bucket/runs/r/checkpoints"
    assert layout.checkpoint(folder) == "s3://bucket/runs/r/checkpoints/step-000012-g3"
    assert layout.segments == "s3://bucket/runs/r/metrics"
    assert layout.segment(12) == "s3://bucket/runs/r/metrics/000012.jsonl"
    assert layout.curve == "s3://bucket/runs/r/metrics.jsonl"
    assert layout.published("adapter") == "s3://bucket/runs/r/adapter"
    assert layout.published("merged") == "s3://bucket/runs/r/merged"
    assert rank_file(1) == "rank-00001.json"


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("step-000012-g3", StepFolder(12, 3, "step-000012-g3")),
        ("step-000012", StepFolder(12, 0, "step-000012")),  # from before lease generations
        ("step-x", None),
        ("step-000012-g3.tmp", None),
        ("COMMITTED", None),
    ],
)
def test_only_checkpoint_folders_are_read_as_checkpoints(name, folder):
    assert parse_step_folder(name) == folder


def test_checkpoint_folders_sort_by_step_then_generation():
    names = ["step-000010-g2", "step-000002-g9", "step-000010-g1", "step-000010"]
    newest_last = sorted(parse_step_folder(name) for name in names)
    assert [f.name for f in newest_last] == [
        "step-000002-g9",
        "step-000010",
        "step-000010-g1",
        "step-000010-g2",
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"FTJOB_RESTART_ID": "k8s-abc", "SLURM_JOB_ID": "7"}, "k8s-abc"),
        ({"SLURM_JOB_ID": "7"}, "slurm-7"),
        ({}, None),
    ],
)
def test_the_restart_id_is_the_scheduler_jobs(environ, expected):
    assert restart_id(environ) == expected


def test_scheduler_tags_name_the_slurm_and_kubernetes_job():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "6", "SLURM_ARRAY_TASK_ID": "1", "HOME": "/h"}
    assert scheduler_tags(slurm) == {
        "slurm.job_id": "7",
        "slurm.array_job_id": "6",
        "slurm.array_task_id": "1",
    }
    pod = {
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "JOB_NAME": "ft",
        "KUBERNETES_NAMESPACE": "ml",
        "HOSTNAME": "p",
    }
    assert scheduler_tags(pod) == {"k8s.job_name": "ft", "k8s.namespace": "ml", "k8s.pod": "p"}
    assert scheduler_tags({"JOB_NAME": "outside a pod"}) == {}


def test_a_restart_is_recorded_once_per_scheduler_job(tmp_path):
    output = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    assert restart_pending(output, "slurm-7")
    record_restart(output, "slurm-7")
    assert json.loads((tmp_path / "out" / "restart.json").read_text()) == {"restart_id": "slurm-7"}
    assert not restart_pending(output, "slurm-7")  # the requeued job resumes
    assert restart_pending(output, "slurm-8")
    assert restart_pending(output, None)  # a plain shell restarts every time
