"""`ftjob launch` and `ftjob compare`: the commands of the submission side.

`ftjob` finds them through its entry-point group `ftjob.commands` (pyproject.toml), so that job never
imports launch: each is a function of the command's arguments that returns the exit code and raises
job's errors, which ftjob reports. The first line of its docstring is its line in `ftjob --help`.

A launcher (LAUNCHERS) is a module with HELP, DESCRIPTION, `add_arguments(parser)` for its own options
and `submit(args, submission)`; what every launch does first is here: read the spec, validate each
point of a --sweep (launch/sweep.py), then hand the submission to the launcher.
"""

from __future__ import annotations

import argparse

from job.spec import add_spec_arguments, load_spec
from launch import k8s, slurm
from launch.compare import compare
from launch.sweep import Submission

LAUNCHERS = {"k8s": k8s, "slurm": slurm}


def launch_main(argv: list[str]) -> int:
    """submit a spec to a scheduler"""
    args = launch_parser().parse_args(argv)
    submission = Submission.of(load_spec(args.spec, args.set), args.sweep)
    return LAUNCHERS[args.target].submit(args, submission)


def compare_main(argv: list[str]) -> int:
    """MLflow runs of an experiment side by side"""
    args = compare_parser().parse_args(argv)
    compare(args.experiment, args.metric, args.json, args.plot, args.parent)
    return 0


def launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftjob launch")
    targets = parser.add_subparsers(dest="target", required=True)
    for name, launcher in LAUNCHERS.items():
        target = targets.add_parser(name, help=launcher.HELP, description=launcher.DESCRIPTION)
        add_spec_arguments(target)
        target.add_argument("--nodes", type=int, default=1)
        target.add_argument(
            "--gpus-per-node", type=int, default=0, help="0: a CPU job (one process per node)"
        )
        target.add_argument(
            "--sweep", metavar="FILE", help="YAML of spec keys and the values to try: a run per point"
        )
        launcher.add_arguments(target)
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftjob compare",
        description="The runs of an MLflow experiment side by side: status, duration, the params that "
        "differ, final and best value of a metric, best first. The store is MLFLOW_TRACKING_URI, "
        "or ./mlruns when it is unset.",
    )
    parser.add_argument(
        "--experiment", help="experiment name (default: the experiment of the most recent run)"
    )
    parser.add_argument(
        "--metric", help="metric to compare and sort by (default: eval/loss, else train/loss)"
    )
    parser.add_argument("--parent", metavar="RUN_ID", help="only this parent run's children (a sweep)")
    parser.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    parser.add_argument("--plot", metavar="FILE", help="also write the runs' loss curves to this PNG")
    return parser
