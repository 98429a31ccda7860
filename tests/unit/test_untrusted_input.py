"""Input ftjob reads back is checked as strictly as the spec: published spec.json and manifests, URLs with
credentials, rows whose rendering runs away."""

from __future__ import annotations

import json
import re

import pytest
from helpers import make_spec

from job.errors import UserError


@pytest.mark.parametrize(
    "model,problem",
    [
        ({"source": "m", "identity": 42}, "model.identity is 42, not a model's identity"),
        ({"source": "m", "identity": "sha256:abc"}, "model.identity is 'sha256:abc', not a model's identity"),
        ("m", "model is 'm', not a mapping"),
    ],
)
def test_a_published_spec_json_whose_model_identity_is_not_one_is_refused(tmp_path, model, problem):
    from job.output.publish import trained_on

    (tmp_path / "spec.json").write_text(json.dumps({"model": model}))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}/spec.json: {problem}")):
        trained_on(tmp_path)


@pytest.mark.parametrize(
    "manifest",
    ["{", "[]", '{"files": []}', '{"files": {"a": "x"}}', '{"files": {"a": {"sha256": "x", "size": "1"}}}'],
    ids=["not-json", "not-an-object", "files-not-an-object", "entry-not-an-object", "size-not-a-number"],
)
def test_a_manifest_not_as_ftjob_writes_it_is_refused(tmp_path, manifest):
    from job.output.manifest import verify_manifest

    (tmp_path / "MANIFEST.json").write_text(manifest)
    with pytest.raises(UserError, match="MANIFEST.json: not a manifest as ftjob writes it"):
        verify_manifest(tmp_path)


@pytest.mark.parametrize(
    "where,value",
    [
        ("model.source", "https://user:hunter2@models.example.com/llama"),
        ("data.train[0]", "s3://AKIAEXAMPLE:hunter2@bucket/train.jsonl"),
        ("data.eval[0]", "https://token-hunter2@data.example.com/eval.jsonl"),
        ("output.uri", "s3://u:hunter2@bucket/runs"),
        ("storage_options.s3.endpoint_url", "http://minio:hunter2@minio:9000"),
        ("model.source", "simplecache::https://u:hunter2@models.example.com/m"),  # a chained fsspec URL
        ("model.source", "https://u:hun#ter2@models.example.com/m"),  # "#" or "?" in a password
        ("data.eval[0]", "https://u:hun?ter2@data.example.com/eval.jsonl"),
    ],
)
def test_credentials_inside_a_url_are_refused_without_being_echoed(where, value):
    from job.spec import apply_override, validate_spec

    data = make_spec(model="m")
    apply_override(data, where.replace("[0]", ""), [value] if "[0]" in where else value, "test")
    with pytest.raises(UserError) as refused:
        validate_spec(data)
    assert f"{where}: a URL with credentials in it" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_urls_without_credentials_pass():
    from job.spec import validate_spec

    train = ["hf://datasets/org/name@v1.0", "s3://bucket/a@b.jsonl"]
    validate_spec(make_spec(model="https://models.example.com/llama?rev=main@x", data={"train": train}))


def test_paths_that_merely_contain_token_letters_are_published_as_they_are():
    from job.spec import public_dict, validate_spec

    train = ["s3://b/sk-learn-datasets-2024-cleaned-v2/train.jsonl", "https://h/d.jsonl?sig=abc"]
    spec = validate_spec(
        make_spec(
            model="/models/hf_Llama3InstructFinetunedVersionTwoXyz",
            data={"train": train},
            tracking={"tags": {"api_token": "hunter2", "hf": "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"}},
        )
    )
    public = public_dict(spec)
    assert public["model"]["source"] == "/models/hf_Llama3InstructFinetunedVersionTwoXyz"
    assert public["data"]["train"] == ["s3://b/sk-learn-datasets-2024-cleaned-v2/train.jsonl", "***"]
    assert public["tracking"]["tags"] == {"api_token": "***", "hf": "***"}


LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_a_row_whose_rendering_runs_out_of_memory_is_a_bad_row(tokenizer):
    from job.data.formats import BadRow, Formatter

    huge_on_request = (
        "{% for m in messages %}{% if m['content'] == 'huge' %}{{ 'a' * 10**15 }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    formatter = Formatter("chat", {}, "completion", tokenizer, huge_on_request)
    with pytest.raises(BadRow, match="chat template: rendering ran out of memory"):
        formatter({"messages": [{"role": "user", "content": "huge"}, {"role": "assistant", "content": "yo"}]})


def test_a_row_that_makes_the_template_run_long_is_a_bad_row(tokenizer, monkeypatch):
    from job.data import template_budget
    from job.data.formats import BadRow, Formatter

    slow_on_request = (
        "{% for m in messages %}{% if m['content'] == 'slow' %}" + LOOPS + "{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    formatter = Formatter("chat", {}, "completion", tokenizer, slow_on_request)
    monkeypatch.setattr(template_budget, "ROW_SECONDS", 0.5)
    fine = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert formatter(fine).segments
    with pytest.raises(BadRow, match="chat template: rendering took more than 0.5 s"):
        formatter({"messages": [{"role": "user", "content": "slow"}, {"role": "assistant", "content": "yo"}]})
    assert formatter(fine).segments  # and the next row renders as before
