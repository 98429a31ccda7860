"""`ftjob launch slurm`: submit a spec as a Slurm job through submitit, from a login node or a laptop.

The spec is validated here first (a bad spec is exit 2 now, not a failed job after hours in the
queue). Each node of the job runs one task, `FtjobTask`, which runs `ftjob run --nproc-per-node G`
in the foreground on the spec validated here: the FTJOB__ variables that sbatch exports from the
login shell are folded into it already and never reach that ftjob. Placement and rendezvous come from
Slurm's environment (job/cluster.py), nothing is added here. Slurm sends the stop signal (USR2,
`--signal-seconds` before the time limit); the task passes it on, ftjob checkpoints and exits 75, and
task 0 requeues the job (`scontrol requeue`, up to `--max-requeues` times), which resumes from that
checkpoint. An ftjob that lost a peer (exit 76: another node's process or the node itself is gone)
cannot go on alone either: whichever task sees it requeues the whole job (the task that would have
may be dead), within the same cap, and the job resumes from its last committed checkpoint. After
SIGTERM (scancel, preemption) the job is not requeued here: Slurm requeues preempted jobs itself where
the cluster says so. A requeue that fails ends the task with ftjob's code. A requeued run never passes
`--restart` on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from job.errors import EXIT_PEER_LOST, EXIT_REQUEUE, UserError
from job.spec import Spec
from job.tracking.store import default_tracking_uri
from launch.sweep import PARENT_ENV, Submission

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
TIME_LIMIT_SIGNALS = {signal.SIGUSR1, signal.SIGUSR2}
# sacct's states of a job that goes on; any other is its end, but for REQUEUED_AFTER, after which Slurm
# requeues a job that allows it (ftjob's do): those are the end only once they have lasted SETTLE_SECONDS.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}  # fmt: skip
REQUEUED_AFTER = {"PREEMPTED", "NODE_FAIL"}
SETTLE_SECONDS = 60.0
UNKNOWN_LIMIT_SECONDS = 300.0  # sacct silent this long: stop following
# sbatch options that submitit or ftjob set themselves: a --sbatch for one would break requeueing,
# signals, logs or the environment the job needs.
RESERVED_SBATCH = {"array", "output", "error", "wrap", "signal", "open-mode", "requeue", "no-requeue", "export", "ntasks", "ntasks-per-node", "job-name"}  # fmt: skip
# sbatch reads these variables of the submitting shell over the script's own lines.
RESERVED_SBATCH_VARIABLES = {f"SBATCH_{option.upper().replace('-', '_')}" for option in RESERVED_SBATCH} | {"SBATCH_ARRAY_INX"}  # fmt: skip
SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# What would end a value's line in the sbatch script, or, for a backslash, end the quotes submitit puts
# around it (sbatch reads a backslash as an escape even inside quotes): either way the rest of the value
# would become options of its own.
UNSAFE_IN_SCRIPT = re.compile(r"[\x00-\x1f\x7f\\]")
EXIT_MESSAGE = re.compile(r"ftjob exited with (\d+)")


class FtjobFailed(RuntimeError):
    """The task's ftjob ended with a non-zero code (submitit records it; `--wait` returns it)."""

    def __init__(self, code: int):
        super().__init__(f"ftjob exited with {code}")
        self.code = code


@dataclass
class FtjobTask:
    """What each Slurm task (one per node) runs; pickled by submitit into the job's folder."""

    spec: dict[str, Any]  # validated, as JSON
    nproc_per_node: str  # a number, or "auto"
    restart: bool
    max_requeues: int
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "job"])

    def __call__(self) -> int:
        requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        environment = without_launcher_variables(os.environ)
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ftjob-spec-") as spec_file:
            json.dump(self.spec, spec_file)  # 0600: NamedTemporaryFile's mode
            spec_file.flush()
            argv = [*self.command, "run", spec_file.name, "--nproc-per-node", self.nproc_per_node]
            if self.restart and requeues == 0:
                argv.append("--restart")
            code, received = run_forwarding_signals(argv, environment)
        if code == 0:
            return 0
        reason = requeue_reason(code, received, int(os.environ.get("SLURM_PROCID") or 0))
        if reason:
            job = os.environ["SLURM_JOB_ID"]
            if requeues < self.max_requeues:
                print(f"ftjob launch: {reason}; requeueing job {job}", file=sys.stderr)
                try:
                    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
                except (OSError, subprocess.SubprocessError) as e:  # no scontrol here (an image without it)
                    print(f"ftjob launch: cannot requeue ({e}); the job ends with {code}", file=sys.stderr)
                    raise FtjobFailed(code) from None
                sys.exit(code)  # no result is recorded: the requeued run records its own
            print(
                f"ftjob launch: requeued {requeues} times already (--max-requeues); not again",
                file=sys.stderr,
            )
        raise FtjobFailed(code)


