"""job/cluster.py reads the environment as input: a Slurm step's own nodes, a login shell's loopback
MASTER_ADDR, and torch's process-group variables that no launcher set (tests/unit/test_launch_placement.py has the
placement of each scheduler)."""

from __future__ import annotations

import logging
import time

import pytest
from helpers import free_port, ftjob, make_spec, write_spec

from job.cluster import Placement, check_process_group_variables, is_loopback, node_placement
from job.errors import UserError

# --- Slurm: the step, not the allocation ----------------------------------------------------------

ALLOCATION = {
    "SLURM_JOB_ID": "40",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_NNODES": "3",
    "SLURM_JOB_NODELIST": "n[1-3]",
}


def test_a_slurm_step_on_one_node_of_the_allocation_trains_alone():
    """`srun -N1` in a 3-node allocation: one node, not a rendezvous that waits for two more."""
    step = {**ALLOCATION, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "n3", "SLURM_NODEID": "0"}
    assert node_placement(step) == Placement(1, 0, "127.0.0.1", 20040, "slurm")


def test_a_slurm_step_on_some_nodes_meets_on_the_first_host_of_the_step():
    step = {**ALLOCATION, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[2-3]", "SLURM_NODEID": "1"}
    assert node_placement(step) == Placement(2, 1, "n2", 20040, "slurm")


# --- Slurm: a loopback MASTER_ADDR from the submitting shell ---------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.1.1", "localhost", "LOCALHOST", "::1", "[::1]", "0.0.0.0"]
)
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["n1", "10.0.0.7", "fe80::1", "localhost-2", "gpu.localdomain"])
def test_other_addresses(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("loopback", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_master_addr_does_not_beat_the_first_host_of_a_multi_node_step(loopback, caplog):
    step = {**ALLOCATION, "SLURM_NODEID": "2", "MASTER_ADDR": loopback}
    with caplog.at_level(logging.WARNING, logger="job.cluster"):
        assert node_placement(step).master_addr == "n1"
    assert f"MASTER_ADDR={loopback} names each node itself" in caplog.text
    assert "rank 0 is n1, the first host of SLURM_JOB_NODELIST" in caplog.text


def test_a_master_addr_that_names_a_host_or_a_single_node_or_the_command_line_wins(caplog):
    assert node_placement({**ALLOCATION, "SLURM_NODEID": "1", "MASTER_ADDR": "n3"}).master_addr == "n3"
    one_node = {**ALLOCATION, "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0", "MASTER_ADDR": "localhost"}
    assert node_placement(one_node).master_addr == "localhost"  # one node: the launcher meets at home
    given = {"master_addr": "127.0.0.1"}  # two "nodes" on one host, as the tests run them
    assert node_placement({**ALLOCATION, "SLURM_NODEID": "1"}, given).master_addr == "127.0.0.1"
    assert not caplog.records


def test_a_multi_node_slurm_step_without_a_node_list_is_a_user_error():
    step = {"SLURM_JOB_ID": "40", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "0", "MASTER_ADDR": "::1"}
    with pytest.raises(UserError, match="without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"):
        node_placement(step)
    with pytest.raises(UserError, match="SLURM_STEP_NODELIST: cannot read a host from '\\[1-2\\]'"):
        node_placement({**step, "SLURM_STEP_NODELIST": "[1-2]"})


# --- torch's process-group variables in a worker ---------------------------------------------------

# What torch's elastic launcher (torchrun, `ftjob run --nproc-per-node`) gives rank 1 of 2 on one node
ELASTIC_WORKER = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "41234",
    "TORCHELASTIC_RUN_ID": "ftjob",
}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"MASTER_ADDR": "localhost", "MASTER_PORT": "12355"},  # a login shell's: no process group
        {"WORLD_SIZE": "1", "RANK": "0"},
        ELASTIC_WORKER,
        # one process per task started by a scheduler; or one of two "nodes" on one host
        {
            "RANK": "1",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
        },
        {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},  # mpirun: accelerate reads these
    ],
)
def test_variables_a_launcher_sets_or_that_ask_for_no_process_group_pass(environ):
    check_process_group_variables(environ)


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 set, but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"),
        (
            {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
            "but RANK, LOCAL_RANK not: no launcher started this process",
        ),
        ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0 set, but WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT not"),
        ({**ELASTIC_WORKER, "LOCAL_RANK": ""}, "but LOCAL_RANK not"),
        ({**ELASTIC_WORKER, "RANK": "2"}, "RANK=2 is not one of the WORLD_SIZE=2 ranks"),
        ({**ELASTIC_WORKER, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not one of this node's 2 ranks"),
        ({**ELASTIC_WORKER, "RANK": "one"}, "RANK='one' is not an integer"),
        ({**ELASTIC_WORKER, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a number of processes, 1 or more"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ],
)
def test_process_group_variables_that_no_launcher_set_are_a_user_error(environ, message):
    with pytest.raises(UserError, match=message):
        check_process_group_variables(environ)


def test_a_stale_world_size_ends_ftjob_run_with_exit_2_at_once(isolated):
    """Today's login shell exported WORLD_SIZE, MASTER_ADDR and MASTER_PORT for another job: rank 0
    would wait train.collective_timeout_seconds for a rank 1 that never comes, then fail with exit 1."""
    write_spec(
        isolated / "spec.json", make_spec(train={"collective_timeout_seconds": 60, "lease_seconds": 10})
    )
    stale = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    started = time.monotonic()
    result = ftjob("run", "spec.json", cwd=isolated, env=stale)
    assert result.returncode == 2, result.stderr
    assert "WORLD_SIZE=2, MASTER_ADDR=127.0.0.1, MASTER_PORT=" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # not the collective timeout
