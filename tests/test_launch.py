"""Several processes, several nodes: job/cluster.py's placement and `ftjob run --nproc-per-node`,
with real processes, real signals and a slow object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import free_port, read_until, run_ftjob, start_run, write_jsonl, write_stop_spec
from safetensors.torch import load_file

from job.cluster import Placement, first_host, node_placement
from job.errors import Preempted, UserError
from job.node_workers import exit_code, forwarding_stop_signals
from job.signals import STOP_SIGNALS, StopRequest

STEPS = 40

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
    spec = {"model": {"source": "unused"}, "data": {"train": ["unused.jsonl"]}, "train": {"max_steps": 1}}
    (isolated / "spec.json").write_text(json.dumps(spec))
    unplaced = run_ftjob(
        "run", "spec.json", "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1", cwd=isolated
    )
    assert unplaced.returncode == 2 and "MASTER_ADDR not set" in unplaced.stderr, unplaced.stderr
    alone = run_ftjob("run", "spec.json", "--nnodes", "2", cwd=isolated)
    assert alone.returncode == 2 and "--nnodes: placement for --nproc-per-node" in alone.stderr, alone.stderr


# --- the launcher, for real -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    return write_stop_spec(workdir, tiny_model_dir, "l", STEPS, checkpoint_every=10, seed=5)


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out = process.stdout.read()
    return process.wait(timeout=timeout), out


def history(output: Path) -> list[dict]:
    return json.loads((output / "adapter" / "metrics.json").read_text())["history"]


def weights(output: Path) -> dict:
    return load_file(output / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_processes(spec_path, workdir) -> Path:
    code, out = finish(start_run(spec_path, "./two", "--nproc-per-node", "2"))
    assert code == 0, out
    assert out.count("adapter published to") == 1 and len(history(workdir / "two")) == STEPS
    return workdir / "two"


def test_two_ranks_of_micro_batch_m_train_like_one_rank_of_2m(spec_path, workdir, two_processes):
    """Gradients averaged over ranks and no row trained twice: the same losses and weights as one
    process taking both ranks' rows at once. Rows in file order, unpacked and without dropout: row k
    goes to rank k mod 2, so each step sees the same rows either way."""
    same = ["--set", "adapter.dropout=0", "--set", "data.shuffle_buffer=0", "--set", "data.packing=false"]
    one = start_run(spec_path, "./one-2m", "--set", "train.micro_batch_size=4", *same)
    two = start_run(spec_path, "./two-m", "--nproc-per-node", "2", *same)
    (code_one, out_one), (code_two, out_two) = finish(one), finish(two)
    assert code_one == 0 and code_two == 0, out_one + out_two
    losses_one = [h["train/loss"] for h in history(workdir / "one-2m")]
    losses_two = [h["train/loss"] for h in history(workdir / "two-m")]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    a, b = weights(workdir / "one-2m"), weights(workdir / "two-m")
    assert all(pytest.approx(a[k].flatten().tolist(), abs=1e-5) == b[k].flatten().tolist() for k in a)


@pytest.fixture
def slow_s3_spec(spec_path, workdir, s3, fault_proxy) -> Path:
    spec = json.loads(spec_path.read_text())
    spec["storage_options"] = {"s3": {"endpoint_url": fault_proxy.url}}
    path = workdir / f"spec-{s3.bucket}.json"
    path.write_text(json.dumps(spec))
    return path


def committed(s3, uri: str) -> list[str]:
    s3.invalidate_cache()
    root = f"{uri.removeprefix('s3://')}/checkpoints"
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(root) if s3.exists(f"{p}/COMMITTED"))


@pytest.mark.parametrize("target", ["launcher", "every process", "one worker"])
def test_a_stop_with_slow_uploads_exits_75_commits_and_resumes_exactly(
    slow_s3_spec, workdir, s3, fault_proxy, two_processes, target
):
    """What Kubernetes does (SIGTERM to the launcher), what scancel does (every process), and a signal
    that reaches one worker: every time exit 75, the stop checkpoint committed, the resumed run
    bitwise the uninterrupted one."""
    import psutil

    output = f"s3://{s3.bucket}/stopped"
    launcher = start_run(slow_s3_spec, output, "--nproc-per-node", "2")
    read_until(launcher, f"step 12/{STEPS}")
    fault_proxy.slow_seconds = 1.0
    fault_proxy.outage("slow")  # every request now a second late: the stop checkpoint takes seconds
    if target == "launcher":
        launcher.send_signal(signal.SIGTERM)
    elif (
        target == "every process"
    ):  # scancel: the launcher and each worker (they run in sessions of their own)
        for process in [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children()]:
            process.send_signal(signal.SIGTERM)
    else:
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGTERM)
    code, out = finish(launcher)
    fault_proxy.heal()
    assert code == 75, out
    assert out.count("exit 75 to be requeued") == 2, out
    steps = committed(s3, output)
    assert steps and steps[-1] >= "step-000012", steps

    code, out = finish(start_run(slow_s3_spec, output, "--nproc-per-node", "2"))
    assert code == 0 and "resuming from the checkpoint at step" in out, out
    s3.get(f"{s3.bucket}/stopped/adapter/", str(workdir / target / "adapter") + "/", recursive=True)
    assert [h["train/loss"] for h in history(workdir / target)] == [
        h["train/loss"] for h in history(two_processes)
    ]
    resumed, straight = weights(workdir / target), weights(two_processes)
    assert all((resumed[k] == straight[k]).all() for k in straight)  # bitwise


def open_once_read(fifo: Path, process: subprocess.Popen, timeout: float = 60) -> int:
    """The write end of fifo, opened once process has opened it to read; fails if it exits first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.01)
            continue
        os.set_blocking(writer, True)
        return writer
    process.kill()
    raise AssertionError(f"ftjob never opened {fifo} (exit {process.wait()}):\n{process.stdout.read()}")


