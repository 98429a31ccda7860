"""model.source resolved without loading weights: local folders, the hub offline, pickles refused, and a
model's identity (with downloads and the node's cache: tests/integration/test_model_cache.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_spec

from job.errors import UserError
from job.model.source import resolve_model_dir
from job.spec import ModelSpec


def resolve(source: str):
    return resolve_model_dir(ModelSpec(source=source))


def test_missing_local_directory(isolated):
    with pytest.raises(UserError, match=r"model.source: no such directory: ./models/nothing"):
        resolve("./models/nothing")


def test_pickle_only_model_is_refused(isolated):
    model = isolated / "bin-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        resolve(str(model))


def test_hub_id_offline_not_cached_is_a_clear_error(isolated):
    with pytest.raises(
        UserError, match=r"'someorg/some-model' is not a local directory, and HF_HUB_OFFLINE is set"
    ):
        resolve("someorg/some-model")


def test_hub_id_unreachable_is_a_clear_error(isolated, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(UserError, match=r"the Hub could not be reached or has no such model"):
        resolve("someorg/some-model")


def fake_model(directory, weights: bytes):
    directory.mkdir()
    (directory / "config.json").write_text('{"hidden_size": 8}')
    (directory / "tokenizer.json").write_text('{"model": {}}')
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def test_the_identity_of_a_model_is_the_content_of_what_the_loader_reads(isolated):
    from job.model.source import HEAD_BYTES, model_identity

    weights = bytes(range(256)) * (12 * 1024)  # 3 MiB: read by its header and samples
    model = fake_model(isolated / "model", weights)
    identity = model_identity(model)
    assert identity.digest.startswith("sha256:")
    assert sorted(identity.files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert model_identity(shutil.copytree(model, isolated / "copy")) == identity

    (model / "README.md").write_text("not loaded")
    (model / "LICENSE.txt").write_text("added by huggingface-cli download")
    (model / "modeling_x.py").write_text("# remote code, which runs only with trust_remote_code")
    (model / ".ftjob-source.json").write_text("{}")  # hidden: ftjob's own marker
    assert model_identity(model) == identity
    with_code = model_identity(model, trust_remote_code=True)
    assert with_code.digest != identity.digest and "modeling_x.py" in with_code.files

    changed_weight = bytearray(weights)
    changed_weight[HEAD_BYTES] ^= 1  # the first sampled block
    (model / "model.safetensors").write_bytes(changed_weight)
    changed = model_identity(model)
    assert changed.digest != identity.digest
    assert {name for name in identity.files if changed.files[name] != identity.files[name]} == {
        "model.safetensors"
    }

    (model / "model.safetensors").write_bytes(weights)
    (model / "config.json").write_text('{"hidden_size": 9}')
    assert model_identity(model).digest != identity.digest

    (model / "additional_chat_templates").mkdir()  # named chat templates, which the tokenizer loads
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    assert "additional_chat_templates/tool_use.jinja" in model_identity(model).files


def test_a_changed_identity_names_the_files_that_changed():
    from job.model.source import ModelIdentity, identity_change

    before = ModelIdentity(
        "sha256:" + "a" * 64, {"config.json": "1", "model.safetensors": "2", "vocab.json": "3"}
    )
    after = ModelIdentity(
        "sha256:" + "b" * 64, {"config.json": "1", "model.safetensors": "9", "merges.txt": "4"}
    )
    assert identity_change(before, after) == (
        "model files changed under model.source: merges.txt, model.safetensors, vocab.json "
        f"(model.identity {before.digest!r} -> {after.digest!r}): point model.source at the model the run "
        "started on"
    )
    shards = {f"model-{i:05d}-of-00007.safetensors": str(i) for i in range(7)}
    many = identity_change(ModelIdentity("x", shards), ModelIdentity("y", {}))
    assert "model-00004-of-00007.safetensors, and 2 more (model.identity" in many
    commits = ModelIdentity("hub:org/m@" + "1" * 40, {}), ModelIdentity("hub:org/m@" + "2" * 40, {})
    assert identity_change(*commits).startswith("other model files under model.source (model.identity")
    read_back = ModelIdentity("sha256:" + "a" * 64, ["not", "a", "mapping"])  # a damaged run.json's
    assert identity_change(read_back, after).startswith(
        "model files changed under model.source: config.json,"
    )


def hub_cache(isolated, monkeypatch, repo: str, commit: str):
    """An offline Hub cache that holds repo at commit (refs/main names it), as huggingface_hub lays it out;
    its snapshot folder, which a test fills."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(isolated / "hub"))
    storage = isolated / "hub" / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "snapshots").mkdir()
    return storage / "snapshots" / commit


