"""Checkpoints under output.uri/checkpoints/step-NNNNNN-gG/ (G: the generation of output.uri's lease that
wrote it, job/output/lease.py): everything needed to continue a run exactly.

    trainable.safetensors   the trainable weights (adapter, or the whole model for `full`)      rank 0
    optimizer.pt            optimizer, schedule and grad-scaler states (read with weights_only)  rank 0
    run.json                step, last metrics, MLflow run id, what the run depends on           rank 0
    rank-00000.json         that rank's RNG states and data cursor                               each rank
    MANIFEST.json           sha256 and size of every file above, the other ranks' included       rank 0
    COMMITTED               written last by rank 0, after every other file is uploaded, while   rank 0
                            the job still holds output.uri's lease (job/output/lease.py); names the
                            lease's generation (as run.json does), host and pid

A sharded model's (train.distributed fsdp) has no trainable.safetensors: each rank writes its shards of
the trainable weights and of their optimizer state, shard-00000.safetensors, and optimizer.pt holds no
per-parameter state (job/output/sharded.py). Each rank downloads and reads the checkpoint's files but
the other ranks' shards.

A job writes only folders of its own generation, so a job that lost the lease (a frozen node) and the
job that took it over never write the same folder, even for the same step. The newest checkpoint is the
one of the highest step, and of the highest generation among those (folders named step-NNNNNN, from
before generations, are generation 0).

A reader trusts only a checkpoint with COMMITTED whose files match its MANIFEST; a damaged newest one
(a truncated or missing file, as any rank sees it) is skipped with a warning for the one before. What a
whole one holds is input all the same, checked as strictly as the spec before anything is trained
(run.json, the rank files' RNG states, the metric curve, the weights and optimizer states against what
they are loaded into here, the data cursor by the data pipeline): one that is not as ftjob writes it is
refused (exit 2), naming the file and key.

Rank files (and shards) are uploaded before a barrier; rank 0 then uploads its files from a background
thread and writes COMMITTED, so training goes on meanwhile. At most one upload is in flight: a
checkpoint that comes while one is uploading waits for it. Retention runs right after a commit, which
happens only while the lease is this job's; a failure to list or delete checkpoints there is a warning.
The metric curve is not in checkpoints: each one adds a segment of it (job/output/curve.py).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn

import torch
from accelerate.utils import gather_object
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from job.collective import rank_0_outcome, whole_everywhere
from job.errors import JobError, UserError
from job.model.sharding import is_sharded
from job.model.source import ModelIdentity, identity_change, resolved_identity
from job.output.curve import read_history, remove_segments_after, to_lines
from job.output.layout import (
    COMMITTED,
    MANIFEST,
    RUN_RECORD,
    STATES,
    WEIGHTS,
    OutputLayout,
    StepFolder,
    parse_step_folder,
    rank_file,
    read_by,
    segment_file,
    shard_file,
    step_folder,
)
from job.output.lease import Lease, LeaseLost, holder
from job.output.manifest import manifest_entry, verify_manifest, write_manifest
from job.output.sharded import load_shard, shard_reference, write_shard
from job.rng import SavedRngStates, rng_states
from job.saved import Count, Saved, refuse, validated
from job.spec import Spec, echo, flatten
from job.storage import download_dir, filesystem, join, upload_dir

log = logging.getLogger(__name__)

# Spec keys a resumed run may change: they do not change what is trained, only how often it is
# checkpointed, logged or evaluated, how long it may take to stop, and where things are reported. Any
# other change (the learning rate or the chat template as much as the model) is refused on resume:
# the published spec.json must be the spec the whole run trained with.
MAY_CHANGE_ON_RESUME = (
    "name",
    "train.checkpoint_every",
    "train.stop_grace_seconds",
    "train.collective_timeout_seconds",
    "train.peer_timeout_seconds",
    "eval",
    "train.lease_seconds",
    "train.eval_every",
    "train.log_every",
    "train.gradient_checkpointing",
    "train.compile",
    "data.eval",
    "data.bad_rows",
    "data.prefetch",
    "tracking",
    "output",
    "report",
    "storage_options",
)
CHECKPOINT_FORMAT = 2  # 2: with MANIFEST.json (a format-2 checkpoint without one is damaged)
# A checkpoint whose fingerprint has another version was written by another ftjob. 3: the data cursor
# holds the positions of buffered and carried-over rows, not the rows. 4: with model.identity. 5: an
# identity of the loaded files only (a Hub model's: its commit), and model.files.
FINGERPRINT_VERSION = 5
# The identity of the model the run loaded, and its files' digests, which name what changed in a message.
MODEL_IDENTITY, MODEL_FILES = "model.identity", "model.files"
# Spec keys added since fingerprints were first written, with the value a checkpoint without the key was
# trained with: such a checkpoint still resumes under a spec of that value. (train.fsdp's options are in
# the fingerprints of fsdp runs only.)
ADDED_KEYS = {"train.distributed": "ddp"}


def fingerprint(spec: Spec, world_size: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint: every spec key (dotted)
    but those in MAY_CHANGE_ON_RESUME (and train.fsdp's, which mean nothing under ddp), the identity of
    the model it loaded (the same model.source may hold other weights by then), and the number of
    processes (each rank's data cursor and shards are its own)."""
    keys = flatten(spec.model_dump(mode="json"))
    left_out = MAY_CHANGE_ON_RESUME + (() if spec.train.distributed == "fsdp" else ("train.fsdp",))
    kept = {k: v for k, v in keys.items() if not any(k == p or k.startswith(f"{p}.") for p in left_out)}
    identity = resolved_identity(spec.model)
    return {
        **kept,
        MODEL_IDENTITY: identity.digest,
        MODEL_FILES: identity.files,
        "world_size": world_size,
        "fingerprint_version": FINGERPRINT_VERSION,
    }


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    if saved.get("fingerprint_version") != current["fingerprint_version"]:
        return ["the checkpoint was written by another version of ftjob, which saved other fields"]
    saved, current = {**ADDED_KEYS, **saved}, {**ADDED_KEYS, **current}
    changes = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted((saved.keys() | current.keys()) - {MODEL_IDENTITY, MODEL_FILES})
        if saved.get(key) != current.get(key)
    ]
    if saved.get(MODEL_IDENTITY) != current.get(MODEL_IDENTITY):  # the files' digests only say what changed
        before = ModelIdentity(saved.get(MODEL_IDENTITY), saved.get(MODEL_FILES))
        after = ModelIdentity(current.get(MODEL_IDENTITY), current.get(MODEL_FILES, {}))
        changes.append(identity_change(before, after))
    return changes


