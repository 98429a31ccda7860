"""How a run takes over output.uri: claim, load the model, settle, then resume or restart.

setup() calls a Takeover's methods in this order, and the order is what keeps other jobs' outputs and
this job's own earlier work safe:

1. claim(): rank 0 probes that output.uri is writable and claims its lease (job/output/lease.py),
   refused at once where another job holds it. Nothing else is written yet.
2. The model loads (setup's work): it writes nothing under output.uri, so the claim settles meanwhile.
3. settle(): the lease is held from here on, and only from here is anything written or deleted:
   uncommitted checkpoints (an interrupted upload's leftovers) go, then the newest committed checkpoint
   is loaded and checked (neither on a restart). resume_data() hands its data cursor to the pipeline.
4. stop_if_agreed(), between the phases that can take long (the model load, the counting pass): a stop
   on any rank ends every rank at the same point, so that no rank waits in a collective for another.
5. clear_if_restart(): a restart deletes the old checkpoints and published outputs only now that the
   model and adapter loaded: a spec that cannot train loses nothing.
6. restore(): weights, optimizer, schedule and RNG states once the optimizer exists.

The Takeover holds the lease for the whole run (as a context manager it releases it however the run
ends) and the checkpointer that writes under it.
"""

from __future__ import annotations

import logging
from typing import Any

from job.errors import Preempted
from job.model.source import resolve_model_dir
from job.output.checkpoint import Checkpointer, remove_all, remove_uncommitted
from job.output.layout import rank_file
from job.output.lease import Lease
from job.output.publish import is_published, publish_merged, remove_published
from job.output.restart import record_restart, restart_pending
from job.rng import set_rng_states
from job.signals import StopRequest
from job.spec import ModelSpec
from job.storage import check_writable, join, storage_errors

log = logging.getLogger(__name__)


class Takeover:
    """output.uri's lease, its checkpointer and what the run resumes from (`saved`; None for a fresh
    start or a restart)."""

    def __init__(
        self, output_uri: str, lease: Lease, keep: int, accelerator, restart: bool, restart_id: str | None
    ):
        self.output_uri = output_uri
        self.lease = lease
        self.accelerator = accelerator
        self.restart = restart
        self.restart_id = restart_id
        rank, world = accelerator.process_index, accelerator.num_processes
        self.checkpointer = Checkpointer(output_uri, rank, world, keep, lease)
        self.saved: dict[str, Any] | None = None
        self.rank_state: dict[str, Any] | None = None

    def __enter__(self) -> Takeover:
        return self

    def __exit__(self, *exc) -> None:
        self.lease.release()

    def claim(self, stop: StopRequest) -> None:
        if self.accelerator.is_main_process:
            check_writable(self.output_uri)
        self.lease.acquire(self.accelerator, stop)

    def settle(self, fingerprint: dict[str, Any]) -> None:
        """Hold the lease; unless restarting, clear the uncommitted checkpoints and load the newest one
        whose fingerprint matches (UserError for one of another spec or model)."""
        self.lease.settle(self.accelerator)
        if self.restart:
            return
        if self.accelerator.is_main_process:
            remove_uncommitted(self.output_uri)
        self.accelerator.wait_for_everyone()
        self.saved = self.checkpointer.load_latest(fingerprint, self.accelerator)
        if self.saved:
            self.rank_state = self.checkpointer.rank_state(self.saved)

    def resume_data(self, data) -> None:
        """The files and the cursor the run was reading, before the counting pass reads them: checked as
        input (exit 2 before a row is read)."""
        if self.rank_state:
            cursor = f"the data cursor in {join(self.saved['uri'], rank_file(self.checkpointer.rank))}"
            data.load_state_dict(self.rank_state["data"], cursor)

    def stop_if_agreed(self, stop: StopRequest) -> None:
        stop.raise_if_agreed(self.accelerator, self.saved)

    def clear_if_restart(self) -> None:
        if not self.restart:
            return
        if self.accelerator.is_main_process:
            remove_published(self.output_uri)
            remove_all(self.output_uri)
            record_restart(self.output_uri, self.restart_id)
        self.accelerator.wait_for_everyone()

    def restore(self, model, optimizer, scheduler) -> tuple[int, list[dict[str, float]]]:
        """Continue exactly where the checkpoint left off (weights, optimizer, data, RNG): the first step
        to train and the metric history so far."""
        if not self.saved:
            return 1, []
        self.checkpointer.restore(self.saved, model, optimizer, scheduler, self.accelerator)
        set_rng_states(self.rank_state["rng"])
        log.info("resuming from the checkpoint at step %d", self.saved["step"])
        return self.saved["step"] + 1, self.saved["history"] or [self.saved["last_metrics"]]

    def stop_for_requeue(self, stop: StopRequest, step: int) -> Preempted:
        """Every rank exits 75 only once the checkpoint of `step` is committed and rank 0 has released
        the lease for the requeued job: a launcher that sees one worker exit stops the others."""
        self.checkpointer.wait_committed(self.accelerator)
        if self.accelerator.is_main_process:
            self.lease.release()
        self.accelerator.wait_for_everyone()
        return stop.committed_at(step)

    @property
    def run_id(self) -> Any:
        """The MLflow run id the checkpoint recorded, checked by the tracker before it continues it."""
        return self.saved.get("run_id") if self.saved else None


def restart_decision(output_uri: str, restart: bool, restart_id: str | None) -> tuple[bool, bool]:
    """Whether the run starts over (`--restart`, once per scheduler job: a requeued restart resumes), and
    whether its adapter is published already (nothing to train)."""
    with storage_errors(f"output.uri {output_uri}"):
        restart = restart and restart_pending(output_uri, restart_id)
        return restart, not restart and is_published(output_uri)


def merge_published(output_uri: str, lease: Lease, model: ModelSpec, stop: StopRequest) -> None:
    """Rank 0 of a run whose adapter is published and merged/ is not: merge it, under the lease like
    any other writer."""
    if is_published(output_uri, "merged"):
        return
    with lease:
        lease.take(stop)
        merged_uri = publish_merged(output_uri, model, resolve_model_dir(model))
        log.info("merged model published to %s", merged_uri)
