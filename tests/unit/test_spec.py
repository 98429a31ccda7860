"""Spec loading, overrides and error messages (fast: no model, no training)."""

from __future__ import annotations

import io
import json
import re
import uuid
from functools import partial

import fsspec
import pytest
import yaml
from helpers import ftjob, make_spec

from job.cli import main
from job.errors import UserError
from job.spec import REDACTED, Spec, flatten, load_spec, public_dict, validate_spec

# the minimal spec, sections merged over it
minimal = partial(make_spec, model="./model", data={"train": ["train.jsonl"]}, train={"max_steps": 10})
MINIMAL = minimal()


def write_json(path, data) -> str:
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def problems(message: str) -> list[str]:
    """The '  - ...' lines of a validation message."""
    return [line[4:] for line in message.splitlines() if line.startswith("  - ")]


def spec_error(data: dict) -> str:
    with pytest.raises(UserError) as info:
        validate_spec(data, "spec.json")
    assert info.value.exit_code == 2
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_json_file(tmp_path):
    path = write_json(tmp_path / "spec.json", minimal(name="from-json"))
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.name == "from-json"
    assert spec.model.source == "./model"
    assert spec.data.train == ["train.jsonl"]
    assert spec.train.max_steps == 10
    # defaults filled in
    assert spec.adapter.method == "lora"
    assert spec.data.bad_rows.policy == "skip"


def test_load_yaml_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: from-yaml\n"
        "model:\n  source: ./model\n"
        "data:\n  train:\n    - a.jsonl\n    - b.jsonl.gz\n  format: completion\n"
        "train:\n  epochs: 2\n  learning_rate: 0.001\n"
    )
    spec = load_spec(str(path))
    assert spec.name == "from-yaml"
    assert spec.data.train == ["a.jsonl", "b.jsonl.gz"]
    assert spec.data.format == "completion"
    assert spec.train.epochs == 2 and spec.train.max_steps is None
    assert spec.train.learning_rate == pytest.approx(1e-3)


def test_load_yaml_flow_mapping(tmp_path):
    """YAML is a superset of JSON's syntax: a .yaml file written in flow style is still YAML."""
    path = tmp_path / "spec.yaml"
    path.write_text("{name: flow, model: {source: m}, data: {train: [a.jsonl]}, train: {max_steps: 3}}\n")
    spec = load_spec(str(path))
    assert spec.name == "flow"
    assert spec.train.max_steps == 3


def test_load_from_memory_url():
    fs = fsspec.filesystem("memory")
    path = f"/ftjob-tests/{uuid.uuid4().hex}/spec.json"
    fs.pipe(path, json.dumps(minimal(name="from-memory")).encode())
    try:
        spec = load_spec(f"memory://{path}")
        assert spec.name == "from-memory"
    finally:
        fs.rm(path)


def test_missing_url_names_it():
    with pytest.raises(UserError, match=r"memory://ftjob-tests/nope\.json"):
        load_spec("memory://ftjob-tests/nope.json")


def test_load_from_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(minimal(name="from-stdin"))))
    spec = load_spec("-")
    assert spec.name == "from-stdin"


def test_load_from_stdin_names_stdin_in_errors(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"model": }'))
    with pytest.raises(UserError, match=r"<stdin>:1:11: invalid JSON"):
        load_spec("-")


def test_load_from_ftjob_spec_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJOB_SPEC", write_json(tmp_path / "env.json", minimal(name="from-env-path")))
    assert load_spec(None).name == "from-env-path"


def test_load_from_ftjob_spec_inline_json(monkeypatch):
    monkeypatch.setenv("FTJOB_SPEC", json.dumps(minimal(name="inline")))
    assert load_spec(None).name == "inline"


def test_no_spec_at_all():
    with pytest.raises(UserError, match="FTJOB_SPEC"):
        load_spec(None)


# ---------------------------------------------------------------------------------------------
# Overrides


def test_set_learning_rate_is_a_float(tmp_path):
    spec = load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["train.learning_rate=1e-4"])
    assert isinstance(spec.train.learning_rate, float)
    assert spec.train.learning_rate == 1e-4


