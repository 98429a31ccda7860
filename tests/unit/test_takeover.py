"""job/output/takeover.py: the claim -> settle -> resume or restart protocol does its steps in order,
deleting nothing before the lease is held, nor old outputs on a restart before clear_if_restart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import job.output.takeover as takeover_module
from job.output.takeover import Takeover

SAVED = {"step": 4, "uri": "out/checkpoints/step-000004-g1", "history": [], "last_metrics": {"step": 4}}


class Recorder:
    """Every call made to the fakes, in order."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name: str, result=None):
        def record(*args, **kwargs):
            self.calls.append(name)
            return result

        return record


@pytest.fixture
def calls(monkeypatch) -> Recorder:
    recorder = Recorder()
    for name in ("check_writable", "remove_uncommitted", "remove_published", "remove_all", "record_restart"):
        monkeypatch.setattr(takeover_module, name, recorder(name))

    class FakeCheckpointer:
        def __init__(self, *args):
            self.rank = 0

        load_latest = staticmethod(recorder("load_latest", SAVED))
        rank_state = staticmethod(recorder("rank_state", {"data": {}, "rng": {}}))
        wait_committed = staticmethod(recorder("wait_committed"))

    monkeypatch.setattr(takeover_module, "Checkpointer", FakeCheckpointer)
    return recorder


def make_takeover(calls: Recorder, restart: bool) -> Takeover:
    accelerator = SimpleNamespace(
        is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=calls("barrier")
    )
    lease = SimpleNamespace(
        acquire=calls("claim lease"), settle=calls("settle lease"), release=calls("release")
    )
    return Takeover("out", lease, 2, accelerator, restart, "slurm-7")


def test_a_resume_claims_then_clears_leftovers_and_loads_only_once_the_lease_is_held(calls):
    takeover = make_takeover(calls, restart=False)
    stop = SimpleNamespace(raise_if_agreed=calls("stop?"), committed_at=calls("exit 75"))
    takeover.claim(stop)
    assert calls.calls == ["check_writable", "claim lease"]  # nothing else is written before the model loads
    takeover.settle({"fingerprint_version": 5})
    takeover.clear_if_restart()
    assert calls.calls[2:] == ["settle lease", "remove_uncommitted", "barrier", "load_latest", "rank_state"]
    assert takeover.saved == SAVED and takeover.run_id is None
    takeover.stop_for_requeue(stop, 4)
    assert calls.calls[7:] == ["wait_committed", "release", "barrier", "exit 75"]


def test_a_restart_loads_nothing_and_deletes_the_old_outputs_only_when_told(calls):
    takeover = make_takeover(calls, restart=True)
    takeover.claim(SimpleNamespace())
    takeover.settle({})
    assert calls.calls == ["check_writable", "claim lease", "settle lease"]
    assert takeover.saved is None and takeover.restore(None, None, None) == (1, [])
    takeover.clear_if_restart()
    assert calls.calls[3:] == ["remove_published", "remove_all", "record_restart", "barrier"]