def requeue_reason(code: int, received: set[int], task: int) -> str | None:
    """Why this task's ftjob exit asks for a requeue of the whole job, or None: a checkpoint after the
    time-limit signal (every task made it; task 0 asks), or a lost peer, which any task may be the one
    to see. Never after SIGTERM (a cancel, or a preemption that Slurm requeues itself)."""
    if signal.SIGTERM in received:
        return None
    if code == EXIT_PEER_LOST:
        return "another node of the job is gone (exit 76)"
    if code == EXIT_REQUEUE and received & TIME_LIMIT_SIGNALS and task == 0:
        return "checkpointed (exit 75)"
    return None


def is_launcher_variable(name: str) -> bool:
    """A variable of the login shell that the task's ftjob must not read: the launcher folded the
    spec's (FTJOB_SPEC, FTJOB__*) into the spec it validated, and the job's restart id is its Slurm job
    id, not one left over in that shell (FTJOB_RESTART_ID)."""
    return name.startswith("FTJOB__") or name in ("FTJOB_SPEC", "FTJOB_RESTART_ID")


def without_launcher_variables(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if not is_launcher_variable(name)}


def run_forwarding_signals(argv: list[str], env: Mapping[str, str]) -> tuple[int, set[int]]:
    """Run argv in env; the stop signals this process gets go on to it. Returns its exit code and the
    signals received (Slurm may also signal the child directly; ftjob takes a repeat as one stop)."""
    child = subprocess.Popen(argv, env=env)
    received: set[int] = set()

    def forward(signum: int, _frame) -> None:
        received.add(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, received


# ---------------------------------------------------------------------------------------------
# The login-node side

HELP = "submit to Slurm through submitit"
DESCRIPTION = (
    "Validate the spec here, then submit one Slurm job: one task per node, each running "
    "`ftjob run --nproc-per-node G`. Before the time limit Slurm sends USR2; the job checkpoints, "
    "exits 75 and is requeued, and resumes; so does a job that lost a node (76)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ftjob launch slurm`'s own options (launch/cli.py adds the spec, --nodes, --gpus-per-node, --sweep)."""
    parser.add_argument("--partition")
    parser.add_argument("--time", dest="time_minutes", type=int, default=60, metavar="MINUTES")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--mem", help="memory per node, e.g. 64G")
    parser.add_argument("--constraint")
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument(
        "--sbatch", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="make sure a variable reaches the job (sbatch exports this shell's environment)",
    )
    parser.add_argument(
        "--signal-seconds", type=int, default=120, help="USR2 this long before the time limit"
    )
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=10,
        help="requeues of the job after the time-limit signal (75) or a lost node (76), together",
    )
    parser.add_argument(
        "--container-image", help="run each task in this image: a .sif (Apptainer) or a pyxis/enroot image"
    )
    parser.add_argument("--folder", default="ftjob-logs", help="submitit's folder: the job's pickle and logs")
    parser.add_argument("--max-parallel", type=int, help="array tasks running at once (default: all)")
    parser.add_argument("--restart", action="store_true", help="ftjob run --restart (the first run only)")
    parser.add_argument("--check-access", action="store_true", help="read model, data and output first")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument(
        "--wait", action="store_true", help="follow the job and its requeues; exit with its exit code"
    )


def submit(args: argparse.Namespace, submission: Submission) -> int:
    """One Slurm job, a job array for a sweep (a task per point); with --wait, its exit code."""
    if args.check_access:
        code = check_access(submission.spec)
        if code:
            return code
    options = SlurmOptions(
        **{name: getattr(args, name) for name in SlurmOptions.__dataclass_fields__ if hasattr(args, name)}
    )
    pass_environment(args.env, os.environ)
    array = len(submission.specs) if submission.is_sweep else None
    executor = executor_for(options, submission.spec.name, array=array, dry_run=args.dry_run)
    if args.dry_run:
        print(dry_run_script(executor, array))
        return 0
    if submission.wants_parent_run:
        store = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        os.environ[PARENT_ENV] = submission.start_parent_run(store)  # sbatch exports it to every task
    tasks = [task_for(spec, options, args.restart) for spec in submission.specs]
    make_private_folder(executor.folder)
    try:
        if submission.is_sweep:
            with executor.batch():  # one job array, a task per point
                jobs = [executor.submit(task) for task in tasks]
        else:
            jobs = [executor.submit(tasks[0])]
    except Exception as e:  # sbatch refused it: a partition, account or limit that does not exist
        raise UserError(f"sbatch refused the job: {e}") from None
    for job, spec in zip(jobs, submission.specs, strict=True):
        print(
            f"submitted Slurm job {job.job_id} ({spec.name}); log: {job.paths.stdout} (errors: {job.paths.stderr})"
        )
    return follow_all(jobs) if args.wait else 0


def check_access(spec: Spec) -> int:
    """`ftjob validate - --check-access` on the spec checked here, in a process of its own (reading the
    model and the data is job's work, which launch never imports); its exit code."""
    argv = [sys.executable, "-m", "job", "validate", "-", "--check-access"]
    spec_json = json.dumps(spec.model_dump(mode="json"))
    return subprocess.run(
        argv, input=spec_json, text=True, env=without_launcher_variables(os.environ)
    ).returncode


@dataclass
class SlurmOptions:
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    time_minutes: int = 60
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch: list[str] = field(default_factory=list)  # KEY=VALUE
    signal_seconds: int = 120
    max_requeues: int = 10
    container_image: str | None = None
    folder: str = "ftjob-logs"
    max_parallel: int | None = None  # array tasks at once (a sweep)


def executor_for(options: SlurmOptions, job_name: str, array: int | None = None, dry_run: bool = False):
    """A submitit SlurmExecutor with one task per node; for a sweep of `array` points, at most
    --max-parallel of its array's tasks at once. For a dry run, Slurm need not be installed here."""
    if array and options.container_image:  # submitit's job arrays run the login node's Python
        raise UserError("--sweep with --container-image is not supported yet: submit each point on its own")
    if "%" in options.folder:
        raise UserError(f"--folder {options.folder}: a plain path, without Slurm's %-patterns")
    check_script_values(options)
    check_sbatch_variables(os.environ)
    if not dry_run:
        require_slurm()
    folder = Path(options.folder).absolute()
    python, srun_args = runtime(options.container_image, folder)
    executor = script_executor(folder, python)
    extra = dict(sbatch_pair(item) for item in options.sbatch)
    extra.setdefault("requeue", True)
    executor.update_parameters(
        job_name=job_name,
        partition=options.partition,
        nodes=options.nodes,
        ntasks_per_node=1,
        gpus_per_node=options.gpus_per_node or None,
        time=options.time_minutes,
        account=options.account,
        qos=options.qos,
        cpus_per_task=options.cpus_per_task,
        mem=options.mem,
        constraint=options.constraint,
        exclusive=options.exclusive or None,
        signal_delay_s=options.signal_seconds,
        additional_parameters=extra,
        srun_args=srun_args,
        array_parallelism=options.max_parallel or array or 256,
    )
    return executor


def script_executor(folder: Path, python: str | None):
    """submitit's SlurmExecutor without its check for srun on this machine (which would end a dry run
    on a laptop in a traceback); a submission checks for Slurm first (require_slurm)."""
    import submitit

    class ScriptExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2  # what submitit's own says where srun is found

    return ScriptExecutor(folder=folder, python=python)


def require_slurm() -> None:
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} not found on PATH: submit from a Slurm login node "
            "(--dry-run prints the sbatch script anywhere)"
        )


