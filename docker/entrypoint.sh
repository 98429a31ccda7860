#!/bin/sh
# The image's `ftjob`, first on PATH: both `docker run IMAGE ...` (ENTRYPOINT ["ftjob"]) and a Kubernetes
# pod's `command: [ftjob]`, which replaces the entrypoint, start here. As PID 1 it hands over to tini:
# the kernel drops a signal to PID 1 that has no handler (a SIGTERM before ftjob has installed its own
# would be lost, and the pod killed only when its grace period ends), and PID 1 must reap orphans.
if [ "$$" -eq 1 ]; then
    exec /usr/bin/tini -- /opt/venv/bin/ftjob "$@"
fi
exec /opt/venv/bin/ftjob "$@"
