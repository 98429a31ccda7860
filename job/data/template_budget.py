"""Chat templates under a budget. A template is code (the spec's, or the model's tokenizer's): the Jinja
sandbox keeps it from reaching the machine, but not from asking for `'a' * 10**10` or looping a
billion times, which would take the job's memory or hang it.

- Once per template, before any row: a sample conversation is rendered in a child process with a
  memory limit and a time limit; a template that blows up there is a spec error (exit 2).
- Every row: rendering runs under a time limit (in the main thread, where the data pipeline runs); a
  row that takes longer, or whose rendering runs out of memory, is a bad row. A template that asks for
  a huge string only for some rows is not bounded per row: the machine's memory is the limit there.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from functools import lru_cache

from job.errors import UserError
from job.signals import time_limit

log = logging.getLogger(__name__)
CHECK_SECONDS = 10.0  # the rendering alone, timed from when the child is ready
CHECK_MEMORY_BYTES = 4 << 30  # the child's address space, after its imports
IMPORT_SECONDS = 120.0  # the child's start and imports (minutes from a cold network filesystem)
ROW_SECONDS = 5.0

# The child says "ready" once it has imported what it needs and limited its memory, then renders.
_CHILD = """
import json, resource, sys
from transformers.utils.chat_template_utils import render_jinja_template
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print("ready", flush=True)
given = json.load(sys.stdin)
render_jinja_template([given["messages"]], chat_template=given["template"], **given["variables"])
"""


@lru_cache(maxsize=8)
def _check(given: str) -> str | None:
    """Why rendering the conversation in `given` (JSON: template, messages, variables) is over the
    budget, or None when it is not (an ordinary template error is for the caller to name)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(CHECK_MEMORY_BYTES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], IMPORT_SECONDS)
        if not ready or child.stdout.readline() != "ready\n":
            log.warning("the chat template was not checked: its checking process did not start in time")
            return None
        try:
            _, errors = child.communicate(given, timeout=CHECK_SECONDS)
        except subprocess.TimeoutExpired:
            return f"rendering a two-turn conversation took more than {CHECK_SECONDS:g} s"
    finally:
        child.kill()
        child.wait()
    if "MemoryError" in errors or child.returncode < 0:
        return f"rendering a two-turn conversation needed more than {CHECK_MEMORY_BYTES >> 30} GiB"
    return None


def check_template(template: str, messages: list[dict[str, str]], variables: Mapping[str, object]) -> None:
    """UserError when rendering messages with template exceeds the memory or time budget."""
    strings = {k: v for k, v in variables.items() if isinstance(v, str)}
    problem = _check(
        json.dumps({"template": template, "messages": messages, "variables": strings}, sort_keys=True)
    )
    if problem:
        raise UserError(
            f"data.chat_template (or the tokenizer's): {problem}; is the template a loop or a bomb?"
        )


class TemplateTimeout(Exception):
    pass


def row_time_limit() -> AbstractContextManager[None]:
    """TemplateTimeout when the body runs longer than ROW_SECONDS (in the main thread only)."""
    return time_limit(ROW_SECONDS, TemplateTimeout(f"rendering took more than {ROW_SECONDS:g} s"))
