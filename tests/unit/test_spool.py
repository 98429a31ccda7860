"""The spool, the files a job's MLflow records wait in until the server has them: read back as input, never
written through a link, never another job's (delivered to a server: tests/integration/test_tracking.py)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from helpers import REPO
from tracking_helpers import TARGET, key_of, link, messages, spool_records

from job.tracking.spool import (
    RECORDS,
    STATE,
    CorruptSpool,
    Spool,
    SpoolState,
    find_spool,
    quarantine,
)
from job.tracking.tracker import (
    tracking_target,
)


def test_spool_cuts_a_torn_last_line_and_is_held_by_one_process(spool_dir):
    spool = Spool.create(spool_dir, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})
    with open(spool.records_path, "a") as f:
        f.write('{"kind": "metr')  # killed mid-write
    assert Spool.acquire(spool_dir, spool.key, TARGET) is None  # locked by its writer
    os.close(spool.lock_fd)

    again = Spool.acquire(spool_dir, spool.key, TARGET)
    again.append({"kind": "params", "params": {"b": "2"}})
    assert [r["params"] for r, _ in again.pending()] == [{"a": "1"}, {"b": "2"}]
    again.release()
    assert spool.directory.exists()  # undelivered records stay


def test_spool_folders_are_created_0700_under_a_permissive_umask(spool_dir):
    previous = os.umask(0)
    try:
        spool = Spool.create(spool_dir, TARGET)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    spool.release()


def test_state_is_fsynced_before_it_replaces_the_old_one(spool_dir, monkeypatch):
    spool = Spool.create(spool_dir, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})
    end = spool.records_path.stat().st_size
    spool.acknowledge(end)
    os.close(spool.lock_fd)
    (spool.directory / f"{STATE}.tmp").write_text('{"run_id": "r')  # a crash in the middle of a write
    again = Spool.acquire(spool_dir, spool.key, TARGET)
    assert again.state == SpoolState(offset=end)

    events = []
    fsync, replace = os.fsync, os.replace

    def fsync_spy(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", path.name, path.read_text()))
        fsync(fd)

    def replace_spy(source, target) -> None:
        events.append(("replace", Path(source).name, Path(target).name))
        replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync_spy)
        patch.setattr(os, "replace", replace_spy)
        again.state.run_id = "r1"
        again.acknowledge(end)
    state = json.dumps({"run_id": "r1", "offset": end, "last_steps": {}})
    assert events == [("fsync", f"{STATE}.tmp", state), ("replace", f"{STATE}.tmp", STATE)]
    assert (again.directory / STATE).read_text() == state
    assert not (again.directory / f"{STATE}.tmp").exists()
    again.release()


def test_find_spool_looks_only_at_spool_folders_directly_in_the_root(spool_dir, isolated):
    spool = Spool.create(spool_dir, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})  # undelivered: release keeps the spool
    spool.state.run_id = "frosty_boot_0k4g7y1nqk"
    spool.acknowledge(0)
    spool.release()
    (isolated / "victim").mkdir()
    (spool_dir / "victim").mkdir()
    for ref in ["../victim", str(isolated / "victim"), "victim", f"{spool.key}/..", ""]:
        assert find_spool(spool_dir, ref) is None, ref
    assert find_spool(spool_dir, spool.key) == spool.key
    assert find_spool(spool_dir, "frosty_boot_0k4g7y1nqk") == spool.key


def an_earlier_ftjobs_spool(root: Path, key: str) -> Path:
    """A spool folder as an ftjob before spool.json left it: records, a lock, no target."""
    directory = root / key
    directory.mkdir(parents=True)
    (directory / RECORDS).write_text(json.dumps({"kind": "params", "params": {"a": "1"}}) + "\n")
    (directory / "lock").touch()
    return directory


def unlocked_spool(root: Path) -> Path:
    """A new spool folder in root, as a job that ended left it."""
    spool = Spool.create(root, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})
    os.close(spool.lock_fd)
    return spool.directory


def swapped_for_a_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def spool_with_a_linked_marker(root: Path, outside: Path) -> tuple[str, Path]:
    spool = unlocked_spool(root)
    swapped_for_a_link(spool / "spool.json", outside / "spool.json")
    return spool.name, outside


NOT_SPOOL_FOLDERS = {  # given the spool root and a folder outside it: the key to open, and the folder it names
    "outside the root": lambda root, outside: ("../outside", outside),
    "an earlier ftjob's": lambda root, outside: (key_of("a"), an_earlier_ftjobs_spool(root, key_of("a"))),
    "a link to a folder": lambda root, outside: (key_of("b"), link(root / key_of("b"), outside)),
    "a link to a spool": lambda root, outside: (
        key_of("c"),
        link(root / key_of("c"), unlocked_spool(outside)),
    ),
    "spool.json a link": spool_with_a_linked_marker,
}


@pytest.mark.parametrize("case", NOT_SPOOL_FOLDERS)
def test_a_folder_that_is_not_a_spool_folder_of_this_job_is_left_as_it_is(case, spool_dir, isolated, caplog):
    outside = isolated / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("keep me")
    (outside / "spool.json").write_text(json.dumps({"tracking_uri": "x", "tracking_uri_sha256": "0" * 64}))
    key, folder = NOT_SPOOL_FOLDERS[case](spool_dir, outside)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "lock"}
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, key, TARGET) is None
    assert messages(caplog, logging.WARNING, str(spool_dir / key))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "lock"} == before
    assert not list(spool_dir.glob("*.bad-*"))


def test_release_and_quarantine_touch_only_what_is_still_a_spool_folder(spool_dir, isolated, caplog):
    """A spool folder replaced by another folder meanwhile is neither removed nor renamed."""
    victim = isolated / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    spool = Spool.create(spool_dir, TARGET)  # nothing to deliver: release removes it
    spool.directory.rename(isolated / "moved")
    victim.rename(spool.directory)
    with caplog.at_level(logging.WARNING, logger="job"):
        spool.release()
        quarantine(spool_dir, spool.directory, "damaged")
        quarantine(spool_dir, isolated / "moved", "damaged")  # a spool folder, but not in the root
    assert (spool.directory / "notes.txt").read_text() == "keep me"
    assert (isolated / "moved" / "spool.json").is_file()
    assert len(messages(caplog, logging.WARNING, "left as it is")) == 2


OWN_FILES_PLANTED = {
    "records a link": lambda spool, outside: swapped_for_a_link(spool / RECORDS, outside),
    "records a hard link": lambda spool, outside: (
        (spool / RECORDS).unlink(),
        os.link(outside, spool / RECORDS),
    ),
    "state a link": lambda spool, outside: (spool / STATE).symlink_to(outside),
    "lock a link": lambda spool, outside: swapped_for_a_link(spool / "lock", outside),
    "files a link": lambda spool, outside: link(spool / "files", outside.parent),  # emptied by files()
}


@pytest.mark.parametrize("planted", OWN_FILES_PLANTED)
def test_a_spool_file_that_is_a_link_is_never_written_through(planted, spool_dir, isolated, caplog):
    """records.jsonl is cut at its last newline and appended to; a link would do that to another file."""
    outside = isolated / "notes.txt"
    outside.write_text('{"offset": 0}\nno newline at the end')
    spool = unlocked_spool(spool_dir)
    OWN_FILES_PLANTED[planted](spool, outside)
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, spool.name, TARGET) is None
    assert outside.read_text() == '{"offset": 0}\nno newline at the end'
    assert messages(caplog, logging.WARNING, str(spool))


PLANTED_OPEN = {
    "another spool's key": {"key": key_of("f")},
    "a resume_run_id that is a path": {"resume_run_id": "../victim"},
}


@pytest.mark.parametrize("planted", PLANTED_OPEN)
def test_an_open_record_naming_another_spool_or_a_path_is_quarantined(planted, spool_dir, caplog):
    """Both go into MLflow queries (the run_key tag filter, get_run)."""
    spool = Spool.create(spool_dir, TARGET)
    [opening, *_] = spool_records(spool.key, "planted-open")
    spool.append({**opening, **PLANTED_OPEN[planted]})
    os.close(spool.lock_fd)
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, spool.key, TARGET) is None
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{spool.key}.bad-")
    assert messages(caplog, logging.WARNING, "open record")


def test_a_state_whose_run_id_is_not_a_run_id_is_corrupt(isolated):
    (isolated / STATE).write_text(json.dumps({"run_id": "../victim", "offset": 0, "last_steps": {}}))
    with pytest.raises(CorruptSpool):
        SpoolState.load(isolated / STATE)


def test_the_spool_records_where_it_goes_without_secrets_and_tells_users_apart(spool_dir):
    alice = tracking_target("https://alice:ALICE-SECRET@mlflow.example/")
    bob = tracking_target("https://bob:BOB-SECRET@mlflow.example/")
    with_token = tracking_target("https://mlflow.example/?token=TOKEN-SECRET")
    assert alice.uri == bob.uri == "https://***@mlflow.example" and alice.sha256 != bob.sha256
    assert with_token.uri == "https://mlflow.example"
    for target in (alice, bob, with_token):
        spool = Spool.create(spool_dir, target)
        on_disk = b"".join(p.read_bytes() for p in spool.directory.rglob("*") if p.is_file())
        assert not [s for s in (b"ALICE-SECRET", b"BOB-SECRET", b"TOKEN-SECRET") if s in on_disk]
        spool.release()


SAME_STORES = [  # each a list of tracking URIs of one store, as one job and the next may spell them
    ["http://mlflow.example:5000", "http://mlflow.example:5000/", "HTTP://MLflow.Example:5000/"],
    ["https://alice:OLD@mlflow.example/", "https://alice:ROTATED@MLFLOW.example:443", "https://alice@mlflow.example"],
    ["https://mlflow.example/?token=OLD", "https://mlflow.example:443?token=ROTATED", "https://mlflow.example/"],
    ["postgresql://ml:OLD@db.example/mlflow?sslmode=require", "postgresql://ml:ROTATED@db.example/mlflow?sslmode=require"],
    ["https://bob@mlflow.example"],
    ["http://mlflow.example:5001"],
    ["https://mlflow.example/other"],
    ["postgresql://ml@db.example/mlflow"],
    [f"sqlite:///{REPO}/mlruns/mlflow.db", f"sqlite:///{REPO}/mlruns/mlflow.db/"],
]  # fmt: skip


def test_a_spool_goes_to_its_store_however_its_uri_is_spelled_or_its_password_rotated():
    stores = [{tracking_target(uri).sha256 for uri in same} for same in SAME_STORES]
    assert all(len(hashes) == 1 for hashes in stores)
    assert len(set.union(*stores)) == len(SAME_STORES)


def test_a_spool_of_another_user_name_on_the_same_server_is_left_with_a_warning_that_says_so(
    spool_dir, caplog
):
    spool = Spool.create(spool_dir, tracking_target("https://alice:OLD@mlflow.example/"))
    spool.append({"kind": "params", "params": {"a": "1"}})  # undelivered: release keeps the spool
    spool.release()
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, spool.key, tracking_target("https://bob:BOB@mlflow.example/")) is None
    [warning] = messages(caplog, logging.WARNING, str(spool.directory))
    assert "https://***@mlflow.example for another user name than this job's" in warning
    again = Spool.acquire(spool_dir, spool.key, tracking_target("https://alice:ROTATED@mlflow.example"))
    assert again is not None
    again.release()