def saved_total_steps(saved: dict | None) -> int | None:
    """The step count that a checkpoint's run planned, so that a resumed epoch-based run skips the
    counting pass (a full read of the data). The resumed run trains the same spec (the fingerprint) on
    as many processes over the files the run started with (the plan travels with the cursor), so a
    count made again would only differ if those files changed meanwhile. None where the checkpoint
    holds none (older checkpoints) or one that cannot be right (not past the checkpoint's step)."""
    steps = saved.get("total_steps") if saved else None
    valid = isinstance(steps, int) and not isinstance(steps, bool) and steps >= saved.get("step", 0) >= 0
    return steps if valid and steps > 0 else None


def step_folders(output_uri: str) -> list[StepFolder]:
    """Every checkpoint folder under output.uri, committed or not, oldest first."""
    fs, root = filesystem(OutputLayout(output_uri).checkpoints)
    if not fs.exists(root):
        return []
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False))
    return sorted(folder for name in names if (folder := parse_step_folder(name)))


def is_committed(output_uri: str, folder: StepFolder) -> bool:
    fs, path = filesystem(join(OutputLayout(output_uri).checkpoint(folder), COMMITTED))
    return fs.exists(path)


def committed_checkpoints(output_uri: str) -> list[StepFolder]:
    """The committed checkpoints under output.uri, oldest first."""
    return [folder for folder in step_folders(output_uri) if is_committed(output_uri, folder)]


def remove_uncommitted(output_uri: str) -> None:
    """Checkpoints without COMMITTED are leftovers of an interrupted upload: never trusted, removed."""
    for folder in step_folders(output_uri):
        if not is_committed(output_uri, folder):
            fs, path = filesystem(OutputLayout(output_uri).checkpoint(folder))
            log.info("removing incomplete checkpoint %s", path)
            fs.rm(path, recursive=True)


