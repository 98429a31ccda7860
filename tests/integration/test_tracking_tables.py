"""Tables in a tracked run (eval.samples): through the spool to a real MLflow server, rows of every eval in
one table; a table record that is not as ftjob writes it is refused like any other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tracking_helpers import tracked, tracker_spec

from job.tracking.spool import Spool, table_problem
from job.tracking.tracker import tracking_target


def test_rows_of_each_eval_accumulate_in_one_table(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tracker = tracked(tracker_spec(tiny_model_dir, data_files, "tables"))
    with tracker.run({}):
        tracker.log_table({"step": [2], "prompt": ["hi"], "generation": ["hello"]}, "eval_samples.json")
        tracker.log_metrics({"train/loss": 1.0}, 2)
        tracker.log_table({"step": [4], "prompt": ["hi"], "generation": ["hey"]}, "eval_samples.json")
    local = Path(client.download_artifacts(tracker.run_id, "eval_samples.json", str(tmp_path)))
    table = json.loads(local.read_text())
    assert table["columns"] == ["step", "prompt", "generation"]
    assert table["data"] == [[2, "hi", "hello"], [4, "hi", "hey"]]


@pytest.mark.parametrize(
    "record,problem",
    [
        ({"data": {"a": [1]}, "artifact_file": "../outside.json"}, "is not a JSON file name"),
        ({"data": {"a": [1]}, "artifact_file": "sub/t.json"}, "is not a JSON file name"),
        ({"data": {"a": [1]}, "artifact_file": ".hidden.json"}, "is not a JSON file name"),
        ({"data": {"a": [1], "b": [1, 2]}, "artifact_file": "t.json"}, "all as long"),
        ({"data": {"a": [{"x": 1}]}, "artifact_file": "t.json"}, "lists of strings and numbers"),
        ({"data": {"a": "abc"}, "artifact_file": "t.json"}, "lists of strings and numbers"),
    ],
)
def test_a_table_record_not_as_ftjob_writes_it_is_refused(record, problem):
    assert problem in table_problem({"kind": "table", **record})


def test_a_spool_holding_a_planted_table_record_is_quarantined(spool_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    target = tracking_target(os.environ["MLFLOW_TRACKING_URI"])
    spool = Spool.create(spool_dir, target)
    spool.append({"kind": "table", "data": {"a": [1]}, "artifact_file": "../../escape.json", "time": 1})
    key = spool.key
    spool.release()
    assert Spool.acquire(spool_dir, key, target) is None
    assert list(spool_dir.glob(f"{key}.bad-*"))