def check_script_values(options: SlurmOptions) -> None:
    """Refuse a value that would not stay in its own line and quotes of the sbatch script, naming its
    option (a newline in --partition would start a line of its own: another #SBATCH option, or a
    command)."""
    for name, value in vars(options).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and UNSAFE_IN_SCRIPT.search(item):
                raise UserError(
                    f"--{name.replace('_', '-')} {item!r}: control characters and backslashes are not "
                    "allowed (sbatch would read the rest as options of its own)"
                )


def check_sbatch_variables(environ: Mapping[str, str]) -> None:
    """Refuse SBATCH_* variables of this shell that sbatch would read over the options ftjob sets."""
    found = sorted(RESERVED_SBATCH_VARIABLES & set(environ))
    if found:
        raise UserError(
            f"{', '.join(found)} set in this shell: sbatch would take it over what ftjob launch sets itself "
            "(logs, signal, requeue, environment); unset it"
        )


def runtime(image: str | None, folder: Path) -> tuple[str | None, list[str]]:
    """(the python command of each task, extra srun arguments): this environment's Python (on a
    shared filesystem), an Apptainer image (.sif), or an image for pyxis/enroot; either with the job's
    folder mounted (the task reads its pickle and writes its result there)."""
    if image is None:
        return None, []
    if image.endswith(".sif"):
        return f"apptainer exec --nv --bind {shlex.quote(str(folder))} {shlex.quote(image)} python3", []
    return "python3", [f"--container-image={image}", f"--container-mounts={folder}:{folder}"]


