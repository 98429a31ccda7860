"""What ftjob refuses from storage it does not control (issue: hostile object keys, adapters, URLs)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from helpers import ftjob, put_other_weights

from job.errors import UserError
from job.storage import download_dir


@pytest.mark.parametrize(
    "key",
    ["m/a/../../../escape.txt", "m/../escape.txt", "m//abs/escape.txt", "m/./x/escape.txt"],
)
def test_an_object_key_that_leaves_the_target_folder_is_refused(s3, s3_server, tmp_path, key):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=s3.bucket, Key="m/config.json", Body=b"{}")
    client.put_object(Bucket=s3.bucket, Key=key, Body=b"owned")
    target = tmp_path / "deep" / "down" / "dl"
    target.mkdir(parents=True)
    with pytest.raises(UserError, match="refusing the object"):
        download_dir(f"s3://{s3.bucket}/m", target)
    assert not list(tmp_path.rglob("escape.txt"))  # nothing written, inside or out
    assert not list(target.iterdir())  # refused before anything was copied


def test_plain_keys_are_copied(s3, s3_server, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server)
    for key in (
        "m/",
        "m/sub/",
        "m/config.json",
        "m/sub/dir/weights.safetensors",
        "m/a..b.txt",
    ):  # "/": folder markers
        client.put_object(Bucket=s3.bucket, Key=key, Body=key.encode())
    assert download_dir(f"s3://{s3.bucket}/m", tmp_path) == [
        "a..b.txt",
        "config.json",
        "sub/dir/weights.safetensors",
    ]
    assert (tmp_path / "sub/dir/weights.safetensors").read_bytes() == b"m/sub/dir/weights.safetensors"


def published_adapter(workdir: Path, tiny_model_dir, data_files) -> Path:
    """The adapter/ of two LoRA steps on the tiny model, published under workdir/runs/t (the cwd)."""
    from helpers import make_spec, train_in_process

    spec = make_spec(
        "lora", model=tiny_model_dir, files=data_files, tracking={"enabled": False}, train={"max_steps": 2}
    )
    train_in_process(spec, restart=True)
    return workdir / "runs" / "t" / "adapter"


def crafted_adapter(tmp_path, tiny_model_dir, data_files) -> tuple:
    """A published adapter altered as an attacker would: its spec.json asks for remote code and its
    tokenizer config points at Python shipped beside it; the MANIFEST is rewritten to match."""
    import json

    from job.output.manifest import write_manifest

    adapter = published_adapter(tmp_path, tiny_model_dir, data_files)
    spec = json.loads((adapter / "spec.json").read_text())
    spec["model"]["trust_remote_code"] = True
    (adapter / "spec.json").write_text(json.dumps(spec))
    marker = tmp_path / "code-ran"
    (adapter / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"  # no such class without the shipped code
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    write_manifest(adapter)
    return adapter, marker


def test_generate_never_runs_code_an_adapter_ships(tiny_model_dir, data_files, isolated):

    adapter, marker = crafted_adapter(isolated, tiny_model_dir, data_files)
    result = ftjob("generate", "--adapter", str(adapter), "--prompt", "Say hi", cwd=isolated)
    assert result.returncode == 2, result.stderr
    assert "trust_remote_code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()  # the spec.json's trust_remote_code: true was not honoured


def test_generate_takes_the_base_model_from_the_command_line(tiny_model_dir, data_files, isolated):
    import json

    adapter = published_adapter(isolated, tiny_model_dir, data_files)
    spec = json.loads((adapter / "spec.json").read_text())
    spec["model"]["source"] = str(isolated / "moved-away")
    (adapter / "spec.json").write_text(json.dumps(spec))
    from job.output.manifest import write_manifest

    write_manifest(adapter)
    missing = ftjob(
        "generate", "--adapter", str(adapter), "--prompt", "Say hi", "--max-new-tokens", "2", cwd=isolated
    )
    assert missing.returncode == 2 and "moved-away" in missing.stderr
    given = ftjob("generate", "--adapter", str(adapter), "--prompt", "Say hi", "--max-new-tokens", "2", "--base-model", str(tiny_model_dir), cwd=isolated)  # fmt: skip
    assert given.returncode == 0, given.stderr


def adapter_on_a_copy(isolated, tiny_model_dir, data_files) -> tuple[Path, dict, Path]:
    """(model, spec, adapter): an adapter trained and published on a copy of the tiny model, which the
    test may then change."""
    import shutil

    from helpers import make_spec, train_in_process

    model = Path(shutil.copytree(tiny_model_dir, isolated / "model"))
    spec = make_spec(
        "lora", model=model, files=data_files, tracking={"enabled": False}, train={"max_steps": 2}
    )
    train_in_process(spec)
    return model, spec, isolated / "runs" / "t" / "adapter"


def test_a_merge_only_run_refuses_a_base_other_than_the_one_the_adapter_was_trained_on(
    tiny_model_dir, data_files, isolated
):
    from helpers import train_in_process

    from job.model.source import model_identity

    model, spec, _ = adapter_on_a_copy(isolated, tiny_model_dir, data_files)
    trained_on, original = model_identity(model).digest, (model / "model.safetensors").read_bytes()
    put_other_weights(model)
    merging = {**spec, "output": {"merge": True}}
    with pytest.raises(UserError) as refused:
        train_in_process(merging)
    message = str(refused.value)
    assert message.startswith("output.merge: the adapter in ") and "--restart" in message
    assert (
        f"trained on the model {trained_on}, but model.source {model} now holds {model_identity(model).digest}"
        in message
    )
    assert not (isolated / "runs" / "t" / "merged").exists()

    (model / "model.safetensors").write_bytes(original)
    assert train_in_process(merging) is None  # the adapter was already published: only merged
    assert (isolated / "runs" / "t" / "merged" / "MANIFEST.json").is_file()


def test_a_merge_only_run_merges_an_adapter_of_an_older_ftjob_with_a_warning(
    tiny_model_dir, data_files, isolated, caplog
):
    from helpers import train_in_process

    from job.output.manifest import write_manifest

    model, spec, adapter = adapter_on_a_copy(isolated, tiny_model_dir, data_files)
    published = json.loads((adapter / "spec.json").read_text())
    del published["model"]["identity"]  # as an ftjob that did not record it published it
    (adapter / "spec.json").write_text(json.dumps(published))
    write_manifest(adapter)
    put_other_weights(model)
    with caplog.at_level("WARNING", logger="job"):
        train_in_process({**spec, "output": {"merge": True}})
    assert "spec.json has no model.identity (an older ftjob published it)" in caplog.text
    assert (isolated / "runs" / "t" / "merged" / "MANIFEST.json").is_file()


def test_generate_refuses_a_base_other_than_the_one_the_adapter_was_trained_on(
    tiny_model_dir, data_files, isolated
):
    from job.generate import load_trained
    from job.model.source import model_identity

    model, _, adapter = adapter_on_a_copy(isolated, tiny_model_dir, data_files)
    trained_on = model_identity(model).digest
    load_trained(adapter)

    put_other_weights(model)
    with pytest.raises(UserError) as refused:
        load_trained(adapter)
    message = str(refused.value)
    assert (
        f"model.source {model} holds the model {model_identity(model).digest!r}, not {trained_on!r}"
        in message
    )
    assert "ftjob generate: --base-model" in message
    load_trained(adapter, base_model=str(model))  # another base, named on purpose: no check


def test_a_published_spec_json_runs_again_pinned_to_the_model_it_was_trained_on(
    tiny_model_dir, data_files, isolated, capsys
):
    from job.cli import main
    from job.model.source import model_identity

    model, _, adapter = adapter_on_a_copy(isolated, tiny_model_dir, data_files)
    published = str(adapter / "spec.json")
    trained_on = model_identity(model).digest
    assert json.loads((adapter / "spec.json").read_text())["model"]["identity"] == trained_on
    assert main(["validate", published]) == 0
    assert main(["run", published]) == 0  # the spec the run trained with: published already, nothing to do

    put_other_weights(model)
    assert main(["run", published, "--set", "output.uri=./again"]) == 2
    err = capsys.readouterr().err
    assert f"model.identity: model.source {model} holds the model {model_identity(model).digest!r}, not {trained_on!r}" in err  # fmt: skip
    assert not (isolated / "again" / "checkpoints").exists()
