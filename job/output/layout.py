"""Every path under output.uri, named in one place.

<output.uri>/
    lease.json                      the one writer's lease (job/output/lease.py)
    restart.json                    the scheduler job that last restarted this output (restart.py)
    report.json                     what the job cost, over its attempts (report.py)
    checkpoints/
        step-NNNNNN-gG/             step NNNNNN, written under lease generation G (checkpoint.py)
            trainable.safetensors   (train.distributed ddp)
            shard-NNNNN.safetensors one a rank (train.distributed fsdp: sharded.py)
            optimizer.pt
            run.json
            rank-NNNNN.json         one a rank
            MANIFEST.json           (manifest.py)
            COMMITTED               written last
    metrics/NNNNNN.jsonl            the metric curve, a segment a checkpoint (curve.py)
    metrics.jsonl                   the whole curve, once published
    adapter/                        published (publish.py): the trained files, spec.json,
    merged/                         metrics.json, MANIFEST.json written last
    .ftjob-write-check-<hex>        the write probe (job/storage.py: check_writable), deleted at once
"""

from __future__ import annotations

import re
from typing import NamedTuple

from job.storage import join

LEASE = "lease.json"
RESTART_RECORD = "restart.json"
REPORT = "report.json"
COMMITTED = "COMMITTED"
MANIFEST = "MANIFEST.json"
WEIGHTS = "trainable.safetensors"
STATES = "optimizer.pt"
RUN_RECORD = "run.json"
CURVE = "metrics.jsonl"
PUBLISHED = ("adapter", "merged")
STEP_DIR = re.compile(r"step-(\d+)(?:-g(\d+))?")
SHARD = re.compile(r"shard-(\d{5})\.safetensors")
SEGMENT = re.compile(r"(\d{6})\.jsonl$")


class StepFolder(NamedTuple):
    """A checkpoint's folder under checkpoints/; sorts oldest first."""

    step: int
    generation: int  # of the lease that wrote it; 0 for a folder from before generations
    name: str


def step_folder(step: int, generation: int) -> StepFolder:
    return StepFolder(step, generation, f"step-{step:06d}-g{generation}")


def parse_step_folder(name: str) -> StepFolder | None:
    """The checkpoint folder a name under checkpoints/ is; None for anything else."""
    if match := STEP_DIR.fullmatch(name):
        return StepFolder(int(match.group(1)), int(match.group(2) or 0), name)
    return None


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def read_by(rank: int, name: str) -> bool:
    """Whether rank reads a checkpoint's file `name`: every file but the other ranks' shards."""
    shard = SHARD.fullmatch(name)
    return shard is None or int(shard.group(1)) == rank


def segment_file(step: int) -> str:
    return f"{step:06d}.jsonl"


class OutputLayout:
    """The URIs of what lives under one output.uri."""

    def __init__(self, output_uri: str):
        self.uri = output_uri

    @property
    def lease(self) -> str:
        return join(self.uri, LEASE)

    @property
    def restart_record(self) -> str:
        return join(self.uri, RESTART_RECORD)

    @property
    def report(self) -> str:
        return join(self.uri, REPORT)

    @property
    def checkpoints(self) -> str:
        return join(self.uri, "checkpoints")

    def checkpoint(self, folder: StepFolder) -> str:
        return join(self.checkpoints, folder.name)

    @property
    def segments(self) -> str:
        return join(self.uri, "metrics")

    def segment(self, step: int) -> str:
        return join(self.segments, segment_file(step))

    @property
    def curve(self) -> str:
        return join(self.uri, CURVE)

    def published(self, name: str) -> str:
        """adapter/ or merged/."""
        return join(self.uri, name)
