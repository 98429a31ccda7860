"""Errors that end the job with a message and a documented exit code (docs/contracts.md, "Exit codes").

Raise these for anything a user can fix; the CLI prints the message without a traceback.
"""

EXIT_REQUEUE = 75
EXIT_PEER_LOST = 76


class JobError(Exception):
    """Anything else: exit 1."""

    exit_code = 1


class UserError(JobError):
    """Bad spec, bad arguments, unreachable input: nothing was trained. Exit 2."""

    exit_code = 2


class DataError(JobError):
    """Data error beyond the bad-rows budget; the message names file and line. Exit 3."""

    exit_code = 3


class Preempted(JobError):
    """Stopped by a signal after the stop checkpoint was committed (or before training began, with
    nothing new to save): requeue me, I will resume. Exit 75."""

    exit_code = EXIT_REQUEUE


class PeerLost(JobError):
    """A collective failed because another process of the job is gone (its process or node died, or the
    network to it): this process cannot go on alone. Rerun every node (the whole gang) and the job
    resumes from its last committed checkpoint. Exit 76."""

    exit_code = EXIT_PEER_LOST
