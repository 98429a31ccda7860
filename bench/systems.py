"""The systems the end-to-end bench compares, each run as its own fresh process.

  ftjob    its real CLI, `python -m job run spec.json`: LoRA, packing, one epoch, MLflow tracking on
           (a local store); its measures are read back from the run's metrics.jsonl and MLflow
  ftjob-qlora  the same with the base model quantized to 4 bits (bitsandbytes NF4)
  trl      TRL's SFTTrainer with its fast path: packing (best-fit decreasing, padding-free batches)
  padding  the common recipe: transformers' Trainer, every example padded to max_seq_len, no packing

Both baselines train with ftjob's settings (LoRA r16 all-linear, AdamW fused, lr 2e-4 cosine, no
warmup, clip 1.0, the same micro batch, no gradient checkpointing) and save the adapter at the end, as
ftjob publishes it; they run `python -m bench.systems SYSTEM JOB_JSON` and print one RESULT line.

Times are seconds since the epoch, so that the parent can take them from the moment it started the
process: first_step_end and last_step_end are the ends of the first and last optimizer steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.workload import LORA, MAX_SEQ_LEN

LEARNING_RATE = 2e-4


def ftjob_spec(job: dict, output: Path, experiment: str, quantized: bool = False) -> dict:
    precision = job["precision"]
    on_gpu_bf16 = job["device"] == "cuda" and precision == "bf16"
    model = {"source": job["model"], "dtype": "bfloat16" if on_gpu_bf16 else "float32"}
    return {
        "name": "bench",
        "model": model | ({"quantization": "4bit"} if quantized else {}),
        "adapter": {
            "method": "lora",
            "r": LORA["r"],
            "alpha": LORA["lora_alpha"],
            "dropout": LORA["lora_dropout"],
        },
        "data": {"train": [job["data"]], "format": "text", "max_seq_len": MAX_SEQ_LEN, "packing": True},
        "train": {
            "epochs": 1,
            "micro_batch_size": job["micro_batch"],
            "learning_rate": LEARNING_RATE,
            "mixed_precision": "bf16" if precision == "bf16" else "no",
            "gradient_checkpointing": job["gradient_checkpointing"],
        },
        "tracking": {"enabled": True, "experiment": experiment},
        "output": {"uri": str(output)},
    }


def create_tracking_store(tracking_uri: str) -> None:
    """Create the MLflow store's tables before the ftjob runs: a user creates a local store once (a
    tracking server, never), so the runs should not pay for it (about 4 s here)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).search_experiments()


def ftjob_measures(output: Path, tracking_uri: str, experiment: str, device: str) -> dict:
    """What the ftjob run reported: its metric curve (published with the adapter) and, for the step
    times, the timestamps MLflow recorded as the first and the last step's loss was logged (ftjob logs
    those two as they end; the steps between, every train.log_every steps, in groups)."""
    from mlflow.tracking import MlflowClient

    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    final = history[-1]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    points = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    peaks = [h["train/peak_memory_gib"] for h in history if "train/peak_memory_gib" in h]
    return {
        "steps": len(history),
        "real_tokens": round(final["data/packing_efficiency"] * final["data/packed_rows"] * MAX_SEQ_LEN),
        "examples": int(final["data/examples"]),
        "final_loss": final["train/loss"],
        "first_step_end": points[0].timestamp / 1000,
        "last_step_end": points[-1].timestamp / 1000,
        # the busiest GPU moment up to the last logged step (logged every train.log_every steps)
        "peak_gpu_mib": max(peaks) * 1024 if peaks and device == "cuda" else None,
    }


def run_trainer(system: str, job: dict) -> dict:
    """One epoch with TRL's SFTTrainer (trl) or transformers' Trainer on padded rows (padding)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class StepClock(TrainerCallback):
        first = last = None

        def on_step_end(self, args, state, control, **kwargs):
            if job["device"] == "cuda" and state.global_step in (1, state.max_steps):
                torch.cuda.synchronize()  # the step's work done, as ftjob's loss read is
            self.last = time.time()
            self.first = self.first or self.last

    on_gpu_bf16 = job["device"] == "cuda" and job["precision"] == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.bfloat16 if on_gpu_bf16 else torch.float32, attn_implementation="sdpa"
    )
    dataset = load_dataset("json", data_files=job["data"], split="train")
    lora = LoraConfig(**LORA, task_type="CAUSAL_LM")
    clock = StepClock()
    settings = {
        "output_dir": job["output"],
        "num_train_epochs": 1,
        "per_device_train_batch_size": job["micro_batch"],
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch_fused",
        "bf16": job["precision"] == "bf16",
        "gradient_checkpointing": job["gradient_checkpointing"],  # SFTConfig's default is on, ftjob's off
        "logging_steps": 1,  # the last step's own loss
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": job["device"] == "cpu",
        "seed": 42,
    }
    if system == "trl":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**settings, packing=True, max_length=MAX_SEQ_LEN)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[clock],
        )
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        real_tokens, examples = sum(lengths), sum(len(s) for s in trainer.train_dataset["seq_lengths"])
    else:
        from peft import get_peft_model
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        def tokenize(row):
            text = row["text"] + tokenizer.eos_token
            return tokenizer(text, padding="max_length", truncation=True, max_length=MAX_SEQ_LEN)

        padded = dataset.map(tokenize, remove_columns=["text"])
        trainer = Trainer(
            model=get_peft_model(model, lora),
            args=TrainingArguments(**settings),
            train_dataset=padded,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[clock],
        )
        real_tokens, examples = sum(sum(mask) for mask in padded["attention_mask"]), len(padded)
    trainer.train()
    trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "real_tokens": real_tokens,
        "examples": examples,
        "final_loss": losses[-1],
        "first_step_end": clock.first,
        "last_step_end": clock.last,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if job["device"] == "cuda" else None,
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(run_trainer(sys.argv[1], json.loads(sys.argv[2]))))
