"""The resume fingerprint with train.distributed: checkpoints written before the key existed still resume
under ddp; a change between ddp and fsdp, of fsdp's options or of the number of processes is refused."""

from __future__ import annotations

from job.spec import validate_spec


def test_checkpoints_from_before_train_distributed_resume_under_ddp_and_fsdp_is_a_change(isolated):
    from job.output.checkpoint import fingerprint, fingerprint_changes

    (isolated / "m").mkdir()
    (isolated / "m" / "model.safetensors").write_bytes(b"weights")
    base = {"model": {"source": "m"}, "data": {"train": ["d.jsonl"]}, "train": {"max_steps": 10}}

    def of(world_size: int = 2, **train) -> dict:
        return fingerprint(validate_spec({**base, "train": {**base["train"], **train}}), world_size)

    ddp = of()
    before = {k: v for k, v in ddp.items() if not k.startswith("train.distributed")}  # as written then
    assert not [k for k in ddp if k.startswith("train.fsdp")]
    assert fingerprint_changes(before, ddp) == []
    assert fingerprint_changes(before, of(distributed="ddp", fsdp={"cpu_offload": True})) == []

    fsdp = of(distributed="fsdp")
    assert fingerprint_changes(before, fsdp)[0] == "train.distributed: 'ddp' -> 'fsdp'"
    assert fingerprint_changes(fsdp, of(distributed="fsdp")) == []
    assert fingerprint_changes(fsdp, of(distributed="fsdp", fsdp={"reshard_after_forward": False})) == [
        "train.fsdp.reshard_after_forward: True -> False"
    ]
    assert fingerprint_changes(fsdp, of(1, distributed="fsdp")) == ["world_size: 2 -> 1"]
