"""End to end on a tiny model: every adapter method trains, publishes, and reloads with plain peft."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ALPACA_ROWS, CHATML, ftjob, make_spec, train_in_process, write_jsonl

from job.digest import sha256_file
from job.output.layout import MANIFEST
from job.spec import validate_spec


def run_in_process(spec: dict):
    return train_in_process(spec, restart=True)  # tests run several specs into one output


PROBE = "### Instruction:\nReverse the words: red green blue\n\n### Response:\n"


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def reload_published(adapter_dir, spec) -> torch.nn.Module:
    """What a user does: the base model as the spec loaded it, then plain peft on top."""
    from peft import PeftModel

    from job.model.loading import load_model

    base = load_model(spec.model.source, spec.model, torch.device("cpu"))
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize(
    "adapter,model,train",
    [
        ({"method": "lora"}, {}, {}),
        ({"method": "dora"}, {}, {"gradient_checkpointing": True}),
        ({"method": "lora"}, {"quantization": "4bit"}, {"gradient_checkpointing": True}),
        ({"method": "lora"}, {"quantization": "8bit"}, {}),
    ],
    ids=["lora", "dora", "qlora-4bit", "lora-8bit"],
)
def test_adapter_trains_publishes_and_reloads_with_same_logits(
    tiny_model_dir, data_files, isolated, adapter, model, train
):
    model = {"source": str(tiny_model_dir), **model}
    spec = make_spec("lora", model=model, files=data_files, adapter=adapter, train=train)
    result = run_in_process(spec)

    adapter_dir = isolated / "runs" / "t" / "adapter"
    assert result.adapter_uri == "./runs/t/adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "spec.json", "metrics.json", MANIFEST):
        assert (adapter_dir / name).is_file(), name
    assert any(adapter_dir.glob("tokenizer*.json"))
    assert not list(adapter_dir.glob("*.bin"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is (adapter["method"] == "dora")
    assert config["r"] == 8

    manifest = json.loads((adapter_dir / MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in adapter_dir.iterdir()} - {MANIFEST}
    assert all(sha256_file(adapter_dir / n) == entry["sha256"] for n, entry in manifest.items())

    if model.get("quantization") == "4bit":
        import bitsandbytes as bnb

        from job.model.adapter import count_parameters

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
        plain = validate_spec(make_spec("lora", model=tiny_model_dir, files=data_files))  # no quantization
        unquantized = sum(p.numel() for p in reload_published(adapter_dir, plain).parameters())
        assert count_parameters(result.model)[1] == unquantized  # a 4-bit weight counts whole
    reloaded = reload_published(adapter_dir, validate_spec(spec))
    expected = logits_of(result.model, result.tokenizer)
    torch.testing.assert_close(logits_of(reloaded, result.tokenizer), expected, atol=1e-5, rtol=1e-5)
    # and the adapter changed something: the trained model differs from the base model
    with reloaded.disable_adapter():
        assert not torch.allclose(logits_of(reloaded, result.tokenizer), expected, atol=1e-4)

    history = json.loads((adapter_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 9))
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(
        history[0]
    )
    assert "eval/loss" in history[3] and "eval/loss" in history[7] and "eval/loss" not in history[4]


def test_loss_falls_and_is_tracked_in_local_mlflow_store(tiny_model_dir, data_files, isolated):
    spec = make_spec(
        "lora", model=tiny_model_dir, files=data_files, train={"max_steps": 30, "scheduler": "constant"}
    )
    result = run_in_process(spec)
    losses = [h["train/loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{isolated / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.005"
    assert run.data.params["adapter.method"] == "lora"
    points = client.get_metric_history(result.run_id, "train/loss")
    assert sorted(p.step for p in points) == list(range(1, 31))
    assert client.get_metric_history(result.run_id, "eval/loss")


def test_full_finetune_saves_a_loadable_model(tiny_model_dir, data_files, isolated):
    from transformers import AutoModelForCausalLM

    result = run_in_process(
        make_spec("lora", model=tiny_model_dir, files=data_files, adapter={"method": "full"})
    )
    adapter_dir = isolated / "runs" / "t" / "adapter"
    assert (adapter_dir / "model.safetensors").is_file()
    assert not (adapter_dir / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(adapter_dir, use_safetensors=True).eval()
    expected = logits_of(result.model, result.tokenizer)
    torch.testing.assert_close(logits_of(reloaded, result.tokenizer), expected, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert not torch.allclose(logits_of(base, result.tokenizer), expected, atol=1e-4)

    import mlflow  # the whole model is not copied into MLflow a second time: the run points at it

    client = mlflow.MlflowClient(f"sqlite:///{isolated / 'mlruns' / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(result.run_id)] == ["spec.json"]
    assert client.get_run(result.run_id).data.tags["ftjob.output_uri"] == str(isolated / "runs" / "t")


def test_a_publish_replaces_what_an_earlier_one_left(tiny_model_dir, data_files, isolated):
    """No file of an earlier publish stays beside the new ones under a valid MANIFEST."""
    adapter = isolated / "runs" / "t" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "leftover.safetensors").write_bytes(b"from an earlier publish")  # its MANIFEST went first
    train_in_process(
        make_spec("lora", model=tiny_model_dir, files=data_files, train={"max_steps": 2})
    )  # no --restart
    assert not (adapter / "leftover.safetensors").exists()
    manifest = json.loads((adapter / MANIFEST).read_text())["files"]
    assert sorted(manifest) == sorted(p.name for p in adapter.iterdir() if p.name != MANIFEST)


def bf16_copy(model_dir, target):
    """The tiny model stored in bfloat16, as most published models are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


