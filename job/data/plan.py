"""Which files a run reads: data.train's sources and the eval files, and each rank's share of them.
Made once by rank 0 and followed by every rank, then saved with the data cursor (job/data/cursor.py)."""

from __future__ import annotations

from dataclasses import dataclass

from job.data.files import expand, file_sizes
from job.data.stream import file_shares
from job.errors import JobError
from job.spec import DataSpec


def source_entries(data: DataSpec) -> list[tuple[str, list[str], float]]:
    """data.train as the plan's sources, each as (its spec field, its URLs and globs, its weight): one
    source of every entry, or one per entry when weighted."""
    groups = data.train_groups()
    if not data.weighted:
        return [("data.train", [p for patterns, _ in groups for p in patterns], 1.0)]
    return [(f"data.train[{i}]", patterns, weight) for i, (patterns, weight) in enumerate(groups)]


def train_sources(data: DataSpec) -> list[tuple[list[str], float]]:
    """data.train as (files, weight) sources: one source of every file, or one per entry when weighted."""
    return [(expand(patterns, name), weight) for name, patterns, weight in source_entries(data)]


@dataclass
class DataPlan:
    """Which files the run reads, made once (by rank 0) and followed by every rank, then saved with
    the cursor so that a resumed run reads the same files even where a glob or a dataset repo names
    other files by then: data.train's sources as (files, weight), the eval files, and for each source
    every rank's share of whole files (None where ranks stripe its rows)."""

    sources: list[tuple[list[str], float]]
    eval_files: list[str]
    layout: list[list[list[str]] | None]

    @staticmethod
    def make(config: DataSpec, world_size: int) -> DataPlan:
        sources = train_sources(config)
        if config.eval_fraction:
            eval_files = [f for files, _ in sources for f in files]
        else:
            eval_files = expand(config.eval, "data.eval")
        layout = []
        for files, _ in sources:
            sized = file_sizes(files) if len(files) >= world_size > 1 else None
            layout.append(file_shares(sized, world_size) if sized else None)
        return DataPlan(sources, eval_files, layout)

    def rank_files(self, rank: int) -> list[tuple[list[str], bool]]:
        """For each source: (the files `rank` reads, whether it keeps only its stripe of their rows)."""
        return [
            (files, True) if shares is None else (shares[rank], False)
            for (files, _), shares in zip(self.sources, self.layout, strict=True)
        ]


def shared_plan(config: DataSpec, accelerator) -> DataPlan:
    """Rank 0's plan, on every rank (each rank resolving globs and repos itself could see other files,
    or other sizes); an input error there is raised on every rank, not only on rank 0."""
    from accelerate.utils import broadcast_object_list

    plan: DataPlan | JobError | None = None
    if accelerator.is_main_process:
        try:
            plan = DataPlan.make(config, accelerator.num_processes)
        except JobError as e:
            plan = e
    if accelerator.num_processes > 1:
        plan = broadcast_object_list([plan])[0]
    if isinstance(plan, JobError):
        raise plan
    return plan
