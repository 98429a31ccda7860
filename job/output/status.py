"""`ftjob status OUTPUT_URI`: what a scheduler or a person needs to know of one output.uri, read without
taking anything: who holds its lease, the newest committed checkpoint, and what is published."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from job.output.checkpoint import committed_checkpoints
from job.output.layout import COMMITTED, PUBLISHED, OutputLayout
from job.output.lease import clock, holder, read_lease
from job.output.publish import is_published
from job.storage import filesystem, join, storage_errors


def output_status(output_uri: str, now: float | None = None) -> dict[str, Any]:
    """The lease (its record and its state: held, expired or released), the newest committed checkpoint
    (step, lease generation, URI, when it was committed) and each published folder, as JSON-ready data.
    Times are seconds since the epoch; the lease's are its holder's clock."""
    now = time.time() if now is None else now
    with storage_errors(f"cannot read {output_uri}"):
        lease = read_lease(output_uri)
        committed = committed_checkpoints(output_uri)
        published = {name: is_published(output_uri, name) for name in PUBLISHED}
        checkpoint = None
        if committed:
            newest = committed[-1]
            uri = OutputLayout(output_uri).checkpoint(newest)
            checkpoint = {
                "step": newest.step,
                "generation": newest.generation,
                "uri": uri,
                "committed_at": modified_at(join(uri, COMMITTED)),
            }
    if lease is not None:
        lease = {**lease, "state": lease_state(lease, now)}
    return {"output_uri": output_uri, "lease": lease, "checkpoint": checkpoint, "published": published}


def lease_state(record: dict[str, Any], now: float) -> str:
    if record["released"]:
        return "released"
    return "held" if record["expires_at"] > now else "expired"


def modified_at(uri: str) -> float | None:
    """When the file at uri was last written, as the store says (seconds since the epoch), if it says."""
    fs, path = filesystem(uri)
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return float(stamp) if isinstance(stamp, int | float) else None


def status_text(status: dict[str, Any], now: float | None = None) -> str:
    """The status as lines for a person."""
    now = time.time() if now is None else now
    lines = [f"output      {status['output_uri']}"]
    lease = status["lease"]
    if lease is None:
        lines.append("lease       none (no job has written here, or none since --restart)")
    elif lease["state"] == "released":
        lines.append(f"lease       released by {holder(lease)} (generation {lease['generation']})")
    else:
        lines.append(
            f"lease       {lease['state']}: {holder(lease)}, generation {lease['generation']}; renewed "
            f"{ago(now - lease['renewed_at'])}, {'expires' if lease['state'] == 'held' else 'expired'} "
            f"{clock(lease['expires_at'])} (the holder's clock)"
        )
    checkpoint = status["checkpoint"]
    if checkpoint is None:
        lines.append("checkpoint  none committed")
    else:
        when = checkpoint["committed_at"]
        lines.append(
            f"checkpoint  step {checkpoint['step']} (generation {checkpoint['generation']}), committed "
            f"{ago(now - when) if when is not None else 'at a time the store does not say'}: {checkpoint['uri']}"
        )
    done = [name for name, there in status["published"].items() if there]
    lines.append(f"published   {', '.join(done) if done else 'nothing yet'}")
    return "\n".join(lines)


def ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future by this host's clock"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
