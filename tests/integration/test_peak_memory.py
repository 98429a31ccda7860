"""Peak memory, measured in a child process of its own: what ftjob holds, not what ran before it."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import REPO

PEAK_READ = """
import json, re, sys
from pathlib import Path
from job.data.sources import read_rows

def high_water_mark():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) << 10

before = high_water_mark()
rows = [(row.value, row.error) for row, _ in read_rows(sys.argv[1], max_row_bytes=1 << 20)]
print(json.dumps({"rows": rows, "peak": high_water_mark() - before}))
"""


def test_a_huge_parquet_row_is_read_past_without_being_decoded(tmp_path):
    """A 64 MiB row in a 3 MB Parquet file, in a row group of its own: over max_row_bytes by the
    group's metadata, so never decoded."""
    huge = [{"text": "first"}, {"text": "x" * (64 << 20)}, {"text": "last"}]
    pq.write_table(pa.Table.from_pylist(huge), tmp_path / "d.parquet", row_group_size=1)
    read = subprocess.run(
        [sys.executable, "-c", PEAK_READ, str(tmp_path / "d.parquet")],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(read.stdout)
    assert [value for value, _ in result["rows"]] == [{"text": "first"}, None, {"text": "last"}]
    assert "max_row_bytes" in result["rows"][1][1]
    assert result["peak"] < 16 << 20, result["peak"]


def test_cpu_peak_memory_is_the_programs_own_not_what_ran_before_exec():
    """A worker that torchrun starts is a fork of the launcher followed by exec: ru_maxrss carries the
    launcher's peak across the exec, VmHWM does not."""
    worker = "import resource; from job.metrics import peak_rss_bytes; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    launcher = (
        f"import os, sys; big = b'x' * 2**31; os.execv(sys.executable, [sys.executable, '-c', {worker!r}])"
    )
    out = subprocess.run(
        [sys.executable, "-c", launcher], cwd=REPO, capture_output=True, text=True, check=True
    )
    ours, carried = map(int, out.stdout.split())
    assert carried > 2**31 > ours + 2**30  # ftjob's imports take about 300 MB
