"""A checkpoint's data cursor is input: checked as strictly as the spec before a row is read, so that
an edited rank file cannot make a resumed run read (and train on) a file the spec does not name."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from urllib.parse import parse_qs

import pytest
from helpers import make_spec, write_jsonl

from job.data import files as files_module
from job.data import stream as stream_module
from job.data.cursor import COMMIT_ID
from job.data.pipeline import DataPipeline
from job.data.plan import DataPlan
from job.errors import DataError, UserError
from job.spec import validate_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
TOKENIZER = SimpleNamespace(pad_token_id=0)  # nothing is tokenized before a cursor is loaded
DELETE = object()
# org/cards on a fake Hub: commit -> config -> split -> files; a branch or tag is at COMMIT now
CARDS = {
    COMMIT: {
        "en": {"train": ["en/train-0.jsonl", "en/train-1.jsonl"]},
        "fr": {"train": ["fr/train.jsonl"], "test": ["fr/test.jsonl"]},
    },
    OTHER_COMMIT: {"en": {"train": ["en/train.jsonl"]}, "fr": {"train": ["fr/train-old.jsonl"]}},
}


def spec_over(train: list, **data):
    """A text-format spec over `train` (make_spec's minimal one)."""
    data = {"train": train, "format": "text", "shuffle_buffer": 4, **data}
    return validate_spec(make_spec(data=data, train={"seed": 7}))


def pipeline(spec, plan: DataPlan | None = None, rank: int = 0, world_size: int = 1) -> DataPipeline:
    return DataPipeline(spec.data, TOKENIZER, spec.train.seed, None, rank, world_size, plan)


def saved_cursor(spec, plan: DataPlan | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """A fresh pipeline's cursor, as a checkpoint holds it (JSON)."""
    return json.loads(json.dumps(pipeline(spec, plan, rank, world_size).state_dict()))


def one_source(*files: str) -> DataPlan:
    return DataPlan([(list(files), 1.0)], [], [None])


@pytest.fixture
def nothing_read(monkeypatch):
    def read_rows(url, *args):
        raise AssertionError(f"{url} was read")

    monkeypatch.setattr(stream_module, "read_rows", read_rows)


@pytest.fixture
def fake_hub(monkeypatch) -> list[tuple[str, str, str]]:
    """org/cards resolved as datasets would, from CARDS: (commit, config, split) of each resolution."""
    resolved = []

    def hub_split_files(url, repo, name, default_split):
        query = parse_qs(repo["query"] or "")
        config, split = query.get("config", ["en"])[-1], query.get("split", [default_split])[-1]
        commit = repo["revision"] if COMMIT_ID.fullmatch(repo["revision"] or "") else COMMIT
        resolved.append((commit, config, split))
        if split not in CARDS.get(commit, {}).get(config, {}):
            raise UserError(f"{name}: cannot resolve the dataset repo {url}")
        return [f"hf://datasets/org/cards@{commit}/{path}" for path in CARDS[commit][config][split]]

    monkeypatch.setattr(files_module, "hub_split_files", hub_split_files)
    return resolved


@pytest.mark.parametrize(
    "pattern,planned",
    [
        ("/data/train.jsonl", "/data/other.jsonl"),
        ("/data/train-*.jsonl", "/data/other.jsonl"),
        ("/data/**/*.jsonl", "/data/../home/secret.jsonl"),  # ** matches `..` too
        ("s3://bucket/data/*.jsonl", "/bucket/data/a.jsonl"),  # a local file where the spec names S3
        ("hf://datasets/org/cards@v1.0", f"hf://datasets/org/other@{COMMIT}/en/train.jsonl"),
        (f"hf://datasets/org/cards@{COMMIT}", f"hf://datasets/org/cards@{OTHER_COMMIT}/en/train.jsonl"),
        ("hf://datasets/org/cards", "hf://datasets/org/cards@main/en/train.jsonl"),  # not pinned
        ("hf://datasets/org/cards", f"hf://datasets/org/cards@{COMMIT}/../../org/other/x.jsonl"),
    ],
    ids=[
        "url",
        "glob",
        "glob-dotdot",
        "other-store",
        "hub-repo",
        "hub-revision",
        "hub-unpinned",
        "hub-dotdot",
    ],
)
def test_a_cursor_naming_a_file_the_spec_does_not_is_refused_before_anything_is_read(
    nothing_read, fake_hub, pattern, planned
):
    spec = spec_over([pattern])
    state = saved_cursor(spec, one_source(planned))
    with pytest.raises(UserError) as refused:  # the spec's files now are others
        pipeline(spec, one_source("/elsewhere/now.jsonl")).load_state_dict(
            state, "rank-00000.json of the checkpoint at step 5"
        )
    message = str(refused.value)
    assert message.startswith("rank-00000.json of the checkpoint at step 5: plan.sources[0] names ")
    assert f"names {planned}, a file data.train does not name" in message and "--restart" in message
    assert "relative path" not in message


@pytest.mark.parametrize(
    "pattern,planned",
    [
        ("/data/train.jsonl", "/data/train.jsonl"),
        ("/data/train-*.jsonl", "/data/train-2.jsonl"),
        ("/data/**/*.jsonl", "/data/2026/01/a.jsonl"),
        ("s3://bucket/data/*.jsonl", "s3://bucket/data/a.jsonl"),
        ("hf://datasets/org/cards@v1.0?config=fr", f"hf://datasets/org/cards@{COMMIT}/fr/train.jsonl"),
        (f"hf://datasets/org/cards@{COMMIT}", f"hf://datasets/org/cards@{COMMIT}/en/train-0.jsonl"),
        ("hf://datasets/org/cards/data/*.parquet", "hf://datasets/org/cards/data/a.parquet"),
    ],
)
def test_a_cursor_over_files_the_spec_names_loads(nothing_read, fake_hub, pattern, planned):
    spec = spec_over([pattern])
    resumed = pipeline(spec, one_source("/elsewhere/now.jsonl"))
    resumed.load_state_dict(saved_cursor(spec, one_source(planned)))
    assert resumed.plan.sources == [([planned], 1.0)]


@pytest.mark.parametrize(
    "pattern,planned",
    [
        ("hf://datasets/org/cards?config=fr", f"{COMMIT}/fr/test.jsonl"),  # the test split
        ("hf://datasets/org/cards", f"{COMMIT}/fr/train.jsonl"),  # another config
        (f"hf://datasets/org/cards@{COMMIT}?config=fr", f"{COMMIT}/fr/test.jsonl"),
        ("hf://datasets/org/cards?config=fr", f"{OTHER_COMMIT}/fr/test.jsonl"),  # another commit
        ("hf://datasets/org/cards?config=fr", f"{'0' * 40}/fr/train.jsonl"),  # a commit not there
    ],
    ids=["split", "config", "pinned", "moved-branch", "unknown-commit"],
)
def test_a_file_of_the_repo_outside_the_config_and_split_the_spec_names_is_refused(
    nothing_read, fake_hub, pattern, planned
):
    spec = spec_over([pattern])
    planned = f"hf://datasets/org/cards@{planned}"
    with pytest.raises(UserError) as refused:
        pipeline(spec).load_state_dict(saved_cursor(spec, one_source(planned)))
    assert f"plan.sources[0] names {planned}, a file data.train does not name" in str(refused.value)


def test_a_moved_branch_resumes_over_the_files_of_its_split_at_the_saved_commit(nothing_read, fake_hub):
    """The spec names a branch, which has moved on since the checkpoint: the saved files are checked
    against what the repo names at the saved commit; files the spec names now are not resolved again."""
    spec = spec_over(["hf://datasets/org/cards?config=fr"])
    now = pipeline(spec)
    assert now.plan.sources == [([f"hf://datasets/org/cards@{COMMIT}/fr/train.jsonl"], 1.0)]
    now.load_state_dict(saved_cursor(spec, now.plan))
    assert fake_hub == [(COMMIT, "fr", "train")]  # the plan made now: nothing resolved again

    saved = one_source(f"hf://datasets/org/cards@{OTHER_COMMIT}/fr/train-old.jsonl")
    resumed = pipeline(spec)
    resumed.load_state_dict(saved_cursor(spec, saved))
    assert resumed.plan.sources == saved.sources
    assert fake_hub[-1] == (OTHER_COMMIT, "fr", "train")


def test_saved_eval_files_of_another_split_are_not_evaluated_on(nothing_read, fake_hub, caplog):
    spec = spec_over(["hf://datasets/org/cards"], eval=["hf://datasets/org/cards?config=fr&split=test"])
    state = saved_cursor(spec)
    state["plan"]["eval_files"] = [f"hf://datasets/org/cards@{COMMIT}/fr/train.jsonl"]
    resumed = pipeline(spec)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert resumed.eval_files == [f"hf://datasets/org/cards@{COMMIT}/fr/test.jsonl"]
    assert "its eval files are not those data.eval names" in caplog.text


def test_a_relative_path_resumed_from_another_directory_says_where_it_resolves(nothing_read, isolated):
    spec = spec_over(["data/*.jsonl"])
    started_in = "/srv/first/data/train.jsonl"  # where the run started, in another directory
    with pytest.raises(UserError) as refused:
        pipeline(spec, one_source(str(isolated / "data/train.jsonl"))).load_state_dict(
            saved_cursor(spec, one_source(started_in))
        )
    message = str(refused.value)
    assert (
        f"names {started_in}, a file data.train does not name (data/*.jsonl is a relative path: it "
        f"resolves against the working directory, {isolated} now; resume the run from the directory "
        "it started in)"
    ) in message
    assert "run with --restart to start over (checkpoints and published outputs are deleted)" in message


def edited(state: dict, path: tuple, value) -> dict:
    *parents, last = path
    for key in parents:
        state = state[key]
    if value is DELETE:
        del state[last]
    else:
        state[last] = value
    return state


@pytest.mark.parametrize(
    "path,value,problem",
    [
        (
            ("rows", "source", "epoch"),
            -1,
            "rows.source.epoch: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            ("rows", "source", "position", "row"),
            "3",
            "rows.source.position.row: Input should be a valid integer",
        ),
        (("rows", "source", "file_index"), 2, "rows.source.file_index is past the source's 1 files"),
        (
            ("rows", "source", "files"),
            ["/data/b.jsonl"],
            "rows.source.files are not the files of plan.sources[0]",
        ),
        (("rows", "rng"), [3, [1, 2], None], "rows.rng: Value error, not the state of a random generator"),
        (
            ("rows", "buffer"),
            [["/data/b.jsonl", 0, 0]],
            "rows.buffer names /data/b.jsonl, not a file of the plan",
        ),
        (("rows", "draining"), "no", "rows.draining: Input should be a valid boolean"),
        (("examples", "budget", "policy"), "skip", "examples.budget.policy: Extra inputs are not permitted"),
        (("examples", "counts", "dropped"), DELETE, "examples.counts.dropped: Field required"),
        (("examples", "pending"), [["/etc/passwd", 0, None, 0]], "examples.pending names /etc/passwd"),
        (
            ("packer",),
            {"open_rows": [], "closing_epoch": False, "rows": 0, "real_tokens": 0},
            "a packer state, where data.packing is False",
        ),
        (("plan",), DELETE, "plan: Field required"),  # a cursor from before plans were saved
        (("plan", "sources", 0, 1), 2.0, "plan.sources[0] has the weight 2.0, data.train 1.0"),
        (("plan", "sources"), [], "plan.sources has 0 sources, data.train makes 1"),
        (("plan", "layout"), [], "plan.layout has 0 entries for 1 sources"),
        (
            ("plan", "layout"),
            [[["/data/a.jsonl"]] * 2],
            "plan.layout[0] does not share plan.sources[0]'s files",
        ),
        (("plan", "eval_files"), "/data/a.jsonl", "plan.eval_files: Input should be a valid list"),
    ],
)
def test_a_malformed_cursor_is_refused_naming_what_is_wrong(nothing_read, path, value, problem):
    spec = spec_over(["/data/*.jsonl"])
    plan = one_source("/data/a.jsonl")
    state = saved_cursor(spec, plan)
    edited(state, path, value)
    with pytest.raises(UserError) as refused:
        pipeline(spec, plan).load_state_dict(state)
    assert str(refused.value).startswith("the data cursor: ") and problem in str(refused.value)


def test_a_cursor_that_is_not_a_mapping_is_refused(nothing_read):
    spec = spec_over(["/data/*.jsonl"])
    with pytest.raises(UserError, match="the data cursor: not as ftjob writes it: .*valid dictionary"):
        pipeline(spec, one_source("/data/a.jsonl")).load_state_dict([])


def test_the_rows_of_open_packed_rows_are_checked_against_the_plan(nothing_read):
    spec = spec_over(["/data/*.jsonl"], packing=True)
    plan = one_source("/data/a.jsonl")
    state = saved_cursor(spec, plan)
    state["packer"]["open_rows"] = [[["/data/a.jsonl", 0, 0, 0], ["/data/b.jsonl", 3, 40, 0]]]
    with pytest.raises(UserError, match="packer.open_rows names /data/b.jsonl, not a file of the plan"):
        pipeline(spec, plan).load_state_dict(state)
    state["packer"] = {"open": [], "rows": 0, "real_tokens": 0}  # a single open row, as before best fit
    with pytest.raises(UserError, match="packer.open_rows: Field required"):
        pipeline(spec, plan).load_state_dict(state)


def test_the_streams_of_weighted_sources_are_checked_against_the_plan(nothing_read):
    spec = spec_over([{"path": "/a/*.jsonl", "weight": 2}, {"path": "/b/*.jsonl", "weight": 1}])
    plan = DataPlan([(["/a/1.jsonl"], 2.0), (["/b/1.jsonl"], 1.0)], [], [None, None])
    state = saved_cursor(spec, plan)
    state["rows"]["streams"].pop()
    with pytest.raises(UserError, match=r"rows.streams has 1 streams for 2 sources"):
        pipeline(spec, plan).load_state_dict(state)
    state = saved_cursor(spec, plan)
    state["plan"]["sources"].reverse()
    with pytest.raises(UserError, match=r"plan.sources\[0\] has the weight 1.0, data.train\[0\] 2.0"):
        pipeline(spec, plan).load_state_dict(state)


def test_a_layout_shares_every_file_once_among_the_world(isolated, nothing_read):
    files = [str(write_jsonl(isolated / f"part-{k}.jsonl", [{"text": "same size"}])) for k in range(2)]
    spec = spec_over([str(isolated / "*.jsonl")])
    state = saved_cursor(spec, rank=1, world_size=2)
    assert state["plan"]["layout"] == [[[files[0]], [files[1]]]]
    pipeline(spec, rank=1, world_size=2).load_state_dict(json.loads(json.dumps(state)))
    for layout in ([[files[0]], [files[0]]], [files], [[files[0]], [files[1]], []]):
        state["plan"]["layout"] = [layout]
        with pytest.raises(UserError, match=r"plan.layout\[0\] does not share .* among 2 ranks"):
            pipeline(spec, rank=1, world_size=2).load_state_dict(state)


def test_the_eval_files_are_those_data_eval_names_now_when_it_changed(isolated, nothing_read):
    """data.eval may change on resume: the files it names now are read, never what an edited cursor
    names; while it names the saved files, those are kept (see test_pipeline for a glob naming more)."""
    train, first, second = (
        str(write_jsonl(isolated / f"{name}.jsonl", [{"text": "x"}])) for name in ("t", "e1", "e2")
    )
    state = saved_cursor(spec_over([train], eval=[first]))
    assert state["plan"]["eval_files"] == [first]
    resumed = pipeline(spec_over([train], eval=[second]))
    resumed.load_state_dict(state)
    assert resumed.eval_files == [second]

    state["plan"]["eval_files"] = ["/etc/passwd"]
    resumed = pipeline(spec_over([train], eval=[first]))
    resumed.load_state_dict(state)
    assert resumed.eval_files == [first]

    held_out = spec_over([train], eval_fraction=0.1)
    state = saved_cursor(held_out)
    state["plan"]["eval_files"] = ["/etc/passwd"]
    resumed = pipeline(held_out)
    resumed.load_state_dict(state)
    assert resumed.eval_files == [train]  # the held-out rows of the train files


def test_a_piece_the_row_does_not_have_is_a_data_error_not_a_traceback(tokenizer, isolated):
    data = str(write_jsonl(isolated / "d.jsonl", [{"text": "a few words"}]))
    spec = spec_over([data])
    state = saved_cursor(spec)
    state["examples"]["pending"] = [[data, 0, 0, 99]]
    with pytest.raises(DataError, match=r"d.jsonl:1: the data cursor holds piece 100 of this row's 1"):
        DataPipeline(spec.data, tokenizer, spec.train.seed).load_state_dict(state)