def remove_all(output_uri: str) -> None:
    """The checkpoints and the metric curve: a run that starts over."""
    layout = OutputLayout(output_uri)
    for uri in (layout.checkpoints, layout.segments, layout.curve):
        fs, path = filesystem(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)


# ---------------------------------------------------------------------------------------------
# What a resume reads back is input, checked as the data cursor is (job/data/cursor.py: saved_plan),
# with its helpers: refused with exit 2, naming the file and the key, before anything is trained.

Step = Annotated[int, Field(ge=1, strict=True)]
Metric = Annotated[float, Field(strict=True)]  # an int or a float (NaN too: a loss can be), not a bool


class SavedRankFile(Saved):
    rng: SavedRngStates
    data: Any  # the data cursor, checked whole as the data pipeline loads it (saved_plan)


class SavedMetrics(BaseModel):
    """One step's metrics as the loop records them: the step, and numbers by name."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Metric]
    step: Step


class SavedFingerprint(Saved):
    """What of run.json is read first: the fingerprint, which tells a checkpoint of another ftjob."""

    model_config = ConfigDict(extra="ignore")
    fingerprint: dict[str, Any]


class SavedRun(SavedFingerprint):
    """run.json of a checkpoint whose fingerprint matched: of this ftjob."""

    model_config = ConfigDict(extra="forbid")
    step: Step
    run_id: Any  # continued only when it is an MLflow run id (job/tracking/tracker.py: resumable_run_id)
    total_steps: Step
    last_metrics: SavedMetrics
    checkpoint_format: StrictInt
    lease_generation: Count


def check_run_record(run: Any, folder: StepFolder, where: str) -> None:
    """run.json (at `where`) as this ftjob writes it, for the step and lease generation its folder names."""
    saved = validated(SavedRun, run, where)
    if saved.checkpoint_format != CHECKPOINT_FORMAT:
        refuse(where, f"checkpoint_format is {saved.checkpoint_format}, not {CHECKPOINT_FORMAT}")
    for key, value, named in [
        ("step", saved.step, folder.step),
        ("last_metrics.step", saved.last_metrics.step, folder.step),
        ("lease_generation", saved.lease_generation, folder.generation),
    ]:
        if value != named:
            refuse(where, f"{key} is {value}, where the checkpoint's folder {folder.name} says {named}")


def check_like(found: Any, expected: Any, where: str, key: str = "") -> None:
    """found (read back from `where`) is as this run's `expected` is, all the way down: a dict with the
    same keys, a list or tuple as long, a tensor of the same dtype and shape, else a value of the same
    type. Refused naming the first key where it is not."""
    if not same_kind(found, expected):
        mismatch(where, key, f"found {described(found)}, where this run has {described(expected)}")
    if isinstance(expected, dict):
        if missing := [name for name in expected if name not in found]:
            mismatch(where, key_path(key, missing[0]), "missing")
        if extra := [name for name in found if name not in expected]:
            mismatch(where, key_path(key, echo(extra[0])), "not in this run")
        for name, value in expected.items():
            check_like(found[name], value, where, key_path(key, name))
    elif isinstance(expected, list | tuple):
        if len(found) != len(expected):
            mismatch(where, key, f"{len(found)} items, where this run has {len(expected)}")
        for i, (item, value) in enumerate(zip(found, expected, strict=True)):
            check_like(item, value, where, f"{key}[{i}]")


def same_kind(found: Any, expected: Any) -> bool:
    """Of the same type; tensors of the same dtype and shape."""
    if isinstance(expected, torch.Tensor):
        return isinstance(found, torch.Tensor) and described(found) == described(expected)
    return type(found) is type(expected)


def described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return type(value).__name__


def key_path(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def mismatch(where: str, key: str, problem: str) -> NoReturn:
    refuse(where, f"not as this run writes it: {key or '(top level)'}: {problem}")


def read_back(load: Callable[[Path], Any], path: Path, where: str, kind: str) -> Any:
    if not path.is_file():  # its checkpoint's MANIFEST.json does not list it
        refuse(where, "missing")
    try:
        return load(path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as e:  # what either load raises
        refuse(where, f"not a {kind} ({type(e).__name__})")


def checked_weights(path: Path, where: str, parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trainable.safetensors: exactly the model's trainable tensors, of their names, dtypes and shapes."""
    weights = read_back(load_file, path, where, "safetensors file")
    check_like(weights, parameters, where)
    return weights


