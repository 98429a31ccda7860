"""Several processes, several nodes: job/cluster.py's placement and `ftjob run --nproc-per-node`,
with real processes, real signals and a slow object store."""

from __future__ import annotations

import signal

import pytest
from helpers import ftjob, make_spec, write_spec

from job.cluster import Placement, first_host, node_placement
from job.errors import Preempted, UserError
from job.node_workers import exit_code, forwarding_stop_signals
from job.signals import STOP_SIGNALS, StopRequest

# --- placement from the environment (pure) -----------------------------------------------------


def test_a_plain_shell_is_one_node():
    assert node_placement({}) == Placement(1, 0, "127.0.0.1", 29500, "plain")


@pytest.mark.parametrize(
    "nodelist,first",
    [("gpu07", "gpu07"), ("gpu[07-09,12]", "gpu07"), ("gpu[3,5],cpu1", "gpu3"), ("a-b[001-004]", "a-b001")],
)
def test_the_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist, "SLURM_JOB_NODELIST") == first


def test_slurm_places_the_node_by_its_node_id_and_the_job():
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "n[10-13]",
    }
    assert node_placement(env) == Placement(4, 1, "n10", 20000 + 123456 % 20000, "slurm")
    single = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "x"}
    assert node_placement(single).nnodes == 1 and node_placement(single).master_addr == "127.0.0.1"


def test_the_command_lines_placement_is_laid_over_the_environment_then_checked():
    given = {"nnodes": None, "node_rank": 1, "master_addr": "h0", "master_port": None}
    assert node_placement({"NNODES": "2"}, given) == Placement(2, 1, "h0", 29500, "plain")
    with pytest.raises(UserError, match="MASTER_ADDR not set"):
        node_placement({}, {"nnodes": 2, "node_rank": 1})
    slurm = {
        "SLURM_JOB_ID": "9",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "a[1-2]",
    }
    stale = {**slurm, "NNODES": "4", "NODE_RANK": "0"}  # sbatch exports the submitting shell's variables
    assert node_placement(stale) == Placement(2, 1, "a1", 20009, "slurm")
    assert node_placement({**slurm, "MASTER_PORT": "3000"}, {"master_port": 3001}).master_port == 3001
    with pytest.raises(UserError, match="cannot place this node"):
        node_placement({"NNODES": "two"})


def test_a_kubernetes_indexed_job_places_the_pod_by_its_index():
    env = {"JOB_COMPLETION_INDEX": "2", "NNODES": "3", "MASTER_ADDR": "train-0.ftjob", "MASTER_PORT": "29501"}
    assert node_placement(env) == Placement(3, 2, "train-0.ftjob", 29501, "kubernetes")


@pytest.mark.parametrize(
    "env,missing",
    [
        ({"JOB_COMPLETION_INDEX": "1", "NNODES": "2"}, "needs MASTER_ADDR"),
        ({"NNODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK not set"),
        ({"NNODES": "2"}, "NODE_RANK, MASTER_ADDR not set"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "node rank 2 is not one of the 2 nodes"),
    ],
)
def test_a_multi_node_job_that_cannot_be_placed_is_a_user_error(env, missing):
    with pytest.raises(UserError, match=missing):
        node_placement(env)


@pytest.mark.parametrize(
    "codes,expected",
    [
        ({0: 75, 1: 75}, 75),
        ({1: 75}, 75),
        ({0: 75, 1: -15}, 75),  # the launcher stops the other worker as it exits after the checkpoint
        ({0: 1, 1: 75}, 1),
        ({0: 1, 1: 3}, 3),  # rank 1's bad data, not rank 0's failure that followed
        ({0: 3}, 3),
        ({0: -9}, 137),
        ({1: 2}, 2),
        ({0: 76, 1: 1}, 1),  # rank 1's own failure, not the lost peer it made of it for rank 0
        ({0: 76, 1: 75}, 76),  # a peer lost during a stop: the checkpoint may not be committed
        ({0: 76, 1: -9}, 137),  # rank 1 killed (the OOM killer, a crash): the root cause, not the 76
        ({0: 76, 1: -15}, 76),  # stopped by the launcher as it shuts the node down after the 76
        ({0: -11, 1: -15}, 139),
    ],
)
def test_the_job_exits_with_the_workers_code(codes, expected):
    assert exit_code(codes) == expected


def test_a_stop_received_before_the_launcher_forwards_signals_ends_it_with_75():
    """A stop that the StopRequest took while the launcher imported torch is not lost when the
    forwarding handlers replace it: no worker starts, and the handlers are put back."""
    stop = StopRequest(grace_seconds=60)
    stop.signal = signal.SIGUSR1  # as its handler records it (without the grace period's watchdog)
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with pytest.raises(Preempted, match="SIGUSR1 before the workers started"), forwarding_stop_signals(stop):
        raise AssertionError("the workers would start here")
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_auto_is_one_process_on_a_cpu_node():
    from job.node_workers import nproc_auto

    assert nproc_auto() == 1  # no GPU on this machine


def test_the_command_line_refuses_a_placement_it_cannot_use(isolated):
    write_spec(isolated / "spec.json", make_spec())
    unplaced = ftjob(
        "run", "spec.json", "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1", cwd=isolated
    )
    assert unplaced.returncode == 2 and "MASTER_ADDR not set" in unplaced.stderr, unplaced.stderr
    alone = ftjob("run", "spec.json", "--nnodes", "2", cwd=isolated)
    assert alone.returncode == 2 and "--nnodes: placement for --nproc-per-node" in alone.stderr, alone.stderr
