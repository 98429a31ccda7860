"""train.checkpoint_every: every N steps, or once after each epoch's end, however ranks reach it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from job.output.checkpoint import Cadence

ONE_RANK = SimpleNamespace(num_processes=1)


def other_rank_ended(epochs: list[int]):
    """An accelerator whose reduce sees the other rank's ended epochs beside this rank's."""
    others = iter(epochs)

    def reduce(tensor, reduction):
        assert reduction == "max"
        return torch.maximum(tensor, torch.tensor([next(others)]))

    return SimpleNamespace(num_processes=2, device="cpu", reduce=reduce)


def test_every_n_steps_and_never():
    every_3 = Cadence(3)
    assert [step for step in range(1, 10) if every_3.due(step, 0, ONE_RANK)] == [3, 6, 9]
    assert not any(Cadence(0).due(step, step // 3, ONE_RANK) for step in range(1, 10))


def test_once_after_each_epochs_end():
    cadence = Cadence("epoch")
    ended = [0, 0, 1, 1, 1, 2, 2, 3]
    assert [step for step, n in enumerate(ended, 1) if cadence.due(step, n, ONE_RANK)] == [3, 6, 8]


def test_ranks_checkpoint_together_when_the_first_of_them_ends_an_epoch_and_only_then():
    cadence = Cadence("epoch")  # this rank ends epoch 1 a step after the other one
    accelerator = other_rank_ended([0, 1, 1, 1])
    assert [cadence.due(step, n, accelerator) for step, n in enumerate([0, 0, 1, 1], 1)] == [
        False,
        True,
        False,
        False,
    ]