def checked_shard(path: Path, where: str, parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard file: exactly this rank's shards of the model's trainable tensors and their optimizer
    state, of their names, dtypes and shapes."""
    shard = read_back(load_file, path, where, "safetensors file")
    check_like(shard, shard_reference(shard, parameters), where)
    return shard


def checked_states(
    path: Path, where: str, optimizer, scheduler, scaler, sharded: bool = False
) -> dict[str, Any]:
    """optimizer.pt (read with weights_only): as states_reference says, and the optimizer's param groups
    with this run's parameters and settings; only the learning rate, which the schedule sets, may differ.
    A sharded model's holds no per-parameter state (it is in the shards)."""
    load = partial(torch.load, weights_only=True)
    states = read_back(load, path, where, "file torch.load reads with weights_only")
    reference = states_reference(states, optimizer, scheduler, scaler, sharded)
    check_like(states, reference, where)
    groups = zip(states["optimizer"]["param_groups"], reference["optimizer"]["param_groups"], strict=True)
    for i, (group, ours) in enumerate(groups):
        for name, value in ours.items():
            if name != "lr" and group[name] != value:
                key = f"optimizer.param_groups[{i}].{name}"
                mismatch(where, key, f"{echo(group[name])}, where this run has {echo(value)}")
    return states


def states_reference(states: Any, optimizer, scheduler, scaler, sharded: bool = False) -> dict[str, Any]:
    """What optimizer.pt must be like to be loaded into this run's objects: the optimizer's state as
    adamw_reference says, the schedule's as the scheduler's own state_dict, and a grad scaler's as the
    scaler's. A grad scaler's state is there when the run that wrote it used fp16; a run without a scaler
    ignores it (mixed_precision: auto picks by GPU, and a requeued job may get another)."""
    saved = states if isinstance(states, dict) else {}
    saved_optimizer = saved.get("optimizer") if isinstance(saved.get("optimizer"), dict) else {}
    reference = {
        "optimizer": adamw_reference(optimizer, {} if sharded else saved_optimizer.get("state")),
        "scheduler": scheduler.state_dict(),
    }
    if "scaler" in saved:
        reference["scaler"] = scaler.state_dict() if scaler is not None else saved["scaler"]  # not loaded
    return reference


def adamw_reference(optimizer, saved_state: Any) -> dict[str, Any]:
    """The optimizer's state_dict (its param groups) with AdamW's state (a step, and moments shaped as the
    parameter) for each parameter that saved_state has one for: a parameter that has had no gradient yet
    (an expert no token was routed to, steps that fp16 skipped) has none."""
    reference = optimizer.state_dict()  # this run's param groups; no state before its first step
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    with_state = saved_state.keys() if isinstance(saved_state, dict) else set()
    reference["state"] = {
        i: {"step": torch.tensor(0.0), "exp_avg": p, "exp_avg_sq": p}
        for i, p in enumerate(parameters)
        if i in with_state
    }
    return reference


def resume_copy_prefix() -> str:
    """load_latest's local copies of a checkpoint are named by the process's id: a process removes its
    own, never another's (every rank of a node makes one)."""
    return f"ftjob-resume-{os.getpid()}-"


@contextmanager
def resume_copies_removed() -> Iterator[None]:
    """However the block ends (a stop, an error), the local copies of checkpoints that load_latest made
    in this process are removed: restore() removes the copy only once the run has got that far."""
    try:
        yield
    finally:
        for copy in Path(tempfile.gettempdir()).glob(f"{resume_copy_prefix()}*"):
            shutil.rmtree(copy, ignore_errors=True)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model).items()}


def write_trained_state(directory: Path, model, optimizer, scheduler, scaler) -> None:
    """trainable.safetensors and optimizer.pt, which Checkpointer.restore() checks and loads."""
    save_file(trainable_state(model), directory / WEIGHTS)
    write_states(directory, optimizer.state_dict(), scheduler, scaler)


def write_states(directory: Path, optimizer_state: dict[str, Any], scheduler, scaler) -> None:
    """optimizer.pt: the optimizer's state_dict (a sharded model's without per-parameter state, which
    is in the shards), the schedule's and the grad scaler's."""
    states = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    if scaler is not None:
        states["scaler"] = scaler.state_dict()
    torch.save(states, directory / STATES)


