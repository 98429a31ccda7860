"""A bf16 model trains under bf16 autocast: its own process, since accelerate's mixed precision cannot change
within one."""

from __future__ import annotations

import json
import math

from helpers import make_spec, run_ftjob


def test_a_bf16_model_trains_under_bf16_autocast(tiny_model_dir, data_files, isolated):
    """A GPU's usual setting (bf16 weights and autocast), on the CPU with the real CLI: accelerate's
    autocast returns the model's outputs in float32, and the loss's bf16 output layer still computes."""
    spec = make_spec(
        "lora",
        model={"source": str(tiny_model_dir), "dtype": "bfloat16"},
        files=data_files,
        train={"mixed_precision": "bf16"},
    )
    (isolated / "spec.json").write_text(json.dumps(spec | {"tracking": {"enabled": False}}))
    done = run_ftjob("run", "spec.json", cwd=isolated)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixed precision bf16" in done.stdout + done.stderr
    assert "the loss goes through the output layer chunk by chunk" in done.stdout + done.stderr
    losses = [
        h["train/loss"]
        for h in json.loads((isolated / "runs" / "t" / "adapter" / "metrics.json").read_text())["history"]
    ]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
