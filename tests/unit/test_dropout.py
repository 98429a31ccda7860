"""The CPU LoRA dropout: torch's dropout distribution (each element dropped independently with
probability p, survivors scaled by 1/(1-p)), reproducible from the generator's state, the identity in
eval mode, and what the job puts in place of peft's dropout layers."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm
from torch import nn

import job.model.dropout
from job.model.dropout import CpuDropout, drop_positions, use_cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_each_element_is_dropped_independently_with_probability_p(p):
    torch.manual_seed(0)
    count = 4_000_000
    positions = drop_positions(count, p)
    assert bool((positions[1:] > positions[:-1]).all()) and positions[0] >= 0 and positions[-1] < count
    dropped = torch.zeros(count, dtype=torch.bool)
    dropped[positions] = True
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.001)
    both = (dropped[1:] & dropped[:-1]).float().mean().item()
    assert both == pytest.approx(p * p, abs=0.001)  # neighbours independent, no runs
    by_position = dropped.view(-1, 1000).float().mean(dim=0)  # no position favoured (the start, say)
    assert by_position.min().item() > p - 0.04 and by_position.max().item() < p + 0.04


def test_positions_are_the_same_when_the_first_round_of_gaps_falls_short(monkeypatch):
    torch.manual_seed(3)
    monkeypatch.setattr(
        job.model.dropout, "_draws", lambda expected: 5
    )  # many rounds, each from where it ended
    positions = drop_positions(200_000, 0.05)
    assert bool((positions[1:] > positions[:-1]).all()) and positions[-1] < 200_000
    assert len(positions) / 200_000 == pytest.approx(0.05, abs=0.003)
    assert drop_positions(0, 0.05).numel() == 0


def test_survivors_are_scaled_so_that_the_expectation_is_the_input_and_the_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    dropout = CpuDropout(0.05).train()
    x = torch.randn(512, 512, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.95)
    assert (~kept).float().mean().item() == pytest.approx(0.05, abs=0.003)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / 0.95)
    means = torch.stack([dropout(torch.ones(256, 256)) for _ in range(64)]).mean()
    assert means.item() == pytest.approx(1.0, abs=0.002)
    transposed = dropout(torch.ones(64, 32).t())  # a non-contiguous input
    assert transposed.shape == (32, 64)
    assert bool(((transposed == 0) | torch.isclose(transposed, torch.tensor(1 / 0.95))).all())


def test_the_masks_follow_the_generator_state_so_that_a_resumed_run_draws_the_same_ones():
    dropout = CpuDropout(0.1).train()
    x = torch.ones(64, 300)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = [dropout(x) for _ in range(3)]
    torch.set_rng_state(state)
    again = [dropout(x) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])


def test_eval_mode_and_a_zero_probability_pass_the_input_through():
    x = torch.randn(8, 8)
    assert CpuDropout(0.3).eval()(x) is x
    assert CpuDropout(0.0).train()(x) is x


def test_every_lora_dropout_of_a_peft_model_is_replaced_and_nothing_else():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear")
    model = get_peft_model(tiny_causal_lm(), lora)
    own = model.base_model.model.model.own_dropout = nn.Dropout(0.1)  # as GPT-2's embedding dropout

    assert use_cpu_dropout(model) == 2 * 7  # q, k, v, o, gate, up, down in each decoder layer
    assert [m for m in model.modules() if type(m) is nn.Dropout] == [own]
    dropouts = [m for m in model.modules() if isinstance(m, CpuDropout)]
    assert len(dropouts) == 14 and all(d.p == 0.05 for d in dropouts)
    assert model.peft_config["default"].lora_dropout == 0.05  # what is published with the adapter
    model.train()
    model(input_ids=torch.randint(0, 96, (2, 16)), labels=torch.randint(0, 96, (2, 16))).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