class Checkpointer:
    """Writes checkpoints (one upload in flight at most) and reads the newest committed one. As a
    context manager: however the run ends, the upload in flight ends before the block does (and so
    before the lease is released)."""

    def __init__(self, output_uri: str, rank: int, world_size: int, keep: int, lease: Lease):
        self.output_uri = output_uri
        self.layout = OutputLayout(output_uri)
        self.root = self.layout.checkpoints
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.lease = lease
        self.upload: threading.Thread | None = None
        self.upload_error: BaseException | None = None
        self.curve_saved_to = 0  # the last step whose metrics are in a segment
        # The newest checkpoint this process's run committed: rank 0 sets it as it commits, the other
        # ranks learn it from rank 0 at wait_committed (job/signals.py: what the grace period's end exits)
        self.committed_step: int | None = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        if self.upload is not None:  # only when the run ends on an error: else wait() has joined it
            self.upload.join()
            self.upload = None
        if self.upload_error is not None:
            log.warning("the checkpoint upload in flight failed too: %s: %s", type(self.upload_error).__name__, self.upload_error)  # fmt: skip
            self.upload_error = None

    def step_uri(self, step: int) -> str:
        """Where this job writes its checkpoint of step: a folder of its own lease generation."""
        return self.layout.checkpoint(step_folder(step, self.lease.generation))

    def save(
        self, step: int, model, optimizer, scheduler, accelerator, data_state: dict, run: dict, history: list
    ) -> None:
        """Every rank, at the same step: each uploads its own files (its rank file, and its shard of a
        sharded model); rank 0 then uploads the rest in the background (the metrics since the last
        checkpoint as a segment first) and commits."""
        self.wait_committed(accelerator)  # one upload in flight at most
        uri = self.step_uri(step)
        model = accelerator.unwrap_model(model)
        sharded = is_sharded(model)
        with tempfile.TemporaryDirectory(prefix="ftjob-rank-") as tmp:
            own = Path(tmp)
            (own / rank_file(self.rank)).write_text(json.dumps({"rng": rng_states(), "data": data_state}))
            if sharded:
                write_shard(own / shard_file(self.rank), trainable_parameters(model), optimizer)
            entries = [(path.name, manifest_entry(path)) for path in sorted(own.iterdir())]
            upload_dir(own, uri)
        # every rank's files are up before rank 0 can commit (a collective), and rank 0 learns their hashes
        rank_entries = dict(gather_object(entries) if accelerator.num_processes > 1 else entries)
        if self.rank != 0:
            return
        staging = Path(tempfile.mkdtemp(prefix="ftjob-checkpoint-"))
        if sharded:
            groups = optimizer.state_dict()["param_groups"]
            write_states(staging, {"state": {}, "param_groups": groups}, scheduler, accelerator.scaler)
        else:
            write_trained_state(staging, model, optimizer, scheduler, accelerator.scaler)
        record = {"step": step, **run, "last_metrics": history[-1], "checkpoint_format": CHECKPOINT_FORMAT,
                  "lease_generation": self.lease.generation}  # fmt: skip
        (staging / RUN_RECORD).write_text(json.dumps(record))
        write_manifest(staging, rank_entries)
        segment = Path(tempfile.mkdtemp(prefix="ftjob-metrics-"))
        (segment / segment_file(step)).write_text(
            to_lines([h for h in history if h["step"] > self.curve_saved_to])
        )
        self.curve_saved_to = step
        self.upload = threading.Thread(
            target=self._upload, args=(staging, segment, uri, step), name="ftjob-checkpoint"
        )
        self.upload.start()

    def wait_committed(self, accelerator) -> None:
        """Every rank: wait until rank 0's upload in flight is committed, and check that the lease is still
        this job's. When either failed, every rank ends the job with rank 0's error (exit 1), not rank 0
        alone while the others wait for it in a collective."""

        def committed_and_held() -> int | None:
            self.wait()
            self.lease.check()  # nothing of this checkpoint is written by a job that lost the lease
            return self.committed_step

        self.committed_step = rank_0_outcome(accelerator, committed_and_held)

    def _upload(self, staging: Path, segment: Path, uri: str, step: int) -> None:
        try:
            upload_dir(segment, self.layout.segments)
            upload_dir(staging, uri, last=COMMITTED)  # without the marker: only an old one goes first
            self.lease.check()
            fs, path = filesystem(join(uri, COMMITTED))
            writer = f"lease generation {self.lease.generation}, {holder(self.lease.me)}"
            fs.pipe_file(path, f"step {step}, {writer}\n".encode())
            self.committed_step = step
            log.info("checkpoint step %d committed to %s", step, uri)
            self._apply_retention()  # under the check just made: no second read of the lease
        except BaseException as e:  # surfaced to the training thread by wait()
            self.upload_error = e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(segment, ignore_errors=True)

    def _apply_retention(self) -> None:
        """Older committed checkpoints go only once a newer one is committed. Checkpoints that cannot be
        listed or deleted stay, with a warning: the next commit tries again."""
        try:
            committed = committed_checkpoints(self.output_uri)
        except Exception as e:  # every backend raises its own types
            log.warning("could not list the checkpoints in %s to delete old ones (%s: %s); they stay, the next commit tries again", self.root, type(e).__name__, e)  # fmt: skip
            return
        for old in committed[: max(0, len(committed) - self.keep)]:
            try:
                fs, path = filesystem(self.layout.checkpoint(old))
                fs.rm(path, recursive=True)
            except Exception as e:  # every backend raises its own types
                log.warning("could not delete the checkpoint at step %d (%s: %s); it stays, the next commit tries again", old.step, type(e).__name__, e)  # fmt: skip

    def wait(self) -> None:
        """Rank 0: block until the upload in flight is done; an upload that failed for good ends the job."""
        if self.upload is not None:
            self.upload.join()
            self.upload = None
        if self.upload_error is not None:
            error, self.upload_error = self.upload_error, None
            if isinstance(error, LeaseLost):
                raise error
            raise JobError(
                f"checkpoint upload to {self.root} failed: {type(error).__name__}: {error}; "
                "the previous committed checkpoint is intact"
            ) from None

    def load_latest(self, expected: dict[str, Any], accelerator=None) -> dict[str, Any] | None:
        """The newest committed checkpoint that is whole, downloaded: run.json's content, its metric
        history, its local directory ("dir") and its URI; None if there is none. A damaged one (a file
        missing or not matching its MANIFEST, unreadable JSON) is skipped with a warning for the one
        before; a whole one whose run.json or metric curve is not as ftjob writes it is refused
        (UserError). `expected`: the fingerprint the current spec gives. Every rank of `accelerator`
        takes the same one: a checkpoint damaged as any rank sees it is skipped by all. A storage error
        is raised."""
        committed = committed_checkpoints(self.output_uri)
        if not committed:
            return None
        for folder in reversed(committed):
            step, local = folder.step, Path(tempfile.mkdtemp(prefix=resume_copy_prefix()))
            try:
                run, damage = self._download_whole(folder, local), None
            except (UserError, ValueError, KeyError, FileNotFoundError) as e:  # not a storage outage
                run, damage = None, e
            if whole_everywhere(damage is None, accelerator):
                break
            shutil.rmtree(local, ignore_errors=True)
            log.warning("the checkpoint at step %d is damaged (%s): trying the one before", step, damage or "on another rank")  # fmt: skip
        else:
            raise UserError(
                f"every committed checkpoint in {self.root} is damaged (the warnings above say how); "
                "run with --restart to start over"
            )
        try:  # all that is read back is checked before anything is deleted
            self._check_run(run, folder, expected)
            history = self._saved_history(step)
        except UserError:
            shutil.rmtree(local, ignore_errors=True)
            raise
        if self.rank == 0:
            remove_segments_after(self.output_uri, step)
        self.curve_saved_to = step
        return {**run, "history": history, "dir": local, "uri": self.layout.checkpoint(folder)}

    def _download_whole(self, folder: StepFolder, local: Path) -> Any:
        """The checkpoint's files into local, checked against its MANIFEST (checkpoints written before
        there were manifests have none); its run.json, parsed (what it holds is checked by _check_run)."""
        reads = partial(read_by, self.rank)
        download_dir(self.layout.checkpoint(folder), local, reads)
        if (local / MANIFEST).is_file():
            verify_manifest(local, reads)
        run = json.loads((local / RUN_RECORD).read_text())
        before_manifests = isinstance(run, dict) and run.get("checkpoint_format", 1) == 1
        if not before_manifests and not (local / MANIFEST).is_file():
            raise UserError(f"{MANIFEST} is missing")
        json.loads((local / rank_file(self.rank)).read_text())
        return run

    def _check_run(self, run: Any, folder: StepFolder, expected: dict[str, Any]) -> None:
        """run.json: of a run of this spec and model (its fingerprint, which names a checkpoint of another
        ftjob), then as this ftjob writes it."""
        where = join(self.layout.checkpoint(folder), RUN_RECORD)
        changes = fingerprint_changes(validated(SavedFingerprint, run, where).fingerprint, expected)
        if changes:
            raise UserError(
                f"the spec or the model differs from what wrote the checkpoint at step {folder.step} in "
                f"{self.root}, so resuming would not continue the same run: "
                + "; ".join(changes)
                + ". Run with --restart to start over (checkpoints and published outputs are deleted)."
            )
        check_run_record(run, folder, where)

    def _saved_history(self, step: int) -> list[dict[str, Any]]:
        """The metric curve up to step (the segments of the checkpoints up to it), each step's metrics
        checked."""
        where = f"{self.layout.segments} (the metric curve up to step {step})"
        try:
            history = read_history(self.output_uri, step)
        except (ValueError, KeyError, TypeError) as e:  # a line that is not JSON, or not a step's record
            refuse(where, f"a line is not a step's metrics ({type(e).__name__}: {e})")
        for i, record in enumerate(history):
            validated(SavedMetrics, record, where, i)
        return history

    def rank_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """This rank's data cursor and RNG states in a loaded checkpoint; the RNG states checked here,
        the cursor by the data pipeline as it loads it."""
        name = rank_file(self.rank)
        state = json.loads((saved["dir"] / name).read_text())
        validated(SavedRankFile, state, join(saved["uri"], name))
        return state

    def restore(self, saved: dict[str, Any], model, optimizer, scheduler, accelerator) -> None:
        """Load weights, optimizer, schedule and grad scaler into the prepared objects, once their files
        are checked against them: one that is not as this run writes it is refused (UserError) before
        anything is applied. Then the local copy goes."""
        directory, scaler = saved["dir"], accelerator.scaler
        model = accelerator.unwrap_model(model)
        parameters, sharded = trainable_parameters(model), is_sharded(model)
        states = checked_states(
            directory / STATES, join(saved["uri"], STATES), optimizer, scheduler, scaler, sharded
        )
        if sharded:
            name = shard_file(self.rank)
            shard = checked_shard(directory / name, join(saved["uri"], name), parameters)
            load_shard(shard, parameters, optimizer, states["optimizer"]["param_groups"])
        else:
            weights = checked_weights(directory / WEIGHTS, join(saved["uri"], WEIGHTS), parameters)
            with torch.no_grad():
                for name, tensor in weights.items():
                    parameters[name].copy_(tensor)
            optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        if "scaler" in states and scaler is not None:
            scaler.load_state_dict(states["scaler"])
        shutil.rmtree(directory, ignore_errors=True)


class Cadence:
    """When the loop checkpoints (train.checkpoint_every): every N steps, or after the step that ended an
    epoch's data (job/data/pipeline.py: epochs_ended; an epoch whose last micro-batch ends a step is
    seen ended at the next one). Ranks end an epoch at different steps (each has its own share of the
    data), so at the first step where any rank has, every rank checkpoints, once an epoch (a
    collective). The data of the last epoch ends the run, whose adapter is published."""

    def __init__(self, every: int | str):
        self.every = every
        self.ended = 0  # epochs ended as of the last checkpoint, counted since this process began

    def due(self, step: int, epochs_ended: int, accelerator) -> bool:
        if self.every != "epoch":
            return bool(self.every) and step % self.every == 0
        ended = epochs_ended
        if accelerator.num_processes > 1:
            ended = int(accelerator.reduce(torch.tensor([ended], device=accelerator.device), reduction="max"))
        due, self.ended = ended > self.ended, max(self.ended, ended)
        return due
