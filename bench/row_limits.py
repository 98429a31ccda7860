"""Memory and time of the data pipeline on unbounded rows (issue 12, point 9), each case in a fresh
process, peak RSS measured above the RSS once the libraries and the tokenizer are loaded:

  gz-line        a 400 MB line in a .jsonl.gz (about 400 KB): a bad row over data.max_row_bytes
  completion     a 20 MB completion, max_seq_len 64, truncate (data.max_row_bytes raised to 32 MiB so
                 that the row reaches the tokenizer): its text is cut before it is tokenized
  whole          the same completion tokenized whole, as the pipeline did before the cut (the baseline)
  json-array     a 100 MB JSON array of small rows, read through

    .venv/bin/python -m bench.row_limits
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import proc_status_mb
from bench.workspace import WORDS

CASES = ("gz-line", "completion", "whole", "json-array")
MB = 1_000_000


def write_inputs(root: Path) -> None:
    from job.model.tiny import build_tokenizer

    rng = random.Random(0)
    build_tokenizer([" ".join(rng.choices(WORDS, k=60)) for _ in range(500)], 1024).save_pretrained(
        root / "tokenizer"
    )
    with gzip.open(root / "line.jsonl.gz", "wt", compresslevel=6) as f:
        f.write(json.dumps({"text": "first"}) + '\n{"text": "')
        for _ in range(400):
            f.write("x" * MB)
        f.write('"}\n' + json.dumps({"text": "last"}) + "\n")
    words = " ".join(rng.choices(WORDS, k=20 * MB // 4))[: 20 * MB]
    (root / "completion.jsonl").write_text(json.dumps({"prompt": "Write on.", "completion": words}) + "\n")
    with open(root / "array.json", "w") as f:
        f.write("[")
        for i in range(100 * MB // 100):
            f.write(
                ("," if i else "") + json.dumps({"text": f"row {i} " + " ".join(rng.choices(WORDS, k=16))})
            )
        f.write("]")


def run_case(case: str, root: Path) -> dict:
    """In a fresh process: run one case, return its figures."""
    from transformers import AutoTokenizer

    from job.data.formats import Formatter
    from job.data.pipeline import DataPipeline
    from job.data.sources import read_rows
    from job.data.stream import EPOCH_END
    from job.data.tokens import tokenize
    from job.spec import validate_spec

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    baseline = proc_status_mb("VmRSS")
    started = time.perf_counter()
    if case == "json-array":
        result = {"rows": sum(1 for _ in read_rows(str(root / "array.json")))}
    elif case == "whole":
        row = json.loads((root / "completion.jsonl").read_text())
        result = {
            "tokens": len(tokenize(Formatter("completion", {}, "completion")(row), tokenizer).input_ids)
        }
    else:
        data = {"train": [str(root / "line.jsonl.gz")], "format": "text", "bad_rows": {"max_fraction": 0.5}}
        if case == "completion":
            data = {
                "train": [str(root / "completion.jsonl")],
                "format": "completion",
                "max_row_bytes": 32 << 20,
            }
        spec = validate_spec(
            {"model": {"source": "unused"}, "data": {**data, "max_seq_len": 64}, "train": {"epochs": 1}}
        )
        pipeline = DataPipeline(spec.data, tokenizer, seed=0, epochs=1)
        pipeline.budget.quiet = True
        examples = [e for e in pipeline.examples if e is not EPOCH_END]
        result = {"examples": len(examples), "tokens": sum(len(e.input_ids) for e in examples)}
        result |= {"bad_rows": pipeline.budget.bad, "first_bad": pipeline.budget.first_bad[:1]}
    seconds = time.perf_counter() - started
    return {**result, "seconds": round(seconds, 2), "peak_rss_mib": round(proc_status_mb("VmHWM") - baseline)}


def in_fresh_process(case: str, root: Path) -> dict:
    command = [sys.executable, "-m", "bench.row_limits", "--case", case, str(root)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case[0], Path(args.case[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_inputs(root)
        print(f"line.jsonl.gz: {(root / 'line.jsonl.gz').stat().st_size / 1000:.0f} KB")
        print("| case | peak RSS above libraries MiB | seconds | result |\n| --- | --- | --- | --- |")
        for case in CASES:
            r = in_fresh_process(case, root)
            peak, seconds = r.pop("peak_rss_mib"), r.pop("seconds")
            print(f"| {case} | {peak} | {seconds} | {json.dumps(r)} |")


if __name__ == "__main__":
    main()
