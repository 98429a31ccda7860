"""Which errors of a collective mean that another rank is gone (exit 76), and which keep their own code."""

from __future__ import annotations

import pytest
import torch

from job.collective import lost_peer
from job.errors import EXIT_PEER_LOST, JobError, UserError

GLOO_CLOSED = (
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:8927. "
    "This is typically caused by a remote worker crashing."
)


@pytest.fixture
def in_a_process_group(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(GLOO_CLOSED),
        RuntimeError("[gloo/transport/tcp/pair.cc:598] Read error [10.0.0.2]:4711: Connection reset by peer"),
        RuntimeError("[gloo/transport/tcp/pair.cc:589] Write error [10.0.0.2]:4711: Broken pipe"),
        torch.distributed.DistBackendError("NCCL error: remote process exited or there was a network error"),
        torch.distributed.DistNetworkError("failed to recv, got 0 bytes"),
    ],
)
def test_a_collective_that_lost_its_peer_is_exit_76_naming_the_cause(in_a_process_group, error):
    lost = lost_peer(error)
    assert lost is not None and lost.exit_code == EXIT_PEER_LOST == 76
    assert str(lost).startswith("another process of this job is gone (")


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory"),
        ValueError("Connection closed by peer"),  # not raised by a collective
        RuntimeError("s3: Connection reset by peer"),  # a storage error, not a collective's
        JobError("rank 0: ConnectionResetError: [Errno 104] Connection reset by peer"),  # rank_0_outcome's
        UserError(f"data.train[0]: cannot read: {GLOO_CLOSED}"),  # decided already: stays 2
        RuntimeError(
            "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv"
        ),  # heartbeats'
    ],
)
def test_other_errors_keep_their_own_code(in_a_process_group, error):
    assert lost_peer(error) is None


def test_outside_a_process_group_nothing_is_a_lost_peer():
    assert lost_peer(RuntimeError(GLOO_CLOSED)) is None
