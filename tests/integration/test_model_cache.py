"""Model sources (local, Hub, object store with a node-local cache) and the job's bad-input exits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from helpers import ALPACA_ROWS, NO_AUTOCAST, REPO, make_spec, write_jsonl, write_spec

from job.cli import main
from job.errors import UserError
from job.model import source as model_source
from job.model.source import cache_root, fetch_cached, resolve_model_dir
from job.spec import ModelSpec


def resolve(source: str):
    return resolve_model_dir(ModelSpec(source=source))


def upload_model(s3, tiny_model_dir, prefix="models/tiny") -> str:
    s3.put(str(tiny_model_dir) + "/", f"{s3.bucket}/{prefix}/", recursive=True)
    return f"s3://{s3.bucket}/{prefix}/"


def test_local_directory_is_used_in_place(tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == tiny_model_dir


def test_object_store_model_is_fetched_once_and_again_when_it_changes(tiny_model_dir, s3, monkeypatch):
    url = upload_model(s3, tiny_model_dir)
    downloads = []
    real_download = model_source.download_dir
    monkeypatch.setattr(model_source, "download_dir", lambda *a: downloads.append(a[0]) or real_download(*a))

    first = resolve(url)
    assert first.parent == cache_root()
    assert (first / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert resolve(url) == first
    assert len(downloads) == 1

    s3.pipe(f"{s3.bucket}/models/tiny/config.json", (tiny_model_dir / "config.json").read_bytes() + b"\n")
    second = resolve(url)
    assert second != first and len(downloads) == 2
    assert (second / "config.json").read_bytes().endswith(b"\n")


def test_concurrent_fetches_download_once(tiny_model_dir, s3, monkeypatch):
    url = upload_model(s3, tiny_model_dir)
    downloads = []
    real_download = model_source.download_dir
    monkeypatch.setattr(model_source, "download_dir", lambda *a: downloads.append(a[0]) or real_download(*a))
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch_cached(url)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(downloads) == 1
    assert len(set(results)) == 1 and len(results) == 4


def test_concurrent_processes_share_one_complete_copy(tiny_model_dir, s3, isolated):
    url = upload_model(s3, tiny_model_dir)
    code = f"from job.model.source import fetch_cached; print(fetch_cached({url!r})[0])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(3)
    ]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    entries = [p.name for p in cache_root().iterdir() if p.is_dir()]
    assert len(entries) == 1, entries  # no staging directory left behind
    assert json.loads((cache_root() / entries[0] / ".ftjob-source.json").read_text())["url"] == url


def test_missing_object_store_model(s3):
    with pytest.raises(UserError, match=r"model.source: no files under s3://"):
        resolve(f"s3://{s3.bucket}/models/absent/")


# --- the job's bad inputs: exit 2, one clear message, nothing under output.uri ---------------------


def bad_run(isolated, capsys, tiny_model_dir, **changes):
    data = write_jsonl(isolated / "train.jsonl", ALPACA_ROWS)
    spec = make_spec(
        name="bad",
        model=tiny_model_dir,
        data={"train": [str(data)]},
        train={"mixed_precision": NO_AUTOCAST},  # the process's accelerator's, in-process
        output={"uri": str(isolated / "out")},
        tracking={"enabled": False},
    )
    for section, values in changes.items():
        spec[section] |= values
    write_spec(isolated / "spec.json", spec)
    code = main(["run", str(isolated / "spec.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ftjob: error: ") and "Traceback" not in err
    return err, spec["output"]["uri"]


def test_run_with_missing_model_path(isolated, capsys, tiny_model_dir):
    err, out = bad_run(isolated, capsys, tiny_model_dir, model={"source": str(isolated / "absent")})
    assert f"model.source: no such directory: {isolated / 'absent'}" in err
    assert not (isolated / "out").exists()


def test_run_with_pickle_only_model(isolated, capsys, tiny_model_dir):
    model = isolated / "bin-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    err, _ = bad_run(isolated, capsys, tiny_model_dir, model={"source": str(model)})
    assert "only pickle weights (pytorch_model.bin)" in err
    assert not (isolated / "out").exists()


def test_run_with_missing_data_file(isolated, capsys, tiny_model_dir):
    err, _ = bad_run(isolated, capsys, tiny_model_dir, data={"train": [str(isolated / "nope.jsonl")]})
    assert f"data.train[0]: no such file: {isolated / 'nope.jsonl'}" in err
    assert not (isolated / "out").exists()


def test_run_with_missing_eval_glob(isolated, capsys, tiny_model_dir):
    err, _ = bad_run(isolated, capsys, tiny_model_dir, data={"eval": [str(isolated / "eval-*.jsonl")]})
    assert "data.eval[0]: no such file" in err
    assert not (isolated / "out").exists()


def test_run_with_unwritable_local_output(isolated, capsys, tiny_model_dir):
    blocker = isolated / "a-file"
    blocker.write_text("a file where a directory should be")
    err, _ = bad_run(isolated, capsys, tiny_model_dir, output={"uri": str(blocker / "out")})
    assert f"output.uri {blocker / 'out'} is not writable" in err
    assert blocker.read_text() == "a file where a directory should be"


def test_run_with_missing_output_bucket(isolated, capsys, tiny_model_dir, s3):
    err, _ = bad_run(isolated, capsys, tiny_model_dir, output={"uri": "s3://no-such-bucket-here/runs/x"})
    assert "output.uri s3://no-such-bucket-here/runs/x is not writable" in err
    assert "testing-secret-key" not in err


def test_run_with_bad_spec_writes_nothing(isolated, capsys, tiny_model_dir):
    err, _ = bad_run(isolated, capsys, tiny_model_dir, train={"max_steps": 0, "micro_batch_size": -1})
    assert "train.max_steps" in err and "train.micro_batch_size" in err
    assert not (isolated / "out").exists()


# --- what a model is: its identity, and cached copies that are input like any other -----------------


def test_a_resume_refuses_changed_model_files_naming_them_and_ignores_files_the_loader_does_not_read(
    tiny_model_dir, data_files, isolated, caplog
):
    """Stopped before publishing, then resumed: an edited tokenizer config is named; a LICENSE.txt or code
    that does not run (no trust_remote_code), as tools add to a model folder, are not the model."""
    from helpers import make_spec, train_in_process

    model, output = shutil.copytree(tiny_model_dir, isolated / "model"), isolated / "out"
    spec = make_spec(
        "lora",
        model=model,
        files=data_files,
        tracking={"enabled": False},
        train={"max_steps": 4, "checkpoint_every": 2},
    )
    spec["output"] = {"uri": str(output)}
    train_in_process(spec)
    (output / "adapter" / "MANIFEST.json").unlink()  # as a run stopped before publishing leaves it
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())

    tokenizer_config = (model / "tokenizer_config.json").read_text()
    (model / "tokenizer_config.json").write_text(tokenizer_config.replace("{", '{"model_max_length": 7,', 1))
    with pytest.raises(UserError) as refused:
        train_in_process(spec)
    message = str(refused.value)
    assert "model files changed under model.source: tokenizer_config.json (model.identity 'sha256:" in message
    assert "point model.source at the model the run started on. Run with --restart to start over (checkpoints and published outputs are deleted)" in message  # fmt: skip
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == checkpoints  # nothing lost

    (model / "tokenizer_config.json").write_text(tokenizer_config)
    (model / "LICENSE.txt").write_text("added by huggingface-cli download")
    (model / "modeling_x.py").write_text("raise SystemExit('remote code ran')")
    with caplog.at_level("INFO", logger="job"):
        train_in_process(spec)
    assert "resuming from the checkpoint at step 4" in caplog.text
    assert (output / "adapter" / "MANIFEST.json").is_file()


def test_a_cached_copy_is_hashed_once_per_resolve(tiny_model_dir, s3, monkeypatch):
    url = upload_model(s3, tiny_model_dir)
    hashed = []
    real_model_files = model_source.model_files
    monkeypatch.setattr(model_source, "model_files", lambda d: hashed.append(d) or real_model_files(d))
    downloaded = resolve(url)
    assert len(hashed) == 1  # the staging folder's digests, which the marker and the identity take
    assert resolve(url) == downloaded and len(hashed) == 2  # the cached folder checked: once


def cached_copy(s3, tiny_model_dir, monkeypatch) -> tuple[str, list, object]:
    """The tiny model on S3, fetched once into the node cache; downloads are counted from then on."""
    url = upload_model(s3, tiny_model_dir)
    cached, _ = fetch_cached(url)
    downloads = []
    real_download = model_source.download_dir
    monkeypatch.setattr(model_source, "download_dir", lambda *a: downloads.append(a[0]) or real_download(*a))
    return url, downloads, cached


def test_a_staging_folder_of_a_killed_download_is_removed_by_the_next_download(tiny_model_dir, s3):
    url = upload_model(s3, tiny_model_dir)
    key, _ = model_source.content_key(url)
    stale = cache_root() / f".{key}-killed"  # as tempfile.mkdtemp names them
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a download")
    other_model = cache_root() / ".0123456789abcdef01234567-downloading"
    other_model.mkdir()

    fetch_cached(url)
    assert not stale.exists()
    assert other_model.exists()  # another model's: its lock's holder may be downloading it


def test_a_cached_folder_that_does_not_match_its_marker_is_downloaded_again(
    tiny_model_dir, s3, monkeypatch, caplog
):
    url, downloads, cached = cached_copy(s3, tiny_model_dir, monkeypatch)
    (cached / "config.json").write_text("{}")
    with caplog.at_level("WARNING", logger="job"):
        assert fetch_cached(url)[0] == cached
    assert len(downloads) == 1
    assert (cached / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert "(its files do not match its .ftjob-source.json): downloading it again" in caplog.text

    (cached / ".ftjob-source.json").unlink()
    fetch_cached(url)
    assert len(downloads) == 2 and (cached / ".ftjob-source.json").is_file()


def test_a_symlinked_cached_folder_is_not_trusted(tiny_model_dir, s3, monkeypatch, isolated):
    url, downloads, cached = cached_copy(s3, tiny_model_dir, monkeypatch)
    elsewhere = isolated / "elsewhere"
    cached.rename(elsewhere)
    cached.symlink_to(elsewhere)  # a copy as good as ftjob's, but not the cache's own

    assert fetch_cached(url)[0] == cached
    assert len(downloads) == 1 and cached.is_dir() and not cached.is_symlink()
    assert (elsewhere / "model.safetensors").is_file()  # the link went, never what it pointed to


def test_a_cached_folder_of_another_user_is_refused(tiny_model_dir, s3, monkeypatch):
    url, downloads, cached = cached_copy(s3, tiny_model_dir, monkeypatch)
    owner = cached.stat().st_uid
    monkeypatch.setattr(model_source.os, "geteuid", lambda: owner + 1)
    with pytest.raises(
        UserError, match=rf"not trusted \(it belongs to user id {owner}, not to this user"
    ) as e:
        fetch_cached(url)
    assert "set FTJOB_CACHE to a folder of your own" in str(e.value)
    assert not downloads and cached.is_dir()


LOCK_FILES = {  # what stands where the model's lock file goes, and how the run names it
    "a symbolic link": "is a symbolic link",
    "a folder": "cannot be opened (Is a directory)",
    "a named pipe": "is not a regular file",
}


@pytest.mark.parametrize("kind", LOCK_FILES)
def test_a_lock_file_that_is_no_regular_file_is_refused_and_what_it_points_to_is_kept(
    tiny_model_dir, s3, isolated, capsys, request, kind
):
    """In a shared FTJOB_CACHE another user may put a symbolic link where the model's lock file goes:
    opened for writing, it would truncate what it points to. The run exits 2 naming the lock file."""
    url = upload_model(s3, tiny_model_dir)
    key, _ = model_source.content_key(url)
    cache_root().mkdir(parents=True)
    lock_file = cache_root() / f"{key}.lock"
    precious = isolated / "precious.txt"
    precious.write_text("someone's work")
    if kind == "a symbolic link":
        lock_file.symlink_to(precious)
    elif kind == "a folder":
        lock_file.mkdir()
    else:
        os.mkfifo(lock_file)
        reader = os.open(lock_file, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write never blocks
        request.addfinalizer(lambda: os.close(reader))
    err, _ = bad_run(isolated, capsys, tiny_model_dir, model={"source": url})
    assert f"{lock_file}, the node cache's lock file for this model, {LOCK_FILES[kind]}" in err
    assert "delete it, or set FTJOB_CACHE to a folder of your own" in err
    assert precious.read_text() == "someone's work"
    assert not (cache_root() / key).exists()  # nothing downloaded