def test_the_identity_of_a_hub_model_is_its_commit(isolated, monkeypatch):
    from job.model.source import resolved_identity

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = fake_model(hub_cache(isolated, monkeypatch, "org/tiny", commit), b"weights")
    model = ModelSpec(source="org/tiny")
    assert resolve_model_dir(model) == snapshot
    assert model.identity == f"hub:org/tiny@{commit}"  # set on the spec, which spec.json publishes
    assert resolved_identity(model).files == {}

    (snapshot / "LICENSE.txt").write_text("added by huggingface-cli download")
    (snapshot / "modeling_x.py").write_text("# added by remote code")
    (snapshot / "tokenizer.json").write_text('{"model": {"edited": true}}')
    again = ModelSpec(source="org/tiny", identity=f"hub:org/tiny@{commit}")  # pinned: as spec.json has it
    assert resolve_model_dir(again) == snapshot and again.identity == model.identity


def test_a_model_identity_in_the_spec_pins_the_model(isolated):
    from job.model.source import model_identity

    model = fake_model(isolated / "model", b"weights")
    trained_on = model_identity(model).digest
    assert resolve(str(model)) == model
    (model / "model.safetensors").write_bytes(b"other weights")
    pinned = ModelSpec(source=str(model), identity=trained_on)
    with pytest.raises(UserError) as refused:
        resolve_model_dir(pinned)
    assert str(refused.value).startswith(
        f"model.identity: model.source {model} holds the model {model_identity(model).digest!r}, not "
        f"{trained_on!r}, which model.identity names"
    )
    assert "point model.source at that model, or leave model.identity out" in str(refused.value)


@pytest.mark.parametrize("identity", ["sha256:abc", "hub:org/m@main", "org/m", "sha256:" + "A" * 64])
def test_a_model_identity_that_is_not_one_is_refused_in_the_spec(identity):
    from job.spec import validate_spec

    spec = make_spec(model={"source": "m", "identity": identity})
    with pytest.raises(UserError, match="model.identity: String should match pattern"):
        validate_spec(spec)


def test_the_run_logs_the_identity_it_publishes(isolated):
    from job.data.plan import DataPlan
    from job.output.publish import write_run_files
    from job.spec import validate_spec
    from job.tracking.tracker import run_record

    model = fake_model(isolated / "model", b"weights")
    spec = validate_spec(make_spec(model=model))
    resolve_model_dir(spec.model)
    write_run_files(isolated, spec, {})
    published = json.loads((isolated / "spec.json").read_text())
    record = run_record(spec, DataPlan([([], 1.0)], [], [None]))
    assert published["model"]["identity"] == spec.model.identity == record.params["model.identity"]
    assert record.spec_json == published  # MLflow's copy of spec.json is the published one
    assert validate_spec(published).model.identity == spec.model.identity  # and it is a spec


def test_a_cached_folder_that_is_gone_is_not_trusted(isolated):
    from job.model.source import Untrusted, trusted_files

    with pytest.raises(Untrusted, match="it is not there"):  # a concurrent download removed it
        trusted_files(isolated / "gone", "s3://b/m/")
