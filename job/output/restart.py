"""`ftjob run --restart`: start over, once per scheduler job.

A scheduler that requeues a job runs the same command again, `--restart` included: a preempted
restarted run would then throw its checkpoints away on every requeue. So a restart is recorded under
output.uri with the id of the job that asked for it (`FTJOB_RESTART_ID`, else Slurm's job id), and a
run with the same id resumes instead of restarting again. Without such an id (a plain shell), every
`--restart` starts over.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from job.spec import Spec
from job.storage import filesystem, join

log = logging.getLogger(__name__)
RESTART_RECORD = "restart.json"


def restart_id(environ: Mapping[str, str]) -> str | None:
    """The id of the scheduler job this process belongs to, the same across its requeues."""
    if environ.get("FTJOB_RESTART_ID"):
        return environ["FTJOB_RESTART_ID"]
    if environ.get("SLURM_JOB_ID"):
        return f"slurm-{environ['SLURM_JOB_ID']}"
    return None


def restart_pending(spec: Spec, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `--restart` still has to start over: not when this job already restarted this output."""
    job = restart_id(environ)
    if job is None:
        return True
    fs, path = filesystem(join(spec.output_uri, RESTART_RECORD))
    try:
        done = json.loads(fs.cat_file(path)).get("restart_id")
    except FileNotFoundError:
        return True
    except ValueError:  # a damaged record: restarting once more loses nothing this job trained
        return True
    if done == job:
        log.info("--restart: job %s already restarted %s; resuming instead", job, spec.output_uri)
        return False
    return True


def record_restart(spec: Spec, environ: Mapping[str, str] = os.environ) -> None:
    """Written once the old outputs are gone: later runs of this job resume."""
    job = restart_id(environ)
    if job is None:
        return
    fs, path = filesystem(join(spec.output_uri, RESTART_RECORD))
    with fs.open(path, "w") as f:
        f.write(json.dumps({"restart_id": job}) + "\n")
