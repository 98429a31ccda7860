"""Hugging Face dataset repos as sources, resolved by datasets, over a local Hub (tests/hub_server.py)."""

from __future__ import annotations

import json

import pytest
from helpers import ALPACA_ROWS, read_until, run_ftjob, start_run, write_jsonl, write_stop_spec
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


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub with org/plain (data/train.jsonl, data/validation.jsonl: the file layout names the splits)
    and org/cards (two configs named by its card), for the subprocesses the tests start."""
    root = tmp_path / "hub"
    write_jsonl(
        root / "org/plain/data/train.jsonl",
        [dict(r, output=f"{r['output']} {i}") for i, r in enumerate(ALPACA_ROWS * 15)],
    )
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
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in {
        "HF_DATASETS_OFFLINE": "0",
        "HF_ENDPOINT": server.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        monkeypatch.setenv(name, value)
    yield server
    server.close()


def write_spec(path, model_dir, train: list[str], eval_: list[str] | None = None) -> str:
    spec = {
        "model": {"source": str(model_dir)},
        "data": {"train": train, "eval": eval_ or [], "max_seq_len": 64},
        "train": {"max_steps": 2, "micro_batch_size": 2},
        "tracking": {"enabled": False},
    }
    path.write_text(json.dumps(spec))
    return str(path)


def test_a_repo_names_the_files_of_a_split_pinned_to_the_commit(hub, tiny_model_dir, tmp_path):
    spec = write_spec(
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


@pytest.mark.parametrize(
    "source,message",
    [
        (
            "hf://datasets/org/cards?config=fr&split=validation",
            "has no split 'validation' (its splits: train, test)",
        ),
        ("hf://datasets/org/cards?splt=test", "unknown parameter 'splt'"),
        ("hf://datasets/org/missing", "cannot resolve the dataset repo hf://datasets/org/missing"),
        ("hf://datasets/org/cards?config=de", "cannot resolve the dataset repo"),
        ("hf://datasets/org/private", "cannot resolve the dataset repo"),  # no HF_TOKEN
        ("hf://datasets/org/arrows", "train.arrow: unsupported file type"),
        ("hf://datasets/org/scripted", "cannot resolve the dataset repo"),  # scripts are never run
        ("hf://datasets/org/options", "reader options ftjob does not apply (sep)"),
        ("hf://datasets/org/plain@nope", "cannot resolve the dataset repo hf://datasets/org/plain@nope"),
    ],
)
def test_a_repo_that_cannot_give_the_split_is_exit_2_naming_the_entry(
    hub, tiny_model_dir, tmp_path, source, message
):
    spec = write_spec(tmp_path / "s.json", tiny_model_dir, ["hf://datasets/org/plain", source])
    result = run_ftjob("run", spec, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "data.train[1]" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_private_repo_is_read_with_hf_token(hub, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    spec = write_spec(tmp_path / "s.json", tiny_model_dir, ["hf://datasets/org/private"])
    result = run_ftjob("run", spec, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "data: 2 rows read" in result.stdout  # its one row, in each of the two steps
    assert "hf_secret" not in result.stderr + result.stdout


def test_training_from_a_repo_stops_and_resumes_exactly(hub, tiny_model_dir, tmp_path):
    data = {"train": ["hf://datasets/org/plain"], "shuffle_buffer": 16}
    path = write_stop_spec(tmp_path, tiny_model_dir, "hub", 30, checkpoint_every=5, seed=3, data=data)
    straight = run_ftjob("run", str(path), "--set", "output.uri=./straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

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
