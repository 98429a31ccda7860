"""The pieces of evaluation while it trains (job/harness.py) that need no model: metric names, the
eval.harness section's checks, the samples' table, the missing extra."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from job.errors import UserError
from job.harness import HarnessSpec, flat_metrics, load_harness_tasks, metric_name, samples_table


@pytest.mark.parametrize(
    "task, key, name",
    [
        ("reversal", "acc,none", "harness/reversal/acc"),
        ("arc_easy", "acc_norm,none", "harness/arc_easy/acc_norm"),
        ("gsm8k", "exact_match,strict-match", "harness/gsm8k/exact_match/strict-match"),
        ("my task!", "f1,none", "harness/my task_/f1"),  # what MLflow refuses in a name becomes _
        ("reversal", "acc_stderr,none", None),
        ("reversal", "alias", None),
    ],
)
def test_lm_evals_result_keys_become_metric_names(task, key, name):
    assert metric_name(task, key) == name


def test_only_the_scores_of_every_task_and_group_are_kept_as_floats():
    results = {
        "mmlu": {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": "N/A"},
        "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 1, "acc_stderr,none": 0.1},
        "gsm8k": {
            "exact_match,strict-match": 0.5,
            "exact_match,flexible-extract": 0.75,
            "sample_len,none": True,
        },
    }
    assert flat_metrics(results) == {
        "harness/mmlu/acc": 0.25,
        "harness/mmlu_anatomy/acc": 1.0,
        "harness/gsm8k/exact_match/strict-match": 0.5,
        "harness/gsm8k/exact_match/flexible-extract": 0.75,
    }


def test_the_section_has_defaults_and_refuses_what_cannot_run():
    config = HarnessSpec(tasks=["hellaswag", "tasks/reversal.yaml"])
    assert (config.every, config.limit, config.batch_size) == ("end", None, 8)
    for bad in (
        {"tasks": []},
        {"tasks": ["hellaswag", "hellaswag"]},
        {"tasks": [" "]},
        {"tasks": ["hellaswag"], "every": "step"},
        {"tasks": ["hellaswag"], "limit": 0},
        {"tasks": ["hellaswag"], "batch_size": 0},
        {"tasks": ["hellaswag"], "num_fewshot": 5},
    ):
        with pytest.raises(ValidationError):
            HarnessSpec(**bad)
    with pytest.raises(ValidationError, match="named more than once: hellaswag"):
        HarnessSpec(tasks=["hellaswag", "hellaswag"])


def test_samples_are_a_table_with_the_step_on_each_row():
    samples = [("Reverse the words: a b", "b a"), ("Reverse the words: c d", "d")]
    assert samples_table(samples, 40) == {
        "step": [40, 40],
        "prompt": ["Reverse the words: a b", "Reverse the words: c d"],
        "generation": ["b a", "d"],
    }


def test_a_spec_asking_for_the_harness_without_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra imports
    with pytest.raises(UserError, match=r"pip install 'ftjob\[eval\]'") as raised:
        load_harness_tasks(HarnessSpec(tasks=["hellaswag"]))
    assert raised.value.exit_code == 2
