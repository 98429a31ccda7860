"""The ftjob command line (docs/contracts.md, "Command line"). `python -m job` is the same program.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so spec
errors come back in a fraction of a second. The commands that live outside job (`launch`, `compare`:
launch/cli.py) are ftjob's entry points of the group COMMANDS_GROUP, imported only when they run or
when `ftjob --help` lists them: job never imports launch.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution
from typing import TYPE_CHECKING

from job import __version__
from job.errors import JobError, Preempted, UserError
from job.spec import add_spec_arguments

if TYPE_CHECKING:
    from job.signals import StopRequest

COMMANDS_GROUP = "ftjob.commands"


def cmd_run(args: argparse.Namespace) -> int:
    from job.signals import StopRequest, stop_when_orphaned
    from job.spec import TrainSpec, load_spec
    from job.startup import leave_out_bitsandbytes, use_the_cpus_given

    # First: a stop while the spec is read, the libraries are imported, the workers start, the model
    # downloads or the counting pass runs exits 75 too (the default action would be 128 + the signal).
    with StopRequest(TrainSpec.model_fields["stop_grace_seconds"].default) as stop:
        spec = load_spec(args.spec, args.set, secret_env_only=args.env_overrides == "secrets")
        if stop.requested:
            raise Preempted(f"{stop.signal_name} as the job started, nothing trained; exit 75 to be requeued")
        stop.grace_seconds = spec.train.stop_grace_seconds
        if args.nproc_per_node is not None:
            code = launch_workers(spec, args, stop)
            stop.ignore_from_now()  # the workers are done: a late copy of their stop signal changes nothing
            return code
        placed = [
            f"--{k.replace('_', '-')}"
            for k in ("nnodes", "node_rank", "master_addr", "master_port")
            if getattr(args, k) is not None
        ]
        if placed:
            raise UserError(f"{', '.join(placed)}: placement for --nproc-per-node, which is not given")
        from job.cluster import check_process_group_variables

        group = check_process_group_variables(os.environ)  # before accelerate waits for absent processes
        stop_when_orphaned(os.environ)
        use_the_cpus_given()
        if spec.model.quantization is None:
            leave_out_bitsandbytes()
        from job.accelerator import make_accelerator
        from job.collective import lost_peer
        from job.peers import peers_watched
        from job.train import train

        try:
            with peers_watched(group, spec.train.peer_timeout_seconds, stop):
                result = train(spec, make_accelerator(spec.train), restart=args.restart, stop=stop)
        except Exception as e:  # a collective's failure because another rank is gone is exit 76
            peer_lost = lost_peer(e)
            if peer_lost is None:
                raise
            raise peer_lost from e
        if result is None:
            print(f"{spec.output_uri}/adapter is already published; nothing to do (--restart trains again)")
        stop.ignore_from_now()  # the run is done: a stop signal on the way out changes nothing
    return 0


def launch_workers(spec, args: argparse.Namespace, stop: StopRequest) -> int:
    """This node's workers through torch's elastic launcher, placed by the arguments, else by the
    scheduler's environment (job/cluster.py). `stop`: the StopRequest installed until then."""

    from job.cluster import node_placement
    from job.node_workers import nproc_auto, run_workers

    given = {key: getattr(args, key) for key in ("nnodes", "node_rank", "master_addr", "master_port")}
    placement = node_placement(os.environ, given)
    nproc = nproc_auto() if args.nproc_per_node == "auto" else args.nproc_per_node
    worker_args = ["--restart"] if args.restart else []
    return run_workers(spec.model_dump(mode="json"), worker_args, nproc, placement, stop)


