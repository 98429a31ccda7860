"""The training step does not wait for the device: in a run of one process, the loop reads a tensor's
value on the host (on CUDA a wait for every kernel queued before it) only at the steps it logs, once
there for all the steps it held. Counted on the CPU by patching torch's reads of a tensor's values."""

from __future__ import annotations

import threading
import traceback

import pytest
import torch
from helpers import make_spec, train_in_process

from job.data.pipeline import DataPipeline
from job.data.prefetch import DATA_THREAD
from job.step import OptimizerStep

READS = ("item", "tolist", "nonzero", "__float__", "__int__", "__bool__", "__index__")


def step_reads(spec: dict, monkeypatch) -> dict[int, int]:
    """Each training step's reads of a tensor's values, by the step they follow, setup's not counted;
    nor those that are no device read on a GPU either: of the data pipeline's CPU tensors, on the data
    thread, in the Feed's making of a window and in device_batch (on the CPU batch, before it moves),
    and in the model's forward (transformers' masks and job/model/packed_attention.py, not the loop's)."""
    reads: dict[int, int] = {}
    step = [0]
    batch_tensors: dict[int, torch.Tensor] = {}  # by id, kept alive so that no other tensor takes its id

    def counted(name: str):
        read = getattr(torch.Tensor, name)

        def reading(tensor, *args, **kwargs):
            caller = "".join(traceback.format_stack()[:-1])
            on_host = ("in device_batch", "in _make_window", "/transformers/")
            data_thread = threading.current_thread().name == DATA_THREAD
            host = id(tensor) in batch_tensors or data_thread or any(where in caller for where in on_host)
            if step[0] and not host:
                reads[step[0]] = reads.get(step[0], 0) + 1
            return read(tensor, *args, **kwargs)

        return reading

    train_batches, optimizer_step = DataPipeline.train_batches, OptimizerStep.__call__

    def recorded_batches(data, micro_batch_size):
        for batch in train_batches(data, micro_batch_size):
            batch_tensors.update((id(tensor), tensor) for tensor in batch.values())
            yield batch

    def next_step(self, window):
        step[0] += 1
        return optimizer_step(self, window)

    monkeypatch.setattr(DataPipeline, "train_batches", recorded_batches)
    monkeypatch.setattr(OptimizerStep, "__call__", next_step)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    result = train_in_process(spec, restart=True)
    monkeypatch.undo()
    assert [entry["step"] for entry in result.history] == list(range(1, 9))  # every step's metrics kept
    assert all(isinstance(entry["train/loss"], float) for entry in result.history)
    return reads


@pytest.mark.parametrize(
    "packing,prefetch", [(False, 0), (True, 2)], ids=["padded-training-thread", "packed-data-thread"]
)
def test_only_the_steps_that_log_read_the_device(tiny_model_dir, data_files, monkeypatch, packing, prefetch):
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"packing": packing, "prefetch": prefetch},
        train={"max_steps": 8, "grad_accum": 2, "log_every": 4, "eval_every": 0},
        tracking={"enabled": False},
    )
    reads = step_reads(spec, monkeypatch)
    assert reads.keys() == {1, 4, 8}  # the attempt's first step, then every 4th: 2-3 and 5-7 read nothing
    assert reads[4] <= 20  # the held metrics in one read, the data counters
