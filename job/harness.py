"""Evaluation while it trains: lm-evaluation-harness tasks scored on the model being trained, and greedy
generations of a few prompts for a person to read.

Both run between optimizer steps on the model as it is (adapter applied), in eval mode without
gradients, and leave it as they found it: each module's train/eval mode and the global RNG states (lm-eval
seeds Python's, NumPy's and torch's generators) are set back, so that training goes on exactly as it
would have without them. lm-eval is an optional extra (`pip install 'ftjob[eval]'`), imported here only.
"""

from __future__ import annotations

import logging
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from job.data.formats import Formatter
from job.errors import UserError
from job.generate import generate_text, stop_tokens
from job.rng import rng_states, set_rng_states
from job.spec import HarnessSpec
from job.storage import filesystem, is_local, storage_errors

log = logging.getLogger(__name__)
EXTRA = "pip install 'ftjob[eval]'"
TASK_FILE_SUFFIXES = (".yaml", ".yml")
LM_EVAL_SEEDS = (0, 1234, 1234)  # simple_evaluate's defaults: Python's, NumPy's and torch's (and few-shot)
# What MLflow accepts in a metric name; anything else in a task or metric name becomes "_".
NOT_IN_METRIC_NAMES = re.compile(r"[^/\w.\- :]")


# ---------------------------------------------------------------------------------------------
# Metric names


def metric_name(task: str, key: str) -> str | None:
    """lm-eval's result key ("acc,none", "exact_match,strict-match") of a task as an MLflow metric name:
    harness/<task>/<metric>, with /<filter> when the filter is not "none". None for what is not a score:
    the alias, and standard errors (never computed: see harness_metrics)."""
    metric, comma, filter_name = key.partition(",")
    if not comma or metric.endswith("_stderr"):
        return None
    parts = ["harness", task, metric] + ([filter_name] if filter_name != "none" else [])
    return "/".join(NOT_IN_METRIC_NAMES.sub("_", part) for part in parts)


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's results["results"] (per task and group: its scores) as {harness/<task>/<metric>: float}."""
    flat = {}
    for task, scores in results.items():
        for key, value in scores.items():
            name = metric_name(task, key)
            if name and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[name] = float(value)
    return flat


# ---------------------------------------------------------------------------------------------
# The tasks, loaded once at setup


def require_lm_eval() -> None:
    """UserError (exit 2) naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"eval.harness needs lm-evaluation-harness, which is not installed ({e}): {EXTRA}"
        ) from None


@dataclass
class HarnessTasks:
    """eval.harness's tasks as lm-eval loaded them at setup (their data read): one TaskManager.load()
    result for each entry of eval.harness.tasks, scored again at each eval."""

    config: HarnessSpec
    loaded: list[dict[str, Any]]


def load_harness_tasks(config: HarnessSpec) -> HarnessTasks:
    """Check eval.harness before training: lm-eval is installed, and each task is one lm-eval knows or a
    YAML file that can be read, and loads with its data; a UserError names the task that does not."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    # lm-eval's own index is thousands of YAML files (seconds to read): only for a task named
    manager = TaskManager(
        include_defaults=any(not task.endswith(TASK_FILE_SUFFIXES) for task in config.tasks)
    )
    loaded = []
    with tempfile.TemporaryDirectory(prefix="ftjob-harness-") as folder, quiet_lm_eval():
        for task in config.tasks:
            source = task_source(task, Path(folder))
            try:
                loaded.append(manager.load([source]))
            except Exception as e:  # lm-eval and datasets raise their own types
                raise UserError(
                    f"eval.harness.tasks: {task}: cannot be loaded: {type(e).__name__}: {e}"
                ) from None
    return HarnessTasks(config, loaded)


def task_source(task: str, folder: Path) -> str:
    """What lm-eval loads for an entry of eval.harness.tasks: a task's name as it is, a YAML file's local
    path, or a copy in `folder` of a YAML file read from a URL."""
    if not task.endswith(TASK_FILE_SUFFIXES):
        return task
    fs, path = filesystem(task)
    if is_local(task):
        return path
    copy = folder / Path(path).name
    with storage_errors(f"eval.harness.tasks: {task}"):
        fs.get_file(path, str(copy))
    return str(copy)


# ---------------------------------------------------------------------------------------------
# Scoring


class HarnessStopped(Exception):
    """should_stop() said yes during a task: its scores are incomplete and left out."""