def test_env_learning_rate_is_a_float(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJOB__TRAIN__LEARNING_RATE", "1e-4")
    spec = load_spec(write_json(tmp_path / "spec.json", MINIMAL))
    assert isinstance(spec.train.learning_rate, float)
    assert spec.train.learning_rate == 1e-4


def test_precedence_set_beats_env_beats_file(tmp_path, monkeypatch):
    data = minimal(train={"max_steps": 10, "learning_rate": 0.5, "seed": 1, "grad_accum": 3})
    path = write_json(tmp_path / "spec.json", data)
    monkeypatch.setenv("FTJOB__TRAIN__LEARNING_RATE", "0.25")
    monkeypatch.setenv("FTJOB__TRAIN__SEED", "7")
    spec = load_spec(path, ["train.learning_rate=0.125"])
    assert spec.train.learning_rate == 0.125  # --set beats env
    assert spec.train.seed == 7  # env beats file
    assert spec.train.grad_accum == 3  # file where nothing overrides


def test_environ_argument_replaces_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJOB__TRAIN__SEED", "7")
    spec = load_spec(write_json(tmp_path / "spec.json", MINIMAL), environ={"FTJOB__TRAIN__SEED": "9"})
    assert spec.train.seed == 9


def test_env_nested_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJOB__DATA__BAD_ROWS__POLICY", "fail")
    assert load_spec(write_json(tmp_path / "spec.json", MINIMAL)).data.bad_rows.policy == "fail"


def test_set_nested_dotted_key(tmp_path):
    spec = load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["data.bad_rows.policy=fail"])
    assert spec.data.bad_rows.policy == "fail"
    assert spec.data.bad_rows.max_fraction == 0.01  # the rest of the section keeps its default


def test_set_list_value(tmp_path):
    spec = load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["data.train=[a,b]"])
    assert spec.data.train == ["a", "b"]


def test_set_creates_missing_section_and_other_types(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "train"}
    spec = load_spec(
        write_json(tmp_path / "spec.json", data),
        ["train.epochs=3", "model.trust_remote_code=true", "output.uri=s3://runs/{name}/", "name=my-run"],
    )
    assert spec.train.epochs == 3
    assert spec.model.trust_remote_code is True
    assert spec.output_uri == "s3://runs/my-run/"


def test_bad_override_without_equals(tmp_path):
    with pytest.raises(UserError) as info:
        load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["train.learning_rate"])
    assert "--set train.learning_rate" in str(info.value)
    assert "KEY=VALUE" in str(info.value)


def test_override_into_a_value_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--set model\.source\.x=1: model\.source is not a section"):
        load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["model.source.x=1"])


def test_override_with_empty_key_part(tmp_path):
    with pytest.raises(UserError, match=r"'train\.\.seed' is not a dotted key"):
        load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["train..seed=1"])


def test_overrides_are_validated_like_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJOB__TRAIN__MICRO_BATCH_SIZE", "0")
    with pytest.raises(UserError) as info:
        load_spec(write_json(tmp_path / "spec.json", MINIMAL), ["train.learnig_rate=1e-4"])
    message = str(info.value)
    assert "train.micro_batch_size: Input should be greater than 0" in message
    assert "train.learnig_rate: unknown key; did you mean 'learning_rate'?" in message


# ---------------------------------------------------------------------------------------------
# Validation errors: each names its JSON path, all at once


def test_all_problems_reported_at_once():
    message = spec_error(
        {
            "model": {"source": 1, "dtype": "float8"},
            "adapter": {"r": 0},
            "data": {"train": "x.jsonl", "max_seq_len": -1, "bad_rows": {"polcy": "fail"}},
            "train": {"max_steps": 5, "learnig_rate": 1e-4, "micro_batch_size": 0, "seed": "abc"},
        }
    )
    found = problems(message)
    assert message.startswith(f"spec.json: {len(found)} problem(s) in the spec:")
    expected = [
        "model.source: Input should be a valid string",
        "model.dtype: Input should be",
        "adapter.r: Input should be greater than 0",
        "data.train: Input should be a valid list",
        "data.max_seq_len: Input should be greater than 0",
        "data.bad_rows.polcy: unknown key; did you mean 'policy'?",
        "train.learnig_rate: unknown key; did you mean 'learning_rate'?",
        "train.micro_batch_size: Input should be greater than 0",
        "train.seed: Input should be a valid integer",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected)


