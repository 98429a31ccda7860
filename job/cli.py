"""The ftjob command line (DESIGN.md, "Command line"). `python -m job` is the same program.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so spec
errors come back in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from job import __version__
from job.errors import JobError, UserError


def cmd_run(args: argparse.Namespace) -> int:
    from job.signals import StopRequest
    from job.spec import load_spec

    spec = load_spec(args.spec, args.set)
    if args.nproc_per_node is not None:
        return launch_workers(spec, args)
    placed = [
        f"--{k.replace('_', '-')}"
        for k in ("nnodes", "node_rank", "master_addr", "master_port")
        if getattr(args, k) is not None
    ]
    if placed:
        raise UserError(f"{', '.join(placed)}: placement for --nproc-per-node, which is not given")
    # Before the heavy imports: a stop during them, the model download or the counting pass exits 75 too.
    with StopRequest(spec.train.stop_grace_seconds) as stop:
        from job.accelerator import make_accelerator
        from job.train import train

        if train(spec, make_accelerator(spec.train), restart=args.restart, stop=stop) is None:
            print(f"{spec.output_uri}/adapter is already published; nothing to do (--restart trains again)")
    return 0


def launch_workers(spec, args: argparse.Namespace) -> int:
    """This node's workers through torch's elastic launcher, placed by the arguments, else by the
    scheduler's environment (job/cluster.py)."""
    import os

    from job.cluster import node_placement
    from job.launcher import nproc_auto, run_workers

    given = {key: getattr(args, key) for key in ("nnodes", "node_rank", "master_addr", "master_port")}
    placement = node_placement(os.environ, given)
    nproc = nproc_auto() if args.nproc_per_node == "auto" else args.nproc_per_node
    worker_args = ["--restart"] if args.restart else []
    return run_workers(
        spec.model_dump(mode="json"), worker_args, nproc, placement, spec.train.stop_grace_seconds
    )


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
    from job.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from job.generate import generate

    print(generate(args.adapter, args.prompt, args.max_new_tokens, args.temperature))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from launch.compare import compare

    compare(args.experiment, args.metric, args.json, args.plot)
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

    schema = commands.add_parser("schema", help="print the spec's JSON Schema")
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
    compare.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    compare.add_argument("--plot", metavar="FILE", help="also write the runs' loss curves to this PNG")
    compare.set_defaults(handler=cmd_compare)

    generate = commands.add_parser("generate", help="generate with a published adapter")
    generate.add_argument("--adapter", required=True, help="adapter/ directory or URL published by a run")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.set_defaults(handler=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.handler(args)
    except JobError as e:
        print(f"ftjob: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ftjob: interrupted", file=sys.stderr)
        return 130
