"""Hugging Face dataset repos as sources, resolved by datasets, over a local Hub (tests/hub_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ALPACA_ROWS,
    REPO,
    Ran,
    make_spec,
    numbered_rows,
    read_until,
    run_ftjob,
    start_run,
    train_in_process,
    write_jsonl,
    write_spec,
)
from hub_server import COMMIT, HubServer
from safetensors.torch import load_file

CARD = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train-*.jsonl
  default: true
- config_name: fr
  data_files:
  - split: train
    path: fr/train.jsonl
  - split: test
    path: fr/test.jsonl
---
# Two languages
"""
CSV_CARD = """---
configs:
- config_name: default
  data_files: train.csv
  sep: ";"
---
"""


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    """A Hub with org/plain (data/train.jsonl, data/validation.jsonl: the file layout names the splits)
    and org/cards (two configs named by its card), and repos that cannot give a split."""
    root = tmp_path_factory.mktemp("hub")
    write_jsonl(root / "org/plain/data/train.jsonl", numbered_rows())
    write_jsonl(root / "org/plain/data/validation.jsonl", ALPACA_ROWS[:2])
    write_jsonl(root / "org/cards/en/train-0.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    write_jsonl(root / "org/cards/en/train-1.jsonl", [{"instruction": "Say bye", "output": "bye"}])
    write_jsonl(root / "org/cards/fr/train.jsonl", [{"instruction": "Dis bonjour", "output": "bonjour"}])
    write_jsonl(root / "org/cards/fr/test.jsonl", [{"instruction": "Dis merci", "output": "merci"}])
    (root / "org/cards/README.md").write_text(CARD)
    write_jsonl(root / "org/private/train.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    (root / "org/arrows/data").mkdir(parents=True)
    (root / "org/arrows/data/train.arrow").write_bytes(b"not read")
    (root / "org/scripted").mkdir(parents=True)
    (root / "org/scripted/scripted.py").write_text("raise SystemExit('a loading script ran')\n")
    write_jsonl(root / "org/scripted/train.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    (root / "org/options/README.md").parent.mkdir(parents=True)
    (root / "org/options/README.md").write_text(CSV_CARD)
    (root / "org/options/train.csv").write_text("instruction;output\nSay hi;hi\n")
    server = HubServer(root, private={"org/private": "hf_secret"})
    yield server
    server.close()


def hub_environment(server: HubServer, home: Path) -> dict[str, str]:
    """What points huggingface_hub and datasets at server, as they are imported: in a new process."""
    return {"HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The Hub, for the subprocesses the test starts."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in hub_environment(hub_server, tmp_path / "hf-home").items():
        monkeypatch.setenv(name, value)
    return hub_server


def hub_spec(path, model_dir, train: list[str], eval_: list[str] | None = None) -> str:
    """Two steps over the tiny model, written at path."""
    data = {"train": train, "eval": eval_ or [], "max_seq_len": 64}
    train_ = {"max_steps": 2, "micro_batch_size": 2}
    return str(
        write_spec(path, make_spec(model=model_dir, data=data, train=train_, tracking={"enabled": False}))
    )


def test_a_repo_names_the_files_of_a_split_pinned_to_the_commit(hub, tiny_model_dir, tmp_path):
    spec = hub_spec(
        tmp_path / "s.json",
        tiny_model_dir,
        ["hf://datasets/org/cards@v1.0", "hf://datasets/org/cards@refs/pr/1?config=fr"],
        ["hf://datasets/org/plain@refs%2Fpr%2F1", "hf://datasets/org/cards?config=fr&split=test"],
    )
    result = run_ftjob("validate", spec, "--check-access", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pinned = f"hf://datasets/org/cards@{COMMIT}"
    lines = result.stdout.splitlines()
    assert f"ok  data.train {pinned}/en/train-0.jsonl" in lines  # the card's default config
    assert f"ok  data.train {pinned}/en/train-1.jsonl" in lines
    assert f"ok  data.train {pinned}/fr/train.jsonl" in lines  # ?config=
    assert (
        f"ok  data.eval hf://datasets/org/plain@{COMMIT}/data/validation.jsonl" in lines
    )  # eval: validation
    assert f"ok  data.eval {pinned}/fr/test.jsonl" in lines  # ?split=
    assert not any("/fr/test.jsonl" in line and "data.train" in line for line in lines)


REFUSED = {  # a source after org/plain: what the error says
    "hf://datasets/org/cards?config=fr&split=validation": "has no split 'validation' (its splits: train, test)",
    "hf://datasets/org/cards?splt=test": "unknown parameter 'splt'",
    "hf://datasets/org/missing": "cannot resolve the dataset repo hf://datasets/org/missing",
    "hf://datasets/org/cards?config=de": "cannot resolve the dataset repo",
    "hf://datasets/org/private": "cannot resolve the dataset repo",  # no HF_TOKEN
    "hf://datasets/org/arrows": "train.arrow: unsupported file type",
    "hf://datasets/org/scripted": "cannot resolve the dataset repo",  # scripts are never run
    "hf://datasets/org/options": "reader options ftjob does not apply (sep)",
    "hf://datasets/org/plain@nope": "cannot resolve the dataset repo hf://datasets/org/plain@nope",
}

# `ftjob run SPEC` for each SPEC, through job.cli in one interpreter (helpers.ftjob): one interpreter start
# for all of REFUSED, not one each
RUN_EACH = """
import json, sys
from helpers import ftjob
print(json.dumps([vars(ftjob("run", spec, cwd=sys.argv[1])) for spec in sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def refused(hub_server, tiny_model_dir, tmp_path_factory) -> dict[str, Ran]:
    """`ftjob run` over org/plain and each of REFUSED's sources, in a new process."""
    folder = tmp_path_factory.mktemp("refused")
    specs = [hub_spec(folder / f"{i}.json", tiny_model_dir, ["hf://datasets/org/plain", source])
             for i, source in enumerate(REFUSED)]  # fmt: skip
    env = {**os.environ, **hub_environment(hub_server, folder / "hf-home"), "FTJOB_CACHE": str(folder / "cache"),
           "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}  # fmt: skip
    env.pop("HF_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-c", RUN_EACH, str(folder), *specs],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return {source: Ran(**result) for source, result in zip(REFUSED, json.loads(done.stdout), strict=True)}


@pytest.mark.parametrize("source", REFUSED)
def test_a_repo_that_cannot_give_the_split_is_exit_2_naming_the_entry(refused, source):
    result = refused[source]
    assert result.returncode == 2, result.stderr
    assert "data.train[1]" in result.stderr and REFUSED[source] in result.stderr
    assert "Traceback" not in result.stderr


def test_a_private_repo_is_read_with_hf_token(hub, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    spec = hub_spec(tmp_path / "s.json", tiny_model_dir, ["hf://datasets/org/private"])
    result = run_ftjob("run", spec, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "data: 2 rows read" in result.stdout  # its one row, in each of the two steps
    assert "hf_secret" not in result.stderr + result.stdout


def test_training_from_a_repo_stops_and_resumes_exactly(hub, tiny_model_dir, tmp_path):
    """Stopped and resumed as processes; bitwise the uninterrupted run over the same rows from a local
    file (in this process): a repo's file is read as a local one is."""
    spec = make_spec("stop", model=tiny_model_dir, name="hub", data={"shuffle_buffer": 16})
    local = spec | {"data": spec["data"] | {"train": [str(hub.root / "org/plain/data/train.jsonl")]}}
    train_in_process(local | {"output": {"uri": str(tmp_path / "straight")}})
    path = write_spec(
        tmp_path / "spec.json", spec | {"data": spec["data"] | {"train": ["hf://datasets/org/plain"]}}
    )

    process = start_run(path, "./stopped")
    read_until(process, "step 8/30")
    process.terminate()
    assert process.wait(timeout=120) == 75, process.stdout.read()
    resumed = run_ftjob("run", str(path), "--set", "output.uri=./stopped", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step" in resumed.stderr
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "stopped/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(f"/datasets/org/plain/resolve/{COMMIT}/data/train.jsonl" in r for r in hub.requests)