def test_wrong_types_name_path_and_value():
    message = spec_error(
        minimal(
            train={"max_steps": "ten", "learning_rate": "fast"},
            model={"source": "m", "trust_remote_code": "maybe"},
        )
    )
    assert "train.max_steps: Input should be a valid integer" in message
    assert "(got 'ten')" in message
    assert "train.learning_rate: Input should be a valid number" in message
    assert "(got 'fast')" in message
    assert "model.trust_remote_code: Input should be a valid boolean" in message


def test_unknown_key_did_you_mean_top_level_and_nested():
    data = minimal(trian={"max_steps": 1})
    data["train"]["learnig_rate"] = 1e-4
    data["data"]["bad_rows"] = {"polcy": "fail"}
    found = problems(spec_error(data))
    assert "trian: unknown key; did you mean 'train'?" in found
    assert "train.learnig_rate: unknown key; did you mean 'learning_rate'?" in found
    assert "data.bad_rows.polcy: unknown key; did you mean 'policy'?" in found


def test_unknown_key_without_close_match_lists_known_keys():
    data = minimal()
    data["adapter"] = {"zzzzzz": 1}
    message = spec_error(data)
    assert "adapter.zzzzzz: unknown key; known keys: method, r, alpha, dropout, target_modules" in message


def test_missing_required_keys():
    found = problems(spec_error({"model": {}, "data": {}}))
    assert "model.source: required key is missing" in found
    assert "data.train: required key is missing" in found
    assert "train: required key is missing" in found
    assert len(found) == 3


def test_empty_spec_names_every_section():
    found = problems(spec_error({}))
    assert found == [
        "model: required key is missing",
        "data: required key is missing",
        "train: required key is missing",
    ]


def test_empty_train_list():
    assert "data.train: List should have at least 1 item" in spec_error(minimal(data={"train": []}))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "micro_batch_size", 0),
        ("train", "grad_accum", -1),
        ("train", "max_steps", 0),
        ("train", "learning_rate", 0),
        ("data", "max_seq_len", -1),
        ("data", "shuffle_buffer", -5),
        ("adapter", "r", 0),
        ("adapter", "alpha", -1),
    ],
)
def test_non_positive_sizes(section, key, value):
    data = minimal()
    data.setdefault(section, {})[key] = value
    message = spec_error(data)
    assert f"{section}.{key}: Input should be greater than" in message
    assert f"(got {value})" in message


def test_max_steps_and_epochs_both():
    message = spec_error(minimal(train={"max_steps": 10, "epochs": 1}))
    assert "train.max_steps" in message and "train.epochs" in message
    assert len(problems(message)) == 1


def test_cross_field_problems_reported_with_field_errors():
    """All problems at once: a section's cross-key check still runs when one of its keys is bad."""
    data = minimal(train={"max_steps": 5, "epochs": 1, "seed": "abc"})
    message = spec_error(data)
    assert "train.seed: Input should be a valid integer" in message
    assert "set exactly one of train.max_steps or train.epochs" in message

    data = minimal(adapter={"method": "full"}, name="bad name")
    data["model"]["quantization"] = "4bit"
    message = spec_error(data)
    assert "name: String should match pattern" in message
    assert "adapter.method: 'full' cannot train a quantized model" in message


def test_max_steps_and_epochs_neither():
    message = spec_error(minimal(train={"max_steps": None, "learning_rate": 1e-4}))
    assert "set exactly one of train.max_steps or train.epochs" in message


def test_epochs_alone_is_valid():
    spec = validate_spec(minimal(train={"max_steps": None, "epochs": 2}))
    assert spec.train.epochs == 2 and spec.train.max_steps is None


