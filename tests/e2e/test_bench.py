"""The end-to-end bench (python -m bench) at a tiny size: it runs every system from one command, prints
its table and JSON, and the systems train on the same tokens. Speed is not asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers import REPO

SYSTEMS = ["ftjob", "trl", "padding"]
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny bench run: (its stdout, its JSON report)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    systems = SYSTEMS if HAS_TRL else [s for s in SYSTEMS if s != "trl"]
    command = [sys.executable, "-m", "bench", "--size", "tiny", "--rows", "40", "--precisions", "fp32"]
    command += ["--rounds", "1", "--systems", ",".join(systems), "--no-record"]
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_table_is_printed_with_a_row_per_system(bench):
    stdout, report = bench
    lines = stdout.splitlines()
    assert lines[0].startswith("| size | precision | system | wall s |")
    rows = [line for line in lines if line.startswith("| tiny | fp32 |")]
    assert [row.split(" | ")[2] for row in rows] == [r["system"] for r in report["best"]]


@pytest.mark.parametrize("system", SYSTEMS)
def test_each_system_reports_positive_measures(bench, system):
    if system == "trl" and not HAS_TRL:
        pytest.skip("trl is not installed (pip install -e '.[bench]')")
    (run,) = [r for r in bench[1]["best"] if r["system"] == system]
    for key in ("wall_s", "first_step_s", "loop_s", "tokens_per_s", "mfu", "peak_rss_mib", "final_loss"):
        assert run[key] > 0, key
    assert run["first_step_s"] < run["wall_s"]
    assert run["steps"] > 1


def test_systems_train_on_the_same_tokens(bench):
    report = bench[1]
    (size,) = report["sizes"]
    assert size["workspace"]["tokens"] > 0
    assert {r["real_tokens"] for r in report["best"]} == {size["workspace"]["tokens"]}
    assert len({r["examples"] for r in report["best"]}) == 1


def test_the_compile_bench_times_each_form():
    """bench/compile.py at the tiny size, one row a micro-batch: a row per form with a first step and a
    step time, and the compiled form did compile (dynamo's frame count). The aot_eager backend traces
    as inductor does, without making kernels (a minute of compiling on 2 CPUs)."""
    from bench.compile import FORMS

    command = [sys.executable, "-m", "bench.compile", "--size", "tiny", "--steps", "1", "--rows", "40"]
    command += ["--micro-batch", "1", "--backend", "aot_eager"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [row[0].lstrip("| ") for row in rows[1:]] == list(FORMS)
    for row in rows[1:]:
        assert float(row[1]) > 0 and float(row[2]) > 0
    frames = done.stdout.rsplit("frames compiled by torch.compile: ", 1)[1].splitlines()[0]
    counts = dict(part.rsplit(" ", 1) for part in frames.split(", "))
    assert counts.keys() == set(FORMS) and int(counts["peft compiled"]) > 0
    assert int(counts["ftjob regional compile"]) > 0
    assert int(counts["peft eager"]) == int(counts["ftjob layers eager"]) == 0
