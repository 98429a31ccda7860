"""The bench's report without running it: which systems run where, a failing system reported, MFU over the
higher peak."""

from __future__ import annotations

import json

import pytest
from helpers import REPO


def test_ftjob_qlora_runs_on_a_4bit_base_and_by_default_on_gpus_only():
    from bench.__main__ import parse_args
    from bench.systems import ftjob_spec
    from job.spec import validate_spec

    cpu, cuda = (parse_args(["--device", device]) for device in ("cpu", "cuda"))
    assert cpu.systems == ["ftjob", "trl", "padding"]
    assert cuda.systems == ["ftjob", "ftjob-qlora", "trl", "padding"]
    job = {"model": "m", "data": "d.jsonl", "device": "cuda", "precision": "bf16", "micro_batch": 4}
    for quantized, checkpointing in ((False, False), (True, True)):
        spec = ftjob_spec(job | {"gradient_checkpointing": checkpointing}, REPO / "out", "x", quantized)
        spec = validate_spec(spec)
        assert spec.model.quantization == ("4bit" if quantized else None)
        assert spec.train.gradient_checkpointing is checkpointing


def fake_bench(monkeypatch, tmp_path, peaks: list[float], argv: list[str]) -> tuple[dict, str | None]:
    """bench's main() with its systems and calibrations faked: trl fails (out of memory), the others run
    at 50 tokens/s; each calibration measures the next of peaks (fp32 FLOP/s). Returns the JSON report and
    the message main() exited with (None when it returned)."""
    import bench.__main__ as bench_main

    measures = {"wall_s": 2.0, "first_step_s": 1.0, "loop_s": 1.0, "steps": 2, "examples": 3}
    measures |= {"real_tokens": 100, "tokens_per_s": 50.0, "peak_rss_mib": 10.0, "peak_gpu_mib": None}

    def run_system(system, job, workdir):
        if system == "trl":
            raise bench_main.SystemFailed("trl failed with exit 1:\nout of memory")
        return {"system": system, "precision": job["precision"], "round": job["round"], **measures} | {
            "final_loss": 6.9
        }

    measured = iter(peaks)
    monkeypatch.setattr(bench_main, "build_workspace", lambda *a: {"model": "m", "tokens": 100, "rows": 3})
    monkeypatch.setattr(
        bench_main, "calibrate", lambda *a: {"flops_per_token": 1.0, "matmul_flops": {"fp32": next(measured)}}
    )
    monkeypatch.setattr(bench_main, "create_tracking_store", lambda uri: None)
    monkeypatch.setattr(bench_main, "run_system", run_system)
    report = tmp_path / "report.json"
    argv = ["--size", "tiny", "--precisions", "fp32", "--no-record", "--json", str(report), *argv]
    try:
        bench_main.main(argv)
    except SystemExit as exit:
        return json.loads(report.read_text()), str(exit.code)
    return json.loads(report.read_text()), None


def test_a_failing_system_is_reported_and_the_others_still_measured(tmp_path, monkeypatch, capsys):
    report, exited = fake_bench(monkeypatch, tmp_path, [1e4, 1e4], ["--systems", "ftjob,trl,padding"])
    assert exited is not None and exited.endswith(
        "failed (their output is above; the table holds the others): tiny fp32 round 1 trl"
    )
    assert [r["system"] for r in report["best"]] == ["ftjob", "padding"]
    out, err = capsys.readouterr()
    assert "| tiny | fp32 | padding |" in out and "out of memory" in err


@pytest.mark.parametrize("peaks", [[1e4, 2e4], [2e4, 1e4]], ids=["after", "before"])
def test_mfu_is_over_the_higher_of_the_peaks_measured_before_and_after_the_runs(tmp_path, monkeypatch, peaks):
    report, exited = fake_bench(monkeypatch, tmp_path, peaks, ["--systems", "ftjob"])
    assert exited is None
    assert report["sizes"][0]["calibration"]["matmul_flops"] == {"fp32": 2e4}
    assert report["best"][0]["mfu"] == 50.0 / 2e4
