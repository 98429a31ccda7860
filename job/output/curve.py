"""The metric curve under output.uri, out of the checkpoints.

While a run trains, each checkpoint appends one segment, metrics/NNNNNN.jsonl: a JSON line for every
step since the previous checkpoint, NNNNNN being the checkpoint's step. Segments are never rewritten,
so a checkpoint costs the new steps only, however long the run. A resumed run reads the segments up to
its checkpoint's step; a segment past it (its checkpoint never committed) is removed. The published
run leaves the whole curve in metrics.jsonl, one line a step (written before the adapter's MANIFEST),
and the segments go (after it).
"""

from __future__ import annotations

import json
from typing import Any

from job.output.layout import SEGMENT, OutputLayout
from job.storage import filesystem


def to_lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def segment_steps(output_uri: str) -> list[int]:
    fs, root = filesystem(OutputLayout(output_uri).segments)
    if not fs.exists(root):
        return []
    return sorted(int(m.group(1)) for p in fs.ls(root, detail=False) if (m := SEGMENT.search(p)))


def read_lines(uri: str) -> list[dict[str, Any]]:
    fs, path = filesystem(uri)
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line]


def read_history(output_uri: str, up_to: int) -> list[dict[str, Any]]:
    """The steps up to `up_to`, from the segments of the checkpoints up to it (they are removed only
    once the run is published)."""
    steps = [step for step in segment_steps(output_uri) if step <= up_to]
    history = [record for step in steps for record in read_lines(OutputLayout(output_uri).segment(step))]
    return [record for record in history if record["step"] <= up_to]


def remove_segments_after(output_uri: str, step: int) -> None:
    for later in (s for s in segment_steps(output_uri) if s > step):
        fs, path = filesystem(OutputLayout(output_uri).segment(later))
        fs.rm(path)


def write_curve(output_uri: str, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, the whole curve (written before the adapter is published: a published run has it)."""
    fs, path = filesystem(OutputLayout(output_uri).curve)
    fs.pipe_file(path, to_lines(history).encode())


def remove_segments(output_uri: str) -> None:
    """The segments metrics.jsonl replaces (once the adapter is published: until then a run resumes)."""
    fs, root = filesystem(OutputLayout(output_uri).segments)
    if fs.exists(root):
        fs.rm(root, recursive=True)