def harness_metrics(
    model,
    tokenizer,
    tasks: HarnessTasks,
    should_stop: Callable[[], bool] = lambda: False,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Score the tasks on the model as it is: {harness/<task>/<metric>: value} for each task (and each
    group's aggregate), one task after the other.

    `should_stop` is asked before every forward pass (and generation) of the harness: when it says yes,
    the task under way is abandoned and the scores of the tasks done so far are returned. With several
    ranks each runs the same requests in the same order, so a collective `should_stop` (all ranks agree)
    is asked at the same points on every rank. `autocast_dtype`: the dtype training computes in under
    autocast (mixed precision), None for none.

    lm-eval's evaluate(), not simple_evaluate(), which also runs a dozen processes per call to describe
    the machine. Standard errors are not computed (bootstrap_iters 0): for some metrics lm-eval
    bootstraps them in a process pool, which a training process should not fork; more examples
    (eval.harness.limit) make a score precise instead."""
    from lm_eval.evaluator import evaluate

    config, scores = tasks.config, {}
    with kept_as_it_is(model), quiet_lm_eval():
        seed_as_lm_eval_does()
        lm = stoppable_lm(model, tokenizer, config.batch_size, should_stop, autocast_dtype)
        for task, loaded in zip(config.tasks, tasks.loaded, strict=True):
            prepare_as_lm_eval_does(loaded)
            try:
                results = evaluate(
                    lm=lm,
                    task_dict=loaded,
                    limit=config.limit,
                    bootstrap_iters=0,
                    log_samples=False,
                )
            except HarnessStopped:
                log.info("eval.harness: stopped during %s; the tasks before it are scored", task)
                break
            scores.update(flat_metrics(results["results"]))
    return scores


def prepare_as_lm_eval_does(loaded: dict[str, Any]) -> None:
    """Tasks as simple_evaluate() prepares them: zero-shot unless their file says otherwise, few-shot
    examples drawn with lm-eval's default seed (set anew at each eval, which draws the same)."""
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=LM_EVAL_SEEDS[2])


def seed_as_lm_eval_does() -> None:
    """The global generators seeded as simple_evaluate() seeds them, so that each eval draws the same
    (kept_as_it_is sets the training's states back)."""
    python, numpy_seed, torch_seed = LM_EVAL_SEEDS
    random.seed(python)
    np.random.seed(numpy_seed)
    torch.manual_seed(torch_seed)


def stoppable_lm(model, tokenizer, batch_size: int, should_stop: Callable[[], bool], autocast_dtype):
    """lm-eval's model for an in-memory transformers model (its HFLM), asking should_stop before each
    forward pass and generation, without progress bars."""
    from lm_eval.models.huggingface import HFLM

    class StoppableLM(HFLM):
        def _model_call(self, *args, **kwargs):
            if should_stop():
                raise HarnessStopped
            return super()._model_call(*args, **kwargs)

        def _model_generate(self, *args, **kwargs):
            if should_stop():
                raise HarnessStopped
            return super()._model_generate(*args, **kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    return StoppableLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=autocast_dtype
    )


@contextmanager
def kept_as_it_is(model) -> Iterator[None]:
    """Around an evaluation: no gradients; afterwards each module's train/eval mode and the global RNG
    states as they were (lm-eval puts the model in eval mode and seeds the generators)."""
    modes = [(module, module.training) for module in model.modules()]
    states = rng_states()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        set_rng_states(states)


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's warnings about an in-memory model and its info lines, and the progress bars of the
    datasets it reads, which a training log does not need."""
    import datasets

    datasets.disable_progress_bar()
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Generation samples


def sample_generations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, formatter: Formatter
) -> list[tuple[str, str]]:
    """(prompt, greedy generation) for each prompt, rendered as training renders a prompt (the data
    format's template) and stopped where `ftjob generate` stops."""
    stop, samples = stop_tokens(model, tokenizer, formatter), []
    with kept_as_it_is(model):
        model.eval()
        for prompt in prompts:
            text = formatter.render_prompt(prompt)
            generation = generate_text(
                model, tokenizer, text, max_new_tokens, temperature=0.0, add_bos=formatter.adds_bos, stop=stop
            )
            samples.append((prompt, generation))
    return samples


def samples_table(samples: list[tuple[str, str]], step: int) -> dict[str, list]:
    """Samples as MLflow's log_table takes them: columns step, prompt, generation (one row a sample).
    Logged to the same artifact file at each eval, the rows of every step make one table."""
    return {
        "step": [step] * len(samples),
        "prompt": [prompt for prompt, _ in samples],
        "generation": [generation for _, generation in samples],
    }
