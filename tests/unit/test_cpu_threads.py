"""torch's threads from the CPUs a process was given, not every visible core: affinity, the cgroup's
quota, Slurm's CPUs per task, shared by a node's processes; OMP_NUM_THREADS wins."""

from __future__ import annotations

import pytest

from job.cluster import cpu_threads
from job.errors import UserError
from job.startup import cgroup_cpu_quota


@pytest.mark.parametrize(
    "environ,affinity,quota,expected",
    [
        ({}, 64, None, (64, "64 CPUs from CPU affinity")),
        ({}, 64, 4.0, (4, "4 CPUs from the cgroup's CPU quota")),  # a pod limited to 4 of 64 cores
        ({}, 64, 2.5, (2, "2 CPUs from the cgroup's CPU quota")),
        ({}, 64, 0.5, (1, "1 CPUs from the cgroup's CPU quota")),
        ({"SLURM_CPUS_PER_TASK": "8"}, 64, None, (8, "8 CPUs from SLURM_CPUS_PER_TASK")),
        ({"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "2"}, 64, None, (4, "8 CPUs from SLURM_CPUS_PER_TASK, shared by 2 processes")),
        ({"LOCAL_WORLD_SIZE": "4"}, 2, None, (1, "2 CPUs from CPU affinity, shared by 4 processes")),
        ({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}, 64, 4.0, (3, "OMP_NUM_THREADS")),
    ],
)  # fmt: skip
def test_threads_are_the_cpus_given_shared_by_the_nodes_processes(environ, affinity, quota, expected):
    assert cpu_threads(environ, affinity, quota) == expected


@pytest.mark.parametrize(
    "environ", [{"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "all"}, {"SLURM_CPUS_PER_TASK": "x"}]
)
def test_variables_that_are_no_number_of_cpus_are_exit_2_naming_them(environ):
    with pytest.raises(UserError, match=next(iter(environ))):
        cpu_threads(environ, 8, None)


def cgroup_v2(root, own: str, limits: dict[str, str]):
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for folder, cpu_max in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(cpu_max + "\n")
    membership = root / "self-cgroup"
    membership.write_text(f"0::/{own}\n")
    return membership


def test_the_tightest_quota_on_the_cgroup_v2_path_counts(tmp_path):
    root = tmp_path / "cg"
    membership = cgroup_v2(root, "kubepods/pod1/c1", {"kubepods": "max 100000", "kubepods/pod1": "400000 100000", "kubepods/pod1/c1": "800000 100000"})  # fmt: skip
    assert cgroup_cpu_quota(root, membership) == 4.0
    unlimited = cgroup_v2(tmp_path / "free", "user.slice", {"user.slice": "max 100000"})
    assert cgroup_cpu_quota(tmp_path / "free", unlimited) is None


def test_a_cgroup_v1_quota_and_no_cgroup_at_all(tmp_path):
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "v1") == 1.5
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "v1") is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None