@pytest.mark.parametrize("quantization", [None, "4bit"], ids=["lora", "qlora-4bit"])
def test_merge_writes_the_trained_model_in_the_stored_dtype(
    tiny_model_dir, data_files, isolated, quantization
):
    """merged/ gives the logits of the model that was trained (for QLoRA: the 4-bit base, dequantized,
    plus the adapter; not the full-precision base plus the adapter), in the base's stored dtype."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = bf16_copy(tiny_model_dir, isolated / "bf16")
    spec = make_spec(
        "lora",
        model={"source": str(model_dir), "quantization": quantization},
        files=data_files,
        output={"merge": True},
    )
    result = run_in_process(spec)
    merged_dir = isolated / "runs" / "t" / "merged"
    assert (merged_dir / MANIFEST).is_file()
    assert {t.dtype for t in load_file(merged_dir / "model.safetensors").values()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(
        merged_dir, use_safetensors=True, dtype=torch.float32
    ).eval()
    trained = logits_of(result.model, result.tokenizer)
    merged_logits = logits_of(merged, result.tokenizer)
    # bf16 weights: within 0.02 here; merging QLoRA's adapter into the full-precision base was 0.77 off
    torch.testing.assert_close(merged_logits, trained, atol=0.05, rtol=0.05)
    assert (merged_logits.argmax(-1) == trained.argmax(-1)).float().mean() >= 0.9


def test_a_failed_merge_keeps_the_adapter_and_the_next_run_merges(
    tiny_model_dir, data_files, isolated, monkeypatch, caplog
):
    import job.output.publish

    def out_of_memory(*args):
        raise MemoryError("no room to merge")

    spec = make_spec(
        "lora", model=tiny_model_dir, files=data_files, output={"merge": True}, train={"max_steps": 2}
    )
    with monkeypatch.context() as patched, pytest.raises(MemoryError):
        patched.setattr(job.output.publish, "merge_adapter", out_of_memory)
        train_in_process(spec)
    adapter, merged = isolated / "runs" / "t" / "adapter", isolated / "runs" / "t" / "merged"
    assert (adapter / MANIFEST).is_file() and not (merged / MANIFEST).exists()
    published_weights = (adapter / "adapter_model.safetensors").read_bytes()

    with caplog.at_level("INFO", logger="job"):
        assert train_in_process(spec) is None  # nothing trained again...
    assert any("merged model published" in r.getMessage() for r in caplog.records)  # ...only merged
    assert (merged / MANIFEST).is_file() and (merged / "model.safetensors").is_file()
    assert (adapter / "adapter_model.safetensors").read_bytes() == published_weights


def test_packed_micro_batches_reach_flash_attention_as_one_row(
    tiny_model_dir, data_files, monkeypatch, cpu_flash_kernels
):
    """With flash attention and packing, every attention call of a run (micro batch 4) takes the
    variable-length kernel: the loop flattens each packed micro-batch."""
    import job.train

    def load_then_flash(model_dir, model_spec, *args, **kwargs):  # flash-attn does not load on a CPU
        sdpa = model_spec.model_copy(update={"attn_implementation": "sdpa"})
        model = job.model.loading.load_model(model_dir, sdpa, *args, **kwargs)
        model.config._attn_implementation = "flash_attention_2"  # transformers' own flash path runs
        return model

    import job.model.loading
    import job.model.prepare

    monkeypatch.setattr(job.model.prepare, "load_model", load_then_flash)
    probe = job.train.output_head  # its forwards over a few unpacked tokens are not training's

    def probe_then_forget(model):
        head = probe(model)
        cpu_flash_kernels.clear()
        return head

    monkeypatch.setattr(job.train, "output_head", probe_then_forget)
    spec = make_spec(
        "lora",
        model={"source": str(tiny_model_dir), "attn_implementation": "flash_attention_2"},
        files=data_files,
        data={"packing": True, "eval": []},
        train={"max_steps": 3, "micro_batch_size": 4},
    )
    run_in_process(spec)
    assert cpu_flash_kernels and set(cpu_flash_kernels) == {"varlen"}


def test_a_publish_that_fails_after_the_last_checkpoint_is_finished_by_the_next_run(
    tiny_model_dir, data_files, isolated, monkeypatch
):
    """The last checkpoint is at the last step: the next run has nothing to train, only to publish,
    with the whole metric curve."""
    import job.train

    spec = make_spec(
        "lora", model=tiny_model_dir, files=data_files, train={"max_steps": 4, "checkpoint_every": 2}
    )
    with monkeypatch.context() as patched, pytest.raises(OSError):
        patched.setattr(job.train, "publish", lambda *a: (_ for _ in ()).throw(OSError("store gone")))
        train_in_process(spec)
    assert not (isolated / "runs" / "t" / "adapter").exists()
    result = train_in_process(spec)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    curve = (isolated / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in curve] == [1, 2, 3, 4]


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir, data_files):
    """The loss is a mean over loss-bearing tokens of the whole step, however it is split."""
    one_batch = run_in_process(
        make_spec(
            "lora",
            model=tiny_model_dir,
            files=data_files,
            train={"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1},
        )
    )
    accumulated = run_in_process(
        make_spec(
            "lora",
            model=tiny_model_dir,
            files=data_files,
            train={"max_steps": 1, "micro_batch_size": 2, "grad_accum": 2},
        )
    )
    assert accumulated.history[0]["train/loss"] == pytest.approx(one_batch.history[0]["train/loss"], rel=1e-5)
    assert accumulated.history[0]["train/grad_norm"] == pytest.approx(
        one_batch.history[0]["train/grad_norm"], rel=1e-4
    )


def test_epochs_set_the_number_of_steps(tiny_model_dir, data_files):
    # 32 rows, micro batch 4 -> 8 micro-batches an epoch; grad_accum 2 -> 4 steps an epoch; 2 epochs -> 8
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        train={"max_steps": None, "epochs": 2, "grad_accum": 2},
    )
    result = run_in_process(spec)
    assert len(result.history) == 8
    assert result.history[-1]["train/epoch"] == 2.0
    assert result.history[-1]["data/rows_read"] == 64  # every row once per epoch


def test_empty_eval_split_logs_no_eval_metric_and_warns_once(tiny_model_dir, data_files, isolated, caplog):
    """An eval_fraction that holds out no row: no eval/loss 0.0 (which compare would rank best)."""
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"eval": [], "eval_fraction": 1e-9},
        train={"max_steps": 4, "eval_every": 1},
    )
    with caplog.at_level("WARNING", logger="job"):
        result = run_in_process(spec)
    assert not any(key.startswith("eval/") for h in result.history for key in h)
    warnings = [r for r in caplog.records if "no token to score" in r.getMessage()]
    assert len(warnings) == 1
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{isolated / 'mlruns' / 'mlflow.db'}")
    assert "eval/loss" not in client.get_run(result.run_id).data.metrics


def test_chat_adapter_publishes_its_template_and_generate_stops_on_its_end_of_turn_token(
    tiny_model_dir, isolated
):
    from transformers import AutoTokenizer

    from job.data.formats import Formatter
    from job.generate import load_trained, stop_tokens

    chats = [
        {
            "messages": [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in ALPACA_ROWS * 4
    ]
    train = write_jsonl(isolated / "chat.jsonl", chats)
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=(train, None),
        data={"format": "chat", "chat_template": CHATML, "eval": []},
        train={"max_steps": 2},
    )
    run_in_process(spec)
    adapter = isolated / "runs" / "t" / "adapter"
    published = AutoTokenizer.from_pretrained(adapter)
    assert published.chat_template == CHATML  # plain transformers users render prompts as training did

    model, tokenizer, loaded_spec = load_trained(adapter)
    formatter = Formatter("chat", {}, "completion", tokenizer, loaded_spec.data.chat_template)
    ids, strings = stop_tokens(model, tokenizer, formatter)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and tokenizer.eos_token_id in ids
    assert strings == []


def test_generate_renders_prompt_like_training(tiny_model_dir, data_files, isolated):
    """Greedy generation equals decoding the trained model on the alpaca-rendered prompt."""
    from job.generate import generate, generate_text

    result = run_in_process(
        make_spec("lora", model=tiny_model_dir, files=data_files, train={"max_steps": 20})
    )
    text = generate("runs/t/adapter", "Say hi", max_new_tokens=6)
    expected = generate_text(
        result.model,
        result.tokenizer,
        "### Instruction:\nSay hi\n\n### Response:\n",
        max_new_tokens=6,
        temperature=0,
    )
    assert text == expected


def test_model_from_s3_output_to_s3_and_generate_from_s3(tiny_model_dir, data_files, isolated, s3):
    bucket = s3.bucket
    s3.put(str(tiny_model_dir) + "/", f"{bucket}/models/tiny/", recursive=True)
    s3.put(str(data_files[0]), f"{bucket}/data/train.jsonl")
    spec = make_spec(
        "lora",
        model=f"s3://{bucket}/models/tiny/",
        files=data_files,
        data={"train": [f"s3://{bucket}/data/*.jsonl"], "eval": []},
        output={"uri": f"s3://{bucket}/runs/{{name}}"},
        train={"max_steps": 4},
    )
    spec_path = isolated / "spec.json"
    spec_path.write_text(json.dumps(spec))
    run = ftjob("run", str(spec_path), cwd=isolated)
    assert run.returncode == 0, run.stderr
    published = {p.rsplit("/", 1)[1] for p in s3.find(f"{bucket}/runs/t/adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json", "spec.json", MANIFEST} <= published
    assert not any(name.startswith(".ftjob-write-check") for name in s3.find(f"{bucket}/runs/t"))

    generated = ftjob(
        "generate", "--adapter", f"s3://{bucket}/runs/t/adapter", "--prompt", "Say hi", "--max-new-tokens", "3",
        cwd=isolated,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr


def test_secrets_stay_out_of_published_spec_and_params(tiny_model_dir, data_files, isolated):
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        storage_options={"s3": {"secret": "SECRET-MARKER", "key": "KEY-MARKER"}},
    )
    result = run_in_process(spec)
    published = (isolated / "runs" / "t" / "adapter" / "spec.json").read_text()
    assert "SECRET-MARKER" not in published and "KEY-MARKER" not in published

    import mlflow

    params = (
        mlflow.MlflowClient(f"sqlite:///{isolated / 'mlruns' / 'mlflow.db'}")
        .get_run(result.run_id)
        .data.params
    )
    assert not any("MARKER" in value for value in params.values())


def test_tracking_disabled_writes_no_store(tiny_model_dir, data_files, isolated):
    result = run_in_process(
        make_spec("lora", model=tiny_model_dir, files=data_files, tracking={"enabled": False})
    )
    assert result.run_id is None
    assert not (isolated / "mlruns").exists()


def test_data_error_beyond_budget_exits_3_naming_file_and_line(tiny_model_dir, data_files, isolated):
    rows = (
        [json.dumps(ALPACA_ROWS[0])] * 5
        + ['{"instruction": "no output here"}']
        + [json.dumps(ALPACA_ROWS[1])]
    )
    bad = write_jsonl(isolated / "data" / "bad.jsonl", rows)
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"train": [str(bad)], "bad_rows": {"policy": "fail"}},
    )
    spec_path = isolated / "spec.json"
    spec_path.write_text(json.dumps(spec))
    run = ftjob("run", str(spec_path), cwd=isolated)
    assert run.returncode == 3
    assert f"{bad}:6: missing field 'output'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (isolated / "runs" / "t" / "adapter" / MANIFEST).exists()


def test_same_seed_same_run_other_seed_other_run(tiny_model_dir, data_files):
    def losses(seed):
        spec = make_spec(
            "lora",
            model=tiny_model_dir,
            files=data_files,
            adapter={"dropout": 0.1},
            train={"max_steps": 3, "seed": seed, "eval_every": 0},
        )
        return [h["train/loss"] for h in run_in_process(spec).history]

    first = losses(1)
    assert losses(1) == first
    assert losses(2) != first


def test_epoch_runs_plan_exactly_the_steps_they_take(tiny_model_dir, data_files, isolated):
    """5 rows, micro batch 4: each epoch is 2 micro-batches (4 + 1; no batch spans two epochs), so 3
    epochs are 6 steps, and the schedule reaches its end on the last one."""
    five = write_jsonl(isolated / "five.jsonl", (ALPACA_ROWS * 2)[:5])
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"train": [str(five)], "eval": []},
        train={"max_steps": None, "epochs": 3, "micro_batch_size": 4, "scheduler": "linear"},
    )
    history = run_in_process(spec).history
    assert len(history) == 6
    assert history[-1]["train/learning_rate"] == 0.0
    assert history[-1]["data/rows_read"] == 15


def test_a_packed_epoch_run_over_files_with_an_eval_split_ends_its_schedule_on_its_last_step(
    tiny_model_dir, data_files, isolated
):
    """Packing neighbours, file order and the held-out rows differ per epoch: the plan still matches."""
    files = [
        str(write_jsonl(isolated / f"part-{k}.jsonl", [dict(r, output=r["output"] * (k + i % 3)) for i, r in enumerate(ALPACA_ROWS * 3)]))
        for k in range(1, 4)
    ]  # fmt: skip
    spec = make_spec("lora", model=tiny_model_dir, files=data_files,
        data={"train": files, "eval": [], "eval_fraction": 0.2, "packing": True, "max_seq_len": 96},
        train={"max_steps": None, "epochs": 3, "micro_batch_size": 2, "grad_accum": 2, "scheduler": "linear", "eval_every": 0},
    )  # fmt: skip
    rates = [h["train/learning_rate"] for h in run_in_process(spec).history]
    assert rates[-1] == 0.0 and all(rate > 0 for rate in rates[:-1]), rates


@pytest.mark.parametrize(
    "train,expected",
    [({"max_steps": 3}, "a whole epoch gave no example"), ({"epochs": 1}, "no example to train on")],
)
def test_data_with_no_usable_example_is_exit_3_not_a_hang(
    tiny_model_dir, data_files, isolated, train, expected
):
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"max_seq_len": 4},
        train={"max_steps": None, **train},
    )
    (isolated / "spec.json").write_text(json.dumps(spec))
    run = ftjob("run", "spec.json", cwd=isolated)
    assert run.returncode == 3, run.stderr
    assert expected in run.stderr and "dropped" in run.stderr and "Traceback" not in run.stderr


def test_bad_rows_over_budget_fail_a_short_max_steps_run(tiny_model_dir, data_files, isolated):
    rows = [json.dumps(ALPACA_ROWS[0]), "{broken"] * 4
    bad = write_jsonl(isolated / "half-bad.jsonl", rows)
    spec = make_spec(
        "lora", model=tiny_model_dir, files=data_files, data={"train": [str(bad)]}, train={"max_steps": 2}
    )
    (isolated / "spec.json").write_text(json.dumps(spec))
    run = ftjob("run", "spec.json", cwd=isolated)
    assert run.returncode == 3, run.stderr
    assert "rows are bad, over data.bad_rows.max_fraction=0.01" in run.stderr
    assert not (isolated / "runs" / "t" / "adapter" / MANIFEST).exists()


def test_second_spec_entry_is_named_in_errors(tiny_model_dir, data_files, isolated, capsys):
    from job.cli import main

    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"train": [str(data_files[0]), "missing-*.jsonl"]},
    )
    (isolated / "spec.json").write_text(json.dumps(spec))
    assert main(["run", "spec.json"]) == 2
    assert "data.train[1]: no such file: missing-*.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("packing", [True, False])
def test_a_cpu_run_trains_with_the_cpu_layers(tiny_model_dir, data_files, isolated, packing, monkeypatch):
    """On a CPU: glibc keeps freed memory, LoRA's dropout drawn by gaps, the LoRA linears and the RMSNorms
    fused, and without mixed precision
    (auto, on a CPU without AMX) packed rows attended example by example (sdpa as it is for unpacked
    ones and under bf16 autocast)."""
    import helpers

    from job.model.dropout import CpuDropout
    from job.model.fused_lora import FusedLoraLinear
    from job.model.fused_norm import FusedRMSNorm
    from job.model.packed_attention import PACKED_SDPA

    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        adapter={"dropout": 0.05},
        data={"packing": packing},
        train={"max_steps": 2},
    )
    allocator_tuned = []
    monkeypatch.setattr("job.model.prepare.keep_freed_memory", lambda: allocator_tuned.append(True))
    model = train_in_process(spec).model
    assert allocator_tuned == [True]
    per_example = packing and helpers._accelerator.mixed_precision == "no"
    assert model.get_base_model().config._attn_implementation == (PACKED_SDPA if per_example else "sdpa")
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert len(layers) == 2 * 7 and all(isinstance(m.lora_dropout["default"], CpuDropout) for m in layers)
    assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == 2 * 2 + 1


@pytest.mark.parametrize(("dtype", "kept"), [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_a_quantized_bf16_model_keeps_its_other_weights_in_bf16(tiny_model_dir, data_files, dtype, kept):
    """peft casts embeddings and norms to float32 for float16's range; bfloat16 does not need it."""
    from job.model.adapter import apply_adapter
    from job.model.loading import load_model

    spec = validate_spec(
        make_spec(
            "lora",
            model={"source": str(tiny_model_dir), "quantization": "4bit", "dtype": dtype},
            files=data_files,
        )
    )
    model = load_model(tiny_model_dir, spec.model, torch.device("cpu"))
    model = apply_adapter(model, spec.adapter, quantized=True, gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == kept
    assert base.model.norm.weight.dtype == kept
    assert base.is_gradient_checkpointing
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
