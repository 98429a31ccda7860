"""Where this node stands in the job: the one place that reads the scheduler's environment.

`node_placement(environ)` turns the environment of a plain shell, a Slurm step or a Kubernetes
Indexed Job into (nodes, this node's rank, the rendezvous address and port). Pure functions of a
mapping, so each scheduler's case is tested without it. `ftjob run --nproc-per-node` starts the
processes of one node with torch's elastic launcher from this placement; inside each process torch's
own variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are what accelerate reads, and
`check_process_group_variables(environ)` refuses them when no launcher can have set them.

The environment is input like the spec: it may hold what a login shell exported for another job.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from job.errors import UserError

log = logging.getLogger(__name__)

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


def first_host(nodelist: str, variable: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[07-09,12],cpu1' -> 'gpu07'. `variable`: where the
    hostlist came from, for the message."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise UserError(f"{variable}: cannot read a host from {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def is_loopback(host: str) -> bool:
    """Whether host names, on every node, that node itself: localhost, 127.0.0.0/8, ::1 (or 0.0.0.0)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:  # a host name
        return False
    return address.is_loopback or address.is_unspecified


# A job step may run on fewer nodes than the job was given (`srun -N1` in a 2-node allocation), and its
# SLURM_NODEID counts the step's nodes: the step's variables come first.
SLURM_NODE_COUNTS = ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")


def first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, value) of the first of names that is set (not empty) in environ, or None."""
    return next(((name, environ[name]) for name in names if environ.get(name)), None)


def slurm_placement(environ: Mapping[str, str]) -> Placement:
    """One task per node (the sbatch script and `ftjob launch slurm` ask for that): the node's rank is
    SLURM_NODEID; rank 0 runs on the first host of the step; the port follows the job id."""
    count = first_set(environ, SLURM_NODE_COUNTS)
    nnodes = int(count[1]) if count else 1
    node_rank = int(environ.get("SLURM_NODEID") or 0)
    port = environ.get("MASTER_PORT") or SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
    return Placement(nnodes, node_rank, slurm_master(environ, nnodes), int(port), "slurm")


def slurm_master(environ: Mapping[str, str], nnodes: int) -> str:
    """MASTER_ADDR, else the first host of the step; with several nodes not a loopback MASTER_ADDR:
    sbatch passes on the submitting shell's environment, where it meant that shell's host; on each
    node it means that node, and no node would find rank 0."""
    master = environ.get("MASTER_ADDR")
    if nnodes == 1:
        return master or "127.0.0.1"
    if master and not is_loopback(master):
        return master
    nodelist = first_set(environ, SLURM_NODELISTS)
    if nodelist is None:
        raise UserError(
            f"a Slurm step of {nnodes} nodes without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: set "
            "MASTER_ADDR to the host of node 0"
        )
    variable, hosts = nodelist
    host = first_host(hosts, variable)
    if master:
        log.warning(
            "MASTER_ADDR=%s names each node itself in a Slurm step of %d nodes (left over from the "
            "shell that submitted the job?); ignored: rank 0 is %s, the first host of %s",
            master,
            nnodes,
            host,
            variable,
        )
    return host


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


# What torch's env:// rendezvous reads in each process of a process group. Every launcher sets all of
# them: torchrun and `ftjob run --nproc-per-node` (torch's elastic launcher), accelerate launch, a
# scheduler that starts one process per task.
PROCESS_GROUP_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ProcessGroup(NamedTuple):
    """This process's place in the process group a launcher started, and where its ranks meet."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def check_process_group_variables(environ: Mapping[str, str]) -> ProcessGroup | None:
    """For `ftjob run` without --nproc-per-node, before the Accelerator is made: accelerate makes a
    process group from WORLD_SIZE > 1 or from LOCAL_RANK alone, and its rank 0 waits
    train.collective_timeout_seconds for processes that no launcher started. Such variables without
    the others (left in the environment by a shell or a job script) or out of range are exit 2.
    MASTER_ADDR and MASTER_PORT alone ask for no process group and are left alone, as accelerate does.
    Returns the process group the variables describe; None for one process."""
    world_size = integer_variable(environ, "WORLD_SIZE", default=1)
    if world_size < 1:
        raise UserError(f"WORLD_SIZE={world_size}: a number of processes, 1 or more")
    if world_size == 1 and "LOCAL_RANK" not in environ:
        return None
    missing = [name for name in PROCESS_GROUP_VARIABLES if not environ.get(name)]
    if missing:
        present = [name for name in PROCESS_GROUP_VARIABLES if name in environ]
        raise UserError(
            f"{', '.join(f'{name}={environ[name]}' for name in present)} set, but {', '.join(missing)} "
            f"not: no launcher started this process (one sets all of {', '.join(PROCESS_GROUP_VARIABLES)}), "
            f"so nothing would join its process group. Unset {', '.join(present)} to train in one process "
            "(left over from the shell?), or start the processes with `ftjob run --nproc-per-node N`"
        )
    rank = integer_variable(environ, "RANK")
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is not one of the WORLD_SIZE={world_size} ranks")
    local_world_size = integer_variable(environ, "LOCAL_WORLD_SIZE", default=world_size)
    local_rank = integer_variable(environ, "LOCAL_RANK")
    if not 0 <= local_rank < local_world_size:
        raise UserError(
            f"LOCAL_RANK={local_rank} is not one of this node's {local_world_size} ranks (LOCAL_WORLD_SIZE)"
        )
    port = integer_variable(environ, "MASTER_PORT")
    if not 0 < port < 65536:
        raise UserError(f"MASTER_PORT={port} is not a port (1 to 65535)")
    return ProcessGroup(rank, world_size, environ["MASTER_ADDR"], port)


