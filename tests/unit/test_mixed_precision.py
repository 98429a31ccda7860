"""train.mixed_precision on CPUs: bf16 only where the CPU has bf16 matrix units, a fallback warned about once."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("amx,expected", [(True, "bf16"), (False, "no")])
def test_auto_mixed_precision_on_cpu_is_bf16_only_with_bf16_matrix_units(monkeypatch, amx, expected):
    from job.accelerator import resolve_mixed_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: amx)  # the kernel lets the process use them
    assert resolve_mixed_precision("auto", cuda=False) == expected


def test_mixed_precision_falls_back_on_cpu_with_one_warning(caplog, monkeypatch):
    from job.accelerator import resolve_mixed_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_mixed_precision("auto", cuda=False) == "no"
    assert resolve_mixed_precision("no", cuda=False) == "no"
    with caplog.at_level("WARNING"):
        assert resolve_mixed_precision("fp16", cuda=False) == "no"
    assert len(caplog.records) == 1 and "fp16" in caplog.records[0].getMessage()
