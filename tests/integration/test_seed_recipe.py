"""examples/seed-recipe.yaml as it is, on the tiny model: QLoRA over a JSON file of instruction/output rows,
the recipe's prompt template, a checkpoint at each epoch's end, and an exact resume from one of them."""

from __future__ import annotations

import json
import shutil

import yaml
from helpers import REPO, train_in_process

from job.data.formats import Formatter
from job.spec import validate_spec


def recipe(tiny_model_dir, isolated) -> dict:
    spec = yaml.safe_load((REPO / "examples" / "seed-recipe.yaml").read_text())
    rows = [
        {"instruction": f"Count to {n}", "output": " ".join(map(str, range(1, n + 1)))} for n in range(1, 61)
    ]
    (isolated / "rows.json").write_text(json.dumps(rows))  # a JSON array, as the recipe's data
    spec["model"]["source"] = str(tiny_model_dir)
    spec["data"]["train"] = [str(isolated / "rows.json")]
    spec["train"]["mixed_precision"] = "no"  # the numbers compared below: float32 on every CPU
    spec["output"] = {"uri": str(isolated / "out"), "keep_checkpoints": 3}
    spec["tracking"] = {"enabled": False}
    return spec


def committed_steps(output) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (output / "checkpoints").glob("*/COMMITTED"))


def test_the_seed_recipe_checkpoints_at_each_epochs_end_and_resumes_exactly(tiny_model_dir, isolated):
    spec = recipe(tiny_model_dir, isolated)
    loaded = validate_spec(spec)
    assert loaded.model.quantization == "4bit" and loaded.adapter.target_modules == ["q_proj", "v_proj"]
    assert (loaded.train.checkpoint_every, loaded.train.epochs, loaded.data.prompt_template) == (
        "epoch",
        3,
        "Instruction: {instruction}\nResponse: ",
    )
    first = train_in_process(spec)
    output = isolated / "out"
    steps = committed_steps(output)
    # 60 rows: 15 micro-batches of 4 an epoch, 8 a step: epochs end inside steps 2, 4 and 6 (the last)
    assert steps == [2, 4, 6] and first.history[-1]["step"] == 6
    published = json.loads((output / "adapter" / "spec.json").read_text())
    assert published["data"]["prompt_template"] == spec["data"]["prompt_template"]
    formatter = Formatter.of(validate_spec(published).data, None)
    assert (
        formatter.render_prompt("Count to 3") == "Instruction: Count to 3\nResponse: "
    )  # as generate renders it

    losses = [h["train/loss"] for h in first.history]
    shutil.rmtree(output / "adapter")
    shutil.rmtree(next((output / "checkpoints").glob(f"step-{steps[-1]:06d}-*")))
    resumed = train_in_process(spec)  # from the second epoch's checkpoint
    assert [(h["step"], h["train/loss"]) for h in resumed.history if h["step"] > 4] == [
        (5, losses[4]),
        (6, losses[5]),
    ]
