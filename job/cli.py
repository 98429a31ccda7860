"""The ftjob command line (docs/contracts.md, "Command line"). `python -m job` is the same program.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so spec
errors come back in a fraction of a second.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from job import __version__
from job.errors import JobError, Preempted, UserError

if TYPE_CHECKING:
    from job.signals import StopRequest


def cmd_run(args: argparse.Namespace) -> int:
    from job.signals import StopRequest
    from job.spec import TrainSpec, load_spec
    from job.startup import leave_out_bitsandbytes

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

        check_process_group_variables(os.environ)  # before accelerate would wait for absent processes
        if spec.model.quantization is None:
            leave_out_bitsandbytes()
        from job.accelerator import make_accelerator
        from job.train import train

        if train(spec, make_accelerator(spec.train), restart=args.restart, stop=stop) is None:
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


def cmd_launch_slurm(args: argparse.Namespace) -> int:

    from job.spec import load_spec
    from launch.slurm import (
        SlurmOptions,
        dry_run_script,
        executor_for,
        follow_all,
        make_private_folder,
        pass_environment,
        task_for,
    )
    from launch.sweep import PARENT_ENV, load_points, point_specs, start_parent_run

    spec = load_spec(args.spec, args.set)
    points = load_points(args.sweep) if args.sweep else []
    specs = point_specs(spec, points) if points else [spec]
    if args.check_access:
        from job.preview import check_access

        check_access(spec)
    options = SlurmOptions(
        **{name: getattr(args, name) for name in SlurmOptions.__dataclass_fields__ if hasattr(args, name)}
    )
    pass_environment(args.env, os.environ)
    executor = executor_for(options, spec.name, array=len(specs) if points else None, dry_run=args.dry_run)
    if args.dry_run:
        print(dry_run_script(executor, len(specs) if points else None))
        return 0
    if points and spec.tracking.enabled:
        from job.tracking.tracker import default_tracking_uri

        store = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        os.environ[PARENT_ENV] = start_parent_run(spec, points, store)  # sbatch exports it to every task
        print(
            f"MLflow parent run {os.environ[PARENT_ENV]} in {store}: ftjob compare --parent {os.environ[PARENT_ENV]}"
        )
    tasks = [task_for(s, options, args.restart) for s in specs]
    make_private_folder(executor.folder)
    try:
        if points:
            with executor.batch():  # one job array, a task per point
                jobs = [executor.submit(task) for task in tasks]
        else:
            jobs = [executor.submit(tasks[0])]
    except Exception as e:  # sbatch refused it: a partition, account or limit that does not exist
        raise UserError(f"sbatch refused the job: {e}") from None
    for job, one in zip(jobs, specs, strict=True):
        print(
            f"submitted Slurm job {job.job_id} ({one.name}); log: {job.paths.stdout} (errors: {job.paths.stderr})"
        )
    return follow_all(jobs) if args.wait else 0


def cmd_launch_k8s(args: argparse.Namespace) -> int:
    from pathlib import Path

    from job.spec import load_spec
    from launch.k8s import K8sOptions, apply, k8s_warnings, render, to_yaml
    from launch.sweep import load_points, point_specs, start_parent_run

    spec = load_spec(args.spec, args.set)
    points = load_points(args.sweep) if args.sweep else []
    specs = point_specs(spec, points) if points else [spec]
    from job.storage import is_local

    local = [s.name for s in specs if is_local(s.output_uri)]
    if local:
        raise UserError(
            f"output.uri {spec.output.uri}: a pod's local disk goes with the pod (checkpoints and the adapter "
            "with it); give object storage, e.g. s3://bucket/runs/{name}"
        )
    given = {name: getattr(args, name) for name in K8sOptions.__dataclass_fields__}
    options = K8sOptions(**{name: value for name, value in given.items() if value is not None})
    for warning in k8s_warnings(spec, options, len(specs)):
        print(f"warning: {warning}", file=sys.stderr)
    parent = None
    if args.apply and points and spec.tracking.enabled:
        if os.environ.get("MLFLOW_TRACKING_URI"):  # the server the pods log to, reached from here too
            parent = start_parent_run(spec, points, os.environ["MLFLOW_TRACKING_URI"])
            print(f"MLflow parent run {parent}: ftjob compare --parent {parent}")
        else:
            print("no MLflow parent run: MLFLOW_TRACKING_URI is unset here", file=sys.stderr)
    objects = render(specs, options, parent)
    if args.output:
        Path(args.output).write_text(to_yaml(objects))
        print(f"wrote {len(objects)} objects to {args.output}")
    elif not args.apply:
        print(to_yaml(objects), end="")
    if args.apply:
        for name in apply(objects, options.namespace):
            print(f"created {name}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from launch.compare import compare

    compare(args.experiment, args.metric, args.json, args.plot, args.parent)
    return 0


def setup_logging() -> None:
    """ftjob's own messages at INFO on stderr; libraries keep their own settings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("job")
    logger.handlers = [handler]  # replaced, not added: main() may run more than once in a process
    logger.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftjob", description="Fine-tune a causal LM from a spec.")
    parser.add_argument("--version", action="version", version=f"ftjob {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_spec(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", nargs="?", help="path, fsspec URL or '-' (stdin); default: $FTJOB_SPEC")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one key, e.g. train.max_steps=10",
        )

    run = commands.add_parser("run", help="train and publish the adapter")
    with_spec(run)
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
    launch = run.add_argument_group(
        "several processes",
        "start N worker processes on this node through torch's elastic launcher; a stop signal reaches "
        "every worker and the exit code is theirs (75 stays 75). Nodes, node rank and rendezvous come "
        "from Slurm's or a Kubernetes Indexed Job's environment unless given here",
    )
    launch.add_argument(
        "--nproc-per-node", type=nproc_per_node, metavar="N|auto", help="auto: the GPUs, or 1"
    )
    launch.add_argument("--nnodes", type=int, help="nodes in the job (default: from the environment, else 1)")
    launch.add_argument("--node-rank", type=int, help="this node's rank, 0 to nnodes - 1")
    launch.add_argument("--master-addr", help="host of node 0, where the ranks meet")
    launch.add_argument(
        "--master-port", type=int, help="port on node 0 (default 29500; Slurm: from the job id)"
    )
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a spec without training")
    with_spec(validate)
    validate.add_argument(
        "--check-access", action="store_true", help="also read the model config, first data rows and output"
    )
    validate.set_defaults(handler=cmd_validate)

    preview = commands.add_parser("preview", help="show the first examples as the model will see them")
    with_spec(preview)
    preview.add_argument("-n", type=int, default=5, help="examples (or packed rows) to show")
    preview.add_argument(
        "--json", action="store_true", help="one JSON object a line: input_ids, labels, text"
    )
    preview.set_defaults(handler=cmd_preview)

    add_launch_parser(commands, with_spec)

    schema = commands.add_parser("schema", help="print the spec's JSON Schema")
    schema.add_argument(
        "--markdown", action="store_true", help="the same as tables of keys, one per section (docs/spec.md)"
    )
    schema.set_defaults(handler=cmd_schema)

    compare = commands.add_parser(
        "compare",
        help="MLflow runs of an experiment side by side",
        description="The runs of an MLflow experiment side by side: status, duration, the params that "
        "differ, final and best value of a metric, best first. The store is MLFLOW_TRACKING_URI, "
        "or ./mlruns when it is unset.",
    )
    compare.add_argument(
        "--experiment", help="experiment name (default: the experiment of the most recent run)"
    )
    compare.add_argument(
        "--metric", help="metric to compare and sort by (default: eval/loss, else train/loss)"
    )
    compare.add_argument("--parent", metavar="RUN_ID", help="only this parent run's children (a sweep)")
    compare.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    compare.add_argument("--plot", metavar="FILE", help="also write the runs' loss curves to this PNG")
    compare.set_defaults(handler=cmd_compare)

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
    return parser


