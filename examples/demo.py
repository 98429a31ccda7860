"""The README's demo: fine-tune a tiny random Llama with LoRA to reverse lists of words, on the CPU.

It builds everything locally (model, tokenizer, data) under examples/build/, shows a generation
before training, runs `ftjob run examples/demo.yaml`, and shows the same generation after.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
WORDS = [
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "olive",
    "peach",
    "pear",
    "plum",
    "kiwi",
    "lime",
]
PROMPT = "Reverse the words: plum kiwi apple lemon"


def reversal_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        rows.append(
            {"instruction": "Reverse the words: " + " ".join(words), "output": " ".join(reversed(words))}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_assets() -> None:
    from job.data.formats import alpaca_prompt
    from job.model.tiny import build_tiny_model

    train, evaluation = reversal_rows(4000, seed=1), reversal_rows(64, seed=2)
    BUILD.mkdir(parents=True, exist_ok=True)
    write_jsonl(BUILD / "reverse-train.jsonl", train)
    write_jsonl(BUILD / "reverse-eval.jsonl", evaluation)
    corpus = [alpaca_prompt(r["instruction"]) + r["output"] for r in train]
    build_tiny_model(BUILD / "tiny-llama", corpus, hidden_size=128, layers=4, heads=4)


def base_generation() -> str:
    from job.data.formats import alpaca_prompt
    from job.generate import generate_text
    from job.model.loading import load_model, load_tokenizer
    from job.spec import ModelSpec
    from job.startup import quiet_libraries

    quiet_libraries()
    spec = ModelSpec(source=str(BUILD / "tiny-llama"))
    model = load_model(BUILD / "tiny-llama", spec, device=__import__("torch").device("cpu"))
    tokenizer = load_tokenizer(BUILD / "tiny-llama", spec)
    return generate_text(model.eval(), tokenizer, alpaca_prompt(PROMPT), 12, 0.0)


def ftjob(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "job", *args], check=True, stdout=subprocess.PIPE, text=True
    )
    return result.stdout


def main() -> None:
    print("== building a tiny random Llama, a local tokenizer and the word-reversal data in examples/build/")
    build_assets()
    print(f"== before training: {PROMPT!r} -> {base_generation()!r}")
    print("== ftjob run examples/demo.yaml --restart  (the demo always trains anew)")
    subprocess.run([sys.executable, "-m", "job", "run", str(HERE / "demo.yaml"), "--restart"], check=True)
    after = ftjob(
        "generate", "--adapter", "runs/reverse-demo/adapter", "--prompt", PROMPT, "--max-new-tokens", "12"
    )
    print(f"== after training:  {PROMPT!r} -> {after.strip()!r} (expected 'lemon apple kiwi plum')")
    print("== adapter: runs/reverse-demo/adapter/ (loads with peft.PeftModel.from_pretrained)")
    print("== MLflow:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")


if __name__ == "__main__":
    main()
