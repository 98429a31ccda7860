import sys

from job.cli import entry

sys.exit(entry())