def cpu_threads(environ: Mapping[str, str], affinity: int, quota: float | None) -> tuple[int, str]:
    """Threads for torch in this process, and why: OMP_NUM_THREADS when set (the user's choice); else the
    CPUs this process was given (the fewest of its CPU affinity, the cgroup's quota and Slurm's
    SLURM_CPUS_PER_TASK), shared among this node's processes (LOCAL_WORLD_SIZE). A pod limited to 4 of
    64 cores, or a Slurm task sharing a node, would otherwise run a thread on every visible core."""
    if "OMP_NUM_THREADS" in environ:
        threads = integer_variable(environ, "OMP_NUM_THREADS")
        if threads < 1:
            raise UserError(f"OMP_NUM_THREADS={threads}: a number of threads, 1 or more")
        return threads, "OMP_NUM_THREADS"
    limits = {"CPU affinity": affinity}
    if quota is not None:
        limits["the cgroup's CPU quota"] = max(1, int(quota))
    if "SLURM_CPUS_PER_TASK" in environ:
        limits["SLURM_CPUS_PER_TASK"] = max(1, integer_variable(environ, "SLURM_CPUS_PER_TASK"))
    source = min(limits, key=limits.get)
    processes = max(1, integer_variable(environ, "LOCAL_WORLD_SIZE", default=1))
    threads = max(1, limits[source] // processes)
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return threads, f"{limits[source]} CPUs from {source}{shared}"


def integer_variable(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """The integer in environ[name] (default when unset); anything else is exit 2 naming the variable."""
    text = environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise UserError(f"{name}={text!r} is not an integer") from None


def restart_id(environ: Mapping[str, str]) -> str | None:
    """The id of the scheduler job this process belongs to, the same across its requeues
    (FTJOB_RESTART_ID, else Slurm's job id); None in a plain shell."""
    if environ.get("FTJOB_RESTART_ID"):
        return environ["FTJOB_RESTART_ID"]
    if environ.get("SLURM_JOB_ID"):
        return f"slurm-{environ['SLURM_JOB_ID']}"
    return None


def scheduler_tags(environ: Mapping[str, str]) -> dict[str, str]:
    """The Slurm and Kubernetes ids of this job, as tracking tags."""
    from_env = {
        "slurm.job_id": "SLURM_JOB_ID",
        "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
        "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
    }
    if environ.get("KUBERNETES_SERVICE_HOST"):  # inside a pod; the manifest passes JOB_NAME and POD_NAMESPACE
        namespace = "POD_NAMESPACE" if environ.get("POD_NAMESPACE") else "KUBERNETES_NAMESPACE"
        from_env |= {"k8s.job_name": "JOB_NAME", "k8s.namespace": namespace, "k8s.pod": "HOSTNAME"}
    return {tag: environ[name] for tag, name in from_env.items() if environ.get(name)}
