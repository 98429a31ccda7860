"""Where this node stands in the job: the one place that reads the scheduler's environment.

`node_placement(environ)` turns the environment of a plain shell, a Slurm step or a Kubernetes
Indexed Job into (nodes, this node's rank, the rendezvous address and port). Pure functions of a
mapping, so each scheduler's case is tested without it. `ftjob run --nproc-per-node` starts the
processes of one node with torch's elastic launcher from this placement; inside each process torch's
own variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are what accelerate reads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from job.errors import UserError

DEFAULT_PORT = 29500
SLURM_PORT_BASE = 20000  # Slurm jobs on one node pick ports apart: base + job id % SLURM_PORT_SPAN
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class Placement:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # where it came from, for messages: "plain", "slurm", "kubernetes", "arguments"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise UserError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_placement(environ: Mapping[str, str]) -> Placement:
    """One task per node (the sbatch script and `ftjob launch slurm` ask for that): the node's rank is
    SLURM_NODEID; rank 0 runs on the first host of the allocation; the port follows the job id."""
    nnodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    node_rank = int(environ.get("SLURM_NODEID") or 0)
    port = environ.get("MASTER_PORT") or SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
    master = environ.get("MASTER_ADDR") or (
        first_host(environ["SLURM_JOB_NODELIST"]) if nnodes > 1 else "127.0.0.1"
    )
    return Placement(nnodes, node_rank, master, int(port), "slurm")


def kubernetes_placement(environ: Mapping[str, str]) -> Placement:
    """An Indexed Job: the pod's index is its node rank; NNODES, and MASTER_ADDR (the DNS name of
    pod 0 under the Job's headless Service) come from the manifest."""
    nnodes = int(environ.get("NNODES", 1))
    master = environ.get("MASTER_ADDR")
    if nnodes > 1 and not master:
        raise UserError(
            f"a Kubernetes Indexed Job of {nnodes} pods needs MASTER_ADDR (pod 0's name under the Job's "
            "headless Service, e.g. $(JOB_NAME)-0.ftjob): without it each pod would train alone"
        )
    port = int(environ.get("MASTER_PORT", DEFAULT_PORT))
    node_rank = int(environ.get("NODE_RANK") or environ["JOB_COMPLETION_INDEX"])
    return Placement(nnodes, node_rank, master or "127.0.0.1", port, "kubernetes")


ARGUMENT_VARIABLES = {
    "nnodes": "NNODES",
    "node_rank": "NODE_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}


def node_placement(environ: Mapping[str, str], given: Mapping[str, Any] | None = None) -> Placement:
    """This node's placement from the environment, with `given` (the command line's nnodes,
    node_rank, master_addr, master_port; None for not given) laid over it before it is checked. A
    multi-node job that cannot be placed is exit 2, never N single-node runs racing on one output."""
    given = {key: value for key, value in (given or {}).items() if value is not None}
    try:
        if environ.get("SLURM_JOB_ID") and environ.get("SLURM_NODEID") is not None:
            placement = dataclasses.replace(slurm_placement(environ), **given)
        else:  # Kubernetes and plain shells read the variables the arguments stand for
            variables = {ARGUMENT_VARIABLES[key]: str(value) for key, value in given.items()}
            placement = _placement({**environ, **variables})
    except ValueError as e:  # a variable that should hold a number
        raise UserError(f"cannot place this node: {e}") from None
    if not 0 <= placement.node_rank < placement.nnodes:
        raise UserError(f"node rank {placement.node_rank} is not one of the {placement.nnodes} nodes")
    return placement


def _placement(environ: Mapping[str, str]) -> Placement:
    if environ.get("JOB_COMPLETION_INDEX") is not None:
        return kubernetes_placement(environ)
    nnodes = int(environ.get("NNODES", 1))
    if nnodes > 1:
        missing = [name for name in ("NODE_RANK", "MASTER_ADDR") if not environ.get(name)]
        if missing:
            raise UserError(
                f"NNODES={nnodes} but {', '.join(missing)} not set: pass --node-rank and --master-addr "
                "(or run under Slurm or a Kubernetes Indexed Job)"
            )
    return Placement(
        nnodes,
        int(environ.get("NODE_RANK", 0)),
        environ.get("MASTER_ADDR", "127.0.0.1"),
        int(environ.get("MASTER_PORT", DEFAULT_PORT)),
        "plain",
    )
