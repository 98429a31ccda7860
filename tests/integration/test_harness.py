"""Evaluation while it trains (job/harness.py): lm-evaluation-harness tasks from local YAML files and
JSONL data, scored on a tiny model that ftjob trains to reverse words (the demo's task), and greedy
generation samples. Nothing is read from the Hub (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import copy
import random
import runpy
from pathlib import Path

import pytest
import torch
from helpers import REPO, train_in_process, write_jsonl

from job.data.formats import Formatter, alpaca_prompt
from job.errors import UserError
from job.harness import HarnessSpec, HarnessTasks, harness_metrics, load_harness_tasks, sample_generations

WORDS = runpy.run_path(str(REPO / "examples" / "demo.py"))["WORDS"]  # the demo's vocabulary
PROMPT = "### Instruction:\\nReverse the words: {{words}}\\n\\n### Response:\\n"  # alpaca, as trained
TASK = """\
task: reversal
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{prompt}"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""
GENERATION_TASK = """\
task: reversal_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{prompt}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["<|eos|>", "\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def word_lists(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(WORDS, 3) for _ in range(n)]


def question(words: list[str], rng: random.Random) -> dict:
    """A multiple-choice row: the words reversed (right), as they are, and rotated, in a random order."""
    right = " ".join(reversed(words))
    choices = [right, " ".join(words), " ".join(words[1:] + words[:1])]
    rng.shuffle(choices)
    return {"words": " ".join(words), "choices": choices, "answer": choices.index(right)}


def training_row(words: list[str]) -> dict:
    return {"instruction": "Reverse the words: " + " ".join(words), "output": " ".join(reversed(words))}


@pytest.fixture(scope="module")
def reversal(tmp_path_factory) -> Path:
    """A folder with the reversal tasks (reversal.yaml: multiple choice; generation.yaml: the answer
    generated), their 40 questions, 1000 training rows of other word lists and a tiny model whose
    tokenizer learned the words."""
    from job.model.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("reversal")
    rng = random.Random(5)
    data = write_jsonl(folder / "questions.jsonl", [question(words, rng) for words in word_lists(40, 2)])
    (folder / "reversal.yaml").write_text(TASK.format(data=data, prompt=PROMPT))
    (folder / "generation.yaml").write_text(GENERATION_TASK.format(data=data, prompt=PROMPT))
    train = [training_row(words) for words in word_lists(1000, 1)]
    write_jsonl(folder / "train.jsonl", train)
    corpus = [alpaca_prompt(row["instruction"]) + row["output"] for row in train[:200]]
    build_tiny_model(folder / "tiny", corpus, hidden_size=64, layers=2, vocab_size=300)
    return folder


@pytest.fixture(scope="module")
def tasks(reversal) -> HarnessTasks:
    files = [str(reversal / "reversal.yaml"), str(reversal / "generation.yaml")]
    return load_harness_tasks(HarnessSpec(tasks=files, limit=24, batch_size=8))


@pytest.fixture
def adapted(reversal):
    """The tiny model with a LoRA adapter (dropout on), in train mode, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(reversal / "tiny")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config).train(), AutoTokenizer.from_pretrained(reversal / "tiny")


def training_step(model, tokenizer) -> tuple[float, list[torch.Tensor]]:
    """One training step's loss and gradients on a reversal row (dropout drawn from the global RNG)."""
    ids = tokenizer(
        alpaca_prompt("Reverse the words: plum kiwi lime") + "lime kiwi plum", return_tensors="pt"
    )
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


def test_the_tasks_score_as_harness_metrics_and_the_model_trains_on_as_before(adapted, tasks):
    model, tokenizer = adapted
    model.base_model.model.model.layers[0].eval()  # a module out of train mode stays so
    untouched = copy.deepcopy(model)
    modes = [m.training for m in model.modules()]
    weights = dict(model.named_parameters())
    torch.manual_seed(7)

    scores = harness_metrics(model, tokenizer, tasks)

    assert set(scores) == {"harness/reversal/acc", "harness/reversal_gen/exact_match"}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in scores.values())
    assert harness_metrics(model, tokenizer, tasks) == scores  # the tasks score anew, the same
    assert [m.training for m in model.modules()] == modes
    assert all(p is weights[name] for name, p in model.named_parameters())
    loss, gradients = training_step(model, tokenizer)  # the RNG as before the evals: the same dropout
    torch.manual_seed(7)
    expected_loss, expected_gradients = training_step(untouched, tokenizer)
    assert loss == expected_loss
    assert all(torch.equal(a, b) for a, b in zip(gradients, expected_gradients, strict=True))


