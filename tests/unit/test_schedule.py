"""Learning-rate schedules: a warm-up, then their shape."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(name):
    from job.schedule import make_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, name, warmup_steps=4, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    if name == "constant":
        assert rates[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))  # strictly decaying
        middle = rates[12]  # halfway through the decay
        assert middle == pytest.approx(0.5, abs=0.01)  # linear and cosine both cross 0.5 at the midpoint
        assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)