def nproc_per_node(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of processes (1 or more) or 'auto'")
    return int(text)


def cmd_validate(args: argparse.Namespace) -> int:
    from job.spec import load_spec

    spec = load_spec(args.spec, args.set)
    print(f"{args.spec or 'FTJOB_SPEC'}: valid spec '{spec.name}', output {spec.output_uri}")
    if args.check_access:
        from job.preview import check_access

        check_access(spec)
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from job.spec import load_spec

    spec = load_spec(args.spec, args.set)
    from job.preview import preview

    preview(spec, args.n, args.json)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from job.spec import json_schema, schema_markdown

    if args.markdown:
        print(schema_markdown(), end="")  # docs/spec.md, byte for byte
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from job.generate import generate

    text = generate(
        args.adapter,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.trust_remote_code,
        args.base_model,
    )
    print(text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from job.output.status import output_status, status_text
    from job.storage import configure_storage

    configure_storage(None)  # the environment's credentials and endpoint, as for any URL
    status = output_status(args.output_uri)
    print(json.dumps(status, indent=2) if args.json else status_text(status))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from job.report_table import show_report
    from job.storage import configure_storage

    configure_storage(None)  # the environment's credentials and endpoint, as for any URL
    print(show_report(args.target, args.json))
    return 0


def setup_logging() -> None:
    """ftjob's own messages at INFO on stderr; libraries keep their own settings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("job")
    logger.handlers = [handler]  # replaced, not added: main() may run more than once in a process
    logger.setLevel(logging.INFO)


def commands_elsewhere() -> dict[str, EntryPoint]:
    """ftjob's commands that live in other packages, by name: each a function of the command's arguments
    (argv after its name) that returns the exit code and raises JobError like the commands here. Only
    ftjob's own entry points: another installed package can neither add a command nor replace one."""
    try:
        found = distribution("ftjob").entry_points.select(group=COMMANDS_GROUP)
    except PackageNotFoundError:  # job imported from a source tree that was never installed
        return {}
    return {entry.name: entry for entry in found}


def build_parser(elsewhere: dict[str, EntryPoint], with_their_help: bool) -> argparse.ArgumentParser:
    """The parser of job's commands; the commands `elsewhere` are listed by name, and with their help
    lines (their functions' docstrings, which imports them) when `with_their_help`."""
    parser = argparse.ArgumentParser(prog="ftjob", description="Fine-tune a causal LM from a spec.")
    parser.add_argument("--version", action="version", version=f"ftjob {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train and publish the adapter")
    add_spec_arguments(run)
    run.add_argument(
        "--restart",
        action="store_true",
        help="start over: once the model has loaded, delete the checkpoints and the published adapter/ "
        "and merged/. Once per scheduler job (FTJOB_RESTART_ID, else SLURM_JOB_ID): a requeued run of "
        "the same job resumes instead",
    )
    run.add_argument(
        "--env-overrides",
        choices=("all", "secrets"),
        default="all",
        help="which keys FTJOB__ variables may set: all (default), or only those whose values are secret "
        "(storage_options credentials, keys named like token or password), any other being exit 2: what a "
        "Kubernetes pod runs, whose Secrets' keys become its variables",
    )
    workers = run.add_argument_group(
        "several processes",
        "start N worker processes on this node through torch's elastic launcher; a stop signal reaches "
        "every worker and the exit code is theirs (75 stays 75). Nodes, node rank and rendezvous come "
        "from Slurm's or a Kubernetes Indexed Job's environment unless given here",
    )
    workers.add_argument(
        "--nproc-per-node", type=nproc_per_node, metavar="N|auto", help="auto: the GPUs, or 1"
    )
    workers.add_argument(
        "--nnodes", type=int, help="nodes in the job (default: from the environment, else 1)"
    )
    workers.add_argument("--node-rank", type=int, help="this node's rank, 0 to nnodes - 1")
    workers.add_argument("--master-addr", help="host of node 0, where the ranks meet")
    workers.add_argument(
        "--master-port", type=int, help="port on node 0 (default 29500; Slurm: from the job id)"
    )
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a spec without training")
    add_spec_arguments(validate)
    validate.add_argument(
        "--check-access", action="store_true", help="also read the model config, first data rows and output"
    )
    validate.set_defaults(handler=cmd_validate)

    preview = commands.add_parser("preview", help="show the first examples as the model will see them")
    add_spec_arguments(preview)
    preview.add_argument("-n", type=int, default=5, help="examples (or packed rows) to show")
    preview.add_argument(
        "--json", action="store_true", help="one JSON object a line: input_ids, labels, text"
    )
    preview.set_defaults(handler=cmd_preview)

    schema = commands.add_parser("schema", help="print the spec's JSON Schema")
    schema.add_argument(
        "--markdown", action="store_true", help="the same as tables of keys, one per section (docs/spec.md)"
    )
    schema.set_defaults(handler=cmd_schema)

    generate = commands.add_parser("generate", help="generate with a published adapter")
    generate.add_argument("--adapter", required=True, help="adapter/ directory or URL published by a run")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument(
        "--base-model", help="the base model (path or URL) instead of the one the adapter's spec.json names"
    )
    generate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run custom model code shipped with the model or adapter (never taken from the adapter's spec)",
    )
    generate.set_defaults(handler=cmd_generate)

    status = commands.add_parser(
        "status", help="who holds an output.uri's lease, its newest checkpoint, what is published"
    )
    status.add_argument("output_uri", metavar="OUTPUT_URI", help="a run's output.uri")
    status.add_argument("--json", action="store_true", help="as JSON, for scripts")
    status.set_defaults(handler=cmd_status)

    report = commands.add_parser(
        "report", help="what a run cost: tokens, MFU, where the time went, preemption, device-hours, money"
    )
    report.add_argument(
        "target",
        metavar="OUTPUT_URI|RUN_ID",
        help="a run's output.uri (its report.json), or an MLflow run id",
    )
    report.add_argument("--json", action="store_true", help="as JSON, for scripts")
    report.set_defaults(handler=cmd_report)

    for name, entry in elsewhere.items():
        commands.add_parser(name, help=first_line(entry.load().__doc__) if with_their_help else None)
    return parser


def first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text else None


def parse_command(argv: list[str]) -> Callable[[], int]:
    """The command argv asks for, ready to run: one of job's, or one that lives elsewhere, which takes
    the rest of argv (its own options and help included) and is imported only now."""
    elsewhere = commands_elsewhere()
    if argv and argv[0] in elsewhere:
        return functools.partial(elsewhere[argv[0]].load(), argv[1:])
    ftjob_help = not argv or argv[0].startswith("-")  # ftjob's own options: --help may list every command
    args = build_parser(elsewhere, with_their_help=ftjob_help).parse_args(argv)
    return functools.partial(args.handler, args)


def leave_process_group() -> bool:
    """A worker that ends on an error (or a stop) leaves its process group first; whether it had one."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    distributed.destroy_process_group()
    return True


def exit_now(code: int) -> None:
    """Exit with code without the interpreter's teardown, in which the process group's threads were
    seen to abort a worker under load (SIGABRT in place of its 2 or 75, which the launcher passes on)."""

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    # MLflow 3 reports usage to its makers from every process that imports it, unless told not to; a
    # batch job on a cluster sends nothing anywhere but where its spec says
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    command = parse_command(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        return command()
    except JobError as e:
        print(f"ftjob: error: {e}", file=sys.stderr)
        if leave_process_group():
            exit_now(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print("ftjob: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The ftjob program (the console script, `python -m job`): main(), then an exit whose teardown skips
    the garbage collector's passes over the many objects that torch, transformers and MLflow leave
    (seconds of every run's exit); the process's memory goes with it anyway."""
    code = main()
    gc.freeze()
    return code
