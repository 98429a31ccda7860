"""A checkpoint read back is input: its rank files, run.json, metric curve, weights and optimizer states are
checked as strictly as the spec, before anything is applied or deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_spec
from safetensors.torch import load_file, save_file

from job.errors import UserError
from job.spec import validate_spec


def test_resuming_refuses_changes_to_what_is_trained_and_allows_the_rest(isolated):
    from job.output.checkpoint import fingerprint, fingerprint_changes

    (isolated / "m").mkdir()
    (isolated / "m" / "model.safetensors").write_bytes(b"weights")
    base = make_spec(model="m", train={"max_steps": 10})
    saved = fingerprint(validate_spec(base), world_size=2)
    identity = saved["model.identity"]
    assert identity.startswith("sha256:")

    def changes(section: str, **values) -> list[str]:
        spec = {**base, section: {**base.get(section, {}), **values}}
        return fingerprint_changes(saved, fingerprint(validate_spec(spec), world_size=2))

    assert changes("train", learning_rate=1e-5) == ["train.learning_rate: 0.0002 -> 1e-05"]
    assert changes("train", weight_decay=0.1) == ["train.weight_decay: 0.0 -> 0.1"]
    assert changes("data", train_on="all") == ["data.train_on: 'completion' -> 'all'"]
    assert changes("data", chat_template="{{ x }}") == ["data.chat_template: None -> '{{ x }}'"]
    assert changes("data", truncation="drop") == ["data.truncation: 'truncate' -> 'drop'"]
    assert changes("data", eval_fraction=0.3) == ["data.eval_fraction: 0.0 -> 0.3"]  # not data.eval's
    older = {k: v for k, v in saved.items() if k != "fingerprint_version"}
    assert "another version of ftjob" in fingerprint_changes(older, saved)[0]
    assert fingerprint_changes(saved, fingerprint(validate_spec(base), world_size=1)) == [
        "world_size: 2 -> 1"
    ]
    assert fingerprint_changes({**saved, "model.identity": "sha256:0ther"}, saved) == [
        f"other model files under model.source (model.identity 'sha256:0ther' -> {identity!r}): point "
        "model.source at the model the run started on"
    ]
    for section, values in [
        ("train", {"checkpoint_every": 7, "eval_every": 3, "log_every": 1, "stop_grace_seconds": 5}),
        ("output", {"uri": "s3://elsewhere/run", "keep_checkpoints": 5}),
        ("tracking", {"experiment": "other"}),
        ("data", {"eval": ["e.jsonl"]}),
    ]:
        assert changes(section, **values) == [], section


CHECKPOINT = "s3://b/run/checkpoints/step-000004-g1"  # where the rank files below say they are from


def rank_file(**rng) -> dict:
    """A rank file as a checkpoint holds it (JSON), its RNG states updated with rng."""
    from job.rng import rng_states

    return json.loads(json.dumps({"rng": {**rng_states(), **rng}, "data": {"a cursor": "checked elsewhere"}}))


def read_rank_file(tmp_path, state) -> dict:
    from job.output.checkpoint import Checkpointer

    (tmp_path / "rank-00000.json").write_text(json.dumps(state))
    checkpointer = Checkpointer(str(tmp_path / "out"), rank=0, world_size=1, keep=2, lease=None)
    return checkpointer.rank_state({"dir": tmp_path, "uri": CHECKPOINT, "step": 4})


def torch_state(**bytes_at) -> list[int]:
    import torch

    state = torch.get_rng_state().tolist()
    for index, value in bytes_at.items():
        state[int(index.removeprefix("at"))] = value
    return state


@pytest.mark.parametrize(
    "state,key",
    [
        ([], "(top level)"),
        ({"data": {}}, "rng: Field required"),
        ({k: v for k, v in rank_file().items() if k != "data"}, "data: Field required"),
        ({**rank_file(), "notes": 1}, "notes: Extra inputs are not permitted"),
        (rank_file(python=[3, [0, 1, 2], None]), "rng.python"),
        (rank_file(numpy=["PCG64", [0] * 624, 0, 0, 0.0]), "rng.numpy[0]"),
        (rank_file(numpy=["MT19937", [0] * 623, 0, 0, 0.0]), "rng.numpy[1]"),
        (rank_file(numpy=["MT19937", [-1] + [0] * 623, 0, 0, 0.0]), "rng.numpy[1][0]"),
        (rank_file(numpy=["MT19937", [0] * 624, 5000, 0, 0.0]), "rng.numpy[2]"),  # NumPy would read past
        (rank_file(torch=torch_state()[:100]), "rng.torch: Value error, not the state of torch's cpu generator"),
        (rank_file(torch=[0] * len(torch_state())), "Invalid mt19937 state"),
        (rank_file(torch=torch_state(at7=300)), "rng.torch[7]"),
        (rank_file(torch="bytes"), "rng.torch"),
        (rank_file(cuda=[1.5]), "rng.cuda[0]"),
    ],
    ids=[
        "not-an-object", "no-rng", "no-data", "extra-key", "python-short", "numpy-kind", "numpy-short",
        "numpy-negative", "numpy-position", "torch-size", "torch-invalid", "torch-byte", "torch-type", "cuda-type",
    ],
)  # fmt: skip
def test_a_rank_file_not_as_ftjob_writes_it_is_refused_naming_the_file_and_key(tmp_path, state, key):

    with pytest.raises(UserError) as refused:
        read_rank_file(tmp_path, state)
    message = str(refused.value)
    assert message.startswith(f"{CHECKPOINT}/rank-00000.json: ") and key in message and "--restart" in message


FOLDER = "step-000004-g1"


def run_record(**changes) -> dict:
    """run.json as ftjob writes it for the checkpoint in FOLDER, with changes."""
    from job.output.checkpoint import CHECKPOINT_FORMAT, FINGERPRINT_VERSION

    record = {
        "step": 4, "run_id": None, "fingerprint": {"train.seed": 3, "fingerprint_version": FINGERPRINT_VERSION},
        "total_steps": 8, "last_metrics": {"step": 4, "train/loss": 1.5}, "checkpoint_format": CHECKPOINT_FORMAT,
        "lease_generation": 1,
    }  # fmt: skip
    return {**record, **changes}


def committed_checkpoint(output: Path, run, curve: str = '{"step": 4, "train/loss": 1.5}\n') -> None:
    """A committed checkpoint in FOLDER, its metric curve's segment and a later one (left by a checkpoint
    that never committed, which a resume deletes)."""
    from job.output.manifest import write_manifest
    from job.rng import rng_states

    folder = output / "checkpoints" / FOLDER
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "rank-00000.json").write_text(json.dumps({"rng": rng_states(), "data": {}}))
    write_manifest(folder)
    (folder / "COMMITTED").write_text("step 4\n")
    (output / "metrics").mkdir()
    (output / "metrics" / "000004.jsonl").write_text(curve)
    (output / "metrics" / "000006.jsonl").write_text('{"step": 5}\n')


def load_latest(output: Path) -> dict | None:
    from job.output.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(output), rank=0, world_size=1, keep=2, lease=None)
    return checkpointer.load_latest(run_record()["fingerprint"])


def test_a_checkpoint_as_ftjob_writes_it_is_loaded_and_its_rng_states_applied(tmp_path):
    import torch

    from job.output.checkpoint import Checkpointer
    from job.rng import set_rng_states

    committed_checkpoint(tmp_path, run_record())
    saved = load_latest(tmp_path)
    assert saved["step"] == 4 and saved["history"] == [{"step": 4, "train/loss": 1.5}]
    assert saved["uri"] == str(tmp_path / "checkpoints" / FOLDER)  # what the rank file's messages name
    assert not (tmp_path / "metrics" / "000006.jsonl").exists()  # a leftover of an uncommitted checkpoint

    rank_state = Checkpointer(str(tmp_path), 0, 1, keep=2, lease=None).rank_state(saved)
    set_rng_states(rank_state["rng"])
    drawn = torch.rand(3)
    set_rng_states(rank_state["rng"])
    assert torch.equal(torch.rand(3), drawn)


@pytest.mark.parametrize(
    "run,problem",
    [
        ([], "(top level)"),
        (run_record(fingerprint="f"), "fingerprint: Input should be a valid dictionary"),
        (run_record(step="4"), "step: Input should be a valid integer (got '4')"),
        (run_record(step=0), "step: Input should be greater than or equal to 1"),
        (run_record(step=7), f"step is 7, where the checkpoint's folder {FOLDER} says 4"),
        (run_record(total_steps=None), "total_steps"),
        (run_record(last_metrics=[4]), "last_metrics"),
        (run_record(last_metrics={"step": 4, "train/loss": "low"}), "last_metrics.train/loss"),
        (run_record(last_metrics={"step": 3}), f"last_metrics.step is 3, where the checkpoint's folder {FOLDER} says 4"),
        (run_record(lease_generation=-1), "lease_generation: Input should be greater than or equal to 0"),
        (run_record(lease_generation=2), f"lease_generation is 2, where the checkpoint's folder {FOLDER} says 1"),
        (run_record(checkpoint_format=3), "checkpoint_format is 3, not 2"),
        ({k: v for k, v in run_record().items() if k != "run_id"}, "run_id: Field required"),
        (run_record(notes="hi"), "notes: Extra inputs are not permitted"),
    ],
    ids=[
        "not-an-object", "fingerprint", "step-type", "step-zero", "step-not-the-folder-s", "total-steps",
        "last-metrics-type", "metric-type", "last-metrics-step", "generation-negative",
        "generation-not-the-folder-s", "format", "no-run-id", "extra-key",
    ],
)  # fmt: skip
def test_a_run_json_not_as_ftjob_writes_it_is_refused_before_anything_is_deleted(tmp_path, run, problem):

    committed_checkpoint(tmp_path, run)
    with pytest.raises(UserError) as refused:
        load_latest(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path}/checkpoints/{FOLDER}/run.json: ") and problem in message
    assert "--restart" in message
    assert (tmp_path / "metrics" / "000006.jsonl").exists()  # nothing deleted


@pytest.mark.parametrize(
    "curve,problem",
    [
        ('{"step": 4\n', "a line is not a step's metrics (JSONDecodeError"),
        ("[4]\n", "a line is not a step's metrics (TypeError"),
        ('{"train/loss": 1.5}\n', "a line is not a step's metrics (KeyError"),
        ('{"step": 3, "train/loss": "low"}\n{"step": 4}\n', "[0].train/loss: Input should be a valid number"),
        ('{"step": 4.0}\n', "[0].step: Input should be a valid integer"),
    ],
    ids=["not-json", "not-an-object", "no-step", "metric-type", "step-type"],
)
def test_a_metric_curve_not_as_ftjob_writes_it_is_refused_before_anything_is_deleted(
    tmp_path, curve, problem
):

    committed_checkpoint(tmp_path, run_record(), curve)
    with pytest.raises(UserError) as refused:
        load_latest(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path}/metrics (the metric curve up to step 4): ") and problem in message
    assert (tmp_path / "metrics" / "000006.jsonl").exists()


def tiny_run(scaler=None):
    """A model with a frozen parameter, its AdamW and schedule as train.py makes them, after one step."""
    import types

    import torch

    from job.schedule import make_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    scheduler = make_scheduler(optimizer, "linear", 1, 10)
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m, scaler=scaler)
    take_a_step(model, optimizer, scheduler)
    return model, optimizer, scheduler, accelerator


def take_a_step(model, optimizer, scheduler) -> None:
    import torch

    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def snapshot(model, optimizer, scheduler) -> list:
    import copy

    return copy.deepcopy([model.state_dict(), optimizer.state_dict(), scheduler.state_dict()])


def same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def refused_restore(tmp_path, edit_weights=None, edit_states=None, edit_folder=None, scaler=None) -> str:
    """The message with which restore() refuses the checkpoint of tiny_run's first step, edited so;
    asserts that nothing of it was applied (the run had taken a second step meanwhile)."""
    import torch

    from job.output.checkpoint import STATES, WEIGHTS, Checkpointer, write_trained_state

    model, optimizer, scheduler, accelerator = tiny_run(scaler)
    write_trained_state(tmp_path, model, optimizer, scheduler, scaler)
    if edit_weights:
        weights = load_file(tmp_path / WEIGHTS)
        edit_weights(weights)
        save_file(weights, tmp_path / WEIGHTS)
    if edit_states:
        states = torch.load(tmp_path / STATES, weights_only=True)
        edit_states(states)
        torch.save(states, tmp_path / STATES)
    if edit_folder:
        edit_folder(tmp_path)
    take_a_step(model, optimizer, scheduler)
    before = snapshot(model, optimizer, scheduler)

    checkpointer = Checkpointer(str(tmp_path / "out"), rank=0, world_size=1, keep=2, lease=None)
    with pytest.raises(UserError) as refused:
        checkpointer.restore({"dir": tmp_path, "uri": CHECKPOINT}, model, optimizer, scheduler, accelerator)
    assert same(snapshot(model, optimizer, scheduler), before)
    assert refused.value.exit_code == 2 and "--restart" in str(refused.value)
    return str(refused.value)


def weights_edit(name: str, value=None):
    """An edit of trainable.safetensors: the tensor `name` removed, or set to value."""

    def edit(weights: dict) -> None:
        if value is None:
            del weights[name]
        else:
            weights[name] = value

    return edit


def tensor(shape, dtype="float32"):
    import torch

    return torch.zeros(shape, dtype=getattr(torch, dtype))


@pytest.mark.parametrize(
    "edit,problem",
    [
        (weights_edit("0.bias"), "0.bias: missing"),
        (weights_edit("1.bias", tensor([2])), "'1.bias': not in this run"),  # frozen: the model does not train it
        (weights_edit("0.weight", tensor([4, 4])), "0.weight: found float32 tensor of shape [4, 4], where this run has float32 tensor of shape [3, 4]"),
        (weights_edit("0.weight", tensor([3, 4], "float16")), "0.weight: found float16 tensor of shape [3, 4], where this run has float32"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)  # fmt: skip
def test_trainable_weights_not_as_the_model_has_them_are_refused_before_anything_is_applied(
    tmp_path, edit, problem
):
    message = refused_restore(tmp_path, edit_weights=edit)
    assert message.startswith(f"{CHECKPOINT}/trainable.safetensors: not as this run writes it: {problem}")


def param_groups(states: dict) -> list:
    return states["optimizer"]["param_groups"]


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda s: s["optimizer"]["state"][0].update(exp_avg=tensor([2])), "optimizer.state.0.exp_avg: found float32 tensor of shape [2], where this run has float32 tensor of shape [3, 4]"),
        (lambda s: s["optimizer"]["state"][1].pop("exp_avg_sq"), "optimizer.state.1.exp_avg_sq: missing"),
        (lambda s: s["optimizer"]["state"][0].update(step=tensor([1], "int64")), "optimizer.state.0.step: found int64 tensor of shape [1]"),
        (lambda s: s["optimizer"]["state"].update({7: {}}), "optimizer.state.7: not in this run"),
        (lambda s: param_groups(s).append(param_groups(s)[0]), "optimizer.param_groups: 2 items, where this run has 1"),
        (lambda s: param_groups(s)[0].update(params=[2, 1, 0]), "optimizer.param_groups[0].params: [2, 1, 0], where this run has [0, 1, 2]"),
        (lambda s: param_groups(s)[0].update(weight_decay=5.0), "optimizer.param_groups[0].weight_decay: 5.0, where this run has 0.01"),
        (lambda s: param_groups(s)[0].update(betas=[0.9, 0.999]), "optimizer.param_groups[0].betas: found list, where this run has tuple"),
        (lambda s: s["scheduler"].update(last_epoch="1"), "scheduler.last_epoch: found str, where this run has int"),
        (lambda s: s["scheduler"].pop("base_lrs"), "scheduler.base_lrs: missing"),
        (lambda s: s.pop("scheduler"), "scheduler: missing"),
        (lambda s: s.update(optimizer=[s["optimizer"]]), "optimizer: found list, where this run has dict"),
    ],
    ids=["moment-shape", "moment-missing", "step-kind", "not-a-parameter", "group-count", "group-params",
         "group-setting", "group-setting-type", "schedule-type", "schedule-key", "no-schedule", "not-a-dict"],
)  # fmt: skip
def test_optimizer_states_not_as_this_run_has_them_are_refused_before_anything_is_applied(
    tmp_path, edit, problem
):
    message = refused_restore(tmp_path, edit_states=edit)
    assert message.startswith(f"{CHECKPOINT}/optimizer.pt: not as this run writes it: {problem}")


def test_a_grad_scaler_state_not_as_this_run_has_it_is_refused(tmp_path):
    import torch

    def edit(states: dict) -> None:
        states["scaler"]["_growth_tracker"] = 0.5

    message = refused_restore(tmp_path, edit_states=edit, scaler=torch.amp.GradScaler("cpu"))
    assert message.startswith(
        f"{CHECKPOINT}/optimizer.pt: not as this run writes it: scaler._growth_tracker: found float, where this run has int"
    )


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("trainable.safetensors", b"not a safetensors file", "not a safetensors file (SafetensorError)"),
        ("optimizer.pt", b"not a pickle", "not a file torch.load reads with weights_only (UnpicklingError)"),
        ("optimizer.pt", None, "missing"),  # the checkpoint's MANIFEST.json does not list it
    ],
    ids=["weights", "states", "no-states"],
)
def test_a_weights_or_states_file_that_cannot_be_read_is_refused(tmp_path, name, content, problem):
    def replace(folder: Path) -> None:
        (folder / name).unlink()
        if content is not None:
            (folder / name).write_bytes(content)

    assert refused_restore(tmp_path, edit_folder=replace).startswith(f"{CHECKPOINT}/{name}: {problem}")