def test_data_fields_key_not_in_format():
    data = minimal()
    data["data"] = {"train": ["a"], "format": "completion", "fields": {"output": "answer"}}
    message = spec_error(data)
    assert "data.fields: output not a field of format 'completion'" in message
    assert "prompt, completion" in message


def test_data_fields_of_the_format_are_accepted():
    data = minimal()
    data["data"] = {"train": ["a"], "format": "alpaca", "fields": {"instruction": "q", "output": "a"}}
    assert validate_spec(data).data.fields == {"instruction": "q", "output": "a"}


def test_full_with_quantization_refused():
    data = minimal(adapter={"method": "full"})
    data["model"]["quantization"] = "4bit"
    message = spec_error(data)
    assert "adapter.method: 'full'" in message and "model.quantization" in message


def test_bad_name_pattern():
    assert "name: String should match pattern" in spec_error(minimal(name="has space"))


# ---------------------------------------------------------------------------------------------
# Reading and parsing errors


def test_missing_spec_file():
    with pytest.raises(UserError, match=r"spec file not found: nope\.json"):
        load_spec("nope.json")


def test_spec_is_a_directory(tmp_path):
    (tmp_path / "specdir").mkdir()
    with pytest.raises(UserError, match=r"spec is a directory, not a file: specdir"):
        load_spec("specdir")


def test_spec_not_utf8(tmp_path):
    (tmp_path / "spec.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match=r"cannot read spec spec\.yaml"):
        load_spec("spec.yaml")


def test_malformed_json_line_and_column(tmp_path):
    (tmp_path / "spec.json").write_text('{\n  "model": {"source": "m"},\n    , "data": {}\n}\n')
    with pytest.raises(UserError) as info:
        load_spec("spec.json")
    assert str(info.value).startswith("spec.json:3:5: invalid JSON")


def test_malformed_yaml_line_and_column(tmp_path):
    (tmp_path / "spec.yaml").write_text("model:\n  source: m\ntrain:\n  max_steps: 1\n   seed: 2\n")
    with pytest.raises(UserError) as info:
        load_spec("spec.yaml")
    message = str(info.value)
    match = re.match(r"spec\.yaml:(\d+):(\d+): invalid YAML", message)
    assert match, message
    assert int(match.group(1)) == 5  # the offending line
    assert int(match.group(2)) >= 1


def test_malformed_yaml_tab_indent(tmp_path):
    (tmp_path / "spec.yml").write_text("model:\n\tsource: m\n")
    with pytest.raises(UserError, match=r"^spec\.yml:2:1: invalid YAML"):
        load_spec("spec.yml")


@pytest.mark.parametrize(
    ("filename", "text", "kind"),
    [("spec.json", "[1, 2]", "list"), ("spec.yaml", "- a\n- b\n", "list"), ("spec.yaml", "hello\n", "str")],
)
def test_non_mapping_top_level(tmp_path, filename, text, kind):
    (tmp_path / filename).write_text(text)
    with pytest.raises(UserError, match=rf"^{filename}: the spec must be a mapping of sections, got {kind}$"):
        load_spec(filename)


def test_empty_yaml_file(tmp_path):
    (tmp_path / "spec.yaml").write_text("")
    with pytest.raises(UserError, match="must be a mapping"):
        load_spec("spec.yaml")


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_validate_ok(tmp_path, capsys):
    path = write_json(tmp_path / "spec.json", minimal(name="ok-run"))
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "valid spec 'ok-run'" in out
    assert "runs/ok-run" in out


def test_cli_validate_bad_spec_exit_2(tmp_path, capsys):
    data = minimal()
    data["train"] = {"max_steps": 5, "learnig_rate": 1e-4}
    data["data"]["max_seq_len"] = 0
    path = write_json(tmp_path / "spec.json", data)
    assert main(["validate", path]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("ftjob: error:")
    assert "2 problem(s)" in captured.err
    assert "train.learnig_rate: unknown key; did you mean 'learning_rate'?" in captured.err
    assert "data.max_seq_len: Input should be greater than 0" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("files", "argv", "needle"),
    [
        ({}, ["validate", "missing.json"], "spec file not found: missing.json"),
        ({"spec.json": '{"model": '}, ["validate", "spec.json"], "spec.json:1:11: invalid JSON"),
        ({"spec.yaml": "a: [\n"}, ["validate", "spec.yaml"], "spec.yaml:2:1: invalid YAML"),
        ({"spec.json": json.dumps(MINIMAL)}, ["validate", "spec.json", "--set", "oops"], "--set oops"),
    ],
)
def test_cli_reading_errors_exit_2(tmp_path, capsys, files, argv, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftjob: error:")
    assert needle in err
    assert "Traceback" not in err


def test_cli_validate_set_and_ftjob_spec(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTJOB_SPEC", write_json(tmp_path / "spec.json", MINIMAL))
    assert main(["validate", "--set", "train.micro_batch_size=0"]) == 2
    assert "train.micro_batch_size: Input should be greater than 0" in capsys.readouterr().err
    assert main(["validate", "--set", "name=renamed"]) == 0
    assert "valid spec 'renamed'" in capsys.readouterr().out


def test_cli_validate_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(minimal(name="piped"))))
    assert main(["validate", "-"]) == 0
    assert "valid spec 'piped'" in capsys.readouterr().out


def test_cli_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "data", "train"} <= set(schema["properties"])
    assert {"model", "data", "train"} <= set(schema["required"])
    assert "learning_rate" in schema["$defs"]["TrainSpec"]["properties"]


