"""`ftjob status` of an output.uri on S3 (moto over HTTP): the same answers as for local files, commit
times from the store's LastModified."""

from __future__ import annotations

import json
import time

from helpers import ftjob, lease_record


def test_the_status_of_an_output_on_s3(s3):
    out = f"{s3.bucket}/runs/r"
    s3.pipe(f"{out}/lease.json", json.dumps(lease_record(job="k8s-uid", generation=3)).encode())
    s3.pipe(f"{out}/checkpoints/step-000008-g3/COMMITTED", b"step 8, lease generation 3\n")
    s3.pipe(f"{out}/checkpoints/step-000008-g3/run.json", b"{}")
    s3.pipe(f"{out}/checkpoints/step-000012-g3/run.json", b"{}")  # not committed
    s3.pipe(f"{out}/adapter/MANIFEST.json", b"{}")

    ran = ftjob("status", f"s3://{out}", "--json")
    assert ran.returncode == 0, ran.stderr
    status = json.loads(ran.stdout)
    assert status["lease"]["state"] == "held" and status["lease"]["job"] == "k8s-uid"
    assert status["checkpoint"]["step"] == 8 and status["checkpoint"]["uri"].startswith("s3://")
    assert abs(status["checkpoint"]["committed_at"] - time.time()) < 120
    assert status["published"] == {"adapter": True, "merged": False}
