"""Several ranks and nodes as processes (torchrun, ftjob run --nproc-per-node): shards, steps and stops agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ALPACA_ROWS,
    NO_AUTOCAST,
    REPO,
    RESUME_STEPS,
    assert_same_run,
    free_port,
    ftjob,
    make_spec,
    read_until,
    start_run,
    write_jsonl,
    write_spec,
)
from safetensors.torch import load_file


def test_two_processes_with_uneven_shards_finish_the_epoch_together(tiny_model_dir, isolated):
    """5 rows over 2 ranks (3 and 2): the rank that runs out first joins the last step with an empty
    batch, both stop at the epoch's end, and every row was trained on once."""
    data = write_jsonl(isolated / "d.jsonl", (ALPACA_ROWS * 2)[:5])
    one_eval_row = write_jsonl(isolated / "e.jsonl", ALPACA_ROWS[:1])  # rank 1 has no eval batch
    train = {
        "max_steps": None,
        "epochs": 1,
        "micro_batch_size": 1,
        "grad_accum": 2,
        "log_every": 1,
        "eval_every": 1,
    }
    spec = make_spec(
        name="ddp",
        model=tiny_model_dir,
        data={"train": [str(data)], "eval": [str(one_eval_row)], "shuffle_buffer": 0},
        train=train,
        tracking={"enabled": False},
    )
    write_spec(isolated / "spec.json", spec)
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "job", "run", "spec.json"],
        cwd=isolated,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x 2 process(es)" in run.stdout
    metrics = json.loads((isolated / "runs" / "ddp" / "adapter" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert metrics["final"]["data/rows_read"] == 5
    assert all("eval/loss" in h for h in metrics["history"])


def test_two_ranks_compute_the_same_step_as_one_rank_accumulating(tiny_model_dir, isolated):
    """Rows 0-3 in one step: 2 ranks x micro batch 2 (rank r gets rows r, r+2) or 1 rank x 2 micro
    batches of 2. The loss is a mean over the step's tokens on all ranks, so both give the same loss
    and gradient norm."""
    data = write_jsonl(isolated / "d.jsonl", ALPACA_ROWS)
    spec = make_spec(
        model=tiny_model_dir,
        adapter={"dropout": 0.0},
        data={"train": [str(data)], "shuffle_buffer": 0},
        train={"micro_batch_size": 2, "grad_accum": 2, "mixed_precision": NO_AUTOCAST},
        tracking={"enabled": False},
    )
    write_spec(isolated / "spec.json", spec)
    one = ftjob("run", "spec.json", "--set", "output.uri=./one", cwd=isolated)  # in this process
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "job", "run", "spec.json", "--set", "output.uri=./two",
         "--set", "train.grad_accum=1"],
        cwd=isolated, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    first = [
        json.loads((isolated / d / "adapter" / "metrics.json").read_text())["history"][0]
        for d in ("one", "two")
    ]
    assert first[1]["train/loss"] == pytest.approx(first[0]["train/loss"], rel=1e-5)
    assert first[1]["train/grad_norm"] == pytest.approx(first[0]["train/grad_norm"], rel=1e-4)


def test_publishing_on_rank_0_sits_behind_no_collective(slow_s3_spec, workdir, s3, fault_proxy):
    """A publish that takes longer than the process group's timeout does not fail the other rank: they
    are done by then (a big full fine-tune's upload takes minutes; NCCL's default timeout is 10)."""
    output = f"s3://{s3.bucket}/slow-publish"
    settings = ["--set", "train.max_steps=4", "--set", "train.checkpoint_every=0", "--set",
                "train.collective_timeout_seconds=6", "--set", "train.lease_seconds=5"]  # fmt: skip
    rank0, rank1 = ranks(slow_s3_spec, output, workdir, *settings)
    read_until(rank0, "step 2/4")
    fault_proxy.slow_seconds = 0.6  # publishing's ~35 requests now take ~15 s, past the 6 s timeout
    fault_proxy.outage("slow")
    out = rank0.stdout.read()
    assert rank0.wait(timeout=300) == 0, out
    assert rank1.wait(timeout=60) == 0, (workdir / "rank-1.log").read_text()
    fault_proxy.heal()
    s3.invalidate_cache()
    assert s3.exists(f"{s3.bucket}/slow-publish/adapter/MANIFEST.json")


def torchrun(spec_path, output: str, *extra: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m", "job", "run"]
    return subprocess.Popen(
        [*command, str(spec_path), "--set", f"output.uri={output}", *extra],
        cwd=spec_path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )


def ranks(
    spec_path, output: str, log_dir: Path, *extra: str, env: dict | None = None
) -> list[subprocess.Popen]:
    """Two ranks started the way srun or a Kubernetes Indexed Job starts tasks: one process each, with
    torch's environment variables, no launcher in between; each exit code is what the scheduler sees.
    Rank 0's output is piped, rank 1's goes to log_dir/rank-1.log."""
    base = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}  # fmt: skip
    command = [sys.executable, "-m", "job", "run", str(spec_path), "--set", f"output.uri={output}", *extra]
    processes = []
    for rank in (0, 1):
        out = subprocess.PIPE if rank == 0 else open(log_dir / f"rank-{rank}.log", "w")  # noqa: SIM115
        processes.append(
            subprocess.Popen(
                command,
                cwd=spec_path.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
        )
    return processes


@pytest.fixture(scope="module")
def ddp_uninterrupted(spec_path, workdir):
    straight = torchrun(spec_path, "./ddp-straight")
    out = straight.stdout.read()
    assert straight.wait(timeout=300) == 0, out
    return "ddp-straight"


def behind_the_proxy(spec_path: Path, directory: Path, bucket: str, proxy) -> Path:
    """spec_path's spec with checkpoints and output on S3 behind the fault proxy (healthy until a test
    slows it down), written in directory."""
    spec = json.loads(spec_path.read_text())
    spec["storage_options"] = {"s3": {"endpoint_url": proxy.url}}
    path = directory / f"spec-{bucket}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def slow_s3_spec(spec_path, workdir, s3, fault_proxy) -> Path:
    """The resume spec behind the fault proxy."""
    return behind_the_proxy(spec_path, workdir, s3.bucket, fault_proxy)


def slow_uploads(proxy) -> None:
    """Every request to the store from now on is answered 0.15 s late: a checkpoint's ~30 requests take
    ~5 s, far longer than a rank needs to exit."""
    proxy.slow_seconds = 0.15
    proxy.outage("slow")


def fetch_adapter(s3, uri: str, local: Path) -> None:
    s3.invalidate_cache()
    s3.get(f"{uri.removeprefix('s3://')}/adapter/", str(local / "adapter") + "/", recursive=True)


def committed_steps_on(s3, uri: str) -> list[str]:
    s3.invalidate_cache()
    root = f"{uri.removeprefix('s3://')}/checkpoints"
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(root) if s3.exists(f"{p}/COMMITTED"))


def test_sigterm_to_every_worker_of_torchrun_with_slow_uploads_commits_and_resumes_exactly(
    slow_s3_spec, workdir, s3, fault_proxy, ddp_uninterrupted
):
    """The scancel case: every process gets SIGTERM while rank 0's upload takes seconds. Before the
    fix, rank 1 exited 75 at once, torchrun then SIGTERMed rank 0 mid-upload and no COMMITTED was
    written. (torchrun itself still reports 1 for workers' 75.)"""
    import psutil

    output = f"s3://{s3.bucket}/ddp-all"
    stopped = torchrun(slow_s3_spec, output)
    read_until(stopped, f"step 8/{RESUME_STEPS}")
    workers = psutil.Process(stopped.pid).children()
    assert len(workers) == 2
    slow_uploads(fault_proxy)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    out = stopped.stdout.read()
    stopped.wait(timeout=300)
    assert out.count("checkpoint committed") == 2 and out.count("exit 75 to be requeued") == 2, out
    steps = committed_steps_on(s3, output)
    assert steps and steps[-1] >= "step-000008", steps

    fault_proxy.heal()
    resumed = torchrun(slow_s3_spec, output)
    out = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, out
    assert "resuming from the checkpoint at step" in out
    fetch_adapter(s3, output, workdir / "ddp-all")
    assert_same_run(workdir, ddp_uninterrupted, "ddp-all")


def test_sigterm_to_one_rank_with_slow_uploads_exits_75_on_every_rank_after_the_commit(
    slow_s3_spec, workdir, s3, fault_proxy, ddp_uninterrupted
):
    """The signal reaches one rank only (a node's agent, a Kubernetes eviction of one pod): both ranks
    stop after the same step, and no rank exits before the stop checkpoint is committed."""
    output = f"s3://{s3.bucket}/ddp-one"
    rank0, rank1 = ranks(slow_s3_spec, output, workdir)
    read_until(rank0, f"step 8/{RESUME_STEPS}")
    slow_uploads(fault_proxy)
    rank1.send_signal(signal.SIGTERM)
    assert rank1.wait(timeout=300) == 75
    committed_when_rank1_exited = committed_steps_on(s3, output)
    out = rank0.stdout.read()
    assert rank0.wait(timeout=300) == 75, out
    fault_proxy.heal()
    assert committed_when_rank1_exited and committed_when_rank1_exited[-1] >= "step-000008"
    assert committed_steps_on(s3, output)[-1] == committed_when_rank1_exited[-1]
    assert "checkpoint committed" in (workdir / "rank-1.log").read_text()

    rank0, rank1 = ranks(slow_s3_spec, output, workdir)
    out = rank0.stdout.read()
    assert rank0.wait(timeout=300) == 0 and rank1.wait(timeout=60) == 0, out
    assert "resuming from the checkpoint at step" in out
    fetch_adapter(s3, output, workdir / "ddp-one")
    assert_same_run(workdir, ddp_uninterrupted, "ddp-one")


STEPS = 40


@pytest.fixture(scope="module")
def launch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def launch_spec(tiny_model_dir, launch_dir):
    train = {"max_steps": STEPS, "checkpoint_every": 10, "seed": 5}
    spec = make_spec("stop", model=tiny_model_dir, files=launch_dir, name="l", train=train)
    return write_spec(launch_dir / "spec.json", spec)


@pytest.fixture
def slow_launch_spec(launch_spec, launch_dir, s3, fault_proxy) -> Path:
    """The launch spec behind the fault proxy."""
    return behind_the_proxy(launch_spec, launch_dir, s3.bucket, fault_proxy)


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out = process.stdout.read()
    return process.wait(timeout=timeout), out


def history(output: Path) -> list[dict]:
    return json.loads((output / "adapter" / "metrics.json").read_text())["history"]


def weights(output: Path) -> dict:
    return load_file(output / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_processes(launch_spec, launch_dir) -> Path:
    code, out = finish(start_run(launch_spec, "./two", "--nproc-per-node", "2"))
    assert code == 0, out
    assert out.count("adapter published to") == 1 and len(history(launch_dir / "two")) == STEPS
    return launch_dir / "two"


def test_two_ranks_of_micro_batch_m_train_like_one_rank_of_2m(launch_spec, launch_dir, two_processes):
    """Gradients averaged over ranks and no row trained twice: the same losses and weights as one
    process taking both ranks' rows at once. Rows in file order, unpacked and without dropout: row k
    goes to rank k mod 2, so each step sees the same rows either way."""
    same = ["--set", "adapter.dropout=0", "--set", "data.shuffle_buffer=0", "--set", "data.packing=false"]
    one = start_run(launch_spec, "./one-2m", "--set", "train.micro_batch_size=4", *same)
    two = start_run(launch_spec, "./two-m", "--nproc-per-node", "2", *same)
    (code_one, out_one), (code_two, out_two) = finish(one), finish(two)
    assert code_one == 0 and code_two == 0, out_one + out_two
    losses_one = [h["train/loss"] for h in history(launch_dir / "one-2m")]
    losses_two = [h["train/loss"] for h in history(launch_dir / "two-m")]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    a, b = weights(launch_dir / "one-2m"), weights(launch_dir / "two-m")
    assert all(pytest.approx(a[k].flatten().tolist(), abs=1e-5) == b[k].flatten().tolist() for k in a)


def committed(s3, uri: str) -> list[str]:
    s3.invalidate_cache()
    root = f"{uri.removeprefix('s3://')}/checkpoints"
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(root) if s3.exists(f"{p}/COMMITTED"))


@pytest.mark.parametrize("target", ["launcher", "every process", "one worker"])
def test_a_stop_with_slow_uploads_exits_75_commits_and_resumes_exactly(
    slow_launch_spec, launch_dir, s3, fault_proxy, two_processes, target
):
    """What Kubernetes does (SIGTERM to the launcher), what scancel does (every process), and a signal
    that reaches one worker: every time exit 75, the stop checkpoint committed, the resumed run
    bitwise the uninterrupted one."""
    import psutil

    output = f"s3://{s3.bucket}/stopped"
    launcher = start_run(slow_launch_spec, output, "--nproc-per-node", "2")
    read_until(launcher, f"step 12/{STEPS}")
    slow_uploads(fault_proxy)
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

    code, out = finish(start_run(slow_launch_spec, output, "--nproc-per-node", "2"))
    assert code == 0 and "resuming from the checkpoint at step" in out, out
    s3.get(f"{s3.bucket}/stopped/adapter/", str(launch_dir / target / "adapter") + "/", recursive=True)
    assert [h["train/loss"] for h in history(launch_dir / target)] == [
        h["train/loss"] for h in history(two_processes)
    ]
    resumed, straight = weights(launch_dir / target), weights(two_processes)
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
def test_a_stop_while_the_spec_is_read_exits_75(launch_spec, launch_dir, launcher):
    """A scheduler may stop a job the moment it starts: SIGTERM to every process while `ftjob run`
    still reads its spec (a FIFO here, held open) exits 75, not 143, and trains nothing."""
    name = f"early-{len(launcher)}"
    fifo = launch_dir / f"{name}.json"
    os.mkfifo(fifo)
    process = start_run(fifo, f"./{name}", *launcher)
    writer = open_once_read(fifo, process)  # ftjob is reading the spec
    os.killpg(process.pid, signal.SIGTERM)
    time.sleep(0.5)
    with open(writer, "w") as spec:
        spec.write(launch_spec.read_text())
    code, out = finish(process)
    assert code == 75, out
    assert "SIGTERM as the job started, nothing trained; exit 75 to be requeued" in out
    assert not (launch_dir / name / "adapter").exists() and not (launch_dir / name / "checkpoints").exists()


def test_a_failing_worker_ends_the_job_with_its_code(launch_spec, launch_dir):
    bad = write_jsonl(launch_dir / "bad.jsonl", ["{broken"] * 20)
    code, out = finish(
        start_run(launch_spec, "./bad", "--nproc-per-node", "2", "--set", f"data.train=['{bad}']", "--set", "data.bad_rows.policy=fail")
    )  # fmt: skip
    assert code == 3, out
    assert "invalid JSON" in out


def test_missing_data_found_by_rank_0_ends_every_rank_with_exit_2(launch_spec, launch_dir):
    """Rank 0 resolves the files for every rank; what it cannot find is exit 2 on all of them."""
    started = time.monotonic()
    code, out = finish(
        start_run(launch_spec, "./missing", "--nproc-per-node", "2", "--set", f"data.train=['{launch_dir / 'none-*.jsonl'}']")
    )  # fmt: skip
    assert code == 2, out
    assert out.count("no such file") >= 2  # raised on both ranks, from rank 0's plan
    assert time.monotonic() - started < 120  # not a wait for the collective timeout


@pytest.mark.parametrize("how", ["arguments", "indexed job"])
def test_two_nodes_of_one_process_each_train_one_run(launch_spec, launch_dir, two_processes, how):
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
            nodes.append(start_run(launch_spec, output, "--nproc-per-node", "1", *args, env=one_thread))
        else:
            env = {
                **one_thread,
                "JOB_COMPLETION_INDEX": str(rank),
                "NNODES": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            nodes.append(start_run(launch_spec, output, "--nproc-per-node", "1", env=env))
    results = [finish(node) for node in nodes]
    assert [code for code, _ in results] == [0, 0], "".join(out for _, out in results)
    assert "adapter published to" in results[0][1] and "adapter published to" not in results[1][1]
    assert [h["train/loss"] for h in history(launch_dir / output)] == [
        h["train/loss"] for h in history(two_processes)
    ]
