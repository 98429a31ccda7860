"""The CLI as a batch job runs it: `ftjob run` logs plain lines and publishes, then `ftjob generate` answers
from the adapter."""

from __future__ import annotations

import json

from helpers import make_spec, run_ftjob


def test_cli_run_logs_plain_lines_then_generate(tiny_model_dir, data_files, isolated):
    spec_path = isolated / "spec.json"
    spec_path.write_text(json.dumps(make_spec("lora", model=tiny_model_dir, files=data_files)))
    run = run_ftjob("run", str(spec_path), "--set", "train.max_steps=6", cwd=isolated)
    assert run.returncode == 0, run.stderr
    steps = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
    assert all(
        " loss " in line and " lr " in line and " tok/s " in line and " eta " in line for line in steps
    )
    assert "adapter published to ./runs/t/adapter" in run.stdout
    assert "Traceback" not in run.stderr

    generated = run_ftjob(
        "generate", "--adapter", "runs/t/adapter", "--prompt", "Say hi", "--max-new-tokens", "5", cwd=isolated
    )
    assert generated.returncode == 0, generated.stderr
    from job.generate import generate

    assert generated.stdout == generate("runs/t/adapter", "Say hi", max_new_tokens=5) + "\n"