def make_private_folder(folder: Path) -> None:
    """The job's folder, readable by its owner only (its pickle holds the spec)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
    except OSError as e:
        raise UserError(f"--folder {folder}: {e}") from None


def sbatch_pair(item: str) -> tuple[str, str | bool]:
    """--sbatch KEY=VALUE (or KEY) -> (the sbatch option's name, lower case with dashes, its value)."""
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-")
    if not SBATCH_KEY.fullmatch(key):
        raise UserError(
            f"--sbatch {item!r}: expected KEY=VALUE (or KEY for a flag), e.g. --sbatch mail-type=END"
        )
    option = key.lower().replace("_", "-")  # as submitit writes it (no_requeue is --no-requeue)
    # sbatch takes any unambiguous start of a long option: --no-req is --no-requeue
    if any(reserved.startswith(option) for reserved in RESERVED_SBATCH):
        raise UserError(f"--sbatch {key}: set by ftjob launch itself (logs, signal, requeue, environment)")
    return option, value if sep else True


def task_for(spec, options: SlurmOptions, restart: bool) -> FtjobTask:
    nproc = str(options.gpus_per_node) if options.gpus_per_node else "auto"
    command = ["ftjob"] if options.container_image else [sys.executable, "-m", "job"]
    return FtjobTask(spec.model_dump(mode="json"), nproc, restart, options.max_requeues, command)


def dry_run_script(executor, array: int | None = None) -> str:
    """The sbatch script submitit would submit (its own text, so the two cannot drift apart); for a
    job array of `array` tasks, as submitit makes it (its map_count)."""
    if array:
        executor.parameters["map_count"] = array
    try:
        return executor._make_submission_file_text(executor._submitit_command_str, "DRY-RUN")
    finally:
        executor.parameters.pop("map_count", None)


def pass_environment(names: list[str], environ: dict[str, str]) -> None:
    """--env NAME (this shell's value) or NAME=VALUE: set in this process, which sbatch exports to
    the job (values are never written into the script or the job's folder)."""
    for item in names:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"--env {item!r}: not a variable name")
        if is_launcher_variable(name):
            raise UserError(
                f"--env {name}: kept from the job, which runs the spec checked here (override its keys "
                "with --set KEY=VALUE) and restarts once per Slurm job"
            )
        if sep:
            environ[name] = value
        elif name not in environ:
            raise UserError(f"--env {name}: not set in this shell; set it or pass --env {name}=VALUE")


def slurm_state(job_id: str) -> str:
    """The job's state as sacct tells it now (its newest run), "UNKNOWN" when sacct cannot say."""
    try:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].split()[0] if lines else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED


def follow(
    job,
    out: TextIO | None = None,
    poll_seconds: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    state_of: Callable[[str], str] = slurm_state,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Stream the job's log through its requeues until it ends; its exit code (0 when it completed,
    ftjob's own code when it failed, 1 when sacct stays silent or nothing says more). `out`: standard
    output when None (the one of the moment, not of the import)."""
    out = out or sys.stdout
    offsets: dict[Path, int] = {}
    state, since = "", clock()
    while True:
        current = state_of(job.job_id)
        if current != state:
            state, since = current, clock()
        stream_logs(job, offsets, out)
        lasted = clock() - since
        if state == "UNKNOWN" and lasted >= UNKNOWN_LIMIT_SECONDS:
            print(f"ftjob launch: sacct has said nothing of job {job.job_id} for {lasted:.0f} s", file=out)
            return 1
        if state not in ACTIVE_STATES | REQUEUED_AFTER | {"UNKNOWN"}:
            break
        if state in REQUEUED_AFTER and lasted >= SETTLE_SECONDS:
            break
        sleep(poll_seconds)
    sleep(min(poll_seconds, 2.0))  # the last lines may land after the state changes
    stream_logs(job, offsets, out)
    print(f"ftjob launch: job {job.job_id} ended {state}", file=out)
    if state == "COMPLETED":
        return 0
    try:
        message = str(job.exception())
    except Exception as e:  # no result recorded (killed, cancelled before it started)
        message = str(e)
    codes = EXIT_MESSAGE.findall(message)
    return int(codes[-1]) if codes else 1


def follow_all(jobs: list, out: TextIO | None = None) -> int:
    """Follow each job in turn (a sweep's tasks run side by side meanwhile); the first non-zero exit
    code, else 0."""
    codes = [follow(job, out) for job in jobs]
    return next((code for code in codes if code), 0)


def stream_logs(job, offsets: dict[Path, int], out: TextIO) -> None:
    for path in (Path(job.paths.stdout), Path(job.paths.stderr)):
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
                offsets[path] = f.tell()
            out.write(data.decode("utf-8", "replace"))
            out.flush()