def test_a_stop_ends_the_eval_at_the_next_forward_pass_with_the_tasks_done_before(adapted, tasks):
    model, tokenizer = adapted
    asked = []

    def never() -> bool:
        asked.append(1)
        return False

    first = HarnessTasks(tasks.config.model_copy(update={"tasks": tasks.config.tasks[:1]}), tasks.loaded[:1])
    alone = harness_metrics(model, tokenizer, first, never)
    forward_passes = len(asked)
    assert forward_passes > 1

    asked.clear()

    def after_the_first_task() -> bool:
        asked.append(1)
        return len(asked) > forward_passes

    assert harness_metrics(model, tokenizer, tasks, after_the_first_task) == alone
    assert len(asked) == forward_passes + 1  # nothing more of the second task after the stop
    assert harness_metrics(model, tokenizer, tasks, lambda: True) == {}
    assert model.training


def test_accuracy_rises_as_ftjob_trains_and_the_samples_answer_as_trained(reversal, tasks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reversal / "tiny")
    before = harness_metrics(AutoModelForCausalLM.from_pretrained(reversal / "tiny"), tokenizer, tasks)
    spec = {
        "name": "reverse",
        "model": {"source": str(reversal / "tiny")},
        "adapter": {"method": "full"},  # the tiny model learns in a few seconds (LoRA: a few minutes)
        "data": {"train": [str(reversal / "train.jsonl")], "max_seq_len": 64},
        "train": {"max_steps": 40, "micro_batch_size": 16, "learning_rate": 1e-2, "warmup_steps": 5,
                  "eval_every": 0, "checkpoint_every": 0, "mixed_precision": "no"},
        "tracking": {"enabled": False},
    }  # fmt: skip
    trained = train_in_process(spec).model

    after = harness_metrics(trained, tokenizer, tasks)
    assert after["harness/reversal/acc"] >= before["harness/reversal/acc"] + 0.25, (before, after)

    prompts = ["Reverse the words: plum kiwi lime", "Reverse the words: pear olive grape"]
    formatter = Formatter("alpaca", {}, "completion", tokenizer)
    samples = sample_generations(trained.train(), tokenizer, prompts, 8, formatter)
    assert [prompt for prompt, _ in samples] == prompts
    for prompt, generation in samples:  # an answer that starts as trained: the prompt's last word first
        assert generation.split()[0] == prompt.split()[-1], samples
    assert trained.training


def test_a_task_file_from_a_url_loads_and_one_that_cannot_load_is_named(reversal):
    import fsspec

    fsspec.filesystem("memory").pipe("/tasks/reversal.yaml", (reversal / "reversal.yaml").read_bytes())
    loaded = load_harness_tasks(HarnessSpec(tasks=["memory://tasks/reversal.yaml"]))
    assert list(loaded.loaded[0]["tasks"]) == ["reversal"]

    broken = reversal / "broken.yaml"
    broken.write_text(TASK.format(data=reversal / "missing.jsonl", prompt=PROMPT))
    with pytest.raises(UserError, match=f"eval.harness.tasks: {broken}: cannot be loaded"):
        load_harness_tasks(HarnessSpec(tasks=[str(broken)]))
    with pytest.raises(UserError, match="eval.harness.tasks: memory://tasks/none.yaml: not found"):
        load_harness_tasks(HarnessSpec(tasks=["memory://tasks/none.yaml"]))


def test_a_run_scores_its_tasks_at_each_checkpoint_and_logs_samples_as_a_table(reversal, isolated):
    """eval.harness every checkpoint and eval.samples, through the training loop: harness metrics at the
    checkpoint steps (the end's step among them, scored once), the samples of each eval in one table."""
    import json

    from mlflow import MlflowClient

    from job.tracking.store import default_tracking_uri

    spec = {
        "name": "scored",
        "model": {"source": str(reversal / "tiny")},
        "data": {"train": [str(reversal / "train.jsonl")], "max_seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 8, "checkpoint_every": 2, "eval_every": 0,
                  "mixed_precision": "no"},
        "eval": {"harness": {"tasks": [str(reversal / "reversal.yaml")], "every": "checkpoint", "limit": 8},
                 "samples": ["Reverse the words: plum kiwi lime"], "sample_length": 4},
        "tracking": {"experiment": "harness"},
    }  # fmt: skip
    result = train_in_process(spec)
    scored = [h["step"] for h in result.history if "harness/reversal/acc" in h]
    assert scored == [2, 4] and all(
        0 <= h["harness/reversal/acc"] <= 1 for h in result.history if "harness/reversal/acc" in h
    )
    client = MlflowClient(default_tracking_uri())
    assert client.get_metric_history(result.run_id, "harness/reversal/acc")[-1].step == 4
    table = json.loads(
        Path(client.download_artifacts(result.run_id, "eval_samples.json", str(isolated))).read_text()
    )
    assert table["columns"] == ["step", "prompt", "generation"]
    assert [row[:2] for row in table["data"]] == [
        [2, spec["eval"]["samples"][0]],
        [4, spec["eval"]["samples"][0]],
    ]