def test_cli_a_misspelled_nested_key_is_exit_2(tmp_path):
    data = minimal()
    data["data"]["bad_rows"] = {"polcy": "fail"}
    write_json(tmp_path / "spec.json", data)
    result = ftjob("validate", "spec.json", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ftjob: error:")
    assert "data.bad_rows.polcy: unknown key; did you mean 'policy'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_stdin_and_env_override(tmp_path):
    result = ftjob(
        "validate",
        "-",
        cwd=tmp_path,
        env={"FTJOB__TRAIN__MAX_STEPS": "-3"},
        stdin=json.dumps(MINIMAL),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "<stdin>: 1 problem(s)" in result.stderr
    assert "train.max_steps: Input should be greater than 0 (got -3)" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Publishing: redaction, flattening, output URI


def secret_spec() -> Spec:
    data = minimal(
        storage_options={
            "s3": {
                "endpoint_url": "http://minio:9000",
                "key": "AKIA-SECRET-1",
                "secret": "SECRET-2",
                "token": "SECRET-3",
                "anon": False,
                "client_kwargs": {"aws_secret_access_key": "SECRET-4", "region_name": "eu-west-1"},
            },
            "gcs": {"password": "SECRET-5", "project": "p"},
        }
    )
    return validate_spec(data)


def test_public_dict_redacts_storage_secrets():
    public = public_dict(secret_spec())
    s3 = public["storage_options"]["s3"]
    assert s3["key"] == REDACTED == "***"
    assert s3["secret"] == "***"
    assert s3["token"] == "***"
    assert s3["client_kwargs"]["aws_secret_access_key"] == "***"
    assert public["storage_options"]["gcs"]["password"] == "***"
    # what is not secret stays
    assert s3["endpoint_url"] == "http://minio:9000"
    assert s3["anon"] is False
    assert s3["client_kwargs"]["region_name"] == "eu-west-1"
    assert public["storage_options"]["gcs"]["project"] == "p"
    assert "SECRET" not in json.dumps(public)


def test_storage_options_are_shown_by_allowlist_and_credential_tags_hidden():
    """Keys of any spelling (headers, cookies, connection strings, SAS tokens) stay hidden."""
    data = make_spec(
        model="m",
        tracking={
            "tags": {
                "team": "nlp",
                "ci": "ghp_abcdefghijklmnopqrstuvwxyz0123",
                "note": "Bearer abc.def",
                "key": "aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vWxY",
                "commit": "0123456789abcdef0123456789abcdef01234567",
            }
        },
        storage_options={
            "http": {"headers": {"Authorization": "Basic SECRET-A", "Cookie": "session=SECRET-B"}},
            "abfs": {
                "connection_string": "DefaultEndpointsProtocol=https;AccountKey=SECRET-C",
                "account_name": "acct",
            },
            "az": {"sas": "sv=2021&sig=SECRET-D"},
            "s3": {"endpoint_url": "http://minio:9000", "config_kwargs": {"retries": {"max_attempts": 3}}},
        },
    )
    spec = validate_spec(data)
    public = public_dict(spec)
    assert "SECRET" not in json.dumps(public)
    assert public["storage_options"]["abfs"] == {"connection_string": "***", "account_name": "acct"}
    assert public["storage_options"]["s3"]["config_kwargs"] == {"retries": {"max_attempts": 3}}
    from job.spec import public_tags

    commit = "0123456789abcdef0123456789abcdef01234567"
    expected = {"team": "nlp", "ci": "***", "note": "***", "key": "***", "commit": commit}
    assert public_tags(spec.tracking.tags) == expected == public["tracking"]["tags"]


def test_public_dict_keeps_ordinary_keys_and_defaults():
    public = public_dict(secret_spec())
    assert public["model"]["trust_remote_code"] is False
    assert public["train"]["max_steps"] == 10
    assert public["train"]["learning_rate"] == 2e-4
    assert public["data"]["max_seq_len"] == 2048
    json.dumps(public)  # JSON-ready


def test_flatten_dotted_keys():
    flat = flatten(public_dict(validate_spec(minimal(train={"max_steps": 5, "learning_rate": 1e-4}))))
    assert flat["train.learning_rate"] == 1e-4
    assert flat["train.max_steps"] == 5
    assert flat["data.bad_rows.policy"] == "skip"
    assert flat["data.train"] == ["train.jsonl"]  # lists stay values
    assert flat["model.source"] == "./model"
    assert "train" not in flat and "data.bad_rows" not in flat
    assert flatten({"a": {"b": {}}, "c": 1}) == {"a.b": {}, "c": 1}


def test_output_uri_name_substitution():
    spec = validate_spec(minimal(name="support-bot", output={"uri": "s3://runs/{name}/"}))
    assert spec.output_uri == "s3://runs/support-bot/"
    assert validate_spec(minimal(name="x1")).output_uri == "./runs/x1"
    assert validate_spec(minimal(output={"uri": "/data/out"})).output_uri == "/data/out"


def test_plain_words_in_overrides_stay_strings():
    from job.spec import parse_value

    def parse(text: str):
        return parse_value(text, "--set x")

    assert parse("no") == "no" and parse("on") == "on"
    assert parse("true") is True and parse("null") is None and parse("1e-4") == 1e-4
    assert parse("[a, b]") == ["a", "b"]


def test_mixed_precision_no_survives_yaml_and_set(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model: {source: m}\ndata: {train: [x]}\ntrain: {max_steps: 1, mixed_precision: no}\n")
    assert load_spec(str(path)).train.mixed_precision == "no"
    assert load_spec(str(path), ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize(
    "device,max_seq_len,packing,micro_batch",
    [("cpu", 2048, False, 4), ("cuda", 2048, True, 4), ("cuda", 512, True, 16), ("cuda", 16384, True, 1)],
)
def test_the_defaults_a_spec_leaves_to_the_device(device, max_seq_len, packing, micro_batch):
    spec = validate_spec(make_spec(data={"max_seq_len": max_seq_len})).for_device(device)
    assert (spec.data.packing, spec.train.micro_batch_size) == (packing, micro_batch)


def test_what_a_spec_sets_is_kept_on_every_device():
    spec = validate_spec(
        make_spec(data={"packing": False, "max_seq_len": 512}, train={"micro_batch_size": 3})
    )
    for device in ("cpu", "cuda"):
        resolved = spec.for_device(device)
        assert (resolved.data.packing, resolved.train.micro_batch_size) == (False, 3)
