"""`ftjob status OUTPUT_URI`: the lease, the newest committed checkpoint and what is published, read from
files as a job leaves them (and from an S3 store: tests/integration/test_s3_reads.py)."""

from __future__ import annotations

import json
import time

from helpers import ftjob, lease_record, write_lease


def committed(output, step: int, generation: int) -> None:
    folder = output / "checkpoints" / f"step-{step:06d}-g{generation}"
    folder.mkdir(parents=True)
    (folder / "COMMITTED").write_text(f"step {step}, lease generation {generation}\n")


def test_a_running_job_shows_its_holder_newest_commit_and_nothing_published(tmp_path):
    output = tmp_path / "runs" / "r"
    write_lease(output, lease_record(job="slurm-5", generation=2))
    committed(output, 10, 1)
    committed(output, 20, 2)
    (output / "checkpoints" / "step-000030-g2").mkdir()  # being written: no COMMITTED yet

    ran = ftjob("status", str(output))
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[1].startswith("lease       held: host node-7, pid 4242, scheduler job slurm-5, generation 2")
    assert lines[2].startswith("checkpoint  step 20 (generation 2), committed ")
    assert lines[2].endswith(str(output / "checkpoints" / "step-000020-g2"))
    assert lines[3] == "published   nothing yet"

    status = json.loads(ftjob("status", str(output), "--json").stdout)
    assert status["lease"]["state"] == "held" and status["lease"]["job"] == "slurm-5"
    assert status["checkpoint"]["step"] == 20 and status["checkpoint"]["generation"] == 2
    assert abs(status["checkpoint"]["committed_at"] - time.time()) < 60
    assert status["published"] == {"adapter": False, "merged": False}


def test_a_finished_job_released_its_lease_and_published_its_adapter(tmp_path):
    output = tmp_path / "out"
    write_lease(output, lease_record(released=True))
    (output / "adapter").mkdir()
    (output / "adapter" / "MANIFEST.json").write_text("{}")
    status = json.loads(ftjob("status", str(output), "--json").stdout)
    assert status["lease"]["state"] == "released" and status["checkpoint"] is None
    assert status["published"] == {"adapter": True, "merged": False}
    assert ftjob("status", str(output)).stdout.splitlines()[3] == "published   adapter"


def test_a_lease_past_its_expiry_is_shown_expired(tmp_path):
    output = tmp_path / "out"
    write_lease(output, lease_record(renewed_at=time.time() - 90, expires_at=time.time() - 30))
    assert json.loads(ftjob("status", str(output), "--json").stdout)["lease"]["state"] == "expired"
    assert "lease       expired: host node-7" in ftjob("status", str(output)).stdout


def test_an_empty_output_says_so_and_a_damaged_lease_is_exit_2_naming_it(tmp_path):
    ran = ftjob("status", str(tmp_path / "nothing"))
    assert ran.returncode == 0
    assert ran.stdout.splitlines()[1:] == [
        "lease       none (no job has written here, or none since --restart)",
        "checkpoint  none committed",
        "published   nothing yet",
    ]
    write_lease(tmp_path / "bad", '{"owner": 1}')
    ran = ftjob("status", str(tmp_path / "bad"))
    assert ran.returncode == 2 and f"{tmp_path / 'bad' / 'lease.json'} is damaged" in ran.stderr