def add_launch_parser(commands, with_spec) -> None:
    launch = commands.add_parser("launch", help="submit a spec to a scheduler")
    targets = launch.add_subparsers(dest="target", required=True)
    k8s = targets.add_parser(
        "k8s",
        help="render (and --apply) Kubernetes objects",
        description="Render the spec as a ConfigMap and an Indexed Job of --nodes pods (plus a headless "
        "Service for several nodes), restricted pod security, credentials from Secrets by reference; "
        "print them, write them (--output) or create them (--apply).",
    )
    slurm = targets.add_parser(
        "slurm",
        help="submit to Slurm through submitit",
        description="Validate the spec here, then submit one Slurm job: one task per node, each running "
        "`ftjob run --nproc-per-node G`. Before the time limit Slurm sends USR2; the job checkpoints, "
        "exits 75 and is requeued, and resumes.",
    )
    for target in (slurm, k8s):
        with_spec(target)
        target.add_argument("--nodes", type=int, default=1)
        target.add_argument(
            "--gpus-per-node", type=int, default=0, help="0: a CPU job (one process per node)"
        )
        target.add_argument(
            "--sweep", metavar="FILE", help="YAML of spec keys and the values to try: a run per point"
        )
    slurm.add_argument("--partition")
    slurm.add_argument("--time", dest="time_minutes", type=int, default=60, metavar="MINUTES")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem", help="memory per node, e.g. 64G")
    slurm.add_argument("--constraint")
    slurm.add_argument("--exclusive", action="store_true")
    slurm.add_argument(
        "--sbatch", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option"
    )
    slurm.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="make sure a variable reaches the job (sbatch exports this shell's environment)",
    )
    slurm.add_argument("--signal-seconds", type=int, default=120, help="USR2 this long before the time limit")
    slurm.add_argument("--max-requeues", type=int, default=10, help="requeues after the time-limit signal")
    slurm.add_argument(
        "--container-image", help="run each task in this image: a .sif (Apptainer) or a pyxis/enroot image"
    )
    slurm.add_argument("--folder", default="ftjob-logs", help="submitit's folder: the job's pickle and logs")
    slurm.add_argument("--max-parallel", type=int, help="array tasks running at once (default: all)")
    slurm.add_argument("--restart", action="store_true", help="ftjob run --restart (the first run only)")
    slurm.add_argument("--check-access", action="store_true", help="read model, data and output first")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    slurm.add_argument(
        "--wait", action="store_true", help="follow the job and its requeues; exit with its exit code"
    )
    slurm.set_defaults(handler=cmd_launch_slurm)

    k8s.add_argument(
        "--image",
        help=f"the image, pinned by tag or digest (default: ftjob:{__version__}, this ftjob's version)",
    )
    k8s.add_argument("--namespace")
    k8s.add_argument("--cpu", default="4", help="CPU request per pod")
    k8s.add_argument("--memory", default="32Gi", help="memory request and limit per pod")
    k8s.add_argument("--shm", default="8Gi", help="size of the memory-backed /dev/shm")
    k8s.add_argument(
        "--disk",
        default="100Gi",
        help="ephemeral storage per pod: request, limit and size of each writable folder (model cache, staging)",
    )
    k8s.add_argument(
        "--spool-claim",
        metavar="PVC",
        help="a PersistentVolumeClaim for the MLflow spool, so that records kept through a tracking outage "
        "outlive the pod (a later pod delivers them)",
    )
    k8s.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        metavar="NAME",
        help="a Secret whose keys become the pod's variables (default: ftjob-credentials, optional); its "
        "FTJOB__ keys may set only secret values of the spec (ftjob run --env-overrides secrets)",
    )
    k8s.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a variable, never a secret"
    )
    k8s.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    k8s.add_argument(
        "--toleration", dest="tolerations", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]"
    )
    k8s.add_argument("--priority-class")
    k8s.add_argument("--service-account")
    k8s.add_argument("--queue", help="Kueue LocalQueue (the kueue.x-k8s.io/queue-name label)")
    k8s.add_argument("--backoff-limit", type=int, default=3)
    k8s.add_argument("--active-deadline-seconds", type=int)
    k8s.add_argument("--ttl-seconds", type=int, default=86400, help="delete the finished Job after this long")
    k8s.add_argument("--output", "-o", metavar="FILE", help="write the manifests here instead of stdout")
    k8s.add_argument(
        "--apply", action="store_true", help="create them with your kubeconfig (server dry run first)"
    )
    k8s.set_defaults(handler=cmd_launch_k8s, secrets=None)


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
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.handler(args)
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
