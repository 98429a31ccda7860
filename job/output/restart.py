"""`ftjob run --restart`: start over, once per scheduler job.

A scheduler that requeues a job runs the same command again, `--restart` included: a preempted
restarted run would then throw its checkpoints away on every requeue. So a restart is recorded under
output.uri with the id of the job that asked for it (job/cluster.py: restart_id), and a run with the
same id resumes instead of restarting again. Without such an id (a plain shell), every `--restart`
starts over.
"""

from __future__ import annotations

import json
import logging

from job.output.layout import OutputLayout
from job.storage import filesystem

log = logging.getLogger(__name__)


def restart_pending(output_uri: str, restart_id: str | None) -> bool:
    """Whether `--restart` still has to start over: not when the scheduler job `restart_id` already
    restarted this output."""
    if restart_id is None:
        return True
    fs, path = filesystem(OutputLayout(output_uri).restart_record)
    try:
        done = json.loads(fs.cat_file(path)).get("restart_id")
    except FileNotFoundError:
        return True
    except ValueError:  # a damaged record: restarting once more loses nothing this job trained
        return True
    if done == restart_id:
        log.info("--restart: job %s already restarted %s; resuming instead", restart_id, output_uri)
        return False
    return True


def record_restart(output_uri: str, restart_id: str | None) -> None:
    """Written once the old outputs are gone: later runs of this job resume."""
    if restart_id is None:
        return
    fs, path = filesystem(OutputLayout(output_uri).restart_record)
    with fs.open(path, "w") as f:
        f.write(json.dumps({"restart_id": restart_id}) + "\n")