@pytest.mark.parametrize("launcher", [[], ["--nproc-per-node", "2"]], ids=["one-process", "launcher"])
def test_a_stop_while_the_spec_is_read_exits_75(spec_path, workdir, launcher):
    """A scheduler may stop a job the moment it starts: SIGTERM to every process while `ftjob run`
    still reads its spec (a FIFO here, held open) exits 75, not 143, and trains nothing."""
    name = f"early-{len(launcher)}"
    fifo = workdir / f"{name}.json"
    os.mkfifo(fifo)
    process = start_run(fifo, f"./{name}", *launcher)
    writer = open_once_read(fifo, process)  # ftjob is reading the spec
    os.killpg(process.pid, signal.SIGTERM)
    time.sleep(0.5)
    with open(writer, "w") as spec:
        spec.write(spec_path.read_text())
    code, out = finish(process)
    assert code == 75, out
    assert "SIGTERM as the job started, nothing trained; exit 75 to be requeued" in out
    assert not (workdir / name / "adapter").exists() and not (workdir / name / "checkpoints").exists()


def test_a_failing_worker_ends_the_job_with_its_code(spec_path, workdir):
    bad = write_jsonl(workdir / "bad.jsonl", ["{broken"] * 20)
    code, out = finish(
        start_run(spec_path, "./bad", "--nproc-per-node", "2", "--set", f"data.train=['{bad}']", "--set", "data.bad_rows.policy=fail")
    )  # fmt: skip
    assert code == 3, out
    assert "invalid JSON" in out


def test_missing_data_found_by_rank_0_ends_every_rank_with_exit_2(spec_path, workdir):
    """Rank 0 resolves the files for every rank; what it cannot find is exit 2 on all of them."""
    started = time.monotonic()
    code, out = finish(
        start_run(spec_path, "./missing", "--nproc-per-node", "2", "--set", f"data.train=['{workdir / 'none-*.jsonl'}']")
    )  # fmt: skip
    assert code == 2, out
    assert out.count("no such file") >= 2  # raised on both ranks, from rank 0's plan
    assert time.monotonic() - started < 120  # not a wait for the collective timeout


@pytest.mark.parametrize("how", ["arguments", "indexed job"])
def test_two_nodes_of_one_process_each_train_one_run(spec_path, workdir, two_processes, how):
    """Two "nodes" on 127.0.0.1: placed by --nnodes/--node-rank, or by a Kubernetes Indexed Job's
    environment. The same 2-rank run as two processes on one node, bitwise: each worker with one
    thread, as accelerate gives each of two processes on this 2-core node (alone on a node it would
    take both cores, and CPU kernels may sum in another order with another thread count)."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    port = str(free_port())
    output = f"./nodes-{how.replace(' ', '-')}"
    nodes = []
    for rank in (0, 1):
        if how == "arguments":
            args = [
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            ]
            nodes.append(start_run(spec_path, output, "--nproc-per-node", "1", *args, env=one_thread))
        else:
            env = {
                **one_thread,
                "JOB_COMPLETION_INDEX": str(rank),
                "NNODES": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            nodes.append(start_run(spec_path, output, "--nproc-per-node", "1", env=env))
    results = [finish(node) for node in nodes]
    assert [code for code, _ in results] == [0, 0], "".join(out for _, out in results)
    assert "adapter published to" in results[0][1] and "adapter published to" not in results[1][1]
    assert [h["train/loss"] for h in history(workdir / output)] == [
        h["train/loss"] for h in history(two_processes)
    ]
