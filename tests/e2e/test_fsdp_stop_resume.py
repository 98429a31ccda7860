"""train.distributed fsdp under `ftjob run --nproc-per-node 2` (gloo, CPU): SIGTERM to the launcher exits 75
with a committed sharded checkpoint, a resume on another number of processes is refused, and the resume on
two is bitwise the uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, read_until, run_ftjob, start_run, write_jsonl
from safetensors.torch import load_file

STEPS = 16
STOP_AFTER = 4  # the step after which the launcher gets SIGTERM


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def fsdp_spec(tiny_model_dir, fsdp_dir) -> Path:
    """A LoRA run with dropout (the RNG states must resume too), sharded over the processes."""
    rows = [dict(r, output=f"{r['output']} {i}") for i, r in enumerate(ALPACA_ROWS * 15)]
    spec = {
        "name": "fsdp",
        "model": {"source": str(tiny_model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": [str(write_jsonl(fsdp_dir / "train.jsonl", rows))], "packing": False,
                 "max_seq_len": 48, "shuffle_buffer": 16},
        "train": {"distributed": "fsdp", "max_steps": STEPS, "micro_batch_size": 2, "checkpoint_every": 5,
                  "log_every": 1, "seed": 5, "mixed_precision": "no"},
        "tracking": {"enabled": False},
    }  # fmt: skip
    path = fsdp_dir / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out = process.stdout.read()
    return process.wait(timeout=timeout), out


def history(output: Path) -> list[dict]:
    return json.loads((output / "adapter" / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def uninterrupted(fsdp_spec, fsdp_dir) -> Path:
    code, out = finish(start_run(fsdp_spec, "./straight", "--nproc-per-node", "2"))
    assert code == 0, out
    assert len(history(fsdp_dir / "straight")) == STEPS
    return fsdp_dir / "straight"


def test_sigterm_to_the_launcher_commits_shards_and_resumes_bitwise_on_as_many_processes(
    fsdp_spec, fsdp_dir, uninterrupted
):
    output = fsdp_dir / "stopped"
    launcher = start_run(fsdp_spec, "./stopped", "--nproc-per-node", "2")
    read_until(launcher, f"step {STOP_AFTER}/{STEPS}")
    launcher.send_signal(signal.SIGTERM)
    code, out = finish(launcher)
    assert code == 75, out
    assert out.count("exit 75 to be requeued") == 2, out

    newest = max((output / "checkpoints").iterdir())
    sizes = {path.name: path.stat().st_size for path in newest.iterdir()}
    assert {"shard-00000.safetensors", "shard-00001.safetensors", "COMMITTED"} <= sizes.keys(), sizes
    assert "trainable.safetensors" not in sizes
    assert max(sizes.values()) < 0.6 * sum(sizes.values()), sizes  # no file holds most of the state

    one = run_ftjob("run", str(fsdp_spec), "--set", "output.uri=./stopped", cwd=fsdp_dir)
    assert one.returncode == 2, one.stderr
    assert "world_size: 2 -> 1" in one.stderr
    assert max((output / "checkpoints").iterdir()) == newest

    code, out = finish(start_run(fsdp_spec, "./stopped", "--nproc-per-node", "2"))
    assert code == 0, out
    assert f"resuming from the checkpoint at step {int(newest.name[5:11])}" in out
    assert [h["train/loss"] for h in history(output)] == [h["train/loss"] for h in history(uninterrupted)]
    resumed = load_file(output / "adapter" / "adapter_model.safetensors")
    straight = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys() and all((resumed[k] == straight[k]).all() for k in straight)
